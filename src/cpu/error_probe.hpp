// SVG-EAR's probe (ALGORITHMS.md "SVG-EAR" 2): for a few sampled queries of each query
// cluster, compare the exact contribution of every key cluster with its centroid stand-in.
#pragma once

#include <cstdint>
#include <vector>

#include "core/blocks.hpp"
#include "core/value_sketch.hpp"
#include "cpu/block_sparse_attention.hpp"
#include "cpu/permutation.hpp"
#include "svgear/dtype.hpp"

namespace svgear::cpu {

// The probe rows of each query cluster.
struct ProbeRows {
  // Members at evenly spaced positions of the cluster (all members when it is smaller):
  // deterministic, no seed needed.
  int sampled_per_cluster = 4;
  // [C_q][d]: one more row per non-empty cluster, the given vector (the cluster's mean query),
  // or nullptr for none.
  const float* cluster_queries = nullptr;
};

// The mean-query probe rows [C_q][d]: each query cluster's mean of qp (queries in cluster order),
// rounded to `dtype`, as a 16-bit GPU path holds it (the CUDA probe builds the same vectors).
std::vector<float> mean_probe_queries(const float* qp, const ClusterLayout& queries, std::int64_t d, DType dtype);

// The same rows from means already at hand (the pipeline's: Q's final k-means centroids, the means
// of exactly the final clusters), rounded to `dtype`.
std::vector<float> probe_queries_from_means(std::vector<float> means, DType dtype);

// Returns [C_q * C_k]: for block (i, j), n^Q_i times the mean over the probe rows q of cluster i
// of ||o_j'(q) - o(q)||^2, where o is q's exact output and o_j' its output with only key cluster
// j replaced by (n_j, mu_j, vbar_j). Squared errors because the quality metric is the L2 norm
// of the whole output and errors of different blocks are treated as uncorrelated, so they add.
//
// value_sketch_dims > 0 (a multiple of 16 below d): the errors are measured on values sketched to
// that many dimensions, v -> R v with R[r][c] = +-1/sqrt(k) (value_sketch_positive), an unbiased
// estimate of the squared norm (E[R^T R] = I) at a fraction of the value work.
std::vector<double> probe_compensation_error(const float* qp, const float* kp, const float* vp,
                                             std::int64_t d, const ClusterLayout& queries,
                                             const ClusterLayout& keys,
                                             const KeyClusterSummary& summary, const ProbeRows& rows,
                                             int value_sketch_dims = 0);

}  // namespace svgear::cpu
