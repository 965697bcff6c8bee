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
#include "svgear/error.hpp"
#ifdef SVGEAR_HAS_CUDA
#include "cuda/attention_cuda.hpp"
#endif

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

// One (batch, head) of the [B, H, Sq, 1] log-sum-exp output (F32, validated).
void store_lse_head(const std::vector<float>& rows, const TensorView& lse, std::int64_t b, std::int64_t h) {
  for (std::int64_t s = 0; s < lse.tokens(); ++s) {
    store_from_float(lse.data, DType::f32, lse.offset(b, h, s, 0), rows[std::size_t(s)]);
  }
}

// The cached centroids of the state, if they fit this call's shape.
bool state_matches(const LayerState* state, const std::array<std::int64_t, 5>& signature) {
  return state != nullptr && state->has_centroids() && state->signature == signature;
}

}  // namespace

void synchronize(LayerState& state) {
#ifdef SVGEAR_HAS_CUDA
  cuda::synchronize(state);
#else
  (void)state;  // only the CUDA path defers anything
#endif
}

void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView* lse) {
  validate_attention_inputs(q, k, v, out, preset(Method::dense), lse);
  if (q.device != Device::cpu) {
    throw Error("svgear::dense_attention is the CPU reference: pass CPU tensors "
                "(for CUDA tensors call svgear::attention with preset(Method::dense))");
  }
  require_finite(q, "q");
  require_finite(k, "k");
  require_finite(v, "v");
  std::vector<float> head_out(std::size_t(q.tokens() * q.head_dim()));
  std::vector<float> head_lse(lse != nullptr ? std::size_t(q.tokens()) : 0);
  for (std::int64_t b = 0; b < q.batch(); ++b) {
    for (std::int64_t h = 0; h < q.heads(); ++h) {
      const std::vector<float> qh = load_head(q, b, h), kh = load_head(k, b, h), vh = load_head(v, b, h);
      cpu::dense_attention_head(qh.data(), kh.data(), vh.data(), q.tokens(), k.tokens(), q.head_dim(),
                                head_out.data(), lse != nullptr ? head_lse.data() : nullptr);
      store_head(head_out, out, b, h);
      if (lse != nullptr) store_lse_head(head_lse, *lse, b, h);
    }
  }
}

namespace {

// What the score stage leaves for one (batch, head): everything selection and attention read.
struct HeadPlan {
  std::vector<float> qp, kp, vp;  // rows in cluster order
  cpu::ClusterLayout q_layout, k_layout;
  std::vector<float> key_means, value_means;
  BlockStatistics stats;
};

std::vector<BlockSelection> select_blocks(const std::vector<HeadPlan>& plans, const SelectionPolicy& policy,
                                          const MethodConfig& config) {
  std::vector<BlockSelection> selections;
  if (config.top_p) {  // SVG2's own mode: per query cluster, no shared budget
    for (const HeadPlan& plan : plans) {
      selections.push_back(take_blocks_by_top_p(plan.stats.grid, plan.stats.criticality, *config.top_p,
                                                config.min_key_fraction));
    }
    return selections;
  }
  SelectionBudget budget;
  budget.density = config.policy == SelectionPolicyKind::all_blocks ? 1.0 : config.density;
  budget.every_query_cluster_needs_a_block = config.compensation == Compensation::drop;
  std::vector<BlockGrid> grids;
  std::vector<std::vector<double>> priorities;
  for (const HeadPlan& plan : plans) {
    grids.push_back(plan.stats.grid);
    priorities.push_back(policy.block_priority(plan.stats));
  }
  if (config.budget_scope == BudgetScope::call) return take_blocks_by_priority(grids, priorities, budget);
  for (std::size_t head = 0; head < plans.size(); ++head) {
    selections.push_back(take_blocks_by_priority(grids[head], priorities[head], budget));
  }
  return selections;
}

}  // namespace

AttentionReport attention(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const MethodConfig& config, LayerState* state, void* stream,
                          const TensorView* lse) {
  if (state != nullptr) synchronize(*state);  // an earlier asynchronous call's error comes first
  if (q.device == Device::cuda) {
#ifdef SVGEAR_HAS_CUDA
    return cuda::attention(q, k, v, out, config, state, stream, nullptr, lse);
#else
    (void)stream;
    throw Error("tensor 'q' is on a CUDA device, but this build of svgear has only the CPU path: "
                "move the tensors to the CPU or build with CUDA (SVGEAR_CUDA=ON)");
#endif
  }
  const auto start = Clock::now();
  AttentionReport report;
  if (config.policy == SelectionPolicyKind::all_blocks && config.compensation == Compensation::drop) {
    dense_attention(q, k, v, out, lse);
    report.exact_pairs = q.batch() * q.heads() * q.tokens() * k.tokens();
    report.times.attend_ms = report.times.total_ms = elapsed_ms(start);
    return report;
  }
  validate_attention_inputs(q, k, v, out, config, lse);
  require_finite(q, "q");
  require_finite(k, "k");
  require_finite(v, "v");
  report.times.check_ms = elapsed_ms(start);

  const std::int64_t d = q.head_dim(), sq = q.tokens(), sk = k.tokens();
  const int cq = config.clusters_q, ck = config.clusters_k;
  const std::array<std::int64_t, 5> signature{q.batch(), q.heads(), d, cq, ck};
  report.warm_started = state_matches(state, signature);
  std::vector<float> next_q_centroids, next_k_centroids;
  const std::unique_ptr<SelectionPolicy> policy = make_selection_policy(config.policy);

  // Cluster, permute and score every head first: a call-wide budget needs all block statistics.
  std::vector<HeadPlan> plans(std::size_t(q.batch() * q.heads()));
  for (std::int64_t b = 0; b < q.batch(); ++b) {
    for (std::int64_t h = 0; h < q.heads(); ++h) {
      const std::size_t head = std::size_t(b * q.heads() + h);
      HeadPlan& plan = plans[head];
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
      options.alignment.tail_limit = config.query_tail_limit;
      const cpu::KmeansResult q_clusters = cpu::kmeans(
          qh.data(), sq, d, options,
          report.warm_started ? &state->q_centroids[head * std::size_t(cq * d)] : nullptr);
      options.clusters = ck;
      options.alignment.tail_limit = 0;  // key clusters have no tiles of their own
      options.seed = ~(config.seed + head);
      const cpu::KmeansResult k_clusters = cpu::kmeans(
          kh.data(), sk, d, options,
          report.warm_started ? &state->k_centroids[head * std::size_t(ck * d)] : nullptr);
      next_q_centroids.insert(next_q_centroids.end(), q_clusters.centroids.begin(), q_clusters.centroids.end());
      next_k_centroids.insert(next_k_centroids.end(), k_clusters.centroids.begin(), k_clusters.centroids.end());
      report.times.cluster_ms += elapsed_ms(stage);

      stage = Clock::now();
      plan.q_layout = cpu::cluster_layout(q_clusters.labels, cq);
      plan.k_layout = cpu::cluster_layout(k_clusters.labels, ck);
      plan.qp.resize(qh.size());
      plan.kp.resize(kh.size());
      plan.vp.resize(vh.size());
      cpu::gather_rows(qh.data(), d, plan.q_layout, plan.qp.data());
      cpu::gather_rows(kh.data(), d, plan.k_layout, plan.kp.data());
      cpu::gather_rows(vh.data(), d, plan.k_layout, plan.vp.data());
      report.times.permute_ms += elapsed_ms(stage);

      // Score: centroid criticality for every policy; the EAR probe only where asked.
      stage = Clock::now();
      BlockStatistics& stats = plan.stats;
      for (int i = 0; i < cq; ++i) stats.grid.q_sizes.push_back(plan.q_layout.size(i));
      for (int j = 0; j < ck; ++j) stats.grid.k_sizes.push_back(plan.k_layout.size(j));
      plan.key_means = cpu::cluster_means(plan.kp.data(), plan.k_layout.offsets, d);
      plan.value_means = cpu::cluster_means(plan.vp.data(), plan.k_layout.offsets, d);
      stats.criticality = cpu::centroid_criticality(q_clusters.centroids.data(), plan.key_means.data(), stats.grid, d);
      if (policy->needs_error_probe()) {
        const cpu::KeyClusterSummary summary{plan.key_means.data(), plan.value_means.data(), stats.grid.k_sizes.data()};
        std::vector<float> mean_queries;
        // Q's final centroids are the means of exactly these clusters (k-means ends with an update),
        // as the CUDA pipeline takes them: no second pass over the queries.
        if (config.probe_mean) mean_queries = cpu::probe_queries_from_means(q_clusters.centroids, q.dtype);
        const cpu::ProbeRows rows{config.probe_queries, config.probe_mean ? mean_queries.data() : nullptr};
        stats.compensation_error = cpu::probe_compensation_error(plan.qp.data(), plan.kp.data(), plan.vp.data(), d,
                                                                 plan.q_layout, plan.k_layout, summary, rows,
                                                                 config.probe_value_dims);
      }
      report.times.score_ms += elapsed_ms(stage);
    }
  }

  auto stage = Clock::now();
  const std::vector<BlockSelection> selections = select_blocks(plans, *policy, config);
  report.times.select_ms += elapsed_ms(stage);

  std::vector<float> out_permuted(static_cast<std::size_t>(sq * d)), head_out(static_cast<std::size_t>(sq * d));
  std::vector<float> lse_permuted(lse != nullptr ? std::size_t(sq) : 0), head_lse(lse_permuted.size());
  for (std::int64_t b = 0; b < q.batch(); ++b) {
    for (std::int64_t h = 0; h < q.heads(); ++h) {
      const std::size_t head = std::size_t(b * q.heads() + h);
      const HeadPlan& plan = plans[head];
      const BlockSelection& selection = selections[head];
      report.exact_pairs += selection.exact_pairs;
      report.selected_blocks += selection.selected_blocks;
      report.total_blocks += std::int64_t(cq) * ck;

      stage = Clock::now();
      const cpu::KeyClusterSummary summary{plan.key_means.data(), plan.value_means.data(), plan.stats.grid.k_sizes.data()};
      cpu::block_sparse_attention(plan.qp.data(), plan.kp.data(), plan.vp.data(), d, plan.q_layout, plan.k_layout,
                                  selection, config.compensation == Compensation::centroid ? &summary : nullptr,
                                  out_permuted.data(), lse != nullptr ? lse_permuted.data() : nullptr);
      report.times.attend_ms += elapsed_ms(stage);

      stage = Clock::now();
      cpu::scatter_rows(out_permuted.data(), d, plan.q_layout, head_out.data());
      store_head(head_out, out, b, h);
      if (lse != nullptr) {
        cpu::scatter_rows(lse_permuted.data(), 1, plan.q_layout, head_lse.data());
        store_lse_head(head_lse, *lse, b, h);
      }
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
