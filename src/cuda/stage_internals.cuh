// Pieces one stage's .cu lends another: k-means reuses the layout sort and the cluster-mean
// reduction for its update step.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/device_common.cuh"

namespace svgear::cuda::detail {

// Stable sort of labels into (order, offsets) for every head, with its scratch allocated once
// so k-means can rebuild the layout every iteration.
class ClusterLayoutBuilder {
 public:
  ClusterLayoutBuilder(std::int64_t heads_total, std::int64_t tokens, int clusters, cudaStream_t stream);
  void build(const std::int32_t* labels, std::int32_t* order, std::int32_t* offsets);

 private:
  std::int64_t heads_total_, tokens_;
  int clusters_;
  int key_bits_;
  cudaStream_t stream_;
  std::size_t sort_bytes_ = 0;
  DeviceBuffer<std::uint32_t> keys_in_, keys_out_;
  DeviceBuffer<std::int32_t> tokens_in_;
  DeviceBuffer<unsigned char> sort_temp_;
};

// How segment_means treats a cluster.
enum class EmptyCluster {
  zero,  // cluster_means: an empty cluster's mean is zero
  keep,  // k-means update: an empty cluster keeps its centroid; also the objective against it
};

// means[bh][c] = mean of rows order[bh][offsets[c] .. offsets[c + 1]) in float64; counts
// optional; objective_parts[bh][c] (keep mode, optional) = sum of squared distances of the
// cluster's rows to the centroid the means array held on entry.
void segment_means(const DeviceHeads& rows, const std::int32_t* order, const std::int32_t* offsets, int clusters,
                   EmptyCluster empty, float* means, std::int32_t* counts, double* objective_parts,
                   cudaStream_t stream);

// k-means' assignment on wgmma (kmeans_assign_sm90.cu): labels from the packed centroids'
// kTerms 16-bit terms (PackedCentroids), as kmeans.cu's assign_kernel computes them. Only where
// use_sm90_assign().
template <class E, int D, int kTerms>
void launch_assign_sm90(const DeviceHeads& points, const E* centroid_hi, const E* centroid_lo,
                        const float* centroid_norms, int clusters, int padded, std::int32_t* labels,
                        cudaStream_t stream);

// SVGEAR_KMEANS_KERNEL: "sm80" forces the mma.sync assignment, "sm90" the wgmma one (an error
// where it cannot run), unset or "auto" takes wgmma for the two-term assignment wherever the
// sm_90a kernels run (the faster kernel for each term count). Read per call, so a test can run
// both.
bool use_sm90_assign(int terms);

}  // namespace svgear::cuda::detail
