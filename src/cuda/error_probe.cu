// SVG-EAR's error probe (cpu::probe_compensation_error) on tensor cores.
//
// The probe queries of a head (at most min(Cq * probes, Sq) rows) are listed first. A CTA then
// takes 64 of them (16 per warp, as one mma row block) and sweeps the head's keys twice in
// key-cluster order, 64 keys per cp.async double-buffered stage:
//   sweep 1: FlashAttention's online softmax -> per row the max m, the denominator M and the
//            exact output o (kept in registers);
//   sweep 2: with m fixed, per key cluster j its mass d_j = sum exp(l - m) and a_j = sum
//            exp(l - m) v (registers, reset at each cluster end). At the end of cluster j, with
//            its stand-in mass s_j = n_j exp(q.mu_j / sqrt(D) - m) and Delta_j = s_j - d_j,
//              o_j' - o = (s_j vbar_j - a_j - Delta_j o) / (M + Delta_j),
//            which is the CPU's (T - a_j + s_j vbar_j) / (M - d_j + s_j) - T / M rearranged
//            without its cancellation-prone difference of two outputs.
// Probabilities enter P.V as two 16-bit terms (hi + lo), so the sums keep ~16 mantissa bits:
// a bf16 P alone (8 bits) would put noise of the order of the compensation error itself into
// well-compensated blocks. Errors of 32 key clusters at a time are summed over the probe rows
// of each query cluster in shared memory and added to the zeroed output: a query cluster's
// rows span at most two CTAs when probes <= 64, and two float additions onto zero commute, so
// the result is deterministic there.
#include <algorithm>
#include <cmath>
#include <cub/block/block_scan.cuh>
#include <string>

#include "cuda/device_common.cuh"
#include "cuda/mma_tiles.cuh"

namespace svgear::cuda {

namespace {

using namespace detail;

constexpr int kProbeWarps = 4;
constexpr int kProbeThreads = kProbeWarps * 32;
constexpr int kProbeRows = kProbeWarps * 16;
constexpr int kProbeKeys = 64;   // keys per stage
constexpr int kErrorBatch = 32;  // key clusters whose errors are buffered before the output add

template <class E, int D>
constexpr std::size_t probe_smem_bytes() {
  return std::size_t(kProbeRows + 4 * kProbeKeys) * kTileStride<D> * sizeof(E) +  // Q, K x 2, V x 2
         std::size_t(kProbeRows) * kErrorBatch * sizeof(float) +                  // error batch
         std::size_t(kProbeRows) * (sizeof(std::int32_t) + sizeof(float));        // row cluster, weight
}

struct ProbeArgs {
  DeviceTensor q, k, v;
  int heads;
  std::int64_t sq, sk;
  bool q_aligned, k_aligned, v_aligned;
  const std::int32_t* q_offsets;  // [BH][Cq + 1]
  const std::int32_t* k_order;    // [BH][Sk]
  const std::int32_t* k_offsets;  // [BH][Ck + 1]
  int query_clusters, key_clusters;
  const float* key_means;
  const float* value_means;
  const std::int32_t* key_counts;
  const std::int32_t* row_token;    // [BH][row_capacity]
  const std::int32_t* row_cluster;  // [BH][row_capacity]
  const std::int32_t* row_count;    // [BH]
  std::int64_t row_capacity;
  int probes;
  float* error;  // [BH][Cq][Ck], zeroed
};

// The probe rows of each head, cluster after cluster: probe p of cluster i (p < probes_i =
// min(probes, size_i)) is the query at permuted position offsets[i] + (2p+1) size_i / (2 probes_i).
__global__ void __launch_bounds__(256)
    list_probe_rows(const std::int32_t* q_order, const std::int32_t* q_offsets, std::int64_t sq, int query_clusters,
                    int probes, std::int64_t row_capacity, std::int32_t* row_token, std::int32_t* row_cluster,
                    std::int32_t* row_count) {
  using Scan = cub::BlockScan<std::int64_t, 256>;
  __shared__ typename Scan::TempStorage storage;
  const std::int64_t bh = blockIdx.x;
  const std::int32_t* offsets = q_offsets + bh * (query_clusters + 1);
  std::int64_t carry = 0;
  for (int i0 = 0; i0 < query_clusters; i0 += 256) {
    const int i = i0 + threadIdx.x;
    std::int64_t size = 0, count = 0;
    if (i < query_clusters) {
      size = std::max<std::int64_t>(0, std::int64_t(offsets[i + 1]) - offsets[i]);
      count = std::min<std::int64_t>(probes, size);
    }
    std::int64_t first = 0, total = 0;
    Scan(storage).ExclusiveSum(count, first, total);
    first += carry;
    for (std::int64_t p = 0; p < count && first + p < row_capacity; ++p) {
      const std::int64_t position = offsets[i] + (2 * p + 1) * size / (2 * count);
      row_token[bh * row_capacity + first + p] = q_order[bh * sq + position];
      row_cluster[bh * row_capacity + first + p] = i;
    }
    carry += total;
    __syncthreads();  // the scan storage is reused
  }
  if (threadIdx.x == 0) row_count[bh] = std::int32_t(std::min(carry, row_capacity));
}

template <class E, int D>
__global__ void __launch_bounds__(kProbeThreads) probe_kernel(const ProbeArgs args) {
  constexpr int kStride = kTileStride<D>;
  constexpr int kDTiles = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  E* q_tile = reinterpret_cast<E*>(smem);                                             // [kProbeRows][kStride]
  E* k_tiles = q_tile + kProbeRows * kStride;                                         // [2][kProbeKeys][kStride]
  E* v_tiles = k_tiles + 2 * kProbeKeys * kStride;                                    // [2][kProbeKeys][kStride]
  float* error_batch = reinterpret_cast<float*>(v_tiles + 2 * kProbeKeys * kStride);  // [kProbeRows][kErrorBatch]
  std::int32_t* cluster_of_row = reinterpret_cast<std::int32_t*>(error_batch + kProbeRows * kErrorBatch);
  float* weight_of_row = reinterpret_cast<float*>(cluster_of_row + kProbeRows);

  const std::int64_t bh = blockIdx.y;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * kProbeRows;
  const std::int64_t rows_in_head = args.row_count[bh];
  if (row0 >= rows_in_head) return;
  const int ck = args.key_clusters;
  const std::int32_t* k_offsets = args.k_offsets + bh * (ck + 1);
  const std::int32_t* k_order = args.k_order + bh * args.sk;
  const std::int32_t* key_counts = args.key_counts + bh * ck;

  for (int r = threadIdx.x; r < kProbeRows; r += kProbeThreads) {
    const std::int64_t row = row0 + r;
    const std::int32_t cluster = row < rows_in_head ? args.row_cluster[bh * args.row_capacity + row] : -1;
    cluster_of_row[r] = cluster;
    float weight = 0.0f;
    if (cluster >= 0) {
      const std::int32_t* q_offsets = args.q_offsets + bh * (args.query_clusters + 1);
      const std::int64_t size = q_offsets[cluster + 1] - q_offsets[cluster];
      weight = float(double(size) / double(std::min<std::int64_t>(args.probes, size)));
    }
    weight_of_row[r] = weight;
  }
  for (int idx = threadIdx.x; idx < kProbeRows * kErrorBatch; idx += kProbeThreads) error_batch[idx] = 0.0f;

  const HeadRows<E> q_rows = head_rows<E>(args.q, args.heads, bh);
  const HeadRows<E> k_rows = head_rows<E>(args.k, args.heads, bh);
  const HeadRows<E> v_rows = head_rows<E>(args.v, args.heads, bh);
  load_rows<E, D, kProbeRows, kProbeThreads>(q_tile, q_rows, args.q_aligned, [&](int r) -> std::int64_t {
    return row0 + r < rows_in_head ? std::int64_t(args.row_token[bh * args.row_capacity + row0 + r]) : -1;
  });
  auto load_keys = [&](int tile, int stage) {
    const std::int64_t first = std::int64_t(tile) * kProbeKeys;
    auto token_of = [&](int r) -> std::int64_t { return first + r < args.sk ? std::int64_t(k_order[first + r]) : -1; };
    load_rows<E, D, kProbeKeys, kProbeThreads>(k_tiles + stage * kProbeKeys * kStride, k_rows, args.k_aligned,
                                               token_of);
    load_rows<E, D, kProbeKeys, kProbeThreads>(v_tiles + stage * kProbeKeys * kStride, v_rows, args.v_aligned,
                                               token_of);
  };
  load_keys(0, 0);
  sm80::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const float scale_log2 = 1.4426950408889634f / sqrtf(float(D));  // logits in log2 units

  // S = Q K^T of the warp's 16 rows against the stage's 64 keys, scaled, tail keys at -inf.
  auto scores = [&](const E* keys, std::int64_t first_key, float(&s)[kProbeKeys / 8][4]) {
#pragma unroll
    for (int nt = 0; nt < kProbeKeys / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    warp_mma_abt<E, D, kProbeKeys>(s, q_tile, warp * 16, keys, lane);
#pragma unroll
    for (int nt = 0; nt < kProbeKeys / 8; ++nt) {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const bool valid = first_key + nt * 8 + 2 * q + (x & 1) < args.sk;
        s[nt][x] = valid ? s[nt][x] * scale_log2 : -INFINITY;
      }
    }
  };

  // acc += P V for keys [16 ks, 16 ks + 16) of the stage, P given in C-fragment layout (the
  // 8 values of n-tiles 2 ks and 2 ks + 1), entered as hi + lo 16-bit terms.
  auto accumulate_pv = [&](const E* values, int ks, const float(&p)[8], float(&acc)[kDTiles][4]) {
    float hi[8], lo[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) split_hi_lo<E>(p[x], hi[x], lo[x]);
    // p[0..3]: n-tile 2 ks (c0, c1 row g; c2, c3 row g + 8); p[4..7]: n-tile 2 ks + 1.
    const std::uint32_t a_hi[4] = {sm80::pack_pair<E>(hi[0], hi[1]), sm80::pack_pair<E>(hi[2], hi[3]),
                                   sm80::pack_pair<E>(hi[4], hi[5]), sm80::pack_pair<E>(hi[6], hi[7])};
    const std::uint32_t a_lo[4] = {sm80::pack_pair<E>(lo[0], lo[1]), sm80::pack_pair<E>(lo[2], lo[3]),
                                   sm80::pack_pair<E>(lo[4], lo[5]), sm80::pack_pair<E>(lo[6], lo[7])};
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += 16) {
      std::uint32_t b[4];
      sm80::ldmatrix_x4_trans(b, bt_fragment<E, D>(values, ks * 16, d0, lane));
      sm80::mma_m16n8k16<E>(acc[d0 / 8], a_hi, b[0], b[1]);
      sm80::mma_m16n8k16<E>(acc[d0 / 8], a_lo, b[0], b[1]);
      sm80::mma_m16n8k16<E>(acc[d0 / 8 + 1], a_hi, b[2], b[3]);
      sm80::mma_m16n8k16<E>(acc[d0 / 8 + 1], a_lo, b[2], b[3]);
    }
  };

  float o[kDTiles][4] = {};    // sweep 1: exact output (normalised at the sweep's end)
  float sum[kDTiles][4] = {};  // sweep 2: a_j of the current key cluster
  float row_max[2] = {-INFINITY, -INFINITY}, denominator[2] = {0.0f, 0.0f};  // rows g, g + 8
  float mass[2] = {0.0f, 0.0f};  // sweep 2: thread-partial d_j of the current key cluster

  // Error of key cluster j for the warp's rows, into the error batch.
  auto finish_key_cluster = [&](int j, int batch_first) {
    const float* mu = args.key_means + (bh * ck + j) * std::int64_t(D);
    const float* vbar = args.value_means + (bh * ck + j) * std::int64_t(D);
    // q . mu_j on the tensor cores: B columns 0 and 1 hold mu's hi and lo terms.
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 16) {
      std::uint32_t a[4];
      sm80::ldmatrix_x4(a, a_fragment<E, D>(q_tile, warp * 16, k0, lane));
      std::uint32_t b0 = 0, b1 = 0;
      if (lane < 8) {
        float t[4], hi, lo;
        const int kk = k0 + 2 * q;
        const float x[4] = {mu[kk], mu[kk + 1], mu[kk + 8], mu[kk + 9]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          split_hi_lo<E>(x[e], hi, lo);
          t[e] = g == 0 ? hi : lo;
        }
        b0 = sm80::pack_pair<E>(t[0], t[1]);
        b1 = sm80::pack_pair<E>(t[2], t[3]);
      }
      sm80::mma_m16n8k16<E>(c, a, b0, b1);
    }
    const float dot[2] = {__shfl_sync(0xffffffffu, c[0] + c[1], lane & ~3),
                          __shfl_sync(0xffffffffu, c[2] + c[3], lane & ~3)};
    const float log2_count = log2f(float(key_counts[j]));
    float stand_in[2], delta[2], squared[2] = {0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      stand_in[h] = exp2f(dot[h] * scale_log2 + log2_count - row_max[h]);
      delta[h] = stand_in[h] - quad_sum(mass[h]);
    }
#pragma unroll
    for (int nt = 0; nt < kDTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float value_mean = vbar[nt * 8 + 2 * q + e];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float w = stand_in[h] * value_mean - sum[nt][2 * h + e] - delta[h] * o[nt][2 * h + e];
          squared[h] += w * w;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float total = quad_sum(squared[h]);
      const float compensated_mass = denominator[h] + delta[h];
      if (q == 0) {
        error_batch[(warp * 16 + g + 8 * h) * kErrorBatch + (j - batch_first)] =
            total / (compensated_mass * compensated_mass);
      }
    }
  };

  // Adds the buffered errors of key clusters [batch_first, batch_first + kErrorBatch), summed
  // over each query cluster's rows in this CTA and weighted by size / probes, to the output.
  auto flush_errors = [&](int batch_first) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kProbeRows * kErrorBatch; idx += kProbeThreads) {
      const int r = idx / kErrorBatch, jj = idx % kErrorBatch;
      const std::int32_t cluster = cluster_of_row[r];
      const int j = batch_first + jj;
      if (cluster < 0 || (r > 0 && cluster_of_row[r - 1] == cluster) || j >= ck) continue;
      float total = 0.0f;
      for (int rr = r; rr < kProbeRows && cluster_of_row[rr] == cluster; ++rr) {
        total += error_batch[rr * kErrorBatch + jj];
        error_batch[rr * kErrorBatch + jj] = 0.0f;
      }
      const float value = total * weight_of_row[r];
      if (value != 0.0f) atomicAdd(&args.error[(bh * args.query_clusters + cluster) * std::int64_t(ck) + j], value);
    }
    __syncthreads();
  };

  const int tiles = int((args.sk + kProbeKeys - 1) / kProbeKeys);
  int cluster = 0;      // sweep 2: the key cluster being accumulated
  int batch_first = 0;  // first key cluster of the error batch
  for (int step = 0; step < 2 * tiles; ++step) {
    const bool exact_sweep = step < tiles;
    const int tile = exact_sweep ? step : step - tiles;
    const int stage = step & 1;
    if (step + 1 < 2 * tiles) load_keys((step + 1) % tiles, stage ^ 1);
    sm80::cp_async_commit();
    sm80::cp_async_wait<1>();
    __syncthreads();

    if (step == tiles) {  // sweep 1 done: o = T / M
#pragma unroll
      for (int h = 0; h < 2; ++h) denominator[h] = quad_sum(denominator[h]);
#pragma unroll
      for (int nt = 0; nt < kDTiles; ++nt) {
#pragma unroll
        for (int x = 0; x < 4; ++x) o[nt][x] /= denominator[x / 2];
      }
    }
    const E* keys = k_tiles + stage * kProbeKeys * kStride;
    const E* values = v_tiles + stage * kProbeKeys * kStride;
    const std::int64_t first_key = std::int64_t(tile) * kProbeKeys;
    float s[kProbeKeys / 8][4];
    scores(keys, first_key, s);

    if (exact_sweep) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kProbeKeys / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
        const float new_max = fmaxf(row_max[h], quad_max(tile_max));  // finite: every tile has a key
        const float rescale = exp2f(row_max[h] - new_max);
        row_max[h] = new_max;
        denominator[h] *= rescale;
#pragma unroll
        for (int nt = 0; nt < kDTiles; ++nt) {
          o[nt][2 * h] *= rescale;
          o[nt][2 * h + 1] *= rescale;
        }
#pragma unroll
        for (int nt = 0; nt < kProbeKeys / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            s[nt][2 * h + e] = exp2f(s[nt][2 * h + e] - new_max);
            denominator[h] += s[nt][2 * h + e];
          }
        }
      }
#pragma unroll
      for (int ks = 0; ks < kProbeKeys / 16; ++ks) {
        const float p[8] = {s[2 * ks][0],     s[2 * ks][1],     s[2 * ks][2],     s[2 * ks][3],
                            s[2 * ks + 1][0], s[2 * ks + 1][1], s[2 * ks + 1][2], s[2 * ks + 1][3]};
        accumulate_pv(values, ks, p, o);
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < kProbeKeys / 8; ++nt) {
#pragma unroll
        for (int x = 0; x < 4; ++x) s[nt][x] = exp2f(s[nt][x] - row_max[x / 2]);
      }
      const std::int64_t tile_end = std::min<std::int64_t>(first_key + kProbeKeys, args.sk);
      // Key clusters are contiguous in this order: walk those meeting the tile (uniform over
      // the CTA), accumulating each one's part and finishing those that end here.
      while (cluster < ck) {
        const std::int64_t begin = k_offsets[cluster], end = k_offsets[cluster + 1];
        const int lo = int(std::max(begin, first_key) - first_key);
        const int hi = int(std::min(end, tile_end) - first_key);
        if (lo < hi) {
#pragma unroll
          for (int ks = 0; ks < kProbeKeys / 16; ++ks) {
            if (ks * 16 + 16 <= lo || ks * 16 >= hi) continue;
            float p[8];
#pragma unroll
            for (int x = 0; x < 8; ++x) {
              const int column = ks * 16 + (x / 4) * 8 + 2 * q + (x & 1);
              p[x] = column >= lo && column < hi ? s[2 * ks + x / 4][x % 4] : 0.0f;
              mass[(x / 2) % 2] += p[x];
            }
            accumulate_pv(values, ks, p, sum);
          }
        }
        if (end > tile_end) break;  // the cluster goes on in the next tile
        if (key_counts[cluster] > 0) {
          if (cluster >= batch_first + kErrorBatch) {
            flush_errors(batch_first);
            batch_first = cluster - cluster % kErrorBatch;
          }
          finish_key_cluster(cluster, batch_first);
        }
        mass[0] = mass[1] = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kDTiles; ++nt) sum[nt][0] = sum[nt][1] = sum[nt][2] = sum[nt][3] = 0.0f;
        ++cluster;
      }
    }
    __syncthreads();  // the stage is reloaded next step
  }
  flush_errors(batch_first);
}

void validate_probe_inputs(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v,
                           const DeviceLayout& queries, const DeviceLayout& keys, const DeviceKeySummary& summary,
                           int probes, const float* error) {
  validate_heads(q, "q");
  validate_heads(k, "k");
  validate_heads(v, "v");
  if (k.dtype != q.dtype || v.dtype != q.dtype || k.head_dim != q.head_dim || v.head_dim != q.head_dim ||
      k.batch != q.batch || v.batch != q.batch || k.heads != q.heads || v.heads != q.heads) {
    throw Error("probe_compensation_error: q, k and v must share dtype, batch, heads and head_dim");
  }
  if (v.tokens != k.tokens) {
    throw Error("probe_compensation_error: k has " + std::to_string(k.tokens) + " tokens but v has " +
                std::to_string(v.tokens));
  }
  require_heads_per_launch(q.count(), "probe_compensation_error");
  if (queries.order == nullptr || queries.offsets == nullptr || keys.order == nullptr || keys.offsets == nullptr ||
      summary.key_means == nullptr || summary.value_means == nullptr || summary.counts == nullptr || error == nullptr) {
    throw Error("probe_compensation_error: layouts, summary and error must be device pointers, got a null one");
  }
  if (queries.clusters < 1 || keys.clusters < 1) {
    throw Error("probe_compensation_error: need at least one query and one key cluster");
  }
  if (probes < 1)
    throw Error("probe_compensation_error: probes_per_cluster must be >= 1, got " + std::to_string(probes));
}

}  // namespace

void probe_compensation_error(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v,
                              const DeviceLayout& queries, const DeviceLayout& keys, const DeviceKeySummary& summary,
                              int probes_per_cluster, float* error, void* stream) {
  validate_probe_inputs(q, k, v, queries, keys, summary, probes_per_cluster, error);
  const cudaStream_t s = as_stream(stream);
  const std::int64_t heads_total = q.count();
  const int cq = queries.clusters, ck = keys.clusters;
  zero_async(error, std::size_t(heads_total) * std::size_t(cq) * std::size_t(ck), s, "cudaMemsetAsync (probe error)");

  // sum_i min(probes, size_i) <= min(Cq * probes, Sq) rows per head.
  const std::int64_t capacity = std::min<std::int64_t>(std::int64_t(cq) * probes_per_cluster, q.tokens);
  DeviceBuffer<std::int32_t> row_token(std::size_t(heads_total * capacity), s);
  DeviceBuffer<std::int32_t> row_cluster(std::size_t(heads_total * capacity), s);
  DeviceBuffer<std::int32_t> row_count(std::size_t(heads_total), s);
  list_probe_rows<<<unsigned(heads_total), 256, 0, s>>>(queries.order, queries.offsets, q.tokens, cq,
                                                        probes_per_cluster, capacity, row_token.get(),
                                                        row_cluster.get(), row_count.get());
  check_launch("list_probe_rows");

  ProbeArgs args{};
  args.q = q.tensor;
  args.k = k.tensor;
  args.v = v.tensor;
  args.heads = q.heads;
  args.sq = q.tokens;
  args.sk = k.tokens;
  args.q_aligned = rows_aligned_16(q);
  args.k_aligned = rows_aligned_16(k);
  args.v_aligned = rows_aligned_16(v);
  args.q_offsets = queries.offsets;
  args.k_order = keys.order;
  args.k_offsets = keys.offsets;
  args.query_clusters = cq;
  args.key_clusters = ck;
  args.key_means = summary.key_means;
  args.value_means = summary.value_means;
  args.key_counts = summary.counts;
  args.row_token = row_token.get();
  args.row_cluster = row_cluster.get();
  args.row_count = row_count.get();
  args.row_capacity = capacity;
  args.probes = probes_per_cluster;
  args.error = error;
  const dim3 grid(unsigned((capacity + kProbeRows - 1) / kProbeRows), unsigned(heads_total));
  dispatch_element_and_dim(q.dtype, q.head_dim, [&](auto element, auto dim) {
    using E = decltype(element);
    constexpr int D = decltype(dim)::value;
    constexpr std::size_t smem = probe_smem_bytes<E, D>();
    check_cuda(cudaFuncSetAttribute(probe_kernel<E, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "cudaFuncSetAttribute (probe_kernel shared memory)");
    probe_kernel<E, D><<<grid, kProbeThreads, smem, s>>>(args);
    check_launch("probe_kernel");
  });
}

}  // namespace svgear::cuda
