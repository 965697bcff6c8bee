// SVG-EAR's error probe (cpu::probe_compensation_error) on tensor cores.
//
// The probe queries of a head (at most min(Cq * probes, Sq) rows) are listed first, cluster
// after cluster. Then, per head:
//   prep:    max |v| per head, and v in key-cluster order times 2^e as fp16, with e putting the
//            head's largest |v| in [2^14, 2^15) (scaled_values.cuh): the P V products below run
//            on fp16 operands, exact for the bf16 values, and P keeps 11 significant bits where
//            a bf16 P would keep 8 (the pipeline hands both in: the input check leaves the max,
//            value_summary the copy); the key means as hi + lo 16-bit terms (packed_centroids.cuh).
//   sweep 1: (probe_exact_sweep.cuh) the online softmax of every probe row over each chunk of
//            keys, merged into the row max m, denominator M and exact output o.
//   sweep 2: (probe_cluster_sweep.cuh) per CTA one chunk of whole key clusters: per cluster j
//            its mass d_j and sum of exp * v, a_j, against its centroid stand-in, summed over
//            each query cluster's probe rows into error[i][j].
// Both sweeps split the keys across CTAs (and 128 probe rows per CTA, 16 per warp), so a head's
// 1024 probe rows at S = 32K fill the GPU several times over. With P in fp16 (relative rounding
// <= 2^-11) the sums a_j carry ~11 bits per term, averaging down over a cluster's keys; the error
// of the well-compensated blocks stays far below 1e-3 of a head's largest (the test bound).
// Deterministic for at most 128 rows per query cluster: every (query cluster, key cluster) error
// gets at most two float additions onto zero (the query cluster's rows span at most two row blocks,
// and one chunk owns each key cluster), and two additions onto zero commute.
#include <algorithm>
#include <cmath>
#include <cub/block/block_scan.cuh>
#include <string>

#include "cuda/device_common.cuh"
#include "cuda/packed_centroids.cuh"
#include "cuda/probe_cluster_sweep.cuh"
#include "cuda/probe_common.cuh"
#include "cuda/probe_exact_sweep.cuh"
#include "core/value_sketch.hpp"

namespace svgear::cuda {

namespace {

using namespace detail;
using probe::Args;

// The probe rows of each head, cluster after cluster: probe p of cluster i (p < sampled_i =
// min(probes, size_i)) is the query at permuted position offsets[i] + (2p+1) size_i / (2 sampled_i);
// with mean_row, a non-empty cluster's last row is its mean query, listed with token -1 (the
// caller builds it, mean_probe_rows). Also the key chunks of sweep 2: chunk c starts at the first
// key cluster whose keys start at or after c * Sk / chunks, so chunks hold whole clusters and
// about equal numbers of keys.
__global__ void __launch_bounds__(256)
    list_probe_rows(const std::int32_t* q_order, const std::int32_t* q_offsets, std::int64_t sq, int query_clusters,
                    int probes, int mean_row, std::int64_t row_capacity, std::int32_t* row_token,
                    std::int32_t* row_cluster, std::int32_t* row_count, const std::int32_t* k_offsets, std::int64_t sk,
                    int key_clusters, int cluster_chunks, std::int32_t* chunk_clusters) {
  using Scan = cub::BlockScan<std::int64_t, 256>;
  __shared__ typename Scan::TempStorage storage;
  const std::int64_t bh = blockIdx.x;
  const std::int32_t* offsets = q_offsets + bh * (query_clusters + 1);
  std::int64_t carry = 0;
  for (int i0 = 0; i0 < query_clusters; i0 += 256) {
    const int i = i0 + threadIdx.x;
    std::int64_t size = 0, sampled = 0, count = 0;
    if (i < query_clusters) {
      size = std::max<std::int64_t>(0, std::int64_t(offsets[i + 1]) - offsets[i]);
      sampled = std::min<std::int64_t>(probes, size);
      count = sampled + (size > 0 ? mean_row : 0);
    }
    std::int64_t first = 0, total = 0;
    Scan(storage).ExclusiveSum(count, first, total);
    first += carry;
    for (std::int64_t p = 0; p < count && first + p < row_capacity; ++p) {
      if (p < sampled) {
        const std::int64_t position = offsets[i] + (2 * p + 1) * size / (2 * sampled);
        row_token[bh * row_capacity + first + p] = q_order[bh * sq + position];
      } else {
        row_token[bh * row_capacity + first + p] = -1;  // the mean query
      }
      row_cluster[bh * row_capacity + first + p] = i;
    }
    carry += total;
    __syncthreads();  // the scan storage is reused
  }
  if (threadIdx.x == 0) row_count[bh] = std::int32_t(std::min(carry, row_capacity));

  const std::int32_t* key_offsets = k_offsets + bh * (key_clusters + 1);
  for (int c = threadIdx.x; c <= cluster_chunks; c += 256) {
    int j = key_clusters;
    if (c < cluster_chunks) {
      const std::int64_t target = std::int64_t(c) * sk / cluster_chunks;
      int lo = 0, hi = key_clusters;  // lower bound of target in offsets[0 .. Ck]
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (key_offsets[mid] < target) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      j = c == 0 ? 0 : lo;
    }
    chunk_clusters[bh * (cluster_chunks + 1) + c] = j;
  }
}

// With mean rows: the probe rows' queries as their own [BH][row_capacity][D] tensor, so the sweeps
// read them through the identity row_token this kernel leaves. A sampled row copies its token's
// q; a mean row is its cluster's mean query rounded to E: the caller's (query_means, the
// pipeline's Q centroids, as the CPU pipeline takes them), else summed in double over the
// members in permuted order and divided by the size, as cpu::mean_probe_queries does; either
// way both paths probe the same vector bit for bit. Rows past the head's count are zeros. One
// warp per row.
template <class E, int D>
__global__ void mean_probe_rows(DeviceTensor q, int heads, std::int64_t sq, std::int64_t heads_total,
                                const std::int32_t* q_order, const std::int32_t* q_offsets, int query_clusters,
                                std::int64_t row_capacity, std::int32_t* row_token, const std::int32_t* row_cluster,
                                const std::int32_t* row_count, const float* query_means, E* rows_out) {
  const int lane = threadIdx.x % 32;
  const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t w = (blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x) / 32; w < heads_total * row_capacity;
       w += warps) {
    const std::int64_t bh = w / row_capacity, r = w % row_capacity;
    const HeadRows<E> q_rows = head_rows<E>(q, heads, bh);
    double sum[D / 32] = {};
    if (r < row_count[bh]) {
      const std::int32_t token = row_token[w];
      if (token >= 0) {
#pragma unroll
        for (int e = 0; e < D / 32; ++e) sum[e] = Element<E>::to_float(q_rows.row(token)[lane + 32 * e]);
      } else if (query_means != nullptr) {
        const float* mean = query_means + (bh * query_clusters + row_cluster[w]) * D;
#pragma unroll
        for (int e = 0; e < D / 32; ++e) sum[e] = mean[lane + 32 * e];
      } else {
        const std::int32_t* offsets = q_offsets + bh * (query_clusters + 1);
        const std::int32_t cluster = row_cluster[w];
        const std::int64_t begin = offsets[cluster], end = offsets[cluster + 1];
        // The members in order, 32 tokens read at once and 8 rows' loads in flight before their
        // sums (one dependent load per member would leave the warp waiting on memory each time).
        constexpr int kAhead = 8;
        for (std::int64_t base = begin; base < end; base += 32) {
          const int members = int(end - base < 32 ? end - base : 32);
          const std::int32_t my_token = lane < members ? q_order[bh * sq + base + lane] : 0;
          for (int first = 0; first < members; first += kAhead) {
            float x[kAhead][D / 32];
#pragma unroll
            for (int u = 0; u < kAhead; ++u) {
              const std::int32_t token = __shfl_sync(0xffffffffu, my_token, (first + u) & 31);
              const E* row = q_rows.row(first + u < members ? token : my_token);
#pragma unroll
              for (int e = 0; e < D / 32; ++e) x[u][e] = Element<E>::to_float(row[lane + 32 * e]);
            }
#pragma unroll
            for (int u = 0; u < kAhead; ++u) {
              if (first + u >= members) break;
#pragma unroll
              for (int e = 0; e < D / 32; ++e) sum[e] += double(x[u][e]);
            }
          }
        }
#pragma unroll
        for (int e = 0; e < D / 32; ++e) sum[e] = double(float(sum[e] / double(end - begin)));
      }
    }
#pragma unroll
    for (int e = 0; e < D / 32; ++e) rows_out[w * D + lane + 32 * e] = Element<E>::from_float(float(sum[e]));
    __syncwarp();  // every lane has read row_token[w] before lane 0 replaces it
    if (lane == 0) row_token[w] = std::int32_t(r);
  }
}

// max |v| of each head into max_bits[bh] (zeroed): non-negative floats order as their bits.
template <class E>
__global__ void value_abs_max_kernel(DeviceTensor v, int heads, std::int64_t tokens, int d, unsigned* max_bits) {
  const std::int64_t bh = blockIdx.y;
  const HeadRows<E> rows = head_rows<E>(v, heads, bh);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float m = 0.0f;
  for (std::int64_t s = std::int64_t(blockIdx.x) * warps + warp; s < tokens; s += std::int64_t(gridDim.x) * warps) {
    const E* row = rows.row(s);
    for (int c = lane; c < d; c += 32) m = fmaxf(m, fabsf(Element<E>::to_float(row[c])));
  }
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (lane == 0) atomicMax(max_bits + bh, __float_as_uint(m));
}

// out[bh][p] = fp16(v[bh][k_order[bh][p]] 2^e): one warp per row.
template <class E, int D>
__global__ void scaled_values_kernel(DeviceTensor v, int heads, std::int64_t tokens, std::int64_t heads_total,
                                     const std::int32_t* k_order, const unsigned* max_bits, __half* out) {
  const int lane = threadIdx.x % 32;
  const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t w = (blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x) / 32; w < heads_total * tokens;
       w += warps) {
    const std::int64_t bh = w / tokens;
    const float scale = ldexpf(1.0f, value_exponent(max_bits[bh]));
    const E* row = head_rows<E>(v, heads, bh).row(k_order[w]);
#pragma unroll
    for (int e = 0; e < D / 32; ++e) {
      out[w * D + lane + 32 * e] = scaled_value(Element<E>::to_float(row[lane + 32 * e]), scale);
    }
  }
}

void validate_probe_inputs(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v,
                           const DeviceLayout& queries, const DeviceLayout& keys, const DeviceKeySummary& summary,
                           int probes, bool mean_row, const float* error) {
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
  if (k.tokens > std::int64_t(INT32_MAX) - 128) {
    throw Error("probe_compensation_error: " + std::to_string(k.tokens) + " keys per head exceed the int32 positions");
  }
  if (queries.order == nullptr || queries.offsets == nullptr || keys.order == nullptr || keys.offsets == nullptr ||
      summary.key_means == nullptr || summary.value_means == nullptr || summary.counts == nullptr || error == nullptr) {
    throw Error("probe_compensation_error: layouts, summary and error must be device pointers, got a null one");
  }
  if (queries.clusters < 1 || keys.clusters < 1) {
    throw Error("probe_compensation_error: need at least one query and one key cluster");
  }
  if (summary.scaled_values != nullptr && summary.value_abs_max == nullptr) {
    throw Error("probe_compensation_error: summary.scaled_values needs the value_abs_max its scale came from");
  }
  if (reinterpret_cast<std::uintptr_t>(summary.value_means) % 16 != 0) {
    throw Error("probe_compensation_error: summary.value_means must be 16-byte aligned (a whole cudaMalloc'd array)");
  }
  if (probes < 0 || probes > 4096 || (probes == 0 && !mean_row)) {
    throw Error("probe_compensation_error: probes_per_cluster must be in [1, 4096] (or 0 with the mean row), got " +
                std::to_string(probes));
  }
}

// The probe's values sketched to Dv columns: out[bh][p] = 2^-shift * S x for every row x of the
// scaled fp16 copy [BH][Sk][D] (S in {+1, -1}^{Dv x D}, core/value_sketch.hpp), one m16n8k16
// product per 16 rows and 8 columns per warp, fp32 sums. |S x| <= D * 2^15 and shift = log2 D
// keep the result in fp16's range.
template <int D, int Dv>
__global__ void __launch_bounds__(256)
    sketch_values_kernel(const __half* values, std::int64_t rows_total, __half* out) {
  static_assert(D % 16 == 0 && Dv % 8 == 0, "whole MMA tiles");
  constexpr int kSteps = D / 16, kTiles = Dv / 8;
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  // B[k][n] = S[n][k]: this lane's fragments, the same for every row block.
  auto sign_pair = [](int n, int k) {
    const unsigned low = value_sketch_positive(n, k) ? 0x3C00u : 0xBC00u;  // fp16 +-1
    const unsigned high = value_sketch_positive(n, k + 1) ? 0x3C00u : 0xBC00u;
    return std::uint32_t(low | (high << 16));
  };
  // Every lane's fragments in shared memory (8 KB at D = 128, Dv = 32), computed once per CTA:
  // held in registers they took 64 of them and spilled.
  __shared__ uint2 b[kSteps][kTiles][32];
  if (threadIdx.x < 32) {
    for (int ks = 0; ks < kSteps; ++ks) {
      for (int nt = 0; nt < kTiles; ++nt) {
        b[ks][nt][lane] = make_uint2(sign_pair(nt * 8 + g, ks * 16 + 2 * q), sign_pair(nt * 8 + g, ks * 16 + 2 * q + 8));
      }
    }
  }
  __syncthreads();
  const float unit = ldexpf(1.0f, -probe::values_shift<D, Dv>());
  const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t block = (blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x) / 32; block * 16 < rows_total;
       block += warps) {
    const std::int64_t row_low = block * 16 + g, row_high = row_low + 8;
    auto pair_at = [&](std::int64_t row, int column) -> std::uint32_t {
      return row < rows_total ? *reinterpret_cast<const std::uint32_t*>(values + row * D + column) : 0u;
    };
    float c[kTiles][4] = {};
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const std::uint32_t a[4] = {pair_at(row_low, ks * 16 + 2 * q), pair_at(row_high, ks * 16 + 2 * q),
                                  pair_at(row_low, ks * 16 + 2 * q + 8), pair_at(row_high, ks * 16 + 2 * q + 8)};
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        const uint2 fragment = b[ks][nt][lane];
        sm80::mma_m16n8k16<__half>(c[nt], a, fragment.x, fragment.y);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      const int column = nt * 8 + 2 * q;
      if (row_low < rows_total) {
        *reinterpret_cast<__half2*>(out + row_low * Dv + column) = __floats2half2_rn(c[nt][0] * unit, c[nt][1] * unit);
      }
      if (row_high < rows_total) {
        *reinterpret_cast<__half2*>(out + row_high * Dv + column) = __floats2half2_rn(c[nt][2] * unit, c[nt][3] * unit);
      }
    }
  }
}

// means [BH * Ck][D] -> out [BH * Ck][Dv]: S vbar in float (v's units, unscaled).
template <int D, int Dv>
__global__ void sketch_means_kernel(const float* means, std::int64_t clusters_total, float* out) {
  for_each_index(clusters_total * Dv, [&](std::int64_t i) {
    const std::int64_t cluster = i / Dv;
    const int r = int(i % Dv);
    const float* mean = means + cluster * D;
    float sum = 0.0f;
    for (int c = 0; c < D; ++c) sum += value_sketch_positive(r, c) ? mean[c] : -mean[c];
    out[i] = sum;
  });
}

// How many chunks to split the keys into: among counts giving between 2 and 8 waves of `slots`
// resident CTAs, the smallest whose last wave is at least ~94% full (else the fullest), capped
// by how many pieces the keys have.
int chunks_for_waves(std::int64_t units, std::int64_t slots, std::int64_t max_chunks) {
  const std::int64_t lo = std::max<std::int64_t>(1, (2 * slots + units - 1) / units);
  const std::int64_t hi = std::max(lo, (8 * slots + units - 1) / units);
  std::int64_t best = lo;
  double best_fill = 0.0;
  for (std::int64_t c = lo; c <= hi; ++c) {
    const std::int64_t ctas = units * c, waves = (ctas + slots - 1) / slots;
    const double fill = double(ctas) / double(waves * slots);
    if (fill >= 0.94) {
      best = c;
      break;
    }
    if (fill > best_fill) {
      best = c;
      best_fill = fill;
    }
  }
  return int(std::max<std::int64_t>(1, std::min(best, max_chunks)));
}

// Resident CTAs of `kernel` on the whole device.
template <class Kernel>
std::int64_t resident_ctas(Kernel kernel, std::size_t smem) {
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, probe::kThreads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return std::int64_t(device_sm_count()) * std::max(1, per_sm);
}

template <class Kernel>
void allow_shared_memory(Kernel kernel, std::size_t smem, const char* what) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), what);
}

// Dv: the values' width in the sweeps, D or the sketch's kCudaValueSketchDims.
template <class E, int D, int Dv>
void run_probe(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v, const DeviceLayout& queries,
               const DeviceLayout& keys, const DeviceKeySummary& summary, int probes, bool mean_row, float* error,
               cudaStream_t s) {
  constexpr bool kSketch = Dv < D;
  const std::int64_t heads_total = q.count();
  const int cq = queries.clusters, ck = keys.clusters;
  // Sampled rows are distinct tokens (at most Sq of them); a mean row is one more per cluster.
  const std::int64_t capacity = std::min<std::int64_t>(std::int64_t(cq) * probes, q.tokens) + (mean_row ? cq : 0);
  const int row_blocks = int((capacity + probe::kRows - 1) / probe::kRows);
  const std::int64_t key_tiles = (k.tokens + probe::kKeys - 1) / probe::kKeys;

  constexpr std::size_t exact_smem = sizeof(probe::ExactSweepShared<E, D, Dv>);
  constexpr std::size_t cluster_smem = sizeof(probe::ClusterSweepShared<E, D, Dv>);
  allow_shared_memory(probe::exact_sweep_kernel<E, D, Dv>, exact_smem, "cudaFuncSetAttribute (exact_sweep_kernel)");
  allow_shared_memory(probe::cluster_sweep_kernel<E, D, Dv>, cluster_smem,
                      "cudaFuncSetAttribute (cluster_sweep_kernel)");
  const std::int64_t units = heads_total * row_blocks;
  const int exact_chunks =
      chunks_for_waves(units, resident_ctas(probe::exact_sweep_kernel<E, D, Dv>, exact_smem), key_tiles);
  const int cluster_chunks =
      chunks_for_waves(units, resident_ctas(probe::cluster_sweep_kernel<E, D, Dv>, cluster_smem), ck);
  if (std::int64_t(row_blocks) * std::max(exact_chunks, cluster_chunks) > std::int64_t(INT32_MAX)) {
    throw Error("probe_compensation_error: " + std::to_string(capacity) +
                " probe rows per head are too many for one launch");
  }

  DeviceBuffer<std::int32_t> row_token(std::size_t(heads_total * capacity), s);
  DeviceBuffer<std::int32_t> row_cluster(std::size_t(heads_total * capacity), s);
  DeviceBuffer<std::int32_t> row_count(std::size_t(heads_total), s);
  DeviceBuffer<std::int32_t> chunk_clusters(std::size_t(heads_total * (cluster_chunks + 1)), s);
  list_probe_rows<<<unsigned(heads_total), 256, 0, s>>>(
      queries.order, queries.offsets, q.tokens, cq, probes, mean_row ? 1 : 0, capacity, row_token.get(),
      row_cluster.get(), row_count.get(), keys.offsets, k.tokens, ck, cluster_chunks, chunk_clusters.get());
  check_launch("list_probe_rows");

  // With mean rows the sweeps read the probe queries from their own tensor (mean_probe_rows);
  // without, straight from q through the tokens.
  DeviceTensor probe_q = q.tensor;
  bool probe_q_aligned = rows_aligned_16(q);
  DeviceBuffer<E> mean_rows(mean_row ? std::size_t(heads_total * capacity * D) : 0, s);
  if (mean_row) {
    mean_probe_rows<E, D><<<grid_for(heads_total * capacity * 32, 256), 256, 0, s>>>(
        q.tensor, q.heads, q.tokens, heads_total, queries.order, queries.offsets, cq, capacity, row_token.get(),
        row_cluster.get(), row_count.get(), summary.query_means, mean_rows.get());
    check_launch("mean_probe_rows");
    probe_q = DeviceTensor{mean_rows.get(), std::int64_t(q.heads) * capacity * D, capacity * D, D};
    probe_q_aligned = true;  // whole rows of 64 or 128 16-bit elements from one allocation
  }

  // max |v| per head: the caller's (the pipeline's input check computes it), else one pass here.
  DeviceBuffer<unsigned> value_max(summary.value_abs_max != nullptr ? 0 : std::size_t(heads_total), s);
  const unsigned* value_abs_max = summary.value_abs_max;
  if (value_abs_max == nullptr) {
    zero_async(value_max.get(), value_max.size(), s, "cudaMemsetAsync (probe value max)");
    const unsigned max_blocks = unsigned(std::clamp<std::int64_t>((v.tokens + 127) / 128, 1, 64));
    value_abs_max_kernel<E>
        <<<dim3(max_blocks, unsigned(heads_total)), 256, 0, s>>>(v.tensor, v.heads, v.tokens, D, value_max.get());
    check_launch("value_abs_max_kernel");
    value_abs_max = value_max.get();
  }
  // v in key order as scaled fp16: the caller's (value_summary), else written here.
  DeviceBuffer<__half> own_values(summary.scaled_values != nullptr ? 0 : std::size_t(heads_total * k.tokens * D), s);
  const __half* values = reinterpret_cast<const __half*>(summary.scaled_values);
  if (values == nullptr) {
    scaled_values_kernel<E, D><<<grid_for(heads_total * k.tokens * 32, 256), 256, 0, s>>>(
        v.tensor, v.heads, k.tokens, heads_total, keys.order, value_abs_max, own_values.get());
    check_launch("scaled_values_kernel");
    values = own_values.get();
  }
  // Sketched: the copy's rows and the value means through S (the copy's scale lowered by log2 D).
  DeviceBuffer<__half> sketched_values(kSketch ? std::size_t(heads_total * k.tokens * Dv) : 0, s);
  DeviceBuffer<float> sketched_means(kSketch ? std::size_t(heads_total * ck * Dv) : 0, s);
  const float* value_means = summary.value_means;
  if constexpr (kSketch) {
    const std::int64_t rows_total = heads_total * k.tokens;
    sketch_values_kernel<D, Dv><<<grid_for((rows_total + 15) / 16 * 32, 256), 256, 0, s>>>(
        values, rows_total, sketched_values.get());
    check_launch("sketch_values_kernel");
    sketch_means_kernel<D, Dv><<<grid_for(heads_total * ck * Dv, 256), 256, 0, s>>>(
        summary.value_means, heads_total * ck, sketched_means.get());
    check_launch("sketch_means_kernel");
    values = sketched_values.get();
    value_means = sketched_means.get();
  }
  PackedCentroids<E, D> means(heads_total, ck, 2, s);
  means.pack(summary.key_means);

  DeviceBuffer<float> part_state(std::size_t(heads_total * exact_chunks * capacity * (2 + Dv)), s);
  DeviceBuffer<float> row_state(std::size_t(heads_total * capacity * (2 + Dv)), s);
  Args<E> a{};
  a.q = probe_q;
  a.k = k.tensor;
  a.heads = q.heads;
  a.sk = k.tokens;
  a.q_aligned = probe_q_aligned;
  a.k_aligned = rows_aligned_16(k);
  a.values = values;
  a.value_abs_max = value_abs_max;
  a.q_offsets = queries.offsets;
  a.k_order = keys.order;
  a.k_offsets = keys.offsets;
  a.query_clusters = cq;
  a.key_clusters = ck;
  a.row_token = row_token.get();
  a.row_cluster = row_cluster.get();
  a.row_count = row_count.get();
  a.row_capacity = capacity;
  a.row_blocks = row_blocks;
  a.probes = probes;
  a.mean_row = mean_row ? 1 : 0;
  a.exact_chunks = exact_chunks;
  const std::int64_t parts = heads_total * exact_chunks * capacity;
  a.part_max = part_state.get();
  a.part_denominator = part_state.get() + parts;
  a.part_output = part_state.get() + 2 * parts;
  const std::int64_t rows = heads_total * capacity;
  a.row_max = row_state.get();
  a.row_denominator = row_state.get() + rows;
  a.row_output = row_state.get() + 2 * rows;
  a.cluster_chunks = cluster_chunks;
  a.chunk_clusters = chunk_clusters.get();
  a.mean_hi = means.hi();
  a.mean_lo = means.lo();
  a.padded_clusters = means.padded();
  a.value_means = value_means;
  a.key_counts = summary.counts;
  a.error = error;

  probe::exact_sweep_kernel<E, D, Dv>
      <<<dim3(unsigned(row_blocks * exact_chunks), unsigned(heads_total)), probe::kThreads, exact_smem, s>>>(a);
  check_launch("exact_sweep_kernel");
  probe::combine_exact_chunks_kernel<E, Dv><<<grid_for(rows * 32, 256), 256, 0, s>>>(a, heads_total);
  check_launch("combine_exact_chunks_kernel");
  probe::cluster_sweep_kernel<E, D, Dv>
      <<<dim3(unsigned(row_blocks * cluster_chunks), unsigned(heads_total)), probe::kThreads, cluster_smem, s>>>(a);
  check_launch("cluster_sweep_kernel");
}

}  // namespace

void require_cuda_value_sketch(int value_sketch_dims, int head_dim) {
  if (value_sketch_on(value_sketch_dims, head_dim) && value_sketch_dims != kCudaValueSketchDims) {
    throw Error("probe_value_dims = " + std::to_string(value_sketch_dims) + ": the CUDA probe sketches values to " +
                std::to_string(kCudaValueSketchDims) + " dimensions only (or 0 for all of them)");
  }
}

void probe_compensation_error(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v,
                              const DeviceLayout& queries, const DeviceLayout& keys, const DeviceKeySummary& summary,
                              int probes_per_cluster, bool mean_row, float* error, void* stream,
                              int value_sketch_dims) {
  validate_probe_inputs(q, k, v, queries, keys, summary, probes_per_cluster, mean_row, error);
  require_cuda_value_sketch(value_sketch_dims, q.head_dim);
  const bool sketch = value_sketch_on(value_sketch_dims, q.head_dim);
  const cudaStream_t s = as_stream(stream);
  zero_async(error, std::size_t(q.count()) * std::size_t(queries.clusters) * std::size_t(keys.clusters), s,
             "cudaMemsetAsync (probe error)");
  dispatch_element_and_dim(q.dtype, q.head_dim, [&](auto element, auto dim) {
    using E = decltype(element);
    constexpr int D = decltype(dim)::value;
    if (sketch) {
      run_probe<E, D, kCudaValueSketchDims>(q, k, v, queries, keys, summary, probes_per_cluster, mean_row, error, s);
    } else {
      run_probe<E, D, D>(q, k, v, queries, keys, summary, probes_per_cluster, mean_row, error, s);
    }
  });
}

}  // namespace svgear::cuda
