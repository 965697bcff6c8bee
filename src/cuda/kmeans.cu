// Lloyd's k-means of every head at once (cpu::kmeans). Assignment is a fused tensor-core tile
// kernel: a CTA holds 128 rows of x and streams the head's centroids through shared memory 64
// at a time, computing x.c with mma.sync and keeping each row's running argmin of
// ||c||^2 - 2 x.c in registers, so the S x C distance matrix never exists. The update sorts
// tokens by label (the cluster layout, also the stage's optional output) and reduces each
// cluster's rows in float64 (cluster_means.cu).
#include <cmath>
#include <cub/block/block_reduce.cuh>
#include <string>

#include "cuda/device_common.cuh"
#include "cuda/mma_tiles.cuh"
#include "cuda/stage_internals.cuh"

namespace svgear::cuda {

namespace {

using namespace detail;

constexpr int kAssignWarps = 8;
constexpr int kAssignThreads = kAssignWarps * 32;
constexpr int kAssignRows = kAssignWarps * 16;  // one m16 row block per warp
constexpr int kAssignCentroids = 64;            // centroids per shared-memory stage

int padded_clusters(int clusters) { return (clusters + kAssignCentroids - 1) / kAssignCentroids * kAssignCentroids; }

template <class E, int D>
constexpr std::size_t assign_smem_bytes() {
  // x tile, two stages of (hi, lo) centroid tiles, two stages of norms.
  return std::size_t(kAssignRows + 4 * kAssignCentroids) * kTileStride<D> * sizeof(E) +
         2 * kAssignCentroids * sizeof(float);
}

// centroid c = token floor(c * S / C) (cpu strided_init).
template <class E, int D>
__global__ void strided_init_kernel(DeviceTensor tensor, int heads, std::int64_t tokens, std::int64_t heads_total,
                                    int clusters, float* centroids) {
  const std::int64_t total = heads_total * clusters * D;
  for_each_index(total, [&](std::int64_t i) {
    const int d = int(i % D);
    const std::int64_t c = (i / D) % clusters, bh = i / (std::int64_t(D) * clusters);
    const std::int64_t source = c * tokens / clusters;
    centroids[i] = Element<E>::to_float(head_rows<E>(tensor, heads, bh).row(source)[d]);
  });
}

// The tensor-core operands of the centroids: hi + lo 16-bit terms in [BH][padded][D] (zero
// padding, so tile loads need no bounds) and ||c||^2 from the fp32 centroid.
template <class E, int D>
__global__ void pack_centroids_kernel(const float* centroids, std::int64_t heads_total, int clusters, int padded, E* hi,
                                      E* lo, float* norms) {
  const int lane = threadIdx.x % 32;
  const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t w = (blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x) / 32; w < heads_total * padded;
       w += warps) {
    const std::int64_t bh = w / padded;
    const int c = int(w % padded);
    float norm = 0.0f;
    for (int d = lane; d < D; d += 32) {
      float h = 0.0f, l = 0.0f;
      if (c < clusters) {
        const float x = centroids[(bh * clusters + c) * D + d];
        split_hi_lo<E>(x, h, l);
        norm += x * x;
      }
      hi[w * D + d] = Element<E>::from_float(h);
      lo[w * D + d] = Element<E>::from_float(l);
    }
    norm = warp_sum(norm);
    if (lane == 0) norms[w] = norm;
  }
}

template <class E, int D>
__global__ void __launch_bounds__(kAssignThreads)
    assign_kernel(DeviceTensor tensor, int heads, std::int64_t tokens, bool aligned16, const E* centroid_hi,
                  const E* centroid_lo, const float* centroid_norms, int clusters, int padded, std::int32_t* labels) {
  constexpr int kStride = kTileStride<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  E* x_tile = reinterpret_cast<E*>(smem);                   // [kAssignRows][kStride]
  E* hi_tiles = x_tile + kAssignRows * kStride;             // [2][kAssignCentroids][kStride]
  E* lo_tiles = hi_tiles + 2 * kAssignCentroids * kStride;  // [2][kAssignCentroids][kStride]
  float* norm_tiles = reinterpret_cast<float*>(lo_tiles + 2 * kAssignCentroids * kStride);  // [2][64]

  const std::int64_t bh = blockIdx.y;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * kAssignRows;
  const HeadRows<E> rows = head_rows<E>(tensor, heads, bh);
  load_rows<E, D, kAssignRows, kAssignThreads>(
      x_tile, rows, aligned16, [&](int r) -> std::int64_t { return row0 + r < tokens ? row0 + r : -1; });

  const E* head_hi = centroid_hi + bh * padded * D;
  const E* head_lo = centroid_lo + bh * padded * D;
  const float* head_norms = centroid_norms + bh * padded;
  auto load_centroids = [&](int tile, int stage) {
    constexpr int kChunks = D / 8;
    for (int idx = threadIdx.x; idx < kAssignCentroids * kChunks; idx += kAssignThreads) {
      const int r = idx / kChunks, chunk = idx % kChunks;
      const std::int64_t src = (std::int64_t(tile) * kAssignCentroids + r) * D + chunk * 8;
      const int dst = (stage * kAssignCentroids + r) * kStride + chunk * 8;
      sm80::cp_async_16(sm80::shared_address(hi_tiles + dst), head_hi + src, true);
      sm80::cp_async_16(sm80::shared_address(lo_tiles + dst), head_lo + src, true);
    }
    if (threadIdx.x < kAssignCentroids / 4) {
      sm80::cp_async_16(sm80::shared_address(norm_tiles + stage * kAssignCentroids + threadIdx.x * 4),
                        head_norms + std::int64_t(tile) * kAssignCentroids + threadIdx.x * 4, true);
    }
  };
  load_centroids(0, 0);
  sm80::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q = lane & 3;
  float best[2] = {INFINITY, INFINITY};  // rows g and g + 8 of the warp's 16
  int best_index[2] = {0, 0};
  const int tiles = padded / kAssignCentroids;
  for (int t = 0; t < tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < tiles) load_centroids(t + 1, stage ^ 1);
    sm80::cp_async_commit();
    sm80::cp_async_wait<1>();
    __syncthreads();

    const E* hi = hi_tiles + stage * kAssignCentroids * kStride;
    const E* lo = lo_tiles + stage * kAssignCentroids * kStride;
    float acc[kAssignCentroids / 8][4] = {};
    warp_mma_abt<E, D, kAssignCentroids>(acc, x_tile, warp * 16, hi, lane);  // x.c = x.hi + x.lo
    warp_mma_abt<E, D, kAssignCentroids>(acc, x_tile, warp * 16, lo, lane);
    // ||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c; columns in increasing order, strict < keeps the
    // lowest index among ties.
    const float* norm = norm_tiles + stage * kAssignCentroids;
#pragma unroll
    for (int nt = 0; nt < kAssignCentroids / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int local = nt * 8 + 2 * q + e;
        const int c = t * kAssignCentroids + local;
        if (c < clusters) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float distance = norm[local] - 2.0f * acc[nt][2 * h + e];
            if (distance < best[h]) {
              best[h] = distance;
              best_index[h] = c;
            }
          }
        }
      }
    }
    __syncthreads();  // the stage is reloaded next iteration
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int offset = 1; offset <= 2; offset <<= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best[h], offset);
      const int other_index = __shfl_xor_sync(0xffffffffu, best_index[h], offset);
      if (other < best[h] || (other == best[h] && other_index < best_index[h])) {
        best[h] = other;
        best_index[h] = other_index;
      }
    }
    const std::int64_t row = row0 + warp * 16 + lane / 4 + 8 * h;
    if (q == 0 && row < tokens) labels[bh * tokens + row] = best_index[h];
  }
}

__global__ void sum_objective_parts(const double* parts, int clusters, int iterations, int iteration,
                                    double* objective) {
  using Reduce = cub::BlockReduce<double, 256>;
  __shared__ typename Reduce::TempStorage storage;
  const std::int64_t bh = blockIdx.x;
  double sum = 0.0;
  for (int c = threadIdx.x; c < clusters; c += 256) sum += parts[bh * clusters + c];
  const double total = Reduce(storage).Sum(sum);
  if (threadIdx.x == 0) objective[bh * iterations + iteration] = total;
}

// Centroid operands of one head batch, repacked after each update.
template <class E, int D>
class PackedCentroids {
 public:
  PackedCentroids(std::int64_t heads_total, int clusters, cudaStream_t stream)
      : heads_total_(heads_total),
        clusters_(clusters),
        padded_(padded_clusters(clusters)),
        stream_(stream),
        hi_(std::size_t(heads_total * padded_ * D), stream),
        lo_(std::size_t(heads_total * padded_ * D), stream),
        norms_(std::size_t(heads_total * padded_), stream) {}

  void pack(const float* centroids) {
    pack_centroids_kernel<E, D><<<grid_for(heads_total_ * padded_ * 32, 256), 256, 0, stream_>>>(
        centroids, heads_total_, clusters_, padded_, hi_.get(), lo_.get(), norms_.get());
    check_launch("pack_centroids_kernel");
  }

  void assign(const DeviceHeads& points, std::int32_t* labels) const {
    constexpr std::size_t smem = assign_smem_bytes<E, D>();
    check_cuda(cudaFuncSetAttribute(assign_kernel<E, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "cudaFuncSetAttribute (assign_kernel shared memory)");
    const dim3 grid(unsigned((points.tokens + kAssignRows - 1) / kAssignRows), unsigned(heads_total_));
    assign_kernel<E, D><<<grid, kAssignThreads, smem, stream_>>>(points.tensor, points.heads, points.tokens,
                                                                 rows_aligned_16(points), hi_.get(), lo_.get(),
                                                                 norms_.get(), clusters_, padded_, labels);
    check_launch("assign_kernel");
  }

 private:
  std::int64_t heads_total_;
  int clusters_, padded_;
  cudaStream_t stream_;
  DeviceBuffer<E> hi_, lo_;
  DeviceBuffer<float> norms_;
};

void validate_kmeans_shape(const DeviceHeads& points, int clusters) {
  validate_heads(points, "points");
  if (clusters < 1) throw Error("k-means needs at least 1 cluster, got " + std::to_string(clusters));
  require_heads_per_launch(points.count(), "k-means");
}

}  // namespace

void assign_to_nearest_centroid(const DeviceHeads& points, const float* centroids, int clusters, std::int32_t* labels,
                                void* stream) {
  validate_kmeans_shape(points, clusters);
  if (centroids == nullptr || labels == nullptr) {
    throw Error("assign_to_nearest_centroid: centroids and labels must be device pointers, got a null one");
  }
  const cudaStream_t s = as_stream(stream);
  dispatch_element_and_dim(points.dtype, points.head_dim, [&](auto element, auto dim) {
    using E = decltype(element);
    constexpr int D = decltype(dim)::value;
    PackedCentroids<E, D> packed(points.count(), clusters, s);
    packed.pack(centroids);
    packed.assign(points, labels);
  });
}

void kmeans(const DeviceHeads& points, const KmeansSettings& settings, const KmeansOutputs& out, void* stream) {
  validate_kmeans_shape(points, settings.clusters);
  if (settings.iterations < 1) {
    throw Error("k-means needs at least 1 iteration, got " + std::to_string(settings.iterations));
  }
  if (out.centroids == nullptr || out.labels == nullptr || out.counts == nullptr) {
    throw Error("kmeans: out.centroids, out.labels and out.counts must be device pointers, got a null one");
  }
  const cudaStream_t s = as_stream(stream);
  const std::int64_t heads_total = points.count(), tokens = points.tokens;
  const int clusters = settings.clusters, d = points.head_dim;
  const std::size_t centroid_floats = std::size_t(heads_total) * std::size_t(clusters) * std::size_t(d);

  // Layout buffers: the caller's when asked for, else scratch.
  DeviceBuffer<std::int32_t> order_scratch(out.order != nullptr ? 0 : std::size_t(heads_total * tokens), s);
  DeviceBuffer<std::int32_t> offsets_scratch(out.offsets != nullptr ? 0 : std::size_t(heads_total * (clusters + 1)), s);
  std::int32_t* order = out.order != nullptr ? out.order : order_scratch.get();
  std::int32_t* offsets = out.offsets != nullptr ? out.offsets : offsets_scratch.get();
  DeviceBuffer<double> objective_parts(out.objective != nullptr ? std::size_t(heads_total * clusters) : 0, s);
  detail::ClusterLayoutBuilder layout(heads_total, tokens, clusters, s);

  dispatch_element_and_dim(points.dtype, d, [&](auto element, auto dim) {
    using E = decltype(element);
    constexpr int D = decltype(dim)::value;
    if (settings.initial_centroids != nullptr) {
      if (settings.initial_centroids != out.centroids) {
        check_cuda(cudaMemcpyAsync(out.centroids, settings.initial_centroids, sizeof(float) * centroid_floats,
                                   cudaMemcpyDeviceToDevice, s),
                   "cudaMemcpyAsync (k-means warm start)");
      }
    } else {
      strided_init_kernel<E, D><<<grid_for(std::int64_t(centroid_floats), 256), 256, 0, s>>>(
          points.tensor, points.heads, tokens, heads_total, clusters, out.centroids);
      check_launch("strided_init_kernel");
    }
    PackedCentroids<E, D> packed(heads_total, clusters, s);
    for (int iteration = 0; iteration < settings.iterations; ++iteration) {
      packed.pack(out.centroids);
      packed.assign(points, out.labels);
      layout.build(out.labels, order, offsets);
      segment_means(points, order, offsets, clusters, EmptyCluster::keep, out.centroids, out.counts,
                    out.objective != nullptr ? objective_parts.get() : nullptr, s);
      if (out.objective != nullptr) {
        sum_objective_parts<<<unsigned(heads_total), 256, 0, s>>>(objective_parts.get(), clusters, settings.iterations,
                                                                  iteration, out.objective);
        check_launch("sum_objective_parts");
      }
    }
  });
}

}  // namespace svgear::cuda
