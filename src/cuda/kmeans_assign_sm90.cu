// k-means' assignment (kmeans.cu's assign_kernel) on Hopper's warpgroup MMAs: the same labels
// up to the fp32 summation order of x . c.
//
// A CTA is 2 warpgroups around 128 rows of x. Each warp loads its 16 rows' A fragments once into
// registers (x is reused against every centroid), then the CTA streams the head's packed
// centroids through a ring of shared-memory stages, 64 per stage in the 128-byte swizzle wgmma
// reads (sm90_primitives.cuh): per stage one m64n64 product per warpgroup, x . hi (+ x . lo with
// two terms) in fp32, then NearestCentroid's running argmin on the accumulators. The copies of a
// later stage are in flight while a stage is multiplied, and two CTAs per SM overlap one CTA's
// argmin with the other's MMAs. On an H100 it is 1.35x faster than mma.sync with two centroid
// terms but 2-5% slower with one (docs/PERF_NOTES.md), so use_sm90_assign() takes it for two.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/device_common.cuh"
#include "cuda/mma_tiles.cuh"
#include "cuda/nearest_centroid.cuh"
#include "cuda/sm80_primitives.cuh"
#include "cuda/sm90_primitives.cuh"
#include "cuda/stage_internals.cuh"

namespace svgear::cuda::detail {

namespace {

template <class E, int D, int kTerms>
struct AssignSm90 {
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kWarpgroupRows = 64;  // wgmma M
  static constexpr int kRows = kWarpgroupRows * kWarpgroups;
  static constexpr int kCentroids = kCentroidTile;    // wgmma N: 64 centroids per stage
  static constexpr int kStages = kTerms == 1 ? 3 : 2;  // <= 114 KB, so two CTAs fit an SM
  static constexpr int kChunks = D / 8;               // 16-byte chunks per row
  static constexpr int kDSteps = D / 16;
  static constexpr int kTermBytes = kCentroids * D * 2;
  static_assert(kChunks * 8 == D && kDSteps * 16 == D, "D is 64 or 128");

  struct Shared {
    alignas(1024) std::uint8_t centroids[kStages][kTerms][kTermBytes];
    float norms[kStages][kCentroids];
    alignas(16) E x[kRows][kTileStride<D>];
  };
  static_assert(2 * (sizeof(Shared) + 1024) <= 228 * 1024, "two CTAs per SM");
};

#if defined(SVGEAR_SM90A_ENABLED)

template <class E, int D, int kTerms>
__device__ __forceinline__ void load_centroid_stage(typename AssignSm90<E, D, kTerms>::Shared& shared, int stage,
                                                    int tile, const E* hi, const E* lo, const float* norms) {
  using A = AssignSm90<E, D, kTerms>;
  for (int idx = int(threadIdx.x); idx < kTerms * A::kCentroids * A::kChunks; idx += A::kThreads) {
    const int term = idx / (A::kCentroids * A::kChunks);
    const int row = (idx / A::kChunks) % A::kCentroids, chunk = idx % A::kChunks;
    const E* source = (term == 0 ? hi : lo) + (std::int64_t(tile) * A::kCentroids + row) * D + chunk * 8;
    sm80::cp_async_16(sm80::shared_address(shared.centroids[stage][term]) +
                          sm90::swizzled_offset<A::kCentroids>(row, chunk),
                      source, true);
  }
  if (threadIdx.x < A::kCentroids / 4) {
    sm80::cp_async_16(sm80::shared_address(&shared.norms[stage][4 * threadIdx.x]),
                      norms + std::int64_t(tile) * A::kCentroids + 4 * threadIdx.x, true);
  }
}

#endif  // SVGEAR_SM90A_ENABLED

template <class E, int D, int kTerms>
__global__ void __launch_bounds__(AssignSm90<E, D, kTerms>::kThreads, 2)
    assign_sm90_kernel(DeviceTensor tensor, int heads, std::int64_t tokens, bool aligned16, const E* centroid_hi,
                       const E* centroid_lo, const float* centroid_norms, int clusters, int padded,
                       std::int32_t* labels) {
#if defined(SVGEAR_SM90A_ENABLED)
  using A = AssignSm90<E, D, kTerms>;
  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  const std::uint32_t raw = sm80::shared_address(shared_bytes);
  auto& shared = *reinterpret_cast<typename A::Shared*>(shared_bytes + ((1024 - raw % 1024) % 1024));

  const std::int64_t bh = blockIdx.y;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * A::kRows;
  const HeadRows<E> rows = head_rows<E>(tensor, heads, bh);
  load_rows<E, D, A::kRows, A::kThreads>(&shared.x[0][0], rows, aligned16,
                                         [&](int r) -> std::int64_t { return row0 + r < tokens ? row0 + r : -1; });
  const E* hi = centroid_hi + bh * padded * D;
  const E* lo = kTerms > 1 ? centroid_lo + bh * padded * D : nullptr;
  const float* norms = centroid_norms + bh * padded;
  const int tiles = padded / A::kCentroids;
  // Stages 0 .. kStages - 2 ahead; the first group also carries x.
#pragma unroll
  for (int stage = 0; stage < A::kStages - 1; ++stage) {
    if (stage < tiles) load_centroid_stage<E, D, kTerms>(shared, stage, stage, hi, lo, norms);
    sm80::cp_async_commit();
  }

  const int warpgroup = int(threadIdx.x) / 128, warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32;
  const int first_row = A::kWarpgroupRows * warpgroup + 16 * warp;  // the warp's 16 rows of the CTA's tile
  std::uint32_t x_fragments[A::kDSteps][4];
  NearestCentroid<1> nearest;
#pragma unroll 1
  for (int t = 0; t < tiles; ++t) {
    const int stage = t % A::kStages;
    // Stage t has landed for this thread; the fence hands its copies to the async proxy (wgmma)
    // and the barrier publishes everyone's. It also means every warpgroup's product of tile
    // t - 1 has completed, so that stage may be refilled below.
    sm80::cp_async_wait<A::kStages - 2>();
    sm90::fence_proxy_async();
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int step = 0; step < A::kDSteps; ++step) {
        sm80::ldmatrix_x4(x_fragments[step], a_fragment<E, D>(&shared.x[0][0], first_row, 16 * step, lane));
      }
    }
    const int ahead = t + A::kStages - 1;
    if (ahead < tiles) load_centroid_stage<E, D, kTerms>(shared, ahead % A::kStages, ahead, hi, lo, norms);
    sm80::cp_async_commit();  // possibly empty: keeps one group per tile for the wait above

    float acc[A::kCentroids / 2];
    sm90::fence_operands(x_fragments);
    sm90::wgmma_fence();
#pragma unroll
    for (int term = 0; term < kTerms; ++term) {
#pragma unroll
      for (int step = 0; step < A::kDSteps; ++step) {
        const std::uint64_t b = sm90::make_descriptor(
            sm80::shared_address(shared.centroids[stage][term]) + sm90::swizzled_offset<A::kCentroids>(0, 2 * step),
            16, sm90::kSwizzleAtomBytes);
        sm90::wgmma_rs_m64n64k16<E>(acc, x_fragments[step], b, term > 0 || step > 0 ? 1 : 0);
      }
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(acc);
    nearest.take(reinterpret_cast<const float(&)[1][A::kCentroids / 8][4]>(acc), t, clusters, shared.norms[stage],
                 lane % 4);
  }
  nearest.store(labels + bh * tokens, row0 + first_row, tokens, lane);
  sm80::cp_async_wait<0>();  // no copy in flight behind an exited thread (only empty groups remain)
#else
  (void)tensor, (void)heads, (void)tokens, (void)aligned16, (void)centroid_hi, (void)centroid_lo,
      (void)centroid_norms, (void)clusters, (void)padded, (void)labels;  // never launched without sm_90a
#endif
}

}  // namespace

template <class E, int D, int kTerms>
void launch_assign_sm90(const DeviceHeads& points, const E* centroid_hi, const E* centroid_lo,
                        const float* centroid_norms, int clusters, int padded, std::int32_t* labels,
                        cudaStream_t stream) {
  using A = AssignSm90<E, D, kTerms>;
  constexpr int kSharedBytes = int(sizeof(typename A::Shared)) + 1024;  // + alignment slack
  auto* kernel = assign_sm90_kernel<E, D, kTerms>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes),
             "cudaFuncSetAttribute (assign_sm90_kernel shared memory)");
  const dim3 grid(unsigned((points.tokens + A::kRows - 1) / A::kRows), unsigned(points.count()));
  kernel<<<grid, A::kThreads, kSharedBytes, stream>>>(points.tensor, points.heads, points.tokens,
                                                      rows_aligned_16(points), centroid_hi, centroid_lo,
                                                      centroid_norms, clusters, padded, labels);
  check_launch("assign_sm90_kernel");
}

#define SVGEAR_INSTANTIATE_ASSIGN_SM90(E, D, TERMS)                                                         \
  template void launch_assign_sm90<E, D, TERMS>(const DeviceHeads&, const E*, const E*, const float*, int, int, \
                                                std::int32_t*, cudaStream_t);
SVGEAR_INSTANTIATE_ASSIGN_SM90(__nv_bfloat16, 64, 1)
SVGEAR_INSTANTIATE_ASSIGN_SM90(__nv_bfloat16, 64, 2)
SVGEAR_INSTANTIATE_ASSIGN_SM90(__nv_bfloat16, 128, 1)
SVGEAR_INSTANTIATE_ASSIGN_SM90(__nv_bfloat16, 128, 2)
SVGEAR_INSTANTIATE_ASSIGN_SM90(__half, 64, 1)
SVGEAR_INSTANTIATE_ASSIGN_SM90(__half, 64, 2)
SVGEAR_INSTANTIATE_ASSIGN_SM90(__half, 128, 1)
SVGEAR_INSTANTIATE_ASSIGN_SM90(__half, 128, 2)
#undef SVGEAR_INSTANTIATE_ASSIGN_SM90

}  // namespace svgear::cuda::detail
