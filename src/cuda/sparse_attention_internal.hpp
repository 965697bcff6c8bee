// What the two attention kernels (sparse_attention.cu: mma.sync, any sm80+ GPU;
// sparse_attention_sm90.cu: wgmma, Hopper) share: the kernel parameters the host side derives
// from a SparseAttentionProblem, and the device-side walk over a query cluster's selected keys.
// Device code: include from those two .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/sm80_primitives.cuh"
#include "cuda/sparse_attention.hpp"

namespace svgear::cuda::attention {

// What the kernel reads: the problem with strides unpacked and derived constants.
struct KernelParams {
  const std::uint16_t* q;
  const std::uint16_t* k;
  const std::uint16_t* v;
  std::uint16_t* out;
  std::int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  // b, h, s
  float* lse;                 // optional log-sum-exp output (null: none), [B, H, Sq] by lse_stride
  std::int64_t lse_stride[3];  // b, h, s
  int heads, bh_count, sq, sk, query_clusters, key_clusters;
  const std::int32_t* q_order;
  const std::int32_t* q_offsets;
  const std::int32_t* k_order;
  const std::int32_t* k_offsets;
  const std::int32_t* selected_offsets;
  const std::int32_t* selected_clusters;
  const std::int32_t* compensated_offsets;
  const std::int32_t* compensated_clusters;
  const float* key_means;
  const float* value_means;
  const std::int32_t* key_counts;
  const std::int32_t* tiles;
  int implicit_tiles_per_head;  // with tiles == nullptr
  std::int32_t* error_flags;
  float scale_log2;  // log2(e) / sqrt(D): logits go straight into exp2
};

__device__ __forceinline__ void raise_error(const KernelParams& p, std::int32_t bit) {
  if (p.error_flags != nullptr) atomicOr(p.error_flags, bit);
}

// What a row's exponentials subtract, exp2(logit - base): its running max, or 0 while the row
// has seen only masked keys (max -inf), which keeps exp2(-inf - base) = 0 and avoids
// -inf - (-inf) = NaN.
__device__ __forceinline__ float exponent_base(float row_max) { return row_max == -INFINITY ? 0.f : row_max; }

// A row's log-sum-exp in natural-log units from the kernels' softmax state, which lives in the
// log2 domain: row_max = max of the logits times log2 e (pseudo-keys' bias log2 n_j included),
// sum = the row's sum of exp2(logit - row_max). ln sum exp(l) = ln 2 * (row_max + log2 sum);
// -inf for a row without keys (sum 0).
__device__ __forceinline__ float row_log_sum_exp(float row_max, float sum) {
  return sum > 0.f ? (row_max + log2f(sum)) * 0.693147180559945309f : -INFINITY;
}

// The LSE output of head bh (null when the problem has none).
__device__ __forceinline__ float* lse_of_head(const KernelParams& p, int bh) {
  return p.lse != nullptr ? p.lse + (bh / p.heads) * p.lse_stride[0] + (bh % p.heads) * p.lse_stride[1] : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Key sequences: which rows a CTA reads.
// ---------------------------------------------------------------------------------------------

// The exact keys of one query cluster: the concatenation, in list order, of its selected key
// clusters' permuted key ranges. Each warp walks it with a window of 32 listed clusters, lane l
// holding cluster l's inclusive prefix of sizes, so mapping a position to its key is a 5-step
// shuffle search and the list itself is read once per 32 clusters, not per tile.
struct SelectedKeys {
  const std::int32_t* clusters;  // the row's list (null: entry e is key cluster e)
  const std::int32_t* offsets;   // k_offsets of this head (null: one cluster of all keys)
  const std::int32_t* order;     // k_order of this head (null: identity)
  int entry_begin, entry_end, key_clusters, sk;
  int next_entry = 0, window_begin = 0, window_size = 0;  // warp-uniform
  int lane_inclusive = 0, lane_base = 0;                  // per lane: prefix end, permuted key of position window_begin

  // Keys [begin, begin + size) of the cluster listed at `entry`, clamped into [0, sk): a bad
  // id or offset costs keys, never an out-of-bounds read.
  __device__ int cluster_keys(int entry, int& begin) const {
    const int j = clusters != nullptr ? clusters[entry] : entry;
    begin = 0;
    if (j < 0 || j >= key_clusters) return 0;
    if (offsets == nullptr) return sk;
    begin = min(max(offsets[j], 0), sk);
    return min(max(offsets[j + 1], begin), sk) - begin;
  }

  __device__ void load_next_window(int lane) {
    int begin = 0, size = 0;
    if (next_entry + lane < entry_end) size = cluster_keys(next_entry + lane, begin);
    int inclusive = size;
#pragma unroll
    for (int delta = 1; delta < 32; delta <<= 1) {
      const int below = __shfl_up_sync(sm80::kFullMask, inclusive, delta);
      if (lane >= delta) inclusive += below;
    }
    window_begin += window_size;
    window_size = __shfl_sync(sm80::kFullMask, inclusive, 31);
    lane_inclusive = inclusive;
    lane_base = begin - (inclusive - size);
    next_entry += 32;
  }

  // Original key index at concatenated `position` (-1 at or past `total`). Warp-collective;
  // every lane's positions must not decrease from call to call.
  __device__ int key_at(int position, int total, int lane) {
    int permuted = -1;
    for (;;) {
      const int relative = position - window_begin;
      int lo = 0;  // lanes whose clusters end at or before `relative`
#pragma unroll
      for (int step = 16; step > 0; step >>= 1) {
        if (__shfl_sync(sm80::kFullMask, lane_inclusive, lo + step - 1) <= relative) lo += step;
      }
      const int base = __shfl_sync(sm80::kFullMask, lane_base, min(lo, 31));
      if (position < total && relative >= 0 && relative < window_size) permuted = base + relative;
      const bool beyond = position < total && relative >= window_size;
      if (!__any_sync(sm80::kFullMask, beyond) || next_entry >= entry_end) break;
      load_next_window(lane);
    }
    if (permuted < 0) return -1;
    const int key = order != nullptr ? order[permuted] : permuted;
    return unsigned(key) < unsigned(sk) ? key : -1;
  }
};

// One row of a tile as the lane that names it sees it: an exact key (index = original key
// index) or a pseudo-key (index = key cluster, count = n_j); index < 0 is padding.
struct SlotInfo {
  int index = -1;
  int count = 0;
};

// The producers' gather: copies kRows rows of 16-bit elements (kChunks 16-byte chunks each) into
// a shared tile with cp.async. Lane l names the source row of tile row l (negative: zero-fill);
// a pass moves 32 chunks, so 32 / kChunks rows. `byte_offset(row, chunk)` places a chunk in the
// tile: each kernel passes its own swizzle.
template <int kChunks, int kRows, class ByteOffset>
__device__ __forceinline__ void gather_rows_async(std::uint32_t tile, const std::uint16_t* rows,
                                                  std::int64_t row_stride, int row_index, int lane,
                                                  ByteOffset byte_offset) {
  constexpr int kRowsPerPass = 32 / kChunks;
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int local = pass * kRowsPerPass + lane / kChunks;
    const int chunk = lane % kChunks;
    const int index = __shfl_sync(sm80::kFullMask, row_index, local);
    const std::uint16_t* source = rows + (index >= 0 ? index * row_stride + chunk * 8 : 0);
    sm80::cp_async_16(tile + byte_offset(local, chunk), source, index >= 0);
  }
}

// Runs the problem on the Hopper kernel (sparse_attention_sm90.cu); `params` come from the
// validated problem. Only where sm90_attention_available().
void launch_sm90(const KernelParams& params, const SparseAttentionProblem& problem, cudaStream_t stream);

}  // namespace svgear::cuda::attention
