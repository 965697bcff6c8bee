// Centroid scores: the cheap estimate of where attention mass goes, used by SVG2's policy.
#pragma once

#include <cstdint>
#include <vector>

#include "core/blocks.hpp"

namespace svgear::cpu {

// P_ij = n^K_j exp(s_ij) / sum_j' n^K_j' exp(s_ij'), s_ij = mu^Q_i . mu^K_j / sqrt(d).
// Empty key clusters get 0. Returns [C_q * C_k].
std::vector<double> centroid_criticality(const float* q_centroids, const float* k_centroids,
                                         const BlockGrid& grid, std::int64_t d);

// Mean of the rows of each cluster block of `rows` (already in cluster order): [C][d].
// Empty clusters get zeros (they are never used: their count is 0).
std::vector<float> cluster_means(const float* rows, const std::vector<std::int64_t>& offsets,
                                 std::int64_t d);

}  // namespace svgear::cpu
