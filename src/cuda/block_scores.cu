// Centroid criticality (cpu::centroid_criticality): P_ij = softmax_j(mu^Q_i . mu^K_j / sqrt(D)
// + ln n_j). Cq x Ck x D is small next to attention, so fp32 CUDA-core dot products from
// shared memory: a CTA owns 16 query centroids and streams the key means 64 at a time; each
// thread keeps the same 4 columns of one row per tile, so it re-reads only its own logits in
// the softmax passes (no cross-thread visibility needed beyond the 16-lane row reductions).
#include <cmath>
#include <string>

#include "cuda/device_common.cuh"

namespace svgear::cuda {

namespace {

using namespace detail;

constexpr int kRowsPerCta = 16;
constexpr int kKeysPerTile = 64;
constexpr int kThreads = 256;  // 16 threads per row, 4 columns each per tile

__device__ __forceinline__ float row_max(float x) {  // over the 16 lanes sharing a row
  for (int offset = 8; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float row_sum(float x) {
  for (int offset = 8; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    criticality_kernel(const float* q_centroids, const float* key_means, const std::int32_t* key_counts,
                       int query_clusters, int key_clusters, float* criticality) {
  __shared__ float q_tile[kRowsPerCta][D + 1];   // +1: the two rows of a warp hit distinct banks
  __shared__ float k_tile[kKeysPerTile][D + 1];  // +1: the 16 column threads hit distinct banks
  const std::int64_t bh = blockIdx.y;
  const int i0 = blockIdx.x * kRowsPerCta;
  const int r = threadIdx.x / 16, column = threadIdx.x % 16;
  const int i = i0 + r;
  const bool row_valid = i < query_clusters;
  const float scale = 1.0f / sqrtf(float(D));
  const std::int32_t* counts = key_counts + bh * key_clusters;
  float* row = criticality + (bh * query_clusters + (row_valid ? i : 0)) * std::int64_t(key_clusters);

  for (int idx = threadIdx.x; idx < kRowsPerCta * D; idx += kThreads) {
    const int rr = idx / D, d = idx % D;
    q_tile[rr][d] = i0 + rr < query_clusters ? q_centroids[(bh * query_clusters + i0 + rr) * D + d] : 0.0f;
  }
  // Pass 1: logits s_ij + ln n_j into the output, and the row max.
  float maximum = -INFINITY;
  for (int j0 = 0; j0 < key_clusters; j0 += kKeysPerTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kKeysPerTile * D; idx += kThreads) {
      const int jj = idx / D, d = idx % D;
      k_tile[jj][d] = j0 + jj < key_clusters ? key_means[(bh * key_clusters + j0 + jj) * D + d] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kKeysPerTile / 16; ++k) {
      const int jj = column + 16 * k, j = j0 + jj;
      if (!row_valid || j >= key_clusters) continue;
      const std::int32_t n = counts[j];
      if (n <= 0) continue;
      float dot = 0.0f;
#pragma unroll 16
      for (int d = 0; d < D; ++d) dot += q_tile[r][d] * k_tile[jj][d];
      const float logit = dot * scale + logf(float(n));
      row[j] = logit;
      maximum = fmaxf(maximum, logit);
    }
  }
  maximum = row_max(maximum);
  // Pass 2: exp and the row total; pass 3: normalise. Each thread revisits its own columns.
  float total = 0.0f;
  for (int j = column; j < key_clusters && row_valid; j += 16) {
    if (counts[j] <= 0) continue;
    const float e = expf(row[j] - maximum);
    row[j] = e;
    total += e;
  }
  total = row_sum(total);
  const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
  for (int j = column; j < key_clusters && row_valid; j += 16) row[j] = counts[j] > 0 ? row[j] * inverse : 0.0f;
}

}  // namespace

void centroid_criticality(const float* q_centroids, const float* key_means, const std::int32_t* key_counts,
                          std::int64_t heads_total, int query_clusters, int key_clusters, int head_dim,
                          float* criticality, void* stream) {
  if (q_centroids == nullptr || key_means == nullptr || key_counts == nullptr || criticality == nullptr) {
    throw Error("centroid_criticality: every array must be a device pointer, got a null one");
  }
  require_heads_per_launch(heads_total, "centroid_criticality");
  if (query_clusters < 1 || key_clusters < 1) {
    throw Error("centroid_criticality: need at least one cluster of each kind (got " + std::to_string(query_clusters) +
                " x " + std::to_string(key_clusters) + ")");
  }
  const dim3 grid(unsigned((query_clusters + kRowsPerCta - 1) / kRowsPerCta), unsigned(heads_total));
  const cudaStream_t s = as_stream(stream);
  if (head_dim == 64) {
    criticality_kernel<64>
        <<<grid, kThreads, 0, s>>>(q_centroids, key_means, key_counts, query_clusters, key_clusters, criticality);
  } else if (head_dim == 128) {
    criticality_kernel<128>
        <<<grid, kThreads, 0, s>>>(q_centroids, key_means, key_counts, query_clusters, key_clusters, criticality);
  } else {
    throw Error("centroid_criticality: head_dim " + std::to_string(head_dim) + " is not 64 or 128");
  }
  check_launch("criticality_kernel");
}

}  // namespace svgear::cuda
