// Sweep 1 of the EAR probe (error_probe.cu): FlashAttention's online softmax of each probe row
// over one chunk of the head's keys, so every (head, row block, key chunk) is its own CTA and
// the grid fills the GPU. Each CTA leaves its rows' chunk max m_c, denominator M_c and
// unnormalised output O_c; combine_exact_chunks merges the chunks into m, M and o.
#pragma once

#include <cmath>

#include "cuda/probe_common.cuh"

namespace svgear::cuda::detail::probe {

// Dv: the values' width (D, or the sketch's k).
template <class E, int D, int Dv>
struct alignas(16) ExactSweepShared {
  E q[kRows][kTileStride<D>];
  E k[2][kKeys][kTileStride<D>];
  __half v[2][kKeys][kTileStride<Dv>];
};

static_assert(2 * sizeof(ExactSweepShared<__nv_bfloat16, 128, 128>) <= 227 * 1024, "two exact-sweep CTAs per SM");

// Two CTAs per SM (102 KB of shared memory each at D = 128): one's tile loads and softmax
// overlap the other's MMAs.
template <class E, int D, int Dv>
__global__ void __launch_bounds__(kThreads, 2) exact_sweep_kernel(const Args<E> a) {
  constexpr int kDTiles = Dv / 8;
  constexpr int kHalf = kKeys / 2;
  extern __shared__ __align__(16) unsigned char smem[];
  auto& sh = *reinterpret_cast<ExactSweepShared<E, D, Dv>*>(smem);

  const std::int64_t bh = blockIdx.y;
  const int row_block = int(blockIdx.x) % a.row_blocks, chunk = int(blockIdx.x) / a.row_blocks;
  const std::int64_t row0 = std::int64_t(row_block) * kRows;
  const std::int64_t rows_in_head = a.row_count[bh];
  if (row0 >= rows_in_head) return;
  const std::int64_t tiles = (a.sk + kKeys - 1) / kKeys;  // the host keeps exact_chunks <= tiles
  const std::int64_t tile_begin = chunk * tiles / a.exact_chunks, tile_end = (chunk + 1) * tiles / a.exact_chunks;

  const HeadRows<E> k_rows = head_rows<E>(a.k, a.heads, bh);
  const std::int32_t* k_order = a.k_order + bh * a.sk;
  const __half* values = a.values + bh * a.sk * Dv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  TileTokens tokens;  // of the next tile to load
  tokens.load(k_order, tile_begin * kKeys, a.sk, lane);
  load_probe_rows<E, D>(&sh.q[0][0], a, bh, row0, rows_in_head);
  load_key_tile<E, D, Dv>(&sh.k[0][0][0], &sh.v[0][0][0], k_rows, a.k_aligned, tokens, values, tile_begin * kKeys, a.sk);
  sm80::cp_async_commit();
  tokens.load(k_order, (tile_begin + 1) * kKeys, a.sk, lane);

  const float scale_log2 = 1.4426950408889634f / sqrtf(float(D));  // logits in log2 units

  float o[kRowBlocks][kDTiles][4] = {};
  float row_max[kRowBlocks][2], denominator[kRowBlocks][2];  // [m][h]: row 16 m + g + 8 h of the warp
#pragma unroll
  for (int m = 0; m < kRowBlocks; ++m) {
    row_max[m][0] = row_max[m][1] = -INFINITY;
    denominator[m][0] = denominator[m][1] = 0.0f;
  }

  for (std::int64_t t = tile_begin; t < tile_end; ++t) {
    const int stage = int(t - tile_begin) & 1;
    if (t + 1 < tile_end) {
      load_key_tile<E, D, Dv>(&sh.k[stage ^ 1][0][0], &sh.v[stage ^ 1][0][0], k_rows, a.k_aligned, tokens, values,
                          (t + 1) * kKeys, a.sk);
      tokens.load(k_order, (t + 2) * kKeys, a.sk, lane);
    }
    sm80::cp_async_commit();
    sm80::cp_async_wait<1>();
    __syncthreads();

    // Two halves of 32 keys, each its own online-softmax step: 32 live fp32 logits instead of 64
    // next to the 128 output accumulators.
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      const std::int64_t first = t * kKeys + kHalf * half;
      if (first >= a.sk) break;  // uniform: the last tile may end in its first half
      float s[kRowBlocks][kHalf / 8][4] = {};
      warp_mma_abt_rows<E, D, kHalf, kRowBlocks, 2>(s, &sh.q[0][0], warp * kRowsPerWarp, &sh.k[stage][kHalf * half][0],
                                                    lane);
      const bool tail = first + kHalf > a.sk;
#pragma unroll
      for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
        for (int nt = 0; nt < kHalf / 8; ++nt) {
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const bool valid = !tail || first + nt * 8 + 2 * q + (x & 1) < a.sk;
            s[m][nt][x] = valid ? s[m][nt][x] * scale_log2 : -INFINITY;
          }
        }
      }
#pragma unroll
      for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kHalf / 8; ++nt)
            tile_max = fmaxf(tile_max, fmaxf(s[m][nt][2 * h], s[m][nt][2 * h + 1]));
          const float new_max = fmaxf(row_max[m][h], quad_max(tile_max));  // finite: the half has a key
          const float rescale = sm80::exp2_approx(row_max[m][h] - new_max);
          row_max[m][h] = new_max;
          denominator[m][h] *= rescale;
          // Once the max settles (the usual case after the first tiles) no row of the warp moves.
          if (__any_sync(0xffffffffu, rescale != 1.0f)) {
#pragma unroll
            for (int nt = 0; nt < kDTiles; ++nt) {
              o[m][nt][2 * h] *= rescale;
              o[m][nt][2 * h + 1] *= rescale;
            }
          }
#pragma unroll
          for (int nt = 0; nt < kHalf / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              s[m][nt][2 * h + e] = sm80::exp2_approx(s[m][nt][2 * h + e] - new_max);
              denominator[m][h] += s[m][nt][2 * h + e];
            }
          }
        }
      }
      // O += P V with P as fp16 (11 significant bits) against the fp16 values.
      const __half* v_tile = &sh.v[stage][kHalf * half][0];
#pragma unroll
      for (int ks = 0; ks < kHalf / 16; ++ks) {
        std::uint32_t p[kRowBlocks][4];
#pragma unroll
        for (int m = 0; m < kRowBlocks; ++m) {
          p[m][0] = pack_probabilities(s[m][2 * ks][0], s[m][2 * ks][1]);
          p[m][1] = pack_probabilities(s[m][2 * ks][2], s[m][2 * ks][3]);
          p[m][2] = pack_probabilities(s[m][2 * ks + 1][0], s[m][2 * ks + 1][1]);
          p[m][3] = pack_probabilities(s[m][2 * ks + 1][2], s[m][2 * ks + 1][3]);
        }
#pragma unroll
        for (int d0 = 0; d0 < Dv; d0 += 16) {
          std::uint32_t b[4];
          sm80::ldmatrix_x4_trans(b, bt_fragment<__half, Dv>(v_tile, ks * 16, d0, lane));
#pragma unroll
          for (int m = 0; m < kRowBlocks; ++m) {
            sm80::mma_m16n8k16<__half>(o[m][d0 / 8], p[m], b[0], b[1]);
            sm80::mma_m16n8k16<__half>(o[m][d0 / 8 + 1], p[m], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // the stage is reloaded next iteration
  }

  // This chunk's softmax state of each row.
  const std::int64_t part = (bh * a.exact_chunks + chunk) * a.row_capacity;
#pragma unroll
  for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::int64_t row = row0 + warp * kRowsPerWarp + 16 * m + g + 8 * h;
      const float total = quad_sum(denominator[m][h]);
      if (row >= rows_in_head) continue;
      if (q == 0) {
        a.part_max[part + row] = row_max[m][h];
        a.part_denominator[part + row] = total;
      }
      float* out = a.part_output + (part + row) * Dv;
#pragma unroll
      for (int nt = 0; nt < kDTiles; ++nt) {
        *reinterpret_cast<float2*>(out + nt * 8 + 2 * q) = make_float2(o[m][nt][2 * h], o[m][nt][2 * h + 1]);
      }
    }
  }
}

// m = max_c m_c, M = sum_c M_c 2^(m_c - m), o = sum_c O_c 2^(m_c - m) / M: one warp per row.
template <class E, int Dv>
__global__ void combine_exact_chunks_kernel(const Args<E> a, std::int64_t heads_total) {
  constexpr int kPerLane = Dv / 32;
  static_assert(kPerLane * 32 == Dv, "a lane per 32 value columns");
  const int lane = threadIdx.x % 32;
  const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t w = (blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x) / 32; w < heads_total * a.row_capacity;
       w += warps) {
    const std::int64_t bh = w / a.row_capacity, row = w % a.row_capacity;
    if (row >= a.row_count[bh]) continue;
    float m = -INFINITY;
    for (int c = 0; c < a.exact_chunks; ++c) m = fmaxf(m, a.part_max[(bh * a.exact_chunks + c) * a.row_capacity + row]);
    float total = 0.0f, out[kPerLane] = {};
    for (int c = 0; c < a.exact_chunks; ++c) {
      const std::int64_t part = (bh * a.exact_chunks + c) * a.row_capacity + row;
      const float weight = exp2f(a.part_max[part] - m);
      total += a.part_denominator[part] * weight;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) out[e] += a.part_output[part * Dv + lane + 32 * e] * weight;
    }
    if (lane == 0) {
      a.row_max[w] = m;
      a.row_denominator[w] = total;
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) a.row_output[w * Dv + lane + 32 * e] = out[e] / total;
  }
}

}  // namespace svgear::cuda::detail::probe
