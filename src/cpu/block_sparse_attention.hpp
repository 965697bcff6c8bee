// Attention over variable-size cluster blocks: exact selected blocks, and (optionally) every
// skipped key cluster folded into the same online softmax as its centroid (SVG-EAR's
// parameter-free linear compensation, ALGORITHMS.md "SVG-EAR" 1).
#pragma once

#include <cstdint>

#include "core/blocks.hpp"
#include "cpu/permutation.hpp"

namespace svgear::cpu {

// Per key cluster j: the mean key mu^K_j, the mean value vbar_j and the count n^K_j. A
// compensated cluster enters the softmax as one pseudo-key with logit q.mu/sqrt(d) + ln n and
// value vbar: n copies of (mu, vbar), exact when the cluster's keys are identical.
struct KeyClusterSummary {
  const float* key_means = nullptr;    // [C_k][d]
  const float* value_means = nullptr;  // [C_k][d]
  const std::int64_t* counts = nullptr;
};

// qp: queries in query-cluster order; kp, vp: keys and values in key-cluster order; out: [sq][d]
// in query-cluster order. `compensation` null means skipped blocks are dropped; then every
// query cluster must have at least one selected non-empty block (the policies guarantee it).
// lse (optional, [sq] in query-cluster order): each row's ln of its softmax denominator, over
// the same terms: exact logits q.k/sqrt(d) and compensated ones q.mu/sqrt(d) + ln n.
void block_sparse_attention(const float* qp, const float* kp, const float* vp, std::int64_t d,
                            const ClusterLayout& queries, const ClusterLayout& keys,
                            const BlockSelection& selection,
                            const KeyClusterSummary* compensation, float* out, float* lse = nullptr);

}  // namespace svgear::cpu
