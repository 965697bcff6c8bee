// The GPU attention kernel's interface: FlashAttention-style online softmax over the selected
// (query-cluster, key-cluster) blocks of variable size, with the centroid compensation of every
// skipped key cluster folded into the same softmax. Queries, keys and values are read through
// the cluster permutation (no permuted copies), and the output is written back to each query's
// original position, so the pipeline needs no separate gather/scatter passes.
//
// Plain C++ header (no CUDA types beyond an opaque stream) so host code and tests include it.
#pragma once

#include <cstdint>
#include <optional>

#include "svgear/dtype.hpp"

namespace svgear::cuda {

// One [B, H, S, D] device tensor with a contiguous last axis (strides in elements). The kernel
// moves rows in 16-byte pieces: data must be 16-byte aligned and stride_b/h/s multiples of 8.
struct DeviceTensor {
  const void* data = nullptr;
  std::int64_t stride_b = 0, stride_h = 0, stride_s = 0;
};

// One float per query row of a [B, H, S] array (strides in elements, any non-negative values).
struct DeviceRows {
  float* data = nullptr;
  std::int64_t stride_b = 0, stride_h = 0, stride_s = 0;
};

// Bits the kernel ORs into SparseAttentionProblem::error_flags.
inline constexpr std::int32_t kErrorRowWithoutKeys = 1;  // a row had no exact or compensated key: zeros
inline constexpr std::int32_t kErrorBadWorkTile = 2;     // a work tile named a bad (bh, cluster, row): skipped

struct SparseAttentionProblem {
  DType dtype = DType::bf16;  // of q, k, v and out: bf16 or f16
  int batch = 0, heads = 0;
  std::int64_t sq = 0, sk = 0;
  int head_dim = 0;  // 64 or 128
  DeviceTensor q, k, v;
  DeviceTensor out;  // written (data is cast to non-const)
  // Optional: each query row's log-sum-exp, written at the row's original position beside the
  // output. Natural log of the softmax denominator in units of the scaled scores: ln sum exp(l)
  // over the row's exact keys (l = q.k / sqrt(D)) and pseudo-keys (l = q.mu_j / sqrt(D) + ln n_j),
  // -inf for a row without keys. Null data: nothing written.
  DeviceRows lse;

  // Cluster layouts, per (b, h) = bh = b * heads + h. A null order means the identity.
  // A null offsets array means one cluster holding every token (needs query_clusters == 1,
  // resp. key_clusters == 1).
  int query_clusters = 1, key_clusters = 1;
  const std::int32_t* q_order = nullptr;    // [BH][sq]: permuted position -> original query index
  const std::int32_t* q_offsets = nullptr;  // [BH][query_clusters + 1], q_offsets[bh][0] == 0
  const std::int32_t* k_order = nullptr;    // [BH][sk]
  const std::int32_t* k_offsets = nullptr;  // [BH][key_clusters + 1]

  // Exactly computed key clusters of each (bh, query cluster i), CSR over row r = bh * Cq + i:
  // selected_clusters[selected_offsets[r] .. selected_offsets[r + 1]) in any order.
  // A null selected_offsets means every key cluster is selected (dense attention).
  const std::int32_t* selected_offsets = nullptr;  // [BH * Cq + 1]
  const std::int32_t* selected_clusters = nullptr;

  // Compensation: null compensated_offsets means skipped blocks are dropped. Otherwise the
  // compensated key clusters of row r (non-empty, not selected) are listed like the selected
  // ones, and each enters the softmax as one pseudo-key: logit q.mu_j / sqrt(D) + ln n_j,
  // value vbar_j. The means are rounded to `dtype` in shared memory (the precision of the
  // exact keys and values); ln n_j stays fp32. Arrays 16-byte aligned.
  const std::int32_t* compensated_offsets = nullptr;  // [BH * Cq + 1]
  const std::int32_t* compensated_clusters = nullptr;
  const float* key_means = nullptr;    // [BH][Ck][D]
  const float* value_means = nullptr;  // [BH][Ck][D]
  const std::int32_t* key_counts = nullptr;  // [BH][Ck]

  // Work list: one entry per (bh, query cluster, tile of up to kQueryTile permuted queries),
  // built on the device by build_query_tiles. Filled in by the pipeline. Entries with bh < 0
  // are padding (their CTAs exit at once). A null `tiles` (only with query_clusters == 1)
  // means the implicit list bh-major over rows 0, 64, 128, ... and tile_count is ignored.
  const std::int32_t* tiles = nullptr;  // [tile_count][3]: bh, query cluster, first permuted row
  std::int64_t tile_count = 0;

  // Optional device int the kernel ORs kError* bits into (never cleared by the kernel): the
  // caller reads it whenever it synchronizes anyway. Null: problems are only masked.
  std::int32_t* error_flags = nullptr;
};

// Rows of queries one CTA handles.
inline constexpr int kQueryTile = 64;

// Throws svgear::Error on unsupported dtype/head_dim, missing arrays or misaligned tensors;
// checks the launch. Asynchronous on `stream` (a cudaStream_t; null = the legacy default
// stream): no host synchronization.
//
// Two kernels compute the same function: a wgmma (Hopper, sm_90a) one, taken on a compute
// capability 9.0 device when the build includes CUDA architecture 90a, and an mma.sync one
// everywhere else. The environment variable SVGEAR_ATTENTION_KERNEL=sm80 forces the mma.sync
// kernel, =sm90 the wgmma one (an error where it cannot run); it is read on every call.
void sparse_attention(const SparseAttentionProblem& problem, void* stream);

// Whether the wgmma kernel can run on the current device (compute capability 9.0 and an
// sm_90a build of the kernel in this binary).
bool sm90_attention_available();

// The kernel family an environment variable (SVGEAR_ATTENTION_KERNEL, SVGEAR_KMEANS_KERNEL)
// forces: "sm80" false, "sm90" true (an Error where the sm_90a kernels cannot run: they are
// built and loaded together, so sm90_attention_available() answers for all), unset or "auto"
// none, the caller picks. Read on every call, so a test can run both families.
std::optional<bool> forced_sm90_kernel(const char* variable);

// Entries of the work list for bh_count heads of sq queries in query_clusters clusters: an upper
// bound, per head ceil(sq / 64) + min(query_clusters, sq) (each non-empty cluster wastes at
// most one partial tile), so the list is built without reading a count back to the host.
std::int64_t query_tile_capacity(int bh_count, std::int64_t sq, int query_clusters);

// Writes the work list into `tiles` (device, [capacity][3], capacity >= query_tile_capacity)
// from q_offsets (device, [bh_count][query_clusters + 1]): head bh owns entries
// [bh * P, (bh + 1) * P), P = query_tile_capacity(1, sq, query_clusters), its real tiles first,
// then padding (bh = -1). Returns the tile_count to put in SparseAttentionProblem (bh_count * P).
// One small kernel on `stream`; no host synchronization.
std::int64_t build_query_tiles(const std::int32_t* q_offsets, int bh_count, std::int64_t sq, int query_clusters,
                               std::int32_t* tiles, std::int64_t capacity, void* stream);

}  // namespace svgear::cuda
