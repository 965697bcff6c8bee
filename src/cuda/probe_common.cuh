// What the EAR probe's kernels share (error_probe.cu, probe_exact_sweep.cuh,
// probe_cluster_sweep.cuh): the CTA shape, the arguments and the key/value tile loads.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/mma_tiles.cuh"
#include "cuda/scaled_values.cuh"

namespace svgear::cuda::detail::probe {

// A CTA: 8 warps x 16 probe rows (one m16 block per warp), keys in tiles of 64. Two m16 blocks
// per warp (4 warps) let each key or value fragment read from shared memory feed two MMAs, but
// left the cluster sweep (one CTA per SM for its shared memory) with 4 warps per SM to hide
// latency: 3x the exact sweep's time for 1.5x its MMA work.
inline constexpr int kWarps = 8;
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kRowBlocks = 1;
inline constexpr int kRowsPerWarp = 16 * kRowBlocks;
inline constexpr int kRows = kWarps * kRowsPerWarp;  // 128
inline constexpr int kKeys = 64;
inline constexpr int kBatch = 16;  // key clusters whose data the cluster sweep stages at a time

template <class E>
struct Args {
  DeviceTensor q, k;
  int heads;
  std::int64_t sk;
  bool q_aligned, k_aligned;
  // v in key-cluster order (row p = v[k_order[p]]), times 2^(value_exponent - values_shift), as
  // fp16: [BH][Sk][Dv]; with the value sketch (Dv < D) the rows are S v (core/value_sketch.hpp).
  const __half* values;
  const unsigned* value_abs_max;  // [BH]: bit pattern of max |v| (non-negative floats order as unsigned)
  const std::int32_t* q_offsets;  // [BH][Cq + 1]
  const std::int32_t* k_order;    // [BH][Sk]
  const std::int32_t* k_offsets;  // [BH][Ck + 1]
  int query_clusters, key_clusters;

  // The probe rows of each head (list_probe_rows).
  const std::int32_t* row_token;    // [BH][row_capacity]
  const std::int32_t* row_cluster;  // [BH][row_capacity]
  const std::int32_t* row_count;    // [BH]
  std::int64_t row_capacity;
  int row_blocks;  // ceil(row_capacity / kRows)
  int probes;      // sampled rows per query cluster (at most)
  int mean_row;    // 1: each non-empty query cluster has one more row, its mean query

  // Sweep 1 writes one softmax state per (row, key chunk); the combine merges them.
  int exact_chunks;
  float* part_max;          // [BH][exact_chunks][row_capacity], log2 units
  float* part_denominator;  // [BH][exact_chunks][row_capacity]
  float* part_output;       // [BH][exact_chunks][row_capacity][Dv], unnormalised
  float* row_max;           // [BH][row_capacity]: m, log2 units
  float* row_denominator;   // [BH][row_capacity]: M = sum exp2(l - m)
  float* row_output;        // [BH][row_capacity][Dv]: o, in the scaled value units

  // Sweep 2: chunk c of head bh owns key clusters [chunk_clusters[c], chunk_clusters[c + 1]).
  int cluster_chunks;
  const std::int32_t* chunk_clusters;  // [BH][cluster_chunks + 1]
  const E* mean_hi;                    // [BH][padded][D]: key means, hi + lo 16-bit terms
  const E* mean_lo;
  int padded_clusters;
  const float* value_means;        // [BH][Ck][Dv] (sketched: S vbar)
  const std::int32_t* key_counts;  // [BH][Ck]
  float* error;                    // [BH][Cq][Ck], zeroed
};

// The tokens of one key tile (k_order at positions first .. first + 63, -1 at or past `end`),
// held in registers by every warp: lane l keeps positions first + l and first + 32 + l. Loaded
// one tile before the copies that use them, so the gathered index loads never stall the copy
// loop (one memory latency per row otherwise, with a single warp per scheduler).
struct TileTokens {
  static_assert(kKeys == 64, "two tokens per lane");
  std::int32_t low = -1, high = -1;

  __device__ __forceinline__ void load(const std::int32_t* k_order, std::int64_t first, std::int64_t end, int lane) {
    low = first + lane < end ? k_order[first + lane] : -1;
    high = first + 32 + lane < end ? k_order[first + 32 + lane] : -1;
  }
  // Every lane of the warp must call this (it shuffles).
  __device__ __forceinline__ std::int64_t of(int r) const {
    const std::int32_t from_low = __shfl_sync(0xffffffffu, low, r & 31);
    const std::int32_t from_high = __shfl_sync(0xffffffffu, high, r & 31);
    return r < 32 ? from_low : from_high;
  }
};

// The key rows of positions [first, first + kKeys) (their tokens: `tokens`, loaded for this
// `first`) and their fp16 values (contiguous, Dv wide); positions at or past `end` load as zero
// rows. The caller commits.
template <class E, int D, int Dv>
__device__ __forceinline__ void load_key_tile(E* k_tile, __half* v_tile, const HeadRows<E>& k_rows, bool k_aligned,
                                              const TileTokens& tokens, const __half* values, std::int64_t first,
                                              std::int64_t end) {
  load_rows<E, D, kKeys, kThreads>(k_tile, k_rows, k_aligned, [&](int r) { return tokens.of(r); });
  load_rows<__half, Dv, kKeys, kThreads>(v_tile, HeadRows<__half>{values, Dv}, true,
                                         [&](int r) -> std::int64_t { return first + r < end ? first + r : -1; });
}

// How many bits the values copy's scale drops: 0 for v's own rows, log2 D for sketched ones
// (|S v| <= D max |v|, so 2^-log2 D keeps them in fp16's range).
template <int D, int Dv>
constexpr int values_shift() {
  int shift = 0;
  while (Dv < D && (1 << shift) < D) ++shift;
  return shift;
}

// The scale of the values copy: 2^(e - shift) with e from the head's max |v| (scaled_values.cuh).
template <int D, int Dv, class E>
__device__ __forceinline__ int values_exponent(const Args<E>& a, std::int64_t bh) {
  return value_exponent(a.value_abs_max[bh]) - values_shift<D, Dv>();
}

// What the squared errors on the values copy's columns are multiplied by, beside the scale: 1, or
// 1/k for sketched rows (R = S / sqrt(k) with S the copy's +-1).
template <int D, int Dv>
constexpr float error_unit() {
  return Dv < D ? 1.0f / float(Dv) : 1.0f;
}

// The CTA's probe rows of Q (gathered through row_token; zero rows past the head's count).
template <class E, int D>
__device__ __forceinline__ void load_probe_rows(E* q_tile, const Args<E>& a, std::int64_t bh, std::int64_t row0,
                                                std::int64_t rows_in_head) {
  const HeadRows<E> q_rows = head_rows<E>(a.q, a.heads, bh);
  const std::int32_t* tokens = a.row_token + bh * a.row_capacity;
  load_rows<E, D, kRows, kThreads>(q_tile, q_rows, a.q_aligned, [&](int r) -> std::int64_t {
    return row0 + r < rows_in_head ? std::int64_t(tokens[row0 + r]) : -1;
  });
}

// Two fp32 probabilities as one fp16x2 A-fragment register.
__device__ __forceinline__ std::uint32_t pack_probabilities(float low, float high) {
  return sm80::pack_pair<__half>(low, high);
}

}  // namespace svgear::cuda::detail::probe
