// The attention pipeline: cluster -> permute -> score -> select -> attend (+ compensate) ->
// un-permute, per (batch, head). Each stage is a CPU function with the signature its CUDA twin
// will have; this file only chains them, times them and keeps the per-layer state.
#include <chrono>
#include <cstring>
#include <vector>

#include "core/blocks.hpp"
#include "core/validation.hpp"
#include "cpu/block_scores.hpp"
#include "cpu/block_sparse_attention.hpp"
#include "cpu/dense_attention.hpp"
#include "cpu/error_probe.hpp"
#include "cpu/kmeans.hpp"
#include "cpu/permutation.hpp"
#include "policy/selection_policy.hpp"
#include "svgear/attention.hpp"

namespace svgear {

namespace {

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

// One (batch, head) of a strided view, as contiguous float rows.
std::vector<float> load_head(const TensorView& t, std::int64_t b, std::int64_t h) {
  std::vector<float> rows(std::size_t(t.tokens() * t.head_dim()));
  for (std::int64_t s = 0; s < t.tokens(); ++s)
    for (std::int64_t d = 0; d < t.head_dim(); ++d)
      rows[std::size_t(s * t.head_dim() + d)] = load_as_float(t.data, t.dtype, t.offset(b, h, s, d));
  return rows;
}

void store_head(const std::vector<float>& rows, const TensorView& t, std::int64_t b, std::int64_t h) {
  for (std::int64_t s = 0; s < t.tokens(); ++s)
    for (std::int64_t d = 0; d < t.head_dim(); ++d)
      store_from_float(t.data, t.dtype, t.offset(b, h, s, d), rows[std::size_t(s * t.head_dim() + d)]);
}

// The cached centroids of the state, if they fit this call's shape.
bool state_matches(const LayerState* state, const std::array<std::int64_t, 5>& signature) {
  return state != nullptr && state->has_centroids() && state->signature == signature;
}

}  // namespace

void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out) {
  validate_attention_inputs(q, k, v, out, preset(Method::dense));
  require_finite(q, "q");
  require_finite(k, "k");
  require_finite(v, "v");
  std::vector<float> head_out(std::size_t(q.tokens() * q.head_dim()));
  for (std::int64_t b = 0; b < q.batch(); ++b) {
    for (std::int64_t h = 0; h < q.heads(); ++h) {
      const std::vector<float> qh = load_head(q, b, h), kh = load_head(k, b, h), vh = load_head(v, b, h);
      cpu::dense_attention_head(qh.data(), kh.data(), vh.data(), q.tokens(), k.tokens(), q.head_dim(),
                                head_out.data());
      store_head(head_out, out, b, h);
    }
  }
}

AttentionReport attention(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const MethodConfig& config, LayerState* state) {
  const auto start = Clock::now();
  AttentionReport report;
  if (config.policy == SelectionPolicyKind::all_blocks && config.compensation == Compensation::drop) {
    dense_attention(q, k, v, out);
    report.exact_pairs = q.batch() * q.heads() * q.tokens() * k.tokens();
    report.times.attend_ms = report.times.total_ms = elapsed_ms(start);
    return report;
  }
  validate_attention_inputs(q, k, v, out, config);
  require_finite(q, "q");
  require_finite(k, "k");
  require_finite(v, "v");

  const std::int64_t d = q.head_dim(), sq = q.tokens(), sk = k.tokens();
  const int cq = config.clusters_q, ck = config.clusters_k;
  const std::array<std::int64_t, 5> signature{q.batch(), q.heads(), d, cq, ck};
  report.warm_started = state_matches(state, signature);
  std::vector<float> next_q_centroids, next_k_centroids;
  const std::unique_ptr<SelectionPolicy> policy = make_selection_policy(config.policy);
  SelectionBudget budget;
  budget.density = config.density;
  budget.top_p = config.top_p;
  budget.min_key_fraction = config.min_key_fraction;
  budget.every_query_cluster_needs_a_block = config.compensation == Compensation::drop;

  std::vector<float> qp(static_cast<std::size_t>(sq * d)), kp(std::size_t(sk * d)), vp(static_cast<std::size_t>(sk * d));
  std::vector<float> out_permuted(static_cast<std::size_t>(sq * d)), head_out(static_cast<std::size_t>(sq * d));
  for (std::int64_t b = 0; b < q.batch(); ++b) {
    for (std::int64_t h = 0; h < q.heads(); ++h) {
      const std::size_t head = std::size_t(b * q.heads() + h);
      auto stage = Clock::now();
      const std::vector<float> qh = load_head(q, b, h), kh = load_head(k, b, h), vh = load_head(v, b, h);
      report.times.permute_ms += elapsed_ms(stage);

      // Cluster: warm start from the last step's centroids when the state has them.
      stage = Clock::now();
      cpu::KmeansOptions options;
      options.init = config.kmeans_init;
      options.seed = config.seed + head;
      options.iterations = report.warm_started ? config.kmeans_warm_iterations : config.kmeans_iterations;
      options.clusters = cq;
      const cpu::KmeansResult q_clusters = cpu::kmeans(
          qh.data(), sq, d, options,
          report.warm_started ? &state->q_centroids[head * std::size_t(cq * d)] : nullptr);
      options.clusters = ck;
      options.seed = ~(config.seed + head);
      const cpu::KmeansResult k_clusters = cpu::kmeans(
          kh.data(), sk, d, options,
          report.warm_started ? &state->k_centroids[head * std::size_t(ck * d)] : nullptr);
      next_q_centroids.insert(next_q_centroids.end(), q_clusters.centroids.begin(), q_clusters.centroids.end());
      next_k_centroids.insert(next_k_centroids.end(), k_clusters.centroids.begin(), k_clusters.centroids.end());
      report.times.cluster_ms += elapsed_ms(stage);

      stage = Clock::now();
      const cpu::ClusterLayout q_layout = cpu::cluster_layout(q_clusters.labels, cq);
      const cpu::ClusterLayout k_layout = cpu::cluster_layout(k_clusters.labels, ck);
      cpu::gather_rows(qh.data(), d, q_layout, qp.data());
      cpu::gather_rows(kh.data(), d, k_layout, kp.data());
      cpu::gather_rows(vh.data(), d, k_layout, vp.data());
      report.times.permute_ms += elapsed_ms(stage);

      // Score: centroid criticality for every policy; the EAR probe only where asked.
      stage = Clock::now();
      BlockStatistics stats;
      for (int i = 0; i < cq; ++i) stats.grid.q_sizes.push_back(q_layout.size(i));
      for (int j = 0; j < ck; ++j) stats.grid.k_sizes.push_back(k_layout.size(j));
      const std::vector<float> key_means = cpu::cluster_means(kp.data(), k_layout.offsets, d);
      const std::vector<float> value_means = cpu::cluster_means(vp.data(), k_layout.offsets, d);
      const cpu::KeyClusterSummary summary{key_means.data(), value_means.data(), stats.grid.k_sizes.data()};
      stats.criticality = cpu::centroid_criticality(q_clusters.centroids.data(), key_means.data(), stats.grid, d);
      if (policy->needs_error_probe()) {
        stats.compensation_error = cpu::probe_compensation_error(qp.data(), kp.data(), vp.data(), d, q_layout,
                                                                 k_layout, summary, config.probe_queries);
      }
      report.times.score_ms += elapsed_ms(stage);

      stage = Clock::now();
      const BlockSelection selection = policy->select(stats, budget);
      report.exact_pairs += selection.exact_pairs;
      report.selected_blocks += selection.selected_blocks;
      report.total_blocks += std::int64_t(cq) * ck;
      report.times.select_ms += elapsed_ms(stage);

      stage = Clock::now();
      cpu::block_sparse_attention(qp.data(), kp.data(), vp.data(), d, q_layout, k_layout, selection,
                                  config.compensation == Compensation::centroid ? &summary : nullptr,
                                  out_permuted.data());
      report.times.attend_ms += elapsed_ms(stage);

      stage = Clock::now();
      cpu::scatter_rows(out_permuted.data(), d, q_layout, head_out.data());
      store_head(head_out, out, b, h);
      report.times.permute_ms += elapsed_ms(stage);
    }
  }
  report.density = double(report.exact_pairs) / (double(q.batch() * q.heads()) * double(sq) * double(sk));
  if (state != nullptr) {
    state->signature = signature;
    state->q_centroids = std::move(next_q_centroids);
    state->k_centroids = std::move(next_k_centroids);
    ++state->steps;
  }
  report.times.total_ms = elapsed_ms(start);
  return report;
}

}  // namespace svgear
