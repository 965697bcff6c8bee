// Sweep 2 of the EAR probe (error_probe.cu): with each row's m, M and o known, per key cluster j
// its mass d_j = sum exp2(l - m) and a_j = sum exp2(l - m) v over its keys, then
//   o_j' - o = (s_j vbar_j - a_j - Delta_j o) / (M + Delta_j),  Delta_j = s_j - d_j,
// with s_j = n_j exp2(q . mu_j - m) the stand-in mass. A CTA owns 128 probe rows and one chunk of
// whole key clusters (chunk_clusters), so every (row, key cluster) error comes from exactly one
// CTA. The cluster data the finish needs (value means, the key means' hi/lo terms, offsets,
// counts) is staged in shared memory 16 clusters at a time, double-buffered, so no per-cluster
// global load sits on the critical path; q . mu_j of the 16 clusters is one small tensor-core
// product per batch. a_j and d_j come from one fp16 MMA pass per (cluster, 16-key slice): the
// probabilities of keys outside the cluster are masked to zero, and d_j is the product with a
// column of ones, so it sums the same rounded probabilities as a_j.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cuda/probe_common.cuh"

namespace svgear::cuda::detail::probe {

// Dv: the values' width (D, or the sketch's k).
template <class E, int D, int Dv>
struct alignas(16) ClusterBatch {
  float value_means[kBatch][Dv];
  E mean_hi[kBatch][kTileStride<D>];
  E mean_lo[kBatch][kTileStride<D>];
  std::int32_t offsets[kBatch + 4];  // kBatch + 1 used: cluster first + i starts at offsets[i]
  std::int32_t counts[kBatch];
};

template <class E, int D, int Dv>
struct alignas(16) ClusterSweepShared {
  E q[kRows][kTileStride<D>];
  E k[2][kKeys][kTileStride<D>];
  __half v[2][kKeys][kTileStride<Dv>];
  // o of the thread's fragment elements, thread-private: [warp][row block][d tile][lane] holds
  // (row g, cols 2q, 2q + 1), (row g + 8, same cols) of the C layout.
  float4 output[kWarps][kRowBlocks][Dv / 8][32];
  float2 denominator[kWarps][kRowBlocks][32];  // M of the thread's rows g, g + 8 (also thread-private)
  ClusterBatch<E, D, Dv> batch[2];
  float logits[kRows][kBatch + 1];  // log2 of the stand-in mass before - m; +1: no bank conflicts
  float errors[kRows][kBatch + 1];  // per probe row, until summed over its query cluster
  std::int32_t row_cluster[kRows];
  float row_weight[kRows];
};

static_assert(sizeof(ClusterSweepShared<__nv_bfloat16, 128, 128>) <= 227 * 1024,
              "the cluster sweep must fit an H100's 227 KB");

// c = a * b (kOverwrite) or c += a * b for fp16 operands.
template <bool kOverwrite>
__device__ __forceinline__ void mma_f16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                        std::uint32_t b1) {
  if constexpr (kOverwrite) {
    mma_m16n8k16_overwrite<__half>(c, a, b0, b1);
  } else {
    sm80::mma_m16n8k16<__half>(c, a, b0, b1);
  }
}

// 222 KB of shared memory at D = Dv = 128: one CTA per SM.
template <class E, int D, int Dv>
__global__ void __launch_bounds__(kThreads, 1) cluster_sweep_kernel(const Args<E> a) {
  constexpr int kDTiles = Dv / 8;
  constexpr std::uint32_t kOnes = 0x3C003C00u;  // fp16 (1, 1)
  extern __shared__ __align__(16) unsigned char smem[];
  auto& sh = *reinterpret_cast<ClusterSweepShared<E, D, Dv>*>(smem);

  const std::int64_t bh = blockIdx.y;
  const int row_block = int(blockIdx.x) % a.row_blocks, chunk = int(blockIdx.x) / a.row_blocks;
  const std::int64_t row0 = std::int64_t(row_block) * kRows;
  const std::int64_t rows_in_head = a.row_count[bh];
  if (row0 >= rows_in_head) return;
  const int ck = a.key_clusters;
  const std::int32_t* chunk_clusters = a.chunk_clusters + bh * (a.cluster_chunks + 1);
  const int j_begin = chunk_clusters[chunk], j_end = chunk_clusters[chunk + 1];
  if (j_begin >= j_end) return;
  const std::int32_t* k_offsets = a.k_offsets + bh * (ck + 1);
  const int p_begin = k_offsets[j_begin], p_end = k_offsets[j_end];  // positions < 2^31
  const int exponent = values_exponent<D, Dv>(a, bh);
  const float value_scale = ldexpf(1.0f, exponent), value_unscale = ldexpf(1.0f, -exponent);

  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const std::int64_t row = row0 + r;
    const std::int32_t cluster = row < rows_in_head ? a.row_cluster[bh * a.row_capacity + row] : -1;
    float weight = 0.0f;
    if (cluster >= 0) {
      const std::int32_t* q_offsets = a.q_offsets + bh * (a.query_clusters + 1);
      const std::int64_t size = q_offsets[cluster + 1] - q_offsets[cluster];
      weight = float(double(size) / double(std::min<std::int64_t>(a.probes, size) + a.mean_row));
    }
    sh.row_cluster[r] = cluster;
    sh.row_weight[r] = weight;
  }
  for (int idx = threadIdx.x; idx < kRows * (kBatch + 1); idx += kThreads) (&sh.errors[0][0])[idx] = 0.0f;

  const HeadRows<E> k_rows = head_rows<E>(a.k, a.heads, bh);
  const std::int32_t* k_order = a.k_order + bh * a.sk;
  const __half* values = a.values + bh * a.sk * Dv;
  auto load_batch = [&](int buffer, int first_cluster) {
    ClusterBatch<E, D, Dv>& b = sh.batch[buffer];
    constexpr int kMeanChunks = Dv / 4;  // 16-byte chunks of an fp32 row
    for (int idx = threadIdx.x; idx < kBatch * kMeanChunks; idx += kThreads) {
      const int r = idx / kMeanChunks, c = idx % kMeanChunks, j = first_cluster + r;
      const float* src = a.value_means + ((bh * ck + (j < ck ? j : 0)) * Dv + c * 4);
      sm80::cp_async_16(sm80::shared_address(&b.value_means[r][c * 4]), src, j < ck);
    }
    constexpr int kTermChunks = D / 8;
    for (int idx = threadIdx.x; idx < kBatch * kTermChunks; idx += kThreads) {
      // first_cluster + kBatch <= padded_clusters: first_cluster < Ck is a multiple of kBatch.
      const int r = idx / kTermChunks, c = idx % kTermChunks;
      const std::int64_t src = (bh * a.padded_clusters + first_cluster + r) * D + c * 8;
      sm80::cp_async_16(sm80::shared_address(&b.mean_hi[r][c * 8]), a.mean_hi + src, true);
      sm80::cp_async_16(sm80::shared_address(&b.mean_lo[r][c * 8]), a.mean_lo + src, true);
    }
    for (int idx = threadIdx.x; idx <= kBatch; idx += kThreads) {
      const int j = first_cluster + idx;
      cp_async_4(sm80::shared_address(&b.offsets[idx]), k_offsets + (j <= ck ? j : ck), j <= ck);
    }
    for (int idx = threadIdx.x; idx < kBatch; idx += kThreads) {
      const int j = first_cluster + idx;
      cp_async_4(sm80::shared_address(&b.counts[idx]), a.key_counts + bh * ck + (j < ck ? j : 0), j < ck);
    }
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  int batch_first = j_begin - j_begin % kBatch, buffer = 0;
  TileTokens tokens;  // of the next tile to load
  tokens.load(k_order, p_begin, p_end, lane);
  load_probe_rows<E, D>(&sh.q[0][0], a, bh, row0, rows_in_head);
  load_key_tile<E, D, Dv>(&sh.k[0][0][0], &sh.v[0][0][0], k_rows, a.k_aligned, tokens, values, p_begin, p_end);
  tokens.load(k_order, std::int64_t(p_begin) + kKeys, p_end, lane);
  load_batch(0, batch_first);
  if (batch_first + kBatch < j_end) load_batch(1, batch_first + kBatch);
  sm80::cp_async_commit();

  const float scale_log2 = 1.4426950408889634f / sqrtf(float(D));

  // m, M and o of the thread's rows (rows past the head's count: m = 0, M = 1, o = 0, finite).
  float row_max[kRowBlocks][2];
#pragma unroll
  for (int m = 0; m < kRowBlocks; ++m) {
    std::int64_t row[2];
    bool valid[2];
    float denominator[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[h] = row0 + warp * kRowsPerWarp + 16 * m + g + 8 * h;
      valid[h] = row[h] < rows_in_head;
      row_max[m][h] = valid[h] ? a.row_max[bh * a.row_capacity + row[h]] : 0.0f;
      denominator[h] = valid[h] ? a.row_denominator[bh * a.row_capacity + row[h]] : 1.0f;
    }
    sh.denominator[warp][m][lane] = make_float2(denominator[0], denominator[1]);
#pragma unroll
    for (int nt = 0; nt < kDTiles; ++nt) {
      float2 part[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        part[h] =
            valid[h]
                ? *reinterpret_cast<const float2*>(a.row_output + (bh * a.row_capacity + row[h]) * Dv + nt * 8 + 2 * q)
                : make_float2(0.0f, 0.0f);
      }
      sh.output[warp][m][nt][lane] = make_float4(part[0].x, part[0].y, part[1].x, part[1].y);
    }
  }

  // The warp's probe rows stay in registers as A fragments: every key tile and every batch of
  // key means is multiplied by them (32 registers; the kernel runs one CTA per SM anyway).
  static_assert(kRowBlocks == 1, "the held fragments cover one 16-row block per warp");
  std::uint32_t q_fragments[D / 16][4];

  // log2 s_j + m of the batch's clusters for the warp's rows: q . mu_j with mu = hi + lo.
  auto stand_in_logits = [&](int buf) {
    const ClusterBatch<E, D, Dv>& b = sh.batch[buf];
    float dot[kRowBlocks][kBatch / 8][4] = {};
    warp_mma_abt_held<E, D, kBatch>(dot[0], q_fragments, &b.mean_hi[0][0], lane);
    warp_mma_abt_held<E, D, kBatch>(dot[0], q_fragments, &b.mean_lo[0][0], lane);
#pragma unroll
    for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
      for (int nt = 0; nt < kBatch / 8; ++nt) {
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int jj = nt * 8 + 2 * q + (x & 1), r = warp * kRowsPerWarp + 16 * m + g + 8 * (x >> 1);
          const std::int32_t n = b.counts[jj];
          sh.logits[r][jj] = n > 0 ? fmaf(dot[m][nt][x], scale_log2, log2f(float(n))) : -INFINITY;
        }
      }
    }
    __syncwarp();  // each warp reads back only its own rows
  };

  sm80::cp_async_wait<0>();
  __syncthreads();
  load_a_fragments<E, D>(q_fragments, &sh.q[0][0], warp * kRowsPerWarp, lane);
  stand_in_logits(0);

  // Probabilities of half `half` of the tile (32 keys) as fp16 A fragments: p[m][ks] covers
  // keys 16 ks .. 16 ks + 15 of the half. Halves keep 32 fp32 logits live, not 64, next to the
  // 128 accumulators of a_j.
  constexpr int kHalf = kKeys / 2;
  std::uint32_t p[kRowBlocks][kHalf / 16][4];
  auto probabilities = [&](int stage, int half) {
    float s[kRowBlocks][kHalf / 8][4] = {};
    warp_mma_abt_held<E, D, kHalf>(s[0], q_fragments, &sh.k[stage][kHalf * half][0], lane);
#pragma unroll
    for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
      for (int nt = 0; nt < kHalf / 8; ++nt) {
        float e[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) e[x] = sm80::exp2_approx(fmaf(s[m][nt][x], scale_log2, -row_max[m][x >> 1]));
        const int ks = nt / 2, r = 2 * (nt & 1);
        p[m][ks][r] = pack_probabilities(e[0], e[1]);
        p[m][ks][r + 1] = pack_probabilities(e[2], e[3]);
      }
    }
  };

  // a_j (acc) and d_j (mass: every column of the ones product is the row sum) of the current
  // cluster. `fresh`: nothing accumulated yet, the next MMA overwrites instead of adding.
  float acc[kRowBlocks][kDTiles][4];
  float mass[kRowBlocks][4];
  bool fresh = true;
  auto accumulate_slice = [&](const std::uint32_t(&pm)[kRowBlocks][4], const __half* v_tile, int ks, auto overwrite) {
    constexpr bool kOverwrite = decltype(overwrite)::value;
#pragma unroll
    for (int d0 = 0; d0 < Dv; d0 += 16) {
      std::uint32_t b[4];
      sm80::ldmatrix_x4_trans(b, bt_fragment<__half, Dv>(v_tile, ks * 16, d0, lane));
#pragma unroll
      for (int m = 0; m < kRowBlocks; ++m) {
        mma_f16<kOverwrite>(acc[m][d0 / 8], pm[m], b[0], b[1]);
        mma_f16<kOverwrite>(acc[m][d0 / 8 + 1], pm[m], b[2], b[3]);
      }
    }
#pragma unroll
    for (int m = 0; m < kRowBlocks; ++m) mma_f16<kOverwrite>(mass[m], pm[m], kOnes, kOnes);
  };
  // The cluster's keys in columns [lo, hi) of half `half` of the tile.
  auto accumulate = [&](int stage, int half, int lo, int hi) {
    const __half* v_tile = &sh.v[stage][kHalf * half][0];
#pragma unroll
    for (int ks = 0; ks < kHalf / 16; ++ks) {
      if (ks * 16 + 16 <= lo || ks * 16 >= hi) continue;
      const int c = ks * 16 + 2 * q;  // a0/a1 hold columns c, c + 1; a2/a3 hold c + 8, c + 9
      auto keep = [&](int column, std::uint32_t bits) { return column >= lo && column < hi ? bits : 0u; };
      const std::uint32_t low = keep(c, 0x0000FFFFu) | keep(c + 1, 0xFFFF0000u);
      const std::uint32_t high = keep(c + 8, 0x0000FFFFu) | keep(c + 9, 0xFFFF0000u);
      std::uint32_t pm[kRowBlocks][4];
#pragma unroll
      for (int m = 0; m < kRowBlocks; ++m) {
        pm[m][0] = p[m][ks][0] & low;
        pm[m][1] = p[m][ks][1] & low;
        pm[m][2] = p[m][ks][2] & high;
        pm[m][3] = p[m][ks][3] & high;
      }
      if (fresh) {
        accumulate_slice(pm, v_tile, ks, std::true_type{});
      } else {
        accumulate_slice(pm, v_tile, ks, std::false_type{});
      }
      fresh = false;
    }
  };

  // Error of key cluster jj of the batch for the warp's rows, into sh.errors (before weights).
  auto finish = [&](int jj, int buf) {
    if (fresh) {  // no key of the cluster met this CTA (counts and offsets disagree): a_j = d_j = 0
#pragma unroll
      for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
        for (int x = 0; x < 4; ++x) mass[m][x] = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kDTiles; ++nt) acc[m][nt][0] = acc[m][nt][1] = acc[m][nt][2] = acc[m][nt][3] = 0.0f;
      }
    }
    const ClusterBatch<E, D, Dv>& b = sh.batch[buf];
    float stand_in[kRowBlocks][2], delta[kRowBlocks][2], squared[kRowBlocks][2];
#pragma unroll
    for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s = exp2f(sh.logits[warp * kRowsPerWarp + 16 * m + g + 8 * h][jj] - row_max[m][h]);
        delta[m][h] = s - mass[m][2 * h];
        stand_in[m][h] = s * value_scale;  // vbar is in v's units, a_j and o in the scaled ones
        squared[m][h] = 0.0f;
      }
    }
#pragma unroll
    for (int m = 0; m < kRowBlocks; ++m) {
#pragma unroll
      for (int nt = 0; nt < kDTiles; ++nt) {
        const float4 out = sh.output[warp][m][nt][lane];
        const float2 vbar = *reinterpret_cast<const float2*>(&b.value_means[jj][nt * 8 + 2 * q]);
        const float o_of[4] = {out.x, out.y, out.z, out.w};
        const float vbar_of[2] = {vbar.x, vbar.y};
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int h = x >> 1;
          const float w = fmaf(stand_in[m][h], vbar_of[x & 1], -acc[m][nt][x]) - delta[m][h] * o_of[x];
          squared[m][h] = fmaf(w, w, squared[m][h]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kRowBlocks; ++m) {
      const float2 denominator = sh.denominator[warp][m][lane];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float total = quad_sum(squared[m][h]);
        const float compensated_mass = (h == 0 ? denominator.x : denominator.y) + delta[m][h];
        if (q == 0) {
          sh.errors[warp * kRowsPerWarp + 16 * m + g + 8 * h][jj] = total / (compensated_mass * compensated_mass);
        }
      }
    }
  };

  // Adds the batch's errors, summed over each query cluster's rows in this CTA and weighted by
  // size / probes (and 2^-2e back to v's units), to the zeroed output. A query cluster's rows
  // span at most two CTAs when probes <= kRows, and two float additions onto zero commute.
  auto flush = [&](int first_cluster) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kRows * kBatch; idx += kThreads) {
      const int r = idx / kBatch, jj = idx % kBatch, j = first_cluster + jj;
      const std::int32_t cluster = sh.row_cluster[r];
      if (cluster < 0 || (r > 0 && sh.row_cluster[r - 1] == cluster) || j < j_begin || j >= j_end) continue;
      float total = 0.0f;
      for (int rr = r; rr < kRows && sh.row_cluster[rr] == cluster; ++rr) {
        total += sh.errors[rr][jj];
        sh.errors[rr][jj] = 0.0f;
      }
      const float value = total * sh.row_weight[r] * value_unscale * value_unscale * error_unit<D, Dv>();
      if (value != 0.0f) atomicAdd(&a.error[(bh * a.query_clusters + cluster) * std::int64_t(ck) + j], value);
    }
  };

  const int tiles = p_end > p_begin ? (p_end - p_begin + kKeys - 1) / kKeys : 1;
  int cluster = j_begin;
  for (int t = 0; t < tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < tiles) {
      load_key_tile<E, D, Dv>(&sh.k[stage ^ 1][0][0], &sh.v[stage ^ 1][0][0], k_rows, a.k_aligned, tokens, values,
                          std::int64_t(p_begin) + std::int64_t(t + 1) * kKeys, p_end);
      tokens.load(k_order, std::int64_t(p_begin) + std::int64_t(t + 2) * kKeys, p_end, lane);
    }
    sm80::cp_async_commit();
    sm80::cp_async_wait<1>();
    __syncthreads();
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      const int first = p_begin + t * kKeys + kHalf * half;  // < Sk + kKeys: the host keeps Sk <= 2^31 - 1 - 128
      const int half_end = std::min(first + kHalf, p_end);
      if (half == 1 && first >= p_end) break;  // uniform
      probabilities(stage, half);
      // Key clusters are contiguous in this order: walk those meeting the half (uniform over the
      // CTA), accumulating each one's part and finishing those that end here.
      while (cluster < j_end) {
        const int jj = cluster - batch_first;
        const int begin = sh.batch[buffer].offsets[jj], end = sh.batch[buffer].offsets[jj + 1];
        const int lo = std::max(begin, first) - first, hi = std::min(end, half_end) - first;
        if (lo < hi) accumulate(stage, half, lo, hi);
        if (end > half_end) break;  // the cluster goes on in the next half
        if (sh.batch[buffer].counts[jj] > 0) finish(jj, buffer);
        fresh = true;
        ++cluster;
        if (cluster < j_end && cluster - batch_first == kBatch) {
          flush(batch_first);
          sm80::cp_async_wait<0>();  // the next batch (and the next tile) landed
          __syncthreads();           // and every thread is done with this batch's buffer and errors
          if (batch_first + 2 * kBatch < j_end) load_batch(buffer, batch_first + 2 * kBatch);
          sm80::cp_async_commit();
          batch_first += kBatch;
          buffer ^= 1;
          stand_in_logits(buffer);
        }
      }
    }
    __syncthreads();  // the stage is reloaded next step
  }
  flush(batch_first);
}

}  // namespace svgear::cuda::detail::probe
