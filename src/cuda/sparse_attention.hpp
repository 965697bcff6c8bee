// The GPU attention kernel's interface: FlashAttention-style online softmax over the selected
// (query-cluster, key-cluster) blocks of variable size, with the centroid compensation of every
// skipped key cluster folded into the same softmax. Queries, keys and values are read through
// the cluster permutation (no permuted copies), and the output is written back to each query's
// original position, so the pipeline needs no separate gather/scatter passes.
//
// Plain C++ header (no CUDA types beyond an opaque stream) so host code and tests include it.
#pragma once

#include <cstdint>

#include "svgear/dtype.hpp"

namespace svgear::cuda {

// One [B, H, S, D] device tensor with a contiguous last axis (strides in elements).
struct DeviceTensor {
  const void* data = nullptr;
  std::int64_t stride_b = 0, stride_h = 0, stride_s = 0;
};

struct SparseAttentionProblem {
  DType dtype = DType::bf16;  // of q, k, v and out: bf16 or f16
  int batch = 0, heads = 0;
  std::int64_t sq = 0, sk = 0;
  int head_dim = 0;  // 64 or 128
  DeviceTensor q, k, v;
  DeviceTensor out;  // written (data is cast to non-const)

  // Cluster layouts, per (b, h) = bh = b * heads + h. A null order means the identity.
  int query_clusters = 1, key_clusters = 1;
  const std::int32_t* q_order = nullptr;    // [BH][sq]: permuted position -> original query index
  const std::int32_t* q_offsets = nullptr;  // [BH][query_clusters + 1], q_offsets[bh][0] == 0
  const std::int32_t* k_order = nullptr;    // [BH][sk]
  const std::int32_t* k_offsets = nullptr;  // [BH][key_clusters + 1]

  // Exactly computed key clusters of each (bh, query cluster i), CSR over row r = bh * Cq + i:
  // selected_clusters[selected_offsets[r] .. selected_offsets[r + 1]) in any order.
  const std::int32_t* selected_offsets = nullptr;  // [BH * Cq + 1]
  const std::int32_t* selected_clusters = nullptr;

  // Compensation: null compensated_offsets means skipped blocks are dropped. Otherwise the
  // compensated key clusters of row r (non-empty, not selected) are listed like the selected
  // ones, and each enters the softmax as one pseudo-key: logit q.mu_j / sqrt(D) + ln n_j,
  // value vbar_j.
  const std::int32_t* compensated_offsets = nullptr;  // [BH * Cq + 1]
  const std::int32_t* compensated_clusters = nullptr;
  const float* key_means = nullptr;    // [BH][Ck][D]
  const float* value_means = nullptr;  // [BH][Ck][D]
  const std::int32_t* key_counts = nullptr;  // [BH][Ck]

  // Work list: one entry per (bh, query cluster, tile of up to kQueryTile permuted queries),
  // built on the device by build_query_tiles. Filled in by the pipeline.
  const std::int32_t* tiles = nullptr;  // [tile_count][3]: bh, query cluster, first permuted row
  std::int64_t tile_count = 0;
};

// Rows of queries one CTA handles.
inline constexpr int kQueryTile = 64;

// Throws svgear::Error on unsupported dtype/head_dim; checks the launch.
void sparse_attention(const SparseAttentionProblem& problem, void* stream);

}  // namespace svgear::cuda
