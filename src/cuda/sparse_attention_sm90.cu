// Block-sparse attention with SVG-EAR's centroid compensation on Hopper: the function of
// sparse_attention.cu (same SparseAttentionProblem, same results up to rounding order),
// FlashAttention-3 style on wgmma.
//
// One CTA is 3 warpgroups around one 128-row query tile:
// * warpgroup 0, the producer, gathers rows by index with cp.async (the tensor-memory copy
//   engine cannot gather arbitrary rows) into 128-byte-swizzled shared memory: the tile's
//   queries through q_order, then per step 128 keys, K and V in separate stages, through
//   k_order (exact keys of the selected clusters, in list order), then 128 pseudo-keys (rows of
//   mean keys / mean values of the compensated clusters, with a log2 n_j logit bias). Each
//   stage completes an mbarrier when its copies land (cp.async.mbarrier.arrive); consumers free
//   it through a second mbarrier.
// * warpgroups 1 and 2, the consumers, own 64 query rows each: S = Q K^T by wgmma from shared
//   memory, the online softmax on the accumulator fragment, P rounded to 16 bits and fed from
//   registers into O += P V (V read transposed). The product with K of step t is issued before
//   P V of step t - 1 and the softmax of step t overlaps that P V (FlashAttention-3's
//   intra-warpgroup overlap); K is released as soon as its scores are in registers. The scale
//   rides in the exponent's FFMA and o is rescaled only when the running max moves by more
//   than 2^8 (kMaxSlackLog2).
// setmaxnreg moves registers from the producer to the consumers.
//
// Work tiles: the problem's list has one entry per 64 rows (kQueryTile) of a query cluster.
// A CTA is launched per entry; the entry at an even 64-row offset of its cluster (offset % 128
// == 0) also takes the next entry when that one is the following 64 rows of the same cluster,
// and that next entry's CTA exits at once. An entry left alone (a cluster's odd last 64 rows, or
// an unpaired entry of another list) splits its key steps between both consumers, which merge
// their partial softmaxes at the end (merge_partner).
//
// Compensation: the fp32 means are rounded to the element type once per call into a scratch
// copy (the rounding the sm80 kernel applies in shared memory), so pseudo-key rows are gathered
// by the same copies as exact keys.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "cuda/cuda_check.hpp"
#include "cuda/device_buffer.hpp"
#include "cuda/sm80_primitives.cuh"
#include "cuda/sm90_primitives.cuh"
#include "cuda/sparse_attention.hpp"
#include "cuda/sparse_attention_internal.hpp"
#include "svgear/error.hpp"

namespace svgear::cuda {
namespace attention {
namespace {

using sm80::kFullMask;

// ---------------------------------------------------------------------------------------------
// Traits: tile sizes, stages and the register split.
// ---------------------------------------------------------------------------------------------

template <typename Element, int kHeadDim_>
struct Sm90Traits {
  using T = Element;  // __nv_bfloat16 or __half
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = 2;                               // warpgroups of 64 query rows (wgmma M)
  static constexpr int kConsumerRows = 64;
  static constexpr int kQueryRows = kConsumers * kConsumerRows;      // two kQueryTile entries
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kKeyTile = 128;                               // keys per step: the N of S = Q K^T
  // K and V of D = 128 take 64 KB per stage: 2 stages + Q fit the 227 KB; D = 64 takes 3.
  static constexpr int kStages = kHeadDim == 128 ? 2 : 3;
  static constexpr int kChunks = kHeadDim / 8;                       // 16-byte chunks per row
  static constexpr int kDSteps = kHeadDim / 16;                      // k16 steps of Q K^T
  static constexpr int kKeySteps = kKeyTile / 16;                    // k16 steps of P V
  static constexpr int kTileBytes = kKeyTile * kHeadDim * 2;
  static constexpr int kQueryBytes = kQueryRows * kHeadDim * 2;
  // The producer holds the key walk, pointers and the unrolled copy addresses (ptxas spills it
  // below 64 at D = 128); a consumer O (D / 2 fp32), S (64), P (32) and the softmax state, which
  // fit 200. 64 * 128 + 2 * 208 * 128 stays within the 168 per thread the launch grants.
  static constexpr int kProducerRegisters = 64;
  static constexpr int kConsumerRegisters = 208;

  static_assert(kQueryRows == 2 * kQueryTile, "a CTA takes two 64-row work-list entries");
  static_assert(kQueryRows == kKeyTile, "the producer's copy routine moves 128-row tiles of either kind");
  static_assert(kProducerRegisters * 128 + kConsumers * kConsumerRegisters * 128 <= 168 * kThreads,
                "setmaxnreg must not hand out more registers than the launch holds");
  static_assert(32 % kChunks == 0, "a warp copies whole rows per pass");
  static_assert(kDSteps * 16 == kHeadDim && kKeySteps * 16 == kKeyTile, "whole k16 steps");
};

// Tiles first, each 1024-byte aligned for the swizzle atoms (the dynamic buffer is aligned by
// hand). q holds the query tile, then each consumer's output rows for the epilogue.
template <typename Traits>
struct SharedStorage {
  alignas(1024) std::uint8_t q[Traits::kQueryBytes];
  alignas(1024) std::uint8_t k[Traits::kStages][Traits::kTileBytes];
  alignas(1024) std::uint8_t v[Traits::kStages][Traits::kTileBytes];
  float bias[Traits::kStages][Traits::kKeyTile];  // log2 n_j of a pseudo-key step, -inf for padding
  int query_rows[Traits::kQueryRows];             // original index of each tile row, -1 if none
  long long partial[Traits::kThreads / 32];
  // A lone tile's second consumer hands its softmax state to the first here (merge_partner):
  // value i of consumer thread x at [i][x], so a warp's stores and loads hit 32 banks.
  float merge[Traits::kHeadDim / 2 + 4][128];
};

template <typename Traits>
struct Barriers {
  std::uint64_t q_full;
  std::uint64_t k_full[Traits::kStages], k_empty[Traits::kStages];
  std::uint64_t v_full[Traits::kStages], v_empty[Traits::kStages];
};

struct Sm90Params {
  KernelParams base;
  const std::uint16_t* key_means;    // [BH][Ck][D], rounded to the element type (compensation only)
  const std::uint16_t* value_means;  // [BH][Ck][D]
  int tiles_per_head;                // 128-row tiles of the implicit list (tiles == nullptr)
  int tile_count;                    // entries of an explicit list
};

// The device side exists only in the sm_90a compilation; other passes see an empty kernel.
#if defined(SVGEAR_SM90A_ENABLED)

// ---------------------------------------------------------------------------------------------
// Work tiles and key plan: which rows a CTA reads (CTA-uniform).
// ---------------------------------------------------------------------------------------------

struct QueryTile {
  int bh, cluster, first_row;  // CTA row r is permuted row first_row + r
  int rows[2];                 // valid rows of consumer c: CTA rows [64c, 64c + rows[c])
};

// False: this CTA has nothing to do (padding, a bad entry (flagged), or an entry the previous
// entry's CTA takes).
__device__ bool fetch_query_tile(const Sm90Params& params, QueryTile& tile) {
  const KernelParams& p = params.base;
  const std::int64_t index = blockIdx.x;
  if (p.tiles == nullptr) {
    const int first = int(index % params.tiles_per_head) * 128;
    tile = QueryTile{int(index / params.tiles_per_head), 0, first,
                     {min(64, p.sq - first), max(min(64, p.sq - first - 64), 0)}};
    return true;
  }
  const int bh = p.tiles[3 * index], cluster = p.tiles[3 * index + 1], first = p.tiles[3 * index + 2];
  if (bh < 0) return false;
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
  auto entry_is = [&](std::int64_t entry, int row) {
    return entry >= 0 && entry < params.tile_count && p.tiles[3 * entry] == bh && p.tiles[3 * entry + 1] == cluster &&
           p.tiles[3 * entry + 2] == row;
  };
  const int offset = first - begin;
  if (offset % 128 == 64 && entry_is(index - 1, first - 64)) return false;
  const bool paired = offset % 128 == 0 && entry_is(index + 1, first + 64);
  tile = QueryTile{bh, cluster, first, {min(64, end - first), paired ? min(64, end - first - 64) : 0}};
  return true;
}

// The key sequence of the tile: exact steps over the selected clusters' keys, then pseudo-key
// steps over the compensated clusters.
struct KeyPlan {
  int exact_total, exact_tiles;
  int mean_begin, mean_end;
  int total_tiles;
};

// ---------------------------------------------------------------------------------------------
// Producer: gathers rows into swizzled stages and signals them.
// ---------------------------------------------------------------------------------------------

// Producer warp w copies rows [32w, 32w + 32) of a 128-row tile; lane l names the source row of
// tile row 32w + l (negative: zero-fill).
//
// Lanes 8g .. 8g + 7 copy one 128-byte line (64 elements) of a row, so one instruction moves 4
// whole lines, as coalesced as whole rows; lane group g takes rows 32w + 4j + g, j = 0..7. The
// row's start comes from the lane that names it (one shuffle of a pointer per row, shared by the
// row's lines), and the swizzled destination is a per-lane base plus immediates: row 32w + 4j + g
// has row & 7 = 4 (j & 1) + g, so chunk c lands at ((c ^ g) ^ 4 (j & 1)) << 4, the base's bit 6
// flipped on odd j. (The generic gather_rows_async spent ~17 instructions per 16-byte copy here
// on index shuffles, 64-bit multiplies and swizzle arithmetic; the producer's issue slots come
// out of the consumers' sub-partitions.)
template <typename Traits>
__device__ __forceinline__ void copy_rows_async(std::uint32_t tile, const std::uint16_t* rows, std::int64_t row_stride,
                                                int row_index, int warp, int lane) {
  constexpr int kLines = Traits::kChunks / 8;                              // 128-byte lines per row
  constexpr std::uint32_t kBlockBytes = Traits::kKeyTile * sm90::kSwizzleRowBytes;  // one column block
  static_assert(Traits::kChunks % 8 == 0, "rows of whole 128-byte lines");
  const std::uint16_t* own = rows + (row_index >= 0 ? row_index * row_stride : 0);
  const int group = lane / 8, chunk = lane % 8;
  // Needs the tile 1024-byte aligned (the swizzle atoms), so the XOR below cannot carry.
  const std::uint32_t base =
      tile + std::uint32_t(32 * warp + group) * sm90::kSwizzleRowBytes + std::uint32_t((chunk ^ group) << 4);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int from = 4 * j + group;
    const int index = __shfl_sync(sm80::kFullMask, row_index, from);
    const auto* source = reinterpret_cast<const std::uint16_t*>(
        __shfl_sync(sm80::kFullMask, reinterpret_cast<std::uintptr_t>(own), from)) + 8 * chunk;
    const std::uint32_t destination = (base ^ std::uint32_t((j & 1) << 6)) + std::uint32_t(j * 4 * sm90::kSwizzleRowBytes);
#pragma unroll
    for (int line = 0; line < kLines; ++line) {
      sm80::cp_async_16(destination + line * kBlockBytes, source + 64 * line, index >= 0);
    }
  }
}

template <typename Traits>
__device__ __forceinline__ void produce(const Sm90Params& params, SharedStorage<Traits>& shared,
                                        Barriers<Traits>& barriers, const QueryTile& tile, SelectedKeys& keys,
                                        const KeyPlan& plan, int warp, int lane) {
  const KernelParams& p = params.base;
  const int row = 32 * warp + lane;  // the tile row this thread names
  const int b = tile.bh / p.heads, h = tile.bh % p.heads;

  // Queries: CTA row r is consumer r / 64's row r % 64.
  {
    int query_index = -1;
    const int rows = row < Traits::kConsumerRows ? tile.rows[0] : tile.rows[1];
    if (row % Traits::kConsumerRows < rows) {
      const int permuted = tile.first_row + row;
      query_index = p.q_order != nullptr ? p.q_order[std::int64_t(tile.bh) * p.sq + permuted] : permuted;
      if (unsigned(query_index) >= unsigned(p.sq)) query_index = -1;
    }
    shared.query_rows[row] = query_index;
    copy_rows_async<Traits>(sm80::shared_address(shared.q), p.q + b * p.q_stride[0] + h * p.q_stride[1],
                            p.q_stride[2], query_index, warp, lane);
    const std::uint32_t q_full = sm80::shared_address(&barriers.q_full);
    sm90::cp_async_mbarrier_arrive(q_full);
    sm90::mbarrier_arrive(q_full);  // publishes query_rows
  }
  if (plan.total_tiles == 0) return;

  const std::uint16_t* k_rows = p.k + b * p.k_stride[0] + h * p.k_stride[1];
  const std::uint16_t* v_rows = p.v + b * p.v_stride[0] + h * p.v_stride[1];
  const std::int64_t means_head = std::int64_t(tile.bh) * p.key_clusters * Traits::kHeadDim;

  // Step t's row of this thread: an original key index, or a key cluster and its size.
  auto resolve = [&](int t) {
    SlotInfo slot;
    if (t < plan.exact_tiles) {
      slot.index = keys.key_at(t * Traits::kKeyTile + row, plan.exact_total, lane);
    } else {
      const int entry = plan.mean_begin + (t - plan.exact_tiles) * Traits::kKeyTile + row;
      if (entry < plan.mean_end) {
        const int j = p.compensated_clusters[entry];
        if (j >= 0 && j < p.key_clusters) {
          slot.count = p.key_counts[std::int64_t(tile.bh) * p.key_clusters + j];
          slot.index = slot.count > 0 ? j : -1;
        }
      }
    }
    return slot;
  };
  auto source = [&](int t, bool key) -> const std::uint16_t* {
    if (t < plan.exact_tiles) return key ? k_rows : v_rows;
    return (key ? params.key_means : params.value_means) + means_head;
  };
  auto stride = [&](int t, bool key) -> std::int64_t {
    return t < plan.exact_tiles ? (key ? p.k_stride[2] : p.v_stride[2]) : Traits::kHeadDim;
  };
  auto load_k = [&](int t, const SlotInfo& slot) {
    const int stage = t % Traits::kStages;
    if (t >= Traits::kStages) {
      sm90::mbarrier_wait(sm80::shared_address(&barriers.k_empty[stage]), (t / Traits::kStages + 1) & 1);
    }
    copy_rows_async<Traits>(sm80::shared_address(shared.k[stage]), source(t, true), stride(t, true), slot.index, warp,
                            lane);
    // ln n_j in log2 units: n_j copies of (mu_j, vbar_j) in one key.
    if (t >= plan.exact_tiles) shared.bias[stage][row] = slot.index >= 0 ? __log2f(float(slot.count)) : -INFINITY;
    const std::uint32_t full = sm80::shared_address(&barriers.k_full[stage]);
    sm90::cp_async_mbarrier_arrive(full);
    sm90::mbarrier_arrive(full);  // publishes the bias
  };
  auto load_v = [&](int t, const SlotInfo& slot) {
    const int stage = t % Traits::kStages;
    if (t >= Traits::kStages) {
      sm90::mbarrier_wait(sm80::shared_address(&barriers.v_empty[stage]), (t / Traits::kStages + 1) & 1);
    }
    copy_rows_async<Traits>(sm80::shared_address(shared.v[stage]), source(t, false), stride(t, false), slot.index,
                            warp, lane);
    sm90::cp_async_mbarrier_arrive(sm80::shared_address(&barriers.v_full[stage]));
  };

  // The consumers take K of step t, then V of step t - 1: load in that order. Step t + 1's rows
  // are resolved before waiting for its stage, so their index loads overlap the wait.
  SlotInfo current = resolve(0);
  load_k(0, current);
#pragma unroll 1
  for (int t = 0; t < plan.total_tiles; ++t) {
    SlotInfo next;
    if (t + 1 < plan.total_tiles) {
      next = resolve(t + 1);
      load_k(t + 1, next);
    }
    load_v(t, current);
    current = next;
  }
  // Leave no copy in flight behind an exited thread.
  sm80::cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Consumers: wgmma tile steps and the online softmax on the accumulator fragment.
// ---------------------------------------------------------------------------------------------

// Per-thread softmax state of rows g and g + 8 of the warp's 16 (g = lane / 4); row_max in log2
// units, row_sum this thread's share (summed over the quad in the epilogue).
template <typename Traits>
struct ConsumerState {
  float o[Traits::kHeadDim / 2];
  float row_max[2];
  float row_sum[2];
  float correction[2];  // of the last softmax step, applied to o before its P V
  bool rescale;         // warp-uniform: the last step moved the max, so o needs the correction
};

// The running max moves only when a step's max exceeds it by more than this (log2 units), so a
// probability may reach 2^8 before it is rounded to 16 bits (fine in bf16 and fp16) and most
// steps skip rescaling o (FlashAttention-4's lazy rescale). The result is the same softmax: sums,
// o and the log-sum-exp all refer to the same max.
constexpr float kMaxSlackLog2 = 8.f;

// A step's scores on the S fragment (column 8j + 2q + e of s[4j + 2h + e]) before the softmax:
// exact keys stay raw dot products (the softmax folds the scale into its exponent's FFMA, as
// FlashAttention-3 does, so a full step costs no multiply pass), a tail of valid keys gets -inf
// beyond it, and pseudo-keys become logits in log2 units with their bias (scale 1 after).
template <typename Traits>
__device__ __forceinline__ void mask_scores(float (&s)[Traits::kKeyTile / 2], int valid, int quad) {
#pragma unroll
  for (int i = 0; i < Traits::kKeyTile / 2; ++i) {
    const int column = 8 * (i / 4) + 2 * quad + (i & 1);
    if (column >= valid) s[i] = -INFINITY;
  }
}
template <typename Traits>
__device__ __forceinline__ void bias_logits(float (&s)[Traits::kKeyTile / 2], const float* bias, float scale_log2,
                                            int quad) {
#pragma unroll
  for (int j = 0; j < Traits::kKeyTile / 8; ++j) {
    const float2 shift = *reinterpret_cast<const float2*>(bias + 8 * j + 2 * quad);
    s[4 * j + 0] = fmaf(s[4 * j + 0], scale_log2, shift.x);
    s[4 * j + 1] = fmaf(s[4 * j + 1], scale_log2, shift.y);
    s[4 * j + 2] = fmaf(s[4 * j + 2], scale_log2, shift.x);
    s[4 * j + 3] = fmaf(s[4 * j + 3], scale_log2, shift.y);
  }
}

// Online softmax update with the step's scores s in units where `scale` (> 0) makes them log2
// logits: s becomes exp2(scale s - running max), the row sums take the step, and when the max
// moves (kMaxSlackLog2; decided per warp, so the skip is a uniform branch) the correction for o
// is kept for the next P V. The max is taken before scaling (a positive scale keeps the order).
template <typename Traits>
__device__ __forceinline__ void softmax_step(float (&s)[Traits::kKeyTile / 2], ConsumerState<Traits>& state,
                                             float scale) {
  float step_max[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < Traits::kKeyTile / 8; ++j) m = fmaxf(m, fmaxf(s[4 * j + 2 * half], s[4 * j + 2 * half + 1]));
    m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
    m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
    step_max[half] = m * scale;
  }
  // -inf + slack stays -inf: a row's first finite max always moves it.
  state.rescale = __any_sync(kFullMask, step_max[0] > state.row_max[0] + kMaxSlackLog2 ||
                                            step_max[1] > state.row_max[1] + kMaxSlackLog2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (state.rescale) {
      const float row_max = fmaxf(state.row_max[half], step_max[half]);
      state.correction[half] = sm80::exp2_approx(state.row_max[half] - exponent_base(row_max));
      state.row_max[half] = row_max;
      state.row_sum[half] *= state.correction[half];
    }
    const float base = exponent_base(state.row_max[half]);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < Traits::kKeyTile / 8; ++j) {
      s[4 * j + 2 * half] = sm80::exp2_approx(fmaf(s[4 * j + 2 * half], scale, -base));
      s[4 * j + 2 * half + 1] = sm80::exp2_approx(fmaf(s[4 * j + 2 * half + 1], scale, -base));
      sum += s[4 * j + 2 * half] + s[4 * j + 2 * half + 1];
    }
    state.row_sum[half] += sum;
  }
}

template <typename Traits>
__device__ __forceinline__ void rescale_output(ConsumerState<Traits>& state) {
  if (!state.rescale) return;
#pragma unroll
  for (int i = 0; i < Traits::kHeadDim / 2; ++i) state.o[i] *= state.correction[(i >> 1) & 1];
}

// P's A fragments for the k16 steps of P V: the S accumulators in order, packed in pairs.
template <typename Traits>
__device__ __forceinline__ void pack_probabilities(const float (&s)[Traits::kKeyTile / 2],
                                                   std::uint32_t (&p)[Traits::kKeySteps][4]) {
#pragma unroll
  for (int step = 0; step < Traits::kKeySteps; ++step) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      p[step][i] = sm80::pack_pair<typename Traits::T>(s[8 * step + 2 * i], s[8 * step + 2 * i + 1]);
    }
  }
}

// Issues S = Q K^T for this consumer's 64 rows and key stage `k_tile` (one commit group).
template <typename Traits>
__device__ __forceinline__ void issue_scores(float (&s)[Traits::kKeyTile / 2], std::uint32_t q_tile,
                                             std::uint32_t k_tile) {
  sm90::fence_operands(s);
  sm90::wgmma_fence();
#pragma unroll
  for (int step = 0; step < Traits::kDSteps; ++step) {
    // Row 0 of a column block: the k16 step's start inside its swizzle atoms.
    const std::uint64_t a = sm90::make_descriptor(q_tile + sm90::swizzled_offset<Traits::kQueryRows>(0, 2 * step), 16,
                                                  sm90::kSwizzleAtomBytes);
    const std::uint64_t b = sm90::make_descriptor(k_tile + sm90::swizzled_offset<Traits::kKeyTile>(0, 2 * step), 16,
                                                  sm90::kSwizzleAtomBytes);
    sm90::wgmma_ss_m64n128k16<typename Traits::T>(s, a, b, step > 0 ? 1 : 0);
  }
  sm90::wgmma_commit();
}

// Issues O += P V for value stage `v_tile` (one commit group).
template <typename Traits>
__device__ __forceinline__ void issue_values(ConsumerState<Traits>& state, std::uint32_t (&p)[Traits::kKeySteps][4],
                                             std::uint32_t v_tile) {
  sm90::fence_operands(state.o);
  sm90::fence_operands(p);
  sm90::wgmma_fence();
#pragma unroll
  for (int step = 0; step < Traits::kKeySteps; ++step) {
    // Keys [16 step, 16 step + 16): two whole atoms; column blocks of 64 d values kKeyTile rows apart.
    const std::uint64_t b = sm90::make_descriptor(v_tile + sm90::swizzled_offset<Traits::kKeyTile>(16 * step, 0),
                                                  Traits::kKeyTile * sm90::kSwizzleRowBytes, sm90::kSwizzleAtomBytes);
    sm90::wgmma_rs_trans_b<typename Traits::T, Traits::kHeadDim>(state.o, p[step], b);
  }
  sm90::wgmma_commit();
}

// Normalises the consumer's rows and writes them to their original positions, staged through
// the consumer's rows of the Q buffer (its last wgmma has completed), and, when asked, each
// row's log-sum-exp at its original position. Each warp stages and stores its own 16 rows.
template <typename Traits>
__device__ __forceinline__ void store_output(ConsumerState<Traits>& state, SharedStorage<Traits>& shared,
                                             const KernelParams& p, const QueryTile& tile, int consumer, int warp,
                                             int lane) {
  using T = typename Traits::T;
  const int warp_row = Traits::kConsumerRows * consumer + 16 * warp;  // CTA row of the warp's first row
  float* lse = lse_of_head(p, tile.bh);
  float inverse[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = state.row_sum[half];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    // No key at all (drop mode with nothing selected): zeros, and a flag, never NaN.
    inverse[half] = sum > 0.f ? 1.f / sum : 0.f;
    const int row = warp_row + (lane >> 2) + 8 * half;
    if (!(sum > 0.f) && shared.query_rows[row] >= 0 && (lane & 3) == 0) raise_error(p, kErrorRowWithoutKeys);
    // The quad shares row_max (reduced in every step) and now the sum: its first lane writes.
    if (lse != nullptr && (lane & 3) == 0) {
      const int index = shared.query_rows[row];
      if (index >= 0) lse[index * p.lse_stride[2]] = row_log_sum_exp(state.row_max[half], sum);
    }
  }
#pragma unroll
  for (int j = 0; j < Traits::kHeadDim / 8; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = warp_row + (lane >> 2) + 8 * half;
      const std::uint32_t offset = sm90::swizzled_offset<Traits::kQueryRows>(row, j) + 4 * (lane & 3);
      *reinterpret_cast<std::uint32_t*>(shared.q + offset) = sm80::pack_pair<T>(
          state.o[4 * j + 2 * half] * inverse[half], state.o[4 * j + 2 * half + 1] * inverse[half]);
    }
  }
  __syncwarp();
  std::uint16_t* out = p.out + (tile.bh / p.heads) * p.out_stride[0] + (tile.bh % p.heads) * p.out_stride[1];
  constexpr int kRowsPerPass = 32 / Traits::kChunks;
#pragma unroll
  for (int pass = 0; pass < 16 / kRowsPerPass; ++pass) {
    const int row = warp_row + pass * kRowsPerPass + lane / Traits::kChunks;
    const int chunk = lane % Traits::kChunks;
    const int index = shared.query_rows[row];
    if (index >= 0) {
      const uint4 piece =
          *reinterpret_cast<const uint4*>(shared.q + sm90::swizzled_offset<Traits::kQueryRows>(row, chunk));
      *reinterpret_cast<uint4*>(out + index * p.out_stride[2] + chunk * 8) = piece;
    }
  }
}

// A lone tile (one 64-row entry) splits its key steps between the two consumers instead of
// leaving one idle: both take the tile's 64 rows, consumer c the steps t = c, c + 2, ..., and
// the second hands its (o, max, sum) to the first through shared memory, which merges them as
// two partial softmaxes and stores the rows. Each step still has one consumer, so the stages'
// empty barriers count 128 arrivals either way.
template <typename Traits>
__device__ __forceinline__ void merge_partner(ConsumerState<Traits>& state, SharedStorage<Traits>& shared,
                                              int consumer, int thread) {
  constexpr int kO = Traits::kHeadDim / 2;
  constexpr int kBarrier = 1;  // named barrier of the two consumer warpgroups (0 is __syncthreads)
  if (consumer == 1) {
#pragma unroll
    for (int i = 0; i < kO; ++i) shared.merge[i][thread] = state.o[i];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      shared.merge[kO + half][thread] = state.row_max[half];
      shared.merge[kO + 2 + half][thread] = state.row_sum[half];
    }
    asm volatile("bar.arrive %0, 256;\n" ::"n"(kBarrier) : "memory");
    return;
  }
  asm volatile("bar.sync %0, 256;\n" ::"n"(kBarrier) : "memory");
  float own[2], other[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float other_max = shared.merge[kO + half][thread];
    const float row_max = fmaxf(state.row_max[half], other_max);
    const float base = exponent_base(row_max);  // both empty: exp2(-inf) = 0, no NaN
    own[half] = sm80::exp2_approx(state.row_max[half] - base);
    other[half] = sm80::exp2_approx(other_max - base);
    state.row_max[half] = row_max;
    state.row_sum[half] = state.row_sum[half] * own[half] + shared.merge[kO + 2 + half][thread] * other[half];
  }
#pragma unroll
  for (int i = 0; i < kO; ++i) {
    const int half = (i >> 1) & 1;
    state.o[i] = state.o[i] * own[half] + shared.merge[i][thread] * other[half];
  }
}

// Consumer `consumer` runs the tile's key steps first, first + stride, ... (stride 2 on a lone
// tile, see merge_partner) over the 64 query rows at row_block * 64 of the tile.
template <typename Traits>
__device__ __forceinline__ void consume(const KernelParams& p, SharedStorage<Traits>& shared,
                                        Barriers<Traits>& barriers, const QueryTile& tile, const KeyPlan& plan,
                                        int consumer, bool lone, int warp, int lane) {
  const int quad = lane & 3;
  const int first = lone ? consumer : 0, stride = lone ? 2 : 1;
  const int row_block = lone ? 0 : consumer;
  const std::uint32_t q_tile =
      sm80::shared_address(shared.q) + sm90::swizzled_offset<Traits::kQueryRows>(Traits::kConsumerRows * row_block, 0);
  auto k_tile = [&](int t) { return sm80::shared_address(shared.k[t % Traits::kStages]); };
  auto v_tile = [&](int t) { return sm80::shared_address(shared.v[t % Traits::kStages]); };
  auto wait_full = [&](std::uint64_t* full, int t) {
    sm90::mbarrier_wait(sm80::shared_address(&full[t % Traits::kStages]), (t / Traits::kStages) & 1);
    sm90::fence_proxy_async();  // cp.async wrote the stage through the generic proxy; wgmma reads it
  };
  // One arrival per consumer thread, after its last read of the stage (as CUTLASS's pipelines
  // do). The release orders each thread's own reads (the bias) before the producer's rewrite;
  // one arrival per warp after __syncwarp relied on the warp barrier to carry the other lanes'
  // reads, which compute-sanitizer's racecheck reported as WAR hazards on the bias.
  auto release = [&](std::uint64_t* empty, int t) {
    sm90::mbarrier_arrive(sm80::shared_address(&empty[t % Traits::kStages]));
  };
  // Step t's scores made ready for softmax_step; returns the scale that step applies. Reads the
  // bias of K's stage, so before K is released.
  auto logits = [&](float (&s)[Traits::kKeyTile / 2], int t) {
    if (t < plan.exact_tiles) {
      const int valid = plan.exact_total - t * Traits::kKeyTile;
      if (valid < Traits::kKeyTile) mask_scores<Traits>(s, valid, quad);
      return p.scale_log2;
    }
    bias_logits<Traits>(s, shared.bias[t % Traits::kStages], p.scale_log2, quad);
    return 1.f;
  };

  ConsumerState<Traits> state;
#pragma unroll
  for (int i = 0; i < Traits::kHeadDim / 2; ++i) state.o[i] = 0.f;
  state.row_max[0] = state.row_max[1] = -INFINITY;
  state.row_sum[0] = state.row_sum[1] = 0.f;
  state.correction[0] = state.correction[1] = 1.f;
  state.rescale = false;

  sm90::mbarrier_wait(sm80::shared_address(&barriers.q_full), 0);
  sm90::fence_proxy_async();

  if (first < plan.total_tiles) {
    float s[Traits::kKeyTile / 2];
    std::uint32_t probabilities[Traits::kKeySteps][4];

    // The first step: scores and softmax only; its P V runs in the next step (or the tail).
    wait_full(barriers.k_full, first);
    issue_scores<Traits>(s, q_tile, k_tile(first));
    sm90::wgmma_wait<0>();
    sm90::fence_operands(s);
    float scale = logits(s, first);
    release(barriers.k_empty, first);
    softmax_step<Traits>(s, state, scale);
    pack_probabilities<Traits>(s, probabilities);

    int last = first;  // the step whose P V is pending
#pragma unroll 1
    for (int t = first + stride; t < plan.total_tiles; t += stride) {
      wait_full(barriers.k_full, t);
      issue_scores<Traits>(s, q_tile, k_tile(t));
      rescale_output<Traits>(state);
      wait_full(barriers.v_full, last);
      issue_values<Traits>(state, probabilities, v_tile(last));
      sm90::wgmma_wait<1>();  // the scores of step t; P V of the step before still runs
      sm90::fence_operands(s);
      scale = logits(s, t);
      release(barriers.k_empty, t);
      softmax_step<Traits>(s, state, scale);
      sm90::wgmma_wait<0>();
      sm90::fence_operands(state.o);
      sm90::fence_operands(s);
      release(barriers.v_empty, last);
      pack_probabilities<Traits>(s, probabilities);
      last = t;
    }

    rescale_output<Traits>(state);
    wait_full(barriers.v_full, last);
    issue_values<Traits>(state, probabilities, v_tile(last));
    sm90::wgmma_wait<0>();
    sm90::fence_operands(state.o);
    release(barriers.v_empty, last);
  }
  if (lone) {
    merge_partner<Traits>(state, shared, consumer, 32 * warp + lane);
    if (consumer == 1) return;
  }
  store_output<Traits>(state, shared, p, tile, row_block, warp, lane);
}

#endif  // SVGEAR_SM90A_ENABLED

// ---------------------------------------------------------------------------------------------
// The kernel: work tile and key plan (all threads), then the warpgroup roles.
// ---------------------------------------------------------------------------------------------

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    sparse_attention_sm90_kernel(const __grid_constant__ Sm90Params params) {
#if defined(SVGEAR_SM90A_ENABLED)
  // Static, so the host can tell this sm_90a body from the empty one of other builds.
  __shared__ Barriers<Traits> barriers;
  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  const std::uint32_t raw = sm80::shared_address(shared_bytes);
  auto& shared = *reinterpret_cast<SharedStorage<Traits>*>(shared_bytes + ((1024 - raw % 1024) % 1024));
  const KernelParams& p = params.base;
  const int warp = int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;

  QueryTile tile;
  if (!fetch_query_tile(params, tile)) return;
  const std::int64_t list_row = std::int64_t(tile.bh) * p.query_clusters + tile.cluster;
  // A lone 64-row entry splits its key steps between both consumers (merge_partner).
  const bool lone = tile.rows[1] == 0;

  SelectedKeys keys;
  keys.clusters = p.selected_offsets != nullptr ? p.selected_clusters : nullptr;
  keys.offsets = p.k_offsets != nullptr ? p.k_offsets + std::int64_t(tile.bh) * (p.key_clusters + 1) : nullptr;
  keys.order = p.k_order != nullptr ? p.k_order + std::int64_t(tile.bh) * p.sk : nullptr;
  keys.entry_begin = p.selected_offsets != nullptr ? p.selected_offsets[list_row] : 0;
  keys.entry_end = p.selected_offsets != nullptr ? p.selected_offsets[list_row + 1] : p.key_clusters;
  keys.key_clusters = p.key_clusters;
  keys.sk = p.sk;
  keys.next_entry = keys.entry_begin;

  if (threadIdx.x == 0) {
    sm90::mbarrier_init(sm80::shared_address(&barriers.q_full), 2 * 128);
    for (int stage = 0; stage < Traits::kStages; ++stage) {
      // Full: one cp.async arrival per producer thread (+ one release arrival for K's bias);
      // empty: one arrival per consumer thread.
      sm90::mbarrier_init(sm80::shared_address(&barriers.k_full[stage]), 2 * 128);
      sm90::mbarrier_init(sm80::shared_address(&barriers.v_full[stage]), 128);
      // each step has one consumer on a lone tile (merge_partner), both otherwise
      sm90::mbarrier_init(sm80::shared_address(&barriers.k_empty[stage]), lone ? 128 : 2 * 128);
      sm90::mbarrier_init(sm80::shared_address(&barriers.v_empty[stage]), lone ? 128 : 2 * 128);
    }
    sm90::mbarrier_init_fence();
  }

  long long exact_keys = 0;
  for (int entry = keys.entry_begin + int(threadIdx.x); entry < keys.entry_end; entry += Traits::kThreads) {
    int begin;
    exact_keys += keys.cluster_keys(entry, begin);
  }
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) exact_keys += __shfl_xor_sync(kFullMask, exact_keys, delta);
  if (lane == 0) shared.partial[warp] = exact_keys;
  __syncthreads();  // also publishes the initialised barriers
  exact_keys = 0;
#pragma unroll
  for (int w = 0; w < Traits::kThreads / 32; ++w) exact_keys += shared.partial[w];

  KeyPlan plan;
  plan.exact_total = int(min(exact_keys, (long long)std::numeric_limits<int>::max() - Traits::kKeyTile));
  plan.exact_tiles = (plan.exact_total + Traits::kKeyTile - 1) / Traits::kKeyTile;
  plan.mean_begin = plan.mean_end = 0;
  if (p.compensated_offsets != nullptr) {
    plan.mean_begin = p.compensated_offsets[list_row];
    plan.mean_end = max(p.compensated_offsets[list_row + 1], plan.mean_begin);
  }
  plan.total_tiles = plan.exact_tiles + (plan.mean_end - plan.mean_begin + Traits::kKeyTile - 1) / Traits::kKeyTile;

  const int warpgroup = int(threadIdx.x) / 128;
  if (warpgroup == 0) {
    sm90::decrease_registers<Traits::kProducerRegisters>();
    produce<Traits>(params, shared, barriers, tile, keys, plan, warp, lane);
  } else {
    sm90::increase_registers<Traits::kConsumerRegisters>();
    const int consumer = warpgroup - 1;
    consume<Traits>(p, shared, barriers, tile, plan, consumer, lone, warp % 4, lane);
  }
#else
  (void)params;  // built without sm_90a: never launched (sm90_attention_available() is false)
#endif
}

// Rounds the fp32 cluster means to the element type (round to nearest even, as the sm80 kernel
// does in shared memory); `quads` groups of 4 values.
template <typename Element>
__global__ void round_means_kernel(const float4* key_means, const float4* value_means, std::int64_t quads,
                                   uint2* key_out, uint2* value_out) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < quads;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float4 key = key_means[i];
    const float4 value = value_means[i];
    key_out[i] = make_uint2(sm80::pack_pair<Element>(key.x, key.y), sm80::pack_pair<Element>(key.z, key.w));
    value_out[i] = make_uint2(sm80::pack_pair<Element>(value.x, value.y), sm80::pack_pair<Element>(value.z, value.w));
  }
}

template <typename Traits>
void launch(const Sm90Params& params, std::int64_t ctas, cudaStream_t stream) {
  constexpr int kSharedBytes = int(sizeof(SharedStorage<Traits>)) + 1024;  // + alignment slack
  auto* kernel = sparse_attention_sm90_kernel<Traits>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes),
             "cudaFuncSetAttribute(sparse_attention_sm90_kernel, max dynamic shared memory)");
  kernel<<<dim3(unsigned(ctas)), dim3(Traits::kThreads), kSharedBytes, stream>>>(params);
  check_launch("sparse_attention_sm90_kernel");
}

template <typename Element>
void launch_for_head_dim(const Sm90Params& params, int head_dim, std::int64_t ctas, cudaStream_t stream) {
  if (head_dim == 64) {
    launch<Sm90Traits<Element, 64>>(params, ctas, stream);
  } else {
    launch<Sm90Traits<Element, 128>>(params, ctas, stream);
  }
}

// Whether the loaded image of the kernel is the sm_90a build on this device.
bool probe_sm90_kernel(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, sparse_attention_sm90_kernel<Sm90Traits<__nv_bfloat16, 128>>) !=
      cudaSuccess) {
    cudaGetLastError();  // no image for this device
    return false;
  }
  // An sm_90a cubin reports PTX and binary version 90; compute_80 PTX JIT-compiled for the
  // device reports PTX 80, and a plain sm_90 build has the empty body without static barriers.
  return attributes.binaryVersion == 90 && attributes.ptxVersion >= 90 && attributes.sharedSizeBytes > 0;
}

}  // namespace

void launch_sm90(const KernelParams& base, const SparseAttentionProblem& problem, cudaStream_t stream) {
  Sm90Params params{};
  params.base = base;
  params.tiles_per_head = int((problem.sq + 127) / 128);
  params.tile_count = int(problem.tile_count);
  const std::int64_t ctas = problem.tiles != nullptr ? problem.tile_count
                                                     : std::int64_t(base.bh_count) * params.tiles_per_head;
  if (ctas <= 0) return;
  if (ctas > std::numeric_limits<int>::max()) throw Error("sparse_attention: too many work tiles for one launch");

  // Released in stream order after the kernel.
  DeviceBuffer<std::uint16_t> rounded_means;
  if (problem.compensated_offsets != nullptr) {
    const std::int64_t count = std::int64_t(base.bh_count) * problem.key_clusters * problem.head_dim;
    rounded_means = DeviceBuffer<std::uint16_t>(std::size_t(2 * count), stream);
    params.key_means = rounded_means.get();
    params.value_means = rounded_means.get() + count;
    constexpr int kThreads = 256;
    const std::int64_t quads = count / 4;
    const unsigned blocks = unsigned(std::min<std::int64_t>((quads + kThreads - 1) / kThreads, 4096));
    auto* key_out = reinterpret_cast<uint2*>(rounded_means.get());
    auto* value_out = reinterpret_cast<uint2*>(rounded_means.get() + count);
    const auto* key_in = reinterpret_cast<const float4*>(problem.key_means);
    const auto* value_in = reinterpret_cast<const float4*>(problem.value_means);
    if (problem.dtype == DType::bf16) {
      round_means_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(key_in, value_in, quads, key_out, value_out);
    } else {
      round_means_kernel<__half><<<blocks, kThreads, 0, stream>>>(key_in, value_in, quads, key_out, value_out);
    }
    check_launch("round_means_kernel");
  }

  if (problem.dtype == DType::bf16) {
    launch_for_head_dim<__nv_bfloat16>(params, problem.head_dim, ctas, stream);
  } else {
    launch_for_head_dim<__half>(params, problem.head_dim, ctas, stream);
  }
}

}  // namespace attention

bool sm90_attention_available() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // Per device: 0 unknown, 1 no, 2 yes.
  static std::array<std::atomic<int>, 64> known{};
  if (device < 0 || device >= int(known.size())) return attention::probe_sm90_kernel(device);
  int state = known[std::size_t(device)].load(std::memory_order_relaxed);
  if (state == 0) {
    state = attention::probe_sm90_kernel(device) ? 2 : 1;
    known[std::size_t(device)].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

std::optional<bool> forced_sm90_kernel(const char* variable) {
  const char* value = std::getenv(variable);
  const std::string choice = value != nullptr ? value : "";
  if (choice.empty() || choice == "auto") return std::nullopt;
  if (choice == "sm80") return false;
  if (choice != "sm90") throw Error(std::string(variable) + "='" + choice + "' is not one of sm80, sm90, auto");
  if (!sm90_attention_available()) {
    throw Error(std::string(variable) +
                "=sm90 needs a compute capability 9.0 GPU and a build with CUDA architecture 90a "
                "(CMAKE_CUDA_ARCHITECTURES); unset it to pick the kernel automatically");
  }
  return true;
}

}  // namespace svgear::cuda
