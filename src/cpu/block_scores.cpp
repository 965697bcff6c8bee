#include "cpu/block_scores.hpp"

#include <cmath>
#include <limits>

#include "cpu/vector_ops.hpp"

namespace svgear::cpu {

std::vector<double> centroid_criticality(const float* q_centroids, const float* k_centroids,
                                         const BlockGrid& grid, std::int64_t d) {
  const int cq = grid.query_clusters();
  const int ck = grid.key_clusters();
  const double scale_factor = 1.0 / std::sqrt(double(d));
  std::vector<double> criticality(std::size_t(cq) * std::size_t(ck), 0.0);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < cq; ++i) {
    double* row = &criticality[grid.index(i, 0)];
    double row_max = -std::numeric_limits<double>::infinity();
    for (int j = 0; j < ck; ++j) {
      if (grid.k_sizes[std::size_t(j)] == 0) continue;
      // log(n_j) + s_ij: the mass of n_j keys at the centroid score, kept in log space.
      row[j] = std::log(double(grid.k_sizes[std::size_t(j)])) +
               double(dot(q_centroids + std::int64_t(i) * d, k_centroids + std::int64_t(j) * d, d)) *
                   scale_factor;
      row_max = std::max(row_max, row[j]);
    }
    double total = 0;
    for (int j = 0; j < ck; ++j) {
      row[j] = grid.k_sizes[std::size_t(j)] == 0 ? 0.0 : std::exp(row[j] - row_max);
      total += row[j];
    }
    for (int j = 0; j < ck; ++j) row[j] /= total;
  }
  return criticality;
}

std::vector<float> cluster_means(const float* rows, const std::vector<std::int64_t>& offsets,
                                 std::int64_t d) {
  const int clusters = int(offsets.size()) - 1;
  std::vector<float> means(std::size_t(clusters) * std::size_t(d), 0.0f);
  std::vector<double> sum(static_cast<std::size_t>(d));
  for (int c = 0; c < clusters; ++c) {
    const std::int64_t begin = offsets[std::size_t(c)], end = offsets[std::size_t(c) + 1];
    if (end == begin) continue;
    std::fill(sum.begin(), sum.end(), 0.0);
    for (std::int64_t r = begin; r < end; ++r) axpy(sum.data(), 1.0, rows + r * d, d);
    for (std::int64_t j = 0; j < d; ++j) {
      means[std::size_t(c) * std::size_t(d) + std::size_t(j)] = float(sum[std::size_t(j)] / double(end - begin));
    }
  }
  return means;
}

}  // namespace svgear::cpu
