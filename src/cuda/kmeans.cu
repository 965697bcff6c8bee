// Lloyd's k-means of every head at once (cpu::kmeans). Assignment is a fused tensor-core tile
// kernel: a CTA holds 256 rows of x (8 warps x 32 rows) and streams the head's packed centroids
// through shared memory 64 at a time, computing x.c with mma.sync and keeping each row's running
// argmin of ||c||^2 - 2 x.c in registers, so the S x C distance matrix never exists. Each warp
// covers two m16 row blocks so every centroid fragment it reads from shared memory feeds two
// MMAs (warp_mma_abt_rows). Lloyd's iterations use one 16-bit term of the centroids (labels
// then differ from float64 distances only where two centroids are within ~2^-8 (bf16) of each
// other relative to |x||c| / sqrt(D)); the stand-alone assignment keeps two terms. On Hopper
// the two-term assignment runs on wgmma instead (kmeans_assign_sm90.cu, use_sm90_assign()).
// The update sorts tokens by label (the cluster layout, also the stage's optional output) and
// reduces each cluster's rows in float64 (cluster_means.cu).
#include <cmath>
#include <cub/block/block_reduce.cuh>
#include <optional>
#include <string>

#include "cuda/device_common.cuh"
#include "cuda/mma_tiles.cuh"
#include "cuda/nearest_centroid.cuh"
#include "cuda/non_finite_bits.cuh"
#include "cuda/packed_centroids.cuh"
#include "cuda/sparse_attention.hpp"
#include "cuda/stage_internals.cuh"

namespace svgear::cuda {

namespace {

using namespace detail;

constexpr int kAssignWarps = 8;
constexpr int kAssignThreads = kAssignWarps * 32;
constexpr int kAssignBlocks = 2;                                // m16 row blocks per warp
constexpr int kAssignRows = kAssignWarps * 16 * kAssignBlocks;  // 256
constexpr int kAssignCentroids = kCentroidTile;                 // centroids per shared-memory stage

// Shared memory of assign_kernel: the x tile, then two stages of kTerms centroid tiles and norms.
template <class E, int D, int kTerms>
constexpr std::size_t assign_smem_bytes() {
  return std::size_t(kAssignRows + 2 * kTerms * kAssignCentroids) * kTileStride<D> * sizeof(E) +
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

// Adds the non-finite elements of the x tile's first `rows` rows to *count (every thread), eight
// elements per 16-byte shared-memory load (a tile row is 16-byte aligned: kTileStride<D> * 2 bytes).
template <class E, int D>
__device__ void count_non_finite_rows(const E* x_tile, std::int64_t rows, unsigned long long* count) {
  constexpr int kChunks = D / 8;
  unsigned local = 0;
  for (int idx = threadIdx.x; idx < kAssignRows * kChunks; idx += kAssignThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    if (r < rows) {
      local += count_non_finite_in(*reinterpret_cast<const uint4*>(x_tile + r * kTileStride<D> + c * 8),
                                   kExponentBits<E>);
    }
  }
  local = warp_sum(local);
  if (threadIdx.x % 32 == 0 && local != 0) atomicAdd(count, static_cast<unsigned long long>(local));
}

// labels[bh][row] = argmin_c ||x_row - c||^2 for the CTA's 256 rows. Two CTAs fit an SM with one
// term (105 KB of shared memory each at D = 128, <= 128 registers), so one CTA's tile loads
// overlap the other's MMAs; two terms take 140 KB, one CTA per SM. With non_finite, the CTA also
// counts its rows' NaN/Inf elements there (the pipeline's input check of q and k, from the tile
// this kernel loads anyway). With kRunnerUp, it also writes every row's runner-up centroid and
// regret (NearestCentroid), for the tile alignment after k-means' last assignment.
template <class E, int D, int kTerms, bool kRunnerUp = false>
__global__ void __launch_bounds__(kAssignThreads, kTerms == 1 ? 2 : 1)
    assign_kernel(DeviceTensor tensor, int heads, std::int64_t tokens, bool aligned16, const E* centroid_hi,
                  const E* centroid_lo, const float* centroid_norms, int clusters, int padded, std::int32_t* labels,
                  unsigned long long* non_finite, std::int32_t* runner_up, float* regret) {
  constexpr int kStride = kTileStride<D>;
  constexpr int kStageElements = kAssignCentroids * kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  E* x_tile = reinterpret_cast<E*>(smem);              // [kAssignRows][kStride]
  E* centroid_tiles = x_tile + kAssignRows * kStride;  // [2 stages][kTerms][kAssignCentroids][kStride]
  float* norm_tiles = reinterpret_cast<float*>(centroid_tiles + 2 * kTerms * kStageElements);  // [2][64]

  const std::int64_t bh = blockIdx.y;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * kAssignRows;
  const HeadRows<E> rows = head_rows<E>(tensor, heads, bh);
  load_rows<E, D, kAssignRows, kAssignThreads>(
      x_tile, rows, aligned16, [&](int r) -> std::int64_t { return row0 + r < tokens ? row0 + r : -1; });

  const E* head_terms[2] = {centroid_hi + bh * padded * D, kTerms > 1 ? centroid_lo + bh * padded * D : nullptr};
  const float* head_norms = centroid_norms + bh * padded;
  auto load_centroids = [&](int tile, int stage) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int term = 0; term < kTerms; ++term) {
      for (int idx = threadIdx.x; idx < kAssignCentroids * kChunks; idx += kAssignThreads) {
        const int r = idx / kChunks, chunk = idx % kChunks;
        const std::int64_t src = (std::int64_t(tile) * kAssignCentroids + r) * D + chunk * 8;
        E* dst = centroid_tiles + (stage * kTerms + term) * kStageElements + r * kStride + chunk * 8;
        sm80::cp_async_16(sm80::shared_address(dst), head_terms[term] + src, true);
      }
    }
    if (threadIdx.x < kAssignCentroids / 4) {
      sm80::cp_async_16(sm80::shared_address(norm_tiles + stage * kAssignCentroids + threadIdx.x * 4),
                        head_norms + std::int64_t(tile) * kAssignCentroids + threadIdx.x * 4, true);
    }
  };
  load_centroids(0, 0);
  sm80::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  NearestCentroid<kAssignBlocks, kRunnerUp> nearest;
  const int tiles = padded / kAssignCentroids;
  for (int t = 0; t < tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < tiles) load_centroids(t + 1, stage ^ 1);
    sm80::cp_async_commit();
    sm80::cp_async_wait<1>();
    __syncthreads();
    if (t == 0 && non_finite != nullptr) count_non_finite_rows<E, D>(x_tile, tokens - row0, non_finite);

    float acc[kAssignBlocks][kAssignCentroids / 8][4] = {};
#pragma unroll
    for (int term = 0; term < kTerms; ++term) {  // x.c = x.hi (+ x.lo)
      // Two k16 steps unrolled: <= 128 registers without spills (two CTAs per SM hide the rest).
      warp_mma_abt_rows<E, D, kAssignCentroids, kAssignBlocks, 2>(
          acc, x_tile, warp * 16 * kAssignBlocks, centroid_tiles + (stage * kTerms + term) * kStageElements, lane);
    }
    nearest.take(acc, t, clusters, norm_tiles + stage * kAssignCentroids, lane % 4);
    __syncthreads();  // the stage is reloaded next iteration
  }
  nearest.store(labels + bh * tokens, row0 + warp * 16 * kAssignBlocks, tokens, lane,
                kRunnerUp ? runner_up + bh * tokens : nullptr, kRunnerUp ? regret + bh * tokens : nullptr);
}

// non_finite: count the points' NaN/Inf there too; runner_ups (non-null fields): the second
// choices too (both on the mma.sync kernel, whatever use_sm90_assign says: only it does them).
template <class E, int D, int kTerms>
void launch_assign(const DeviceHeads& points, const PackedCentroids<E, D>& packed, std::int32_t* labels,
                   std::int64_t* non_finite, cudaStream_t stream, DeviceRunnerUps runner_ups = {}) {
  const bool with_runner_ups = runner_ups.labels != nullptr;
  if (non_finite == nullptr && !with_runner_ups && use_sm90_assign(kTerms)) {
    launch_assign_sm90<E, D, kTerms>(points, packed.hi(), packed.lo(), packed.norms(), packed.clusters(),
                                     packed.padded(), labels, stream);
    return;
  }
  auto launch = [&](auto kernel) {
    constexpr std::size_t smem = assign_smem_bytes<E, D, kTerms>();
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "cudaFuncSetAttribute (assign_kernel shared memory)");
    const dim3 grid(unsigned((points.tokens + kAssignRows - 1) / kAssignRows), unsigned(points.count()));
    kernel<<<grid, kAssignThreads, smem, stream>>>(points.tensor, points.heads, points.tokens, rows_aligned_16(points),
                                                   packed.hi(), packed.lo(), packed.norms(), packed.clusters(),
                                                   packed.padded(), labels,
                                                   reinterpret_cast<unsigned long long*>(non_finite), runner_ups.labels,
                                                   runner_ups.regrets);
    check_launch("assign_kernel");
  };
  if (with_runner_ups) {
    launch(assign_kernel<E, D, kTerms, true>);
  } else {
    launch(assign_kernel<E, D, kTerms, false>);
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

void validate_kmeans_shape(const DeviceHeads& points, int clusters) {
  validate_heads(points, "points");
  if (clusters < 1) throw Error("k-means needs at least 1 cluster, got " + std::to_string(clusters));
  require_heads_per_launch(points.count(), "k-means");
}

}  // namespace

bool detail::use_sm90_assign(int terms) {
  if (const std::optional<bool> forced = forced_sm90_kernel("SVGEAR_KMEANS_KERNEL")) return *forced;
  // Measured on an H100 (docs/PERF_NOTES.md): with two terms wgmma is 1.35x faster; with one
  // (Lloyd's iterations) it is 2-5% slower, its per-stage argmin and barrier not hidden.
  return terms > 1 && sm90_attention_available();
}

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
    PackedCentroids<E, D> packed(points.count(), clusters, 2, s);
    packed.pack(centroids);
    launch_assign<E, D, 2>(points, packed, labels, nullptr, s);
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
  if ((out.runner_ups.labels == nullptr) != (out.runner_ups.regrets == nullptr)) {
    throw Error("kmeans: out.runner_ups needs both labels and regrets (or neither)");
  }
  if (settings.tail_limit < 0 || settings.tail_limit > cpu::kMaxTailLimit ||
      (settings.tail_limit > 0 && settings.clusters > kMaxAlignedClusters)) {
    throw Error("kmeans: tail limit " + std::to_string(settings.tail_limit) + " must be in [0, " +
                std::to_string(cpu::kMaxTailLimit) + "], and a tail limit needs at most " +
                std::to_string(kMaxAlignedClusters) + " clusters (got " + std::to_string(settings.clusters) + ")");
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
  // The last assignment's runner-ups: the caller's when asked for, else scratch when aligning.
  const bool align = settings.tail_limit > 0;
  const bool runner_up_scratch = align && out.runner_ups.labels == nullptr;
  DeviceBuffer<std::int32_t> runner_up_labels(runner_up_scratch ? std::size_t(heads_total * tokens) : 0, s);
  DeviceBuffer<float> runner_up_regrets(runner_up_scratch ? std::size_t(heads_total * tokens) : 0, s);
  const DeviceRunnerUps runner_ups =
      runner_up_scratch ? DeviceRunnerUps{runner_up_labels.get(), runner_up_regrets.get()} : out.runner_ups;
  if (!align && out.aligned_rows != nullptr) {
    check_cuda(cudaMemsetAsync(out.aligned_rows, 0, sizeof(std::int32_t) * std::size_t(heads_total), s),
               "cudaMemsetAsync (k-means aligned rows)");
  }

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
    PackedCentroids<E, D> packed(heads_total, clusters, 1, s);
    for (int iteration = 0; iteration < settings.iterations; ++iteration) {
      const bool last = iteration + 1 == settings.iterations;
      packed.pack(out.centroids);
      launch_assign<E, D, 1>(points, packed, out.labels, iteration == 0 ? settings.non_finite : nullptr, s,
                             last ? runner_ups : DeviceRunnerUps{});
      layout.build(out.labels, order, offsets);
      if (last && align) {
        align_clusters_to_tiles(heads_total, tokens, clusters, settings.tail_limit, out.labels,
                                DeviceLayout{order, offsets, clusters}, runner_ups, out.aligned_rows, s);
        layout.build(out.labels, order, offsets);
      }
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
