#include "cpu/error_probe.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/block_scores.hpp"
#include "cpu/vector_ops.hpp"

namespace svgear::cpu {

std::vector<float> mean_probe_queries(const float* qp, const ClusterLayout& queries, std::int64_t d, DType dtype) {
  return probe_queries_from_means(cluster_means(qp, queries.offsets, d), dtype);
}

std::vector<float> probe_queries_from_means(std::vector<float> means, DType dtype) {
  for (float& x : means) x = round_to_dtype(x, dtype);
  return means;
}

namespace {

// rows [n][d] -> [n][k]: x -> R x with the value sketch's R.
std::vector<float> sketch_rows(const float* rows, std::int64_t n, std::int64_t d, int k) {
  std::vector<float> signs(std::size_t(k) * std::size_t(d));
  const float unit = float(1.0 / std::sqrt(double(k)));
  for (int r = 0; r < k; ++r)
    for (std::int64_t c = 0; c < d; ++c) signs[std::size_t(r * d + c)] = value_sketch_positive(r, c) ? unit : -unit;
  std::vector<float> out(std::size_t(n) * std::size_t(k));
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    for (int r = 0; r < k; ++r) out[std::size_t(i * k + r)] = float(dot(&signs[std::size_t(r * d)], rows + i * d, d));
  }
  return out;
}

}  // namespace

std::vector<double> probe_compensation_error(const float* qp, const float* kp, const float* vp,
                                             std::int64_t d, const ClusterLayout& queries,
                                             const ClusterLayout& keys,
                                             const KeyClusterSummary& given_summary, const ProbeRows& rows,
                                             int value_sketch_dims) {
  // Keys keep all d dimensions; values (and their means) are dv wide, sketched where asked.
  std::vector<float> sketched_values, sketched_means;
  KeyClusterSummary summary = given_summary;
  std::int64_t dv = d;
  if (value_sketch_on(value_sketch_dims, d)) {
    dv = value_sketch_dims;
    sketched_values = sketch_rows(vp, std::int64_t(keys.order.size()), d, value_sketch_dims);
    sketched_means = sketch_rows(given_summary.value_means, keys.clusters(), d, value_sketch_dims);
    vp = sketched_values.data();
    summary.value_means = sketched_means.data();
  }
  const int cq = queries.clusters();
  const int ck = keys.clusters();
  const std::int64_t sk = std::int64_t(keys.order.size());
  const double scale_factor = 1.0 / std::sqrt(double(d));
  std::vector<double> error(std::size_t(cq) * std::size_t(ck), 0.0);

#pragma omp parallel
  {
    std::vector<double> logits(static_cast<std::size_t>(sk));
    std::vector<double> centroid_logits(static_cast<std::size_t>(ck));
    std::vector<double> block_mass(static_cast<std::size_t>(ck));                        // d_j
    std::vector<double> block_sum(std::size_t(ck) * std::size_t(dv));  // a_j
    std::vector<double> total_sum(static_cast<std::size_t>(dv)), exact(static_cast<std::size_t>(dv));
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < cq; ++i) {
      const std::int64_t size = queries.size(i);
      if (size == 0) continue;
      const std::int64_t sampled = std::min<std::int64_t>(rows.sampled_per_cluster, size);
      const std::int64_t probes = sampled + (rows.cluster_queries != nullptr ? 1 : 0);
      double* row_error = &error[std::size_t(i) * std::size_t(ck)];
      for (std::int64_t p = 0; p < probes; ++p) {
        const float* query =
            p < sampled ? qp + (queries.offsets[std::size_t(i)] + (2 * p + 1) * size / (2 * sampled)) * d
                        : rows.cluster_queries + std::int64_t(i) * d;
        double row_max = -std::numeric_limits<double>::infinity();
        for (std::int64_t key = 0; key < sk; ++key) {
          logits[std::size_t(key)] = double(dot(query, kp + key * d, d)) * scale_factor;
          row_max = std::max(row_max, logits[std::size_t(key)]);
        }
        for (int j = 0; j < ck; ++j) {
          if (summary.counts[j] == 0) continue;
          centroid_logits[std::size_t(j)] =
              double(dot(query, summary.key_means + std::int64_t(j) * d, d)) * scale_factor +
              std::log(double(summary.counts[j]));
          row_max = std::max(row_max, centroid_logits[std::size_t(j)]);
        }
        std::fill(block_sum.begin(), block_sum.end(), 0.0);
        std::fill(total_sum.begin(), total_sum.end(), 0.0);
        double total_mass = 0;
        for (int j = 0; j < ck; ++j) {
          double mass = 0;
          double* sum = &block_sum[std::size_t(j) * std::size_t(dv)];
          for (std::int64_t key = keys.offsets[std::size_t(j)]; key < keys.offsets[std::size_t(j) + 1]; ++key) {
            const double w = std::exp(logits[std::size_t(key)] - row_max);
            mass += w;
            axpy(sum, w, vp + key * dv, dv);
          }
          block_mass[std::size_t(j)] = mass;
          total_mass += mass;
          for (std::int64_t t = 0; t < dv; ++t) total_sum[std::size_t(t)] += sum[t];
        }
        for (std::int64_t t = 0; t < dv; ++t) exact[std::size_t(t)] = total_sum[std::size_t(t)] / total_mass;
        for (int j = 0; j < ck; ++j) {
          if (summary.counts[j] == 0) continue;
          const double stand_in_mass = std::exp(centroid_logits[std::size_t(j)] - row_max);
          const double mass = total_mass - block_mass[std::size_t(j)] + stand_in_mass;
          const double* sum = &block_sum[std::size_t(j) * std::size_t(dv)];
          const float* value_mean = summary.value_means + std::int64_t(j) * dv;
          double squared = 0;
          for (std::int64_t t = 0; t < dv; ++t) {
            const double compensated =
                (total_sum[std::size_t(t)] - sum[t] + stand_in_mass * double(value_mean[t])) / mass;
            const double diff = compensated - exact[std::size_t(t)];
            squared += diff * diff;
          }
          row_error[j] += squared;
        }
      }
      // Mean over probes, times the queries the block's error reaches.
      const double weight = double(size) / double(probes);
      for (int j = 0; j < ck; ++j) row_error[j] *= weight;
    }
  }
  return error;
}

}  // namespace svgear::cpu
