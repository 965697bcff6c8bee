// Centroids (or any per-cluster fp32 vectors) as tensor-core operands: one or two 16-bit terms
// per element, c = hi + lo + O(2^-16 |c|) (split_hi_lo), in [BH][padded][D] with the padding
// rows zero so 64-row tile loads need no bounds, and ||c||^2 from the fp32 value. k-means'
// assignment reads them (one term in its iterations, two for assign_to_nearest_centroid); the
// EAR probe reads the key means' two terms for q . mu.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/mma_tiles.cuh"

namespace svgear::cuda::detail {

inline constexpr int kCentroidTile = 64;  // centroids per shared-memory stage of the consumers

inline int padded_clusters(int clusters) { return (clusters + kCentroidTile - 1) / kCentroidTile * kCentroidTile; }

// One warp per (head, padded centroid); lanes stride the D elements.
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
      if (lo != nullptr) lo[w * D + d] = Element<E>::from_float(l);
    }
    norm = warp_sum(norm);
    if (lane == 0) norms[w] = norm;
  }
}

// The packed operands of one head batch, repacked whenever the fp32 values change.
template <class E, int D>
class PackedCentroids {
 public:
  // terms: 1 (hi only) or 2 (hi + lo).
  PackedCentroids(std::int64_t heads_total, int clusters, int terms, cudaStream_t stream)
      : heads_total_(heads_total),
        clusters_(clusters),
        padded_(padded_clusters(clusters)),
        terms_(terms),
        stream_(stream),
        hi_(std::size_t(heads_total * padded_ * D), stream),
        lo_(terms > 1 ? std::size_t(heads_total * padded_ * D) : 0, stream),
        norms_(std::size_t(heads_total * padded_), stream) {}

  void pack(const float* centroids) {
    pack_centroids_kernel<E, D><<<grid_for(heads_total_ * padded_ * 32, 256), 256, 0, stream_>>>(
        centroids, heads_total_, clusters_, padded_, hi_.get(), lo_.get(), norms_.get());
    check_launch("pack_centroids_kernel");
  }

  const E* hi() const { return hi_.get(); }
  const E* lo() const { return lo_.get(); }  // null with one term
  const float* norms() const { return norms_.get(); }
  int clusters() const { return clusters_; }
  int padded() const { return padded_; }
  int terms() const { return terms_; }

 private:
  std::int64_t heads_total_;
  int clusters_, padded_, terms_;
  cudaStream_t stream_;
  DeviceBuffer<E> hi_, lo_;
  DeviceBuffer<float> norms_;
};

}  // namespace svgear::cuda::detail
