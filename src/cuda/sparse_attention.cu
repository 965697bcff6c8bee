// Block-sparse attention over cluster blocks with SVG-EAR's centroid compensation
// (ALGORITHMS.md "Common stages" 4 and "SVG-EAR" 1), FlashAttention-2 style on mma.sync.
//
// One CTA (4 warps, 16 query rows each) takes one work tile: up to 64 permuted rows of one
// query cluster, gathered through q_order. It streams the concatenation of the selected key
// clusters' keys (gathered through k_order) in tiles of 64, then the compensated clusters'
// (mean key, mean value) pseudo-keys in tiles of 32, through one online softmax held in
// registers: the pseudo-keys are ordinary keys with the logit bias ln n_j, so compensation
// needs no second pass. Each row is normalised and written to its original position.
//
// Layering (FlashAttention's hopper/ split): AttentionTraits fixes tile sizes and stages;
// SelectedKeys / mean slots say *which* rows a tile holds; the mainloop copies and multiplies
// tiles; the epilogue normalises and scatters. The Hopper (wgmma) variant of the same function
// is sparse_attention_sm90.cu; sparse_attention() below picks one per call.
#include "cuda/sparse_attention.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <limits>
#include <string>

#include "cuda/cuda_check.hpp"
#include "cuda/sm80_primitives.cuh"
#include "cuda/sparse_attention_internal.hpp"
#include "svgear/error.hpp"

namespace svgear::cuda {
namespace {

using sm80::kFullMask;
using attention::exponent_base;
using attention::gather_rows_async;
using attention::KernelParams;
using attention::lse_of_head;
using attention::raise_error;
using attention::row_log_sum_exp;
using attention::SelectedKeys;
using attention::SlotInfo;

// ---------------------------------------------------------------------------------------------
// Traits: everything a variant changes. The mainloop and epilogue read sizes only from here.
// ---------------------------------------------------------------------------------------------

template <typename Element, int kHeadDim_>
struct AttentionTraits {
  using T = Element;  // __nv_bfloat16 or __half: selects the MMA and the rounding of P and means
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kQueryRows = kQueryTile;
  static constexpr int kWarpRows = kQueryRows / kWarps;  // one m16 row tile of the MMA per warp
  static constexpr int kKeyTile = 64;                    // exact keys per mainloop step
  // Pseudo-keys per step: their fp32 means fill a stage buffer exactly as kKeyTile 16-bit keys
  // do, so they ride the same cp.async pipeline raw and are rounded when their step comes.
  static constexpr int kMeanTile = kKeyTile * int(sizeof(std::uint16_t)) / int(sizeof(float));
  static constexpr int kWarpMeanRows = kMeanTile / kWarps;
  // Tiles in flight: the copy of tile t + kStages - 1 overlaps the step on tile t.
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim * 2 / 16;      // 16-byte chunks per 16-bit row
  static constexpr int kMeanChunks = kHeadDim * 4 / 16;  // 16-byte chunks per fp32 row
  static constexpr int kDSteps = kHeadDim / 16;          // k-steps of Q K^T, n-pairs of P V
  static constexpr int kDTiles = kHeadDim / 8;           // n8 accumulator tiles of O
  static constexpr int kTileElements = kKeyTile * kHeadDim;
  static constexpr int kMeanTileElements = kMeanTile * kHeadDim;
  // D = 128 holds O (64 registers) + Q fragments (32) + S (32) + the key cursor; ptxas then
  // takes up to 255 without spilling: 2 CTAs (80 KB shared each) per SM. D = 64 fits 168: 3.
  static constexpr int kMinBlocksPerSm = kHeadDim == 128 ? 2 : 3;

  static_assert(kQueryRows == kKeyTile, "the Q tile is staged in a K stage buffer");
  static_assert(kStages >= 2, "the mainloop overlaps one copy with one step at least");
  static_assert(kWarpRows == 16, "one m16 MMA row tile per warp");
  static_assert(32 % kChunks == 0 && 32 % kMeanChunks == 0, "a warp copies whole rows per pass");
  static_assert(kMeanTile % kWarps == 0 && kMeanTile % 16 == 0, "pseudo-key tile splits over warps and k16 steps");
};

template <typename Traits>
struct SharedStorage {
  // Stage s holds an exact tile (K, V) as swizzled 16-bit rows, or a pseudo-key tile as raw fp32
  // rows of means, rounded into mean_k / mean_v when its step comes. The Q tile passes through
  // k[kStages - 1] in the prologue and the output through k[0] in the epilogue.
  alignas(128) std::uint16_t k[Traits::kStages][Traits::kTileElements];
  alignas(128) std::uint16_t v[Traits::kStages][Traits::kTileElements];
  alignas(128) std::uint16_t mean_k[Traits::kMeanTileElements];
  alignas(128) std::uint16_t mean_v[Traits::kMeanTileElements];
  float mean_bias[Traits::kStages][Traits::kMeanTile];  // log2 n_j, -inf for padding slots
  int query_rows[Traits::kQueryRows];  // original index of each tile row, -1 past the cluster's end
  long long partial[Traits::kWarps];
};

// ---------------------------------------------------------------------------------------------
// Work tiles: which query rows a CTA reads.
// ---------------------------------------------------------------------------------------------

struct WorkTile {
  int bh, cluster, first_row, rows;  // rows of the cluster starting at permuted first_row, 1..64
};

// CTA-uniform: false means this CTA has nothing to do (padding entry or a bad entry, flagged).
__device__ bool fetch_work_tile(const KernelParams& p, WorkTile& tile) {
  const std::int64_t index = blockIdx.x;
  int bh = 0, cluster = 0, first = 0;
  if (p.tiles != nullptr) {
    bh = p.tiles[3 * index];
    cluster = p.tiles[3 * index + 1];
    first = p.tiles[3 * index + 2];
    if (bh < 0) return false;
  } else {
    bh = int(index / p.implicit_tiles_per_head);
    first = int(index % p.implicit_tiles_per_head) * kQueryTile;
  }
  int begin = 0, end = p.sq;
  if (bh < p.bh_count && cluster >= 0 && cluster < p.query_clusters && p.q_offsets != nullptr) {
    const std::int32_t* offsets = p.q_offsets + std::int64_t(bh) * (p.query_clusters + 1) + cluster;
    begin = max(offsets[0], 0);
    end = min(offsets[1], p.sq);
  }
  if (bh >= p.bh_count || cluster < 0 || cluster >= p.query_clusters || first < begin || first >= end) {
    if (threadIdx.x == 0) raise_error(p, kErrorBadWorkTile);
    return false;
  }
  tile = WorkTile{bh, cluster, first, min(kQueryTile, end - first)};
  return true;
}

// ---------------------------------------------------------------------------------------------
// Mainloop: copies into shared memory and the tensor-core tile step.
// ---------------------------------------------------------------------------------------------

// Warp w copies tile rows [16w, 16w + 16) of 16-bit elements; lane (l & 15) names the source
// row of tile row 16w + (l & 15) (negative: zero-fill).
template <typename Traits>
__device__ __forceinline__ void copy_rows_async(std::uint32_t tile, const std::uint16_t* rows, std::int64_t row_stride,
                                                int row_index, int warp, int lane) {
  gather_rows_async<Traits::kChunks, Traits::kWarpRows>(tile, rows, row_stride, row_index, lane, [&](int row, int chunk) {
    return 2 * sm80::swizzled_offset<Traits::kHeadDim>(Traits::kWarpRows * warp + row, chunk);
  });
}

// Warp w copies fp32 mean rows [8w, 8w + 8) of a pseudo-key tile, unswizzled; lane (l & 7)
// names the key cluster of row 8w + (l & 7).
template <typename Traits>
__device__ __forceinline__ void copy_mean_rows_async(std::uint32_t tile, const float* means, int cluster, int warp,
                                                     int lane) {
  constexpr int kRowsPerPass = 32 / Traits::kMeanChunks;
#pragma unroll
  for (int pass = 0; pass < Traits::kWarpMeanRows / kRowsPerPass; ++pass) {
    const int local = pass * kRowsPerPass + lane / Traits::kMeanChunks;
    const int chunk = lane % Traits::kMeanChunks;
    const int index = __shfl_sync(kFullMask, cluster, local);
    const float* source = means + (index >= 0 ? std::int64_t(index) * Traits::kHeadDim + chunk * 4 : 0);
    const int row = Traits::kWarpMeanRows * warp + local;
    sm80::cp_async_16(tile + 4 * (row * Traits::kHeadDim + chunk * 4), source, index >= 0);
  }
}

// Rounds a landed pseudo-key tile (raw fp32 rows of means) into the swizzled 16-bit layout
// the tile step reads. CTA-collective; ends with the barrier that publishes the result.
template <typename Traits>
__device__ __forceinline__ void round_mean_tile(const std::uint16_t* raw_k, const std::uint16_t* raw_v,
                                                std::uint16_t* mean_k, std::uint16_t* mean_v) {
  using T = typename Traits::T;
#pragma unroll
  for (int i = 0; i < Traits::kMeanTile * Traits::kMeanChunks / Traits::kThreads; ++i) {
    const int chunk = int(threadIdx.x) + i * Traits::kThreads;
    const int row = chunk / Traits::kMeanChunks;
    const int column = (chunk % Traits::kMeanChunks) * 4;
    const int offset = sm80::swizzled_offset<Traits::kHeadDim>(row, column / 8) + column % 8;
    const float4 key = reinterpret_cast<const float4*>(raw_k)[chunk];
    const float4 value = reinterpret_cast<const float4*>(raw_v)[chunk];
    *reinterpret_cast<uint2*>(mean_k + offset) =
        make_uint2(sm80::pack_pair<T>(key.x, key.y), sm80::pack_pair<T>(key.z, key.w));
    *reinterpret_cast<uint2*>(mean_v + offset) =
        make_uint2(sm80::pack_pair<T>(value.x, value.y), sm80::pack_pair<T>(value.z, value.w));
  }
  __syncthreads();
}

template <typename Traits>
__device__ __forceinline__ void load_query_fragments(std::uint32_t (&q)[Traits::kDSteps][4], std::uint32_t tile,
                                                     int warp, int lane) {
#pragma unroll
  for (int step = 0; step < Traits::kDSteps; ++step) {
    const int row = Traits::kWarpRows * warp + (lane & 15);
    sm80::ldmatrix_x4(q[step], tile + 2 * sm80::swizzled_offset<Traits::kHeadDim>(row, 2 * step + (lane >> 4)));
  }
}

// Per-thread online-softmax state: rows g and g + 8 of the warp's 16 (g = lane / 4), columns
// 8n + 2(lane % 4) + {0, 1} of each n8 tile. row_max is in log2 units; row_sum is this
// thread's share of the row (summed over the quad in the epilogue).
template <typename Traits>
struct Accumulator {
  float o[Traits::kDTiles][4];
  float row_max[2];
  float row_sum[2];
};

// One key tile: S = Q K^T (+ per-key bias), online softmax update, O += P V. kKeys keys are
// in shared memory; columns >= valid_keys are masked. `bias` (log2 units) only for pseudo-keys.
template <typename Traits, int kKeys, bool kHasBias>
__device__ __forceinline__ void attend_tile(const std::uint32_t (&q)[Traits::kDSteps][4], Accumulator<Traits>& acc,
                                            std::uint32_t k_tile, std::uint32_t v_tile, int valid_keys,
                                            const float* bias, float scale_log2, int lane) {
  using T = typename Traits::T;
  constexpr int kN = kKeys / 8;
  float s[kN][4];
#pragma unroll
  for (int n = 0; n < kN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;

#pragma unroll
  for (int step = 0; step < Traits::kDSteps; ++step) {
#pragma unroll
    for (int pair = 0; pair < kKeys / 16; ++pair) {
      // Matrices: keys 0-7 | d lo, keys 0-7 | d hi, keys 8-15 | d lo, keys 8-15 | d hi.
      const int key = 16 * pair + (lane & 7) + ((lane >> 4) << 3);
      std::uint32_t b[4];
      sm80::ldmatrix_x4(b, k_tile + 2 * sm80::swizzled_offset<Traits::kHeadDim>(key, 2 * step + ((lane >> 3) & 1)));
      sm80::mma_m16n8k16<T>(s[2 * pair], q[step], b[0], b[1]);
      sm80::mma_m16n8k16<T>(s[2 * pair + 1], q[step], b[2], b[3]);
    }
  }

  const int quad = lane & 3;
  if (kHasBias || valid_keys < kKeys) {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int column = 8 * n + 2 * quad + e;
        const float shift = kHasBias ? bias[column] : 0.f;
        const bool keep = column < valid_keys;
        s[n][e] = keep ? fmaf(s[n][e], scale_log2, shift) : -INFINITY;
        s[n][2 + e] = keep ? fmaf(s[n][2 + e], scale_log2, shift) : -INFINITY;
      }
    }
  } else {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
    }
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float row_max = acc.row_max[half];
#pragma unroll
    for (int n = 0; n < kN; ++n) row_max = fmaxf(row_max, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
    row_max = fmaxf(row_max, __shfl_xor_sync(kFullMask, row_max, 1));
    row_max = fmaxf(row_max, __shfl_xor_sync(kFullMask, row_max, 2));
    const float base = exponent_base(row_max);
    const float correction = sm80::exp2_approx(acc.row_max[half] - base);
    acc.row_max[half] = row_max;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      s[n][2 * half] = sm80::exp2_approx(s[n][2 * half] - base);
      s[n][2 * half + 1] = sm80::exp2_approx(s[n][2 * half + 1] - base);
      sum += s[n][2 * half] + s[n][2 * half + 1];
    }
    acc.row_sum[half] = acc.row_sum[half] * correction + sum;
#pragma unroll
    for (int n = 0; n < Traits::kDTiles; ++n) {
      acc.o[n][2 * half] *= correction;
      acc.o[n][2 * half + 1] *= correction;
    }
  }

#pragma unroll
  for (int step = 0; step < kKeys / 16; ++step) {
    // The S accumulators of n-tiles 2*step, 2*step + 1 are exactly P's A fragment for k16 step `step`.
    const std::uint32_t a[4] = {sm80::pack_pair<T>(s[2 * step][0], s[2 * step][1]),
                                sm80::pack_pair<T>(s[2 * step][2], s[2 * step][3]),
                                sm80::pack_pair<T>(s[2 * step + 1][0], s[2 * step + 1][1]),
                                sm80::pack_pair<T>(s[2 * step + 1][2], s[2 * step + 1][3])};
#pragma unroll
    for (int pair = 0; pair < Traits::kDSteps; ++pair) {
      // Transposed matrices: keys 0-7 | d lo, keys 8-15 | d lo, keys 0-7 | d hi, keys 8-15 | d hi.
      const int key = 16 * step + (lane & 7) + (((lane >> 3) & 1) << 3);
      std::uint32_t b[4];
      sm80::ldmatrix_x4_trans(b, v_tile + 2 * sm80::swizzled_offset<Traits::kHeadDim>(key, 2 * pair + (lane >> 4)));
      sm80::mma_m16n8k16<T>(acc.o[2 * pair], a, b[0], b[1]);
      sm80::mma_m16n8k16<T>(acc.o[2 * pair + 1], a, b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Epilogue: normalise, stage through shared memory, write 16-byte pieces of original rows
// (and, when asked, each row's log-sum-exp at its original position).
// ---------------------------------------------------------------------------------------------

template <typename Traits>
__device__ __forceinline__ void store_output(Accumulator<Traits>& acc, std::uint16_t* staging, const int* query_rows,
                                             std::uint16_t* out, std::int64_t row_stride, float* lse,
                                             const KernelParams& p, int warp, int lane) {
  using T = typename Traits::T;
  float inverse[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = acc.row_sum[half];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    // No key at all (drop mode with nothing selected): zeros, and a flag, never NaN.
    inverse[half] = sum > 0.f ? 1.f / sum : 0.f;
    const int row = Traits::kWarpRows * warp + (lane >> 2) + 8 * half;
    if (!(sum > 0.f) && query_rows[row] >= 0 && (lane & 3) == 0) raise_error(p, kErrorRowWithoutKeys);
    // The quad shares row_max (reduced in every step) and now the sum: its first lane writes.
    if (lse != nullptr && (lane & 3) == 0) {
      const int index = query_rows[row];
      if (index >= 0) lse[index * p.lse_stride[2]] = row_log_sum_exp(acc.row_max[half], sum);
    }
  }
#pragma unroll
  for (int n = 0; n < Traits::kDTiles; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = Traits::kWarpRows * warp + (lane >> 2) + 8 * half;
      const int offset = sm80::swizzled_offset<Traits::kHeadDim>(row, n) + 2 * (lane & 3);
      *reinterpret_cast<std::uint32_t*>(staging + offset) =
          sm80::pack_pair<T>(acc.o[n][2 * half] * inverse[half], acc.o[n][2 * half + 1] * inverse[half]);
    }
  }
  __syncwarp();  // a warp stages and stores only its own 16 rows
  constexpr int kRowsPerPass = 32 / Traits::kChunks;
#pragma unroll
  for (int pass = 0; pass < Traits::kWarpRows / kRowsPerPass; ++pass) {
    const int local = pass * kRowsPerPass + lane / Traits::kChunks;
    const int chunk = lane % Traits::kChunks;
    const int index = query_rows[Traits::kWarpRows * warp + local];
    if (index >= 0) {
      const uint4 piece = *reinterpret_cast<const uint4*>(
          staging + sm80::swizzled_offset<Traits::kHeadDim>(Traits::kWarpRows * warp + local, chunk));
      *reinterpret_cast<uint4*>(out + index * row_stride + chunk * 8) = piece;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: prologue (work tile, Q, key counts), software-pipelined mainloop, epilogue.
// ---------------------------------------------------------------------------------------------

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
    sparse_attention_kernel(const KernelParams p) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  auto& shared = *reinterpret_cast<SharedStorage<Traits>*>(shared_bytes);
  const int warp = int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;

  WorkTile tile;
  if (!fetch_work_tile(p, tile)) return;
  const int b = tile.bh / p.heads, h = tile.bh % p.heads;
  const std::int64_t list_row = std::int64_t(tile.bh) * p.query_clusters + tile.cluster;

  // Query rows: lane (l & 15) of warp w names tile row 16w + (l & 15) for Q copies and stores.
  int query_index = -1;
  {
    const int row = Traits::kWarpRows * warp + (lane & 15);
    if (row < tile.rows) {
      const int permuted = tile.first_row + row;
      query_index = p.q_order != nullptr ? p.q_order[std::int64_t(tile.bh) * p.sq + permuted] : permuted;
      if (unsigned(query_index) >= unsigned(p.sq)) query_index = -1;
    }
  }
  copy_rows_async<Traits>(sm80::shared_address(shared.k[Traits::kStages - 1]),
                          p.q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], query_index, warp, lane);
  sm80::cp_async_commit();
  // Kept for the epilogue in shared memory rather than a register live across the mainloop.
  if (lane < Traits::kWarpRows) shared.query_rows[Traits::kWarpRows * warp + lane] = query_index;

  // The key sequence: exact tiles over the selected clusters' keys, then pseudo-key tiles.
  SelectedKeys keys;
  keys.clusters = p.selected_offsets != nullptr ? p.selected_clusters : nullptr;
  keys.offsets = p.k_offsets != nullptr ? p.k_offsets + std::int64_t(tile.bh) * (p.key_clusters + 1) : nullptr;
  keys.order = p.k_order != nullptr ? p.k_order + std::int64_t(tile.bh) * p.sk : nullptr;
  keys.entry_begin = p.selected_offsets != nullptr ? p.selected_offsets[list_row] : 0;
  keys.entry_end = p.selected_offsets != nullptr ? p.selected_offsets[list_row + 1] : p.key_clusters;
  keys.key_clusters = p.key_clusters;
  keys.sk = p.sk;
  keys.next_entry = keys.entry_begin;

  long long exact_keys = 0;
  for (int entry = keys.entry_begin + int(threadIdx.x); entry < keys.entry_end; entry += Traits::kThreads) {
    int begin;
    exact_keys += keys.cluster_keys(entry, begin);
  }
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) exact_keys += __shfl_xor_sync(kFullMask, exact_keys, delta);
  if (lane == 0) shared.partial[warp] = exact_keys;
  __syncthreads();
  exact_keys = 0;
#pragma unroll
  for (int w = 0; w < Traits::kWarps; ++w) exact_keys += shared.partial[w];
  const int exact_total = int(min(exact_keys, (long long)std::numeric_limits<int>::max() - Traits::kKeyTile));
  const int exact_tiles = (exact_total + Traits::kKeyTile - 1) / Traits::kKeyTile;

  int mean_begin = 0, mean_end = 0;
  if (p.compensated_offsets != nullptr) {
    mean_begin = p.compensated_offsets[list_row];
    mean_end = max(p.compensated_offsets[list_row + 1], mean_begin);
  }
  const int total_tiles = exact_tiles + (mean_end - mean_begin + Traits::kMeanTile - 1) / Traits::kMeanTile;

  const std::int64_t k_head = b * p.k_stride[0] + h * p.k_stride[1];
  const std::int64_t v_head = b * p.v_stride[0] + h * p.v_stride[1];
  const std::int64_t means_head = std::int64_t(tile.bh) * p.key_clusters * Traits::kHeadDim;

  // Rows of tile t this lane names: exact keys 64t + 16w + (l & 15), pseudo-keys 8w + (l & 7).
  auto resolve = [&](int t) {
    SlotInfo slot;
    if (t < exact_tiles) {
      const int position = t * Traits::kKeyTile + Traits::kWarpRows * warp + (lane & 15);
      slot.index = keys.key_at(position, exact_total, lane);
    } else {
      const int entry = mean_begin + (t - exact_tiles) * Traits::kMeanTile + Traits::kWarpMeanRows * warp + (lane & 7);
      if (entry < mean_end) {
        const int j = p.compensated_clusters[entry];
        if (j >= 0 && j < p.key_clusters) {
          slot.count = p.key_counts[std::int64_t(tile.bh) * p.key_clusters + j];
          slot.index = slot.count > 0 ? j : -1;
        }
      }
    }
    return slot;
  };
  auto issue = [&](int t, int stage, const SlotInfo& slot) {
    const std::uint32_t k_tile = sm80::shared_address(shared.k[stage]);
    const std::uint32_t v_tile = sm80::shared_address(shared.v[stage]);
    if (t < exact_tiles) {
      copy_rows_async<Traits>(k_tile, p.k + k_head, p.k_stride[2], slot.index, warp, lane);
      copy_rows_async<Traits>(v_tile, p.v + v_head, p.v_stride[2], slot.index, warp, lane);
    } else {
      copy_mean_rows_async<Traits>(k_tile, p.key_means + means_head, slot.index, warp, lane);
      copy_mean_rows_async<Traits>(v_tile, p.value_means + means_head, slot.index, warp, lane);
      // ln n_j in log2 units: n_j copies of (mu_j, vbar_j) in one key.
      if (lane < Traits::kWarpMeanRows) {
        shared.mean_bias[stage][Traits::kWarpMeanRows * warp + lane] =
            slot.index >= 0 ? __log2f(float(slot.count)) : -INFINITY;
      }
    }
    sm80::cp_async_commit();
  };

  // Prologue: Q (its own group) and tiles 0 .. kAhead - 1 in flight, tile kAhead's rows
  // resolved; Q into registers as soon as it lands.
  constexpr int kAhead = Traits::kStages - 1;
  SlotInfo next;
#pragma unroll
  for (int t = 0; t < kAhead; ++t) {
    if (t < total_tiles) {
      issue(t, t, resolve(t));
    } else {
      sm80::cp_async_commit();  // one group per tile, real or not, keeps the wait counts fixed
    }
  }
  if (kAhead < total_tiles) next = resolve(kAhead);
  sm80::cp_async_wait<kAhead>();
  __syncthreads();
  std::uint32_t q[Traits::kDSteps][4];
  load_query_fragments<Traits>(q, sm80::shared_address(shared.k[Traits::kStages - 1]), warp, lane);

  Accumulator<Traits> acc;
#pragma unroll
  for (int n = 0; n < Traits::kDTiles; ++n) acc.o[n][0] = acc.o[n][1] = acc.o[n][2] = acc.o[n][3] = 0.f;
  acc.row_max[0] = acc.row_max[1] = -INFINITY;
  acc.row_sum[0] = acc.row_sum[1] = 0.f;

  // Mainloop: one barrier per tile both publishes tile t and frees the stage read in step t - 1
  // (or the Q tile) for tile t + kAhead, whose copy then overlaps steps t .. t + kAhead - 1. The
  // rows of the tile after it are resolved right after issuing, so their index loads are in
  // flight during step t as well.
  for (int t = 0; t < total_tiles; ++t) {
    sm80::cp_async_wait<kAhead - 1>();
    __syncthreads();
    const int ahead = t + kAhead;
    if (ahead < total_tiles) {
      issue(ahead, ahead % Traits::kStages, next);
      if (ahead + 1 < total_tiles) next = resolve(ahead + 1);
    } else {
      sm80::cp_async_commit();
    }
    const int stage = t % Traits::kStages;
    if (t < exact_tiles) {
      const int valid = min(exact_total - t * Traits::kKeyTile, Traits::kKeyTile);
      attend_tile<Traits, Traits::kKeyTile, false>(q, acc, sm80::shared_address(shared.k[stage]),
                                                   sm80::shared_address(shared.v[stage]), valid, nullptr,
                                                   p.scale_log2, lane);
    } else {
      round_mean_tile<Traits>(shared.k[stage], shared.v[stage], shared.mean_k, shared.mean_v);
      attend_tile<Traits, Traits::kMeanTile, true>(q, acc, sm80::shared_address(shared.mean_k),
                                                   sm80::shared_address(shared.mean_v), Traits::kMeanTile,
                                                   shared.mean_bias[stage], p.scale_log2, lane);
    }
  }

  __syncthreads();  // every warp is done with the last stage before k[0] becomes staging
  store_output<Traits>(acc, shared.k[0], shared.query_rows,
                       p.out + (tile.bh / p.heads) * p.out_stride[0] + (tile.bh % p.heads) * p.out_stride[1],
                       p.out_stride[2], lse_of_head(p, tile.bh), p, warp, lane);
}

// ---------------------------------------------------------------------------------------------
// Work list builder: one CTA per head, a block scan over its clusters' tile counts.
// ---------------------------------------------------------------------------------------------

constexpr int kTileBuilderThreads = 256;

__global__ void __launch_bounds__(kTileBuilderThreads)
    build_query_tiles_kernel(const std::int32_t* q_offsets, int query_clusters, int sq, int per_head,
                             std::int32_t* tiles) {
  using Scan = cub::BlockScan<int, kTileBuilderThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int inclusive[kTileBuilderThreads];
  __shared__ int first_row[kTileBuilderThreads];
  const int bh = int(blockIdx.x);
  const std::int32_t* offsets = q_offsets + std::int64_t(bh) * (query_clusters + 1);
  std::int32_t* list = tiles + std::int64_t(bh) * per_head * 3;

  int written = 0;  // tiles of this head so far (same in every thread)
  for (int base = 0; base < query_clusters; base += kTileBuilderThreads) {
    const int cluster = base + int(threadIdx.x);
    int begin = 0, count = 0;
    if (cluster < query_clusters) {
      begin = min(max(offsets[cluster], 0), sq);
      const int end = min(max(offsets[cluster + 1], begin), sq);
      count = (end - begin + kQueryTile - 1) / kQueryTile;
    }
    int exclusive = 0, chunk_total = 0;
    Scan(scan_storage).ExclusiveSum(count, exclusive, chunk_total);
    inclusive[threadIdx.x] = exclusive + count;
    first_row[threadIdx.x] = begin;
    __syncthreads();
    for (int s = int(threadIdx.x); s < chunk_total; s += kTileBuilderThreads) {
      int lo = 0, hi = kTileBuilderThreads - 1;  // first cluster of the chunk whose prefix passes s
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (inclusive[mid] > s) hi = mid; else lo = mid + 1;
      }
      const int tile_in_cluster = s - (lo > 0 ? inclusive[lo - 1] : 0);
      const int slot = written + s;
      if (slot < per_head) {  // always, for offsets that are monotone and end at sq
        list[3 * slot] = bh;
        list[3 * slot + 1] = base + lo;
        list[3 * slot + 2] = first_row[lo] + tile_in_cluster * kQueryTile;
      }
    }
    written += chunk_total;
    __syncthreads();  // before the next chunk reuses the shared arrays
  }
  for (int slot = written + int(threadIdx.x); slot < per_head; slot += kTileBuilderThreads) {
    list[3 * slot] = -1;
    list[3 * slot + 1] = -1;
    list[3 * slot + 2] = -1;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

void require(bool condition, const std::string& message) {
  if (!condition) throw Error("sparse_attention: " + message);
}

bool aligned16(const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; }

void check_tensor(const DeviceTensor& tensor, const char* name) {
  require(tensor.data != nullptr, std::string("tensor '") + name + "' has no data");
  require(aligned16(tensor.data) && tensor.stride_b % 8 == 0 && tensor.stride_h % 8 == 0 && tensor.stride_s % 8 == 0,
          std::string("tensor '") + name +
              "' must be 16-byte aligned with batch/head/token strides that are multiples of 8 elements "
              "(the kernel moves rows in 16-byte pieces); make it contiguous first");
}

KernelParams make_params(const SparseAttentionProblem& problem) {
  const std::int64_t int_max = std::numeric_limits<int>::max();
  require(problem.dtype == DType::bf16 || problem.dtype == DType::f16,
          "dtype " + dtype_name(problem.dtype) + " is not supported (BF16 or F16)");
  require(problem.head_dim == 64 || problem.head_dim == 128,
          "head_dim " + std::to_string(problem.head_dim) + " is not supported (64 or 128)");
  require(problem.batch >= 1 && problem.heads >= 1 && std::int64_t(problem.batch) * problem.heads <= int_max,
          "batch and heads must be positive");
  require(problem.sq >= 1 && problem.sk >= 1 && problem.sq <= int_max - kQueryTile && problem.sk <= int_max,
          "sq and sk must be in [1, 2^31 - 65]");
  require(problem.query_clusters >= 1 && problem.key_clusters >= 1, "cluster counts must be positive");
  check_tensor(problem.q, "q");
  check_tensor(problem.k, "k");
  check_tensor(problem.v, "v");
  check_tensor(problem.out, "out");
  require(problem.lse.data == nullptr ||
              (reinterpret_cast<std::uintptr_t>(problem.lse.data) % alignof(float) == 0 && problem.lse.stride_b >= 0 &&
               problem.lse.stride_h >= 0 && problem.lse.stride_s >= 0),
          "the lse output must be 4-byte aligned floats with non-negative strides");
  require(problem.q_offsets != nullptr || problem.query_clusters == 1,
          "q_offsets may be null only with query_clusters == 1");
  require(problem.k_offsets != nullptr || problem.key_clusters == 1,
          "k_offsets may be null only with key_clusters == 1");
  require(problem.selected_offsets == nullptr || problem.selected_clusters != nullptr,
          "selected_offsets given without selected_clusters");
  if (problem.compensated_offsets != nullptr) {
    require(problem.compensated_clusters != nullptr && problem.key_means != nullptr &&
                problem.value_means != nullptr && problem.key_counts != nullptr,
            "compensation needs compensated_clusters, key_means, value_means and key_counts");
    require(aligned16(problem.key_means) && aligned16(problem.value_means),
            "key_means and value_means must be 16-byte aligned");
  }
  require(problem.tiles != nullptr || problem.query_clusters == 1,
          "a null work list (implicit tiles) needs query_clusters == 1; build one with build_query_tiles");
  require(problem.tiles == nullptr || (problem.tile_count >= 0 && problem.tile_count <= int_max),
          "tile_count must be in [0, 2^31 - 1]");

  KernelParams p{};
  p.q = static_cast<const std::uint16_t*>(problem.q.data);
  p.k = static_cast<const std::uint16_t*>(problem.k.data);
  p.v = static_cast<const std::uint16_t*>(problem.v.data);
  p.out = static_cast<std::uint16_t*>(const_cast<void*>(problem.out.data));
  const DeviceTensor* tensors[4] = {&problem.q, &problem.k, &problem.v, &problem.out};
  std::int64_t* strides[4] = {p.q_stride, p.k_stride, p.v_stride, p.out_stride};
  for (int i = 0; i < 4; ++i) {
    strides[i][0] = tensors[i]->stride_b;
    strides[i][1] = tensors[i]->stride_h;
    strides[i][2] = tensors[i]->stride_s;
  }
  p.lse = problem.lse.data;
  p.lse_stride[0] = problem.lse.stride_b;
  p.lse_stride[1] = problem.lse.stride_h;
  p.lse_stride[2] = problem.lse.stride_s;
  p.heads = problem.heads;
  p.bh_count = problem.batch * problem.heads;
  p.sq = int(problem.sq);
  p.sk = int(problem.sk);
  p.query_clusters = problem.query_clusters;
  p.key_clusters = problem.key_clusters;
  p.q_order = problem.q_order;
  p.q_offsets = problem.q_offsets;
  p.k_order = problem.k_order;
  p.k_offsets = problem.k_offsets;
  p.selected_offsets = problem.selected_offsets;
  p.selected_clusters = problem.selected_clusters;
  p.compensated_offsets = problem.compensated_offsets;
  p.compensated_clusters = problem.compensated_clusters;
  p.key_means = problem.key_means;
  p.value_means = problem.value_means;
  p.key_counts = problem.key_counts;
  p.tiles = problem.tiles;
  p.implicit_tiles_per_head = int((problem.sq + kQueryTile - 1) / kQueryTile);
  p.error_flags = problem.error_flags;
  p.scale_log2 = float(1.4426950408889634 / std::sqrt(double(problem.head_dim)));
  return p;
}

template <typename Traits>
void launch(const KernelParams& params, std::int64_t ctas, cudaStream_t stream) {
  constexpr int kSharedBytes = int(sizeof(SharedStorage<Traits>));
  auto* kernel = sparse_attention_kernel<Traits>;
  // Cheap host-side calls (no synchronization); repeated per launch so that every device a
  // caller switches to gets them.
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes),
             "cudaFuncSetAttribute(sparse_attention_kernel, max dynamic shared memory)");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                  int(cudaSharedmemCarveoutMaxShared)),
             "cudaFuncSetAttribute(sparse_attention_kernel, shared memory carveout)");
  kernel<<<dim3(unsigned(ctas)), dim3(Traits::kThreads), kSharedBytes, stream>>>(params);
  check_launch("sparse_attention_kernel");
}

template <typename Element>
void launch_for_head_dim(const KernelParams& params, int head_dim, std::int64_t ctas, cudaStream_t stream) {
  if (head_dim == 64) {
    launch<AttentionTraits<Element, 64>>(params, ctas, stream);
  } else {
    launch<AttentionTraits<Element, 128>>(params, ctas, stream);
  }
}

// SVGEAR_ATTENTION_KERNEL: "sm80" forces the mma.sync kernel, "sm90" the wgmma one (an error
// where it cannot run), unset or "auto" takes the wgmma kernel wherever it can run. Read per
// call, so a test can run the same problem on both.
bool use_sm90_kernel() {
  return forced_sm90_kernel("SVGEAR_ATTENTION_KERNEL").value_or(sm90_attention_available());
}

}  // namespace

void sparse_attention(const SparseAttentionProblem& problem, void* stream) {
  const KernelParams params = make_params(problem);
  const std::int64_t ctas =
      problem.tiles != nullptr ? problem.tile_count : std::int64_t(params.bh_count) * params.implicit_tiles_per_head;
  require(ctas <= std::numeric_limits<int>::max(), "too many work tiles for one launch");
  if (ctas == 0) return;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (use_sm90_kernel()) {
    attention::launch_sm90(params, problem, cuda_stream);
    return;
  }
  if (problem.dtype == DType::bf16) {
    launch_for_head_dim<__nv_bfloat16>(params, problem.head_dim, ctas, cuda_stream);
  } else {
    launch_for_head_dim<__half>(params, problem.head_dim, ctas, cuda_stream);
  }
}

std::int64_t query_tile_capacity(int bh_count, std::int64_t sq, int query_clusters) {
  const std::int64_t per_head = (sq + kQueryTile - 1) / kQueryTile + std::min<std::int64_t>(query_clusters, sq);
  return std::int64_t(bh_count) * per_head;
}

std::int64_t build_query_tiles(const std::int32_t* q_offsets, int bh_count, std::int64_t sq, int query_clusters,
                               std::int32_t* tiles, std::int64_t capacity, void* stream) {
  if (bh_count < 1 || sq < 1 || query_clusters < 1 || q_offsets == nullptr || tiles == nullptr) {
    throw Error("build_query_tiles: needs q_offsets, tiles, and positive bh_count, sq, query_clusters");
  }
  if (sq > std::numeric_limits<int>::max() - kQueryTile) throw Error("build_query_tiles: sq must be below 2^31 - 64");
  const std::int64_t needed = query_tile_capacity(bh_count, sq, query_clusters);
  if (capacity < needed || needed > std::numeric_limits<int>::max()) {
    throw Error("build_query_tiles: the work list needs " + std::to_string(needed) +
                " entries (query_tile_capacity), got " + std::to_string(capacity));
  }
  const int per_head = int(needed / bh_count);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  build_query_tiles_kernel<<<dim3(unsigned(bh_count)), dim3(kTileBuilderThreads), 0, cuda_stream>>>(
      q_offsets, query_clusters, int(sq), per_head, tiles);
  check_launch("build_query_tiles_kernel");
  return needed;
}

}  // namespace svgear::cuda
