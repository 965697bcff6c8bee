// Per-cluster means of rows read through a cluster layout (cpu::cluster_means), and the same
// reduction as k-means' update step (cpu::update_centroids). One CTA per (cluster, head): the
// sums are float64 in a fixed order, so the result is deterministic and, for 16-bit inputs,
// equal to the CPU's float64 sums in practice. value_summary also writes the EAR probe's fp16
// copy of v in key-cluster order from the same loads.
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "cuda/device_common.cuh"
#include "cuda/scaled_values.cuh"
#include "cuda/stage_internals.cuh"

namespace svgear::cuda {

namespace detail {

namespace {

// Warps per CTA: 8 for clusters of ~100 rows and more (Q's at S / Cq ≈ 128); 4 where the clusters
// average at most 64 rows (K's and V's at S / Ck ≈ 32), so that twice as many CTAs share an SM and
// one CTA's fixed costs (the offsets' and order's loads, the barrier, the reduction) overlap
// another's row loads: with 8 warps K's means took 1.7 times Q's for the same bytes.
constexpr int kWarpsLargeClusters = 8;
constexpr int kWarpsSmallClusters = 4;
constexpr int kSmallClusterRows = 64;

// kPerLane 16-bit values as one register load or store (8 bytes at D = 128, 4 at D = 64).
template <int kPerLane>
struct Packed16;
template <>
struct Packed16<4> {
  using type = uint2;
};
template <>
struct Packed16<2> {
  using type = unsigned;
};

// kWide (rows 16-byte aligned): lane owns the kPerLane adjacent elements lane * kPerLane + e, read
// with one load per row (a warp reads a whole row in one instruction); otherwise elements
// lane + 32 e, one 16-bit load each. Either way each element's rows are summed in the same order,
// so the means do not depend on the path.
template <class E, int D, EmptyCluster kEmpty, bool kWide, int kMeanWarps>
__global__ void __launch_bounds__(kMeanWarps * 32)
    segment_means_kernel(DeviceTensor tensor, int heads, std::int64_t tokens, const std::int32_t* order,
                         const std::int32_t* offsets, int clusters, float* means, std::int32_t* counts,
                         double* objective_parts, const unsigned* max_bits, __half* scaled) {
  constexpr int kPerLane = D / 32;
  using Packed = typename Packed16<kPerLane>::type;
  __shared__ double partial[kMeanWarps][D];
  __shared__ double partial_objective[kMeanWarps];
  const int c = blockIdx.x;
  const std::int64_t bh = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto element = [&](int e) { return kWide ? lane * kPerLane + e : lane + 32 * e; };
  const std::int32_t* head_offsets = offsets + bh * (clusters + 1);
  const std::int32_t begin = head_offsets[c], end = head_offsets[c + 1];
  const std::int32_t size = end > begin ? end - begin : 0;
  const std::int64_t cluster = bh * clusters + c;
  float* mean = means + cluster * D;
  if (threadIdx.x == 0 && counts != nullptr) counts[cluster] = size;
  if (size == 0) {
    if constexpr (kEmpty == EmptyCluster::zero) {
      for (int d = threadIdx.x; d < D; d += blockDim.x) mean[d] = 0.0f;
    }
    if (threadIdx.x == 0 && objective_parts != nullptr) objective_parts[cluster] = 0.0;
    return;
  }

  float previous[kPerLane];
  if constexpr (kEmpty == EmptyCluster::keep) {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) previous[e] = mean[element(e)];
  }
  const HeadRows<E> rows = head_rows<E>(tensor, heads, bh);
  const std::int32_t* head_order = order + bh * tokens;
  // The scaled copy (value_summary), row p of the head at scaled[bh][p].
  const float scale = scaled != nullptr ? ldexpf(1.0f, value_exponent(max_bits[bh])) : 0.0f;
  __half* scaled_rows = scaled != nullptr ? scaled + bh * tokens * D : nullptr;
  double sum[kPerLane] = {};
  double objective = 0.0;
#pragma unroll 4  // several rows' loads in flight per warp
  for (std::int32_t p = begin + warp; p < end; p += kMeanWarps) {
    const E* row = rows.row(head_order[p]);
    E values[kPerLane];
    if constexpr (kWide) {
      const Packed bits = *reinterpret_cast<const Packed*>(row + lane * kPerLane);
      memcpy(values, &bits, sizeof bits);
    } else {
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) values[e] = row[lane + 32 * e];
    }
    __half copy[kPerLane];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const float x = Element<E>::to_float(values[e]);
      sum[e] += double(x);
      copy[e] = scaled_value(x, scale);
      if constexpr (kEmpty == EmptyCluster::keep) {
        const double diff = double(x) - double(previous[e]);
        objective += diff * diff;
      }
    }
    if (scaled_rows != nullptr) {  // its rows are whole allocations' 256- or 128-byte rows: aligned
      __half* out = scaled_rows + std::int64_t(p) * D;
      if constexpr (kWide) {
        Packed bits;
        memcpy(&bits, copy, sizeof bits);
        *reinterpret_cast<Packed*>(out + lane * kPerLane) = bits;
      } else {
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) out[lane + 32 * e] = copy[e];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) partial[warp][element(e)] = sum[e];
  objective = warp_sum(objective);
  if (lane == 0) partial_objective[warp] = objective;
  __syncthreads();  // every warp has read `previous` before anyone overwrites the centroid

  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kMeanWarps; ++w) total += partial[w][d];
    // The CPU's own roundings: update_centroids multiplies by 1/n, cluster_means divides.
    mean[d] = kEmpty == EmptyCluster::keep ? float(total * (1.0 / double(size))) : float(total / double(size));
  }
  if (threadIdx.x == 0 && objective_parts != nullptr) {
    double total = 0.0;
    for (int w = 0; w < kMeanWarps; ++w) total += partial_objective[w];
    objective_parts[cluster] = total;
  }
}

}  // namespace

// Launches segment_means_kernel on the 16-byte-aligned (wide) or the general path, with 8 or 4
// warps per CTA by the clusters' mean size.
template <class E, int D, EmptyCluster kEmpty>
void launch_segment_means(const DeviceHeads& rows, const std::int32_t* order, const std::int32_t* offsets,
                          int clusters, float* means, std::int32_t* counts, double* objective_parts,
                          const unsigned* max_bits, __half* scaled, cudaStream_t stream) {
  const dim3 grid(unsigned(clusters), unsigned(rows.count()));
  // wide and warps are compile-time constants (std::integral_constant), so the block size is
  // taken from the same value as the kernel's __launch_bounds__.
  auto launch = [&](auto wide, auto warps) {
    segment_means_kernel<E, D, kEmpty, decltype(wide)::value, decltype(warps)::value>
        <<<grid, warps * 32, 0, stream>>>(rows.tensor, rows.heads, rows.tokens, order, offsets, clusters, means,
                                          counts, objective_parts, max_bits, scaled);
  };
  auto launch_sized = [&](auto wide) {
    if (rows.tokens <= std::int64_t(kSmallClusterRows) * clusters) {
      launch(wide, std::integral_constant<int, kWarpsSmallClusters>{});
    } else {
      launch(wide, std::integral_constant<int, kWarpsLargeClusters>{});
    }
  };
  if (rows_aligned_16(rows)) {
    launch_sized(std::true_type{});
  } else {
    launch_sized(std::false_type{});
  }
  check_launch("segment_means_kernel");
}

void segment_means(const DeviceHeads& rows, const std::int32_t* order, const std::int32_t* offsets, int clusters,
                   EmptyCluster empty, float* means, std::int32_t* counts, double* objective_parts,
                   cudaStream_t stream) {
  require_heads_per_launch(rows.count(), "cluster means");
  dispatch_element_and_dim(rows.dtype, rows.head_dim, [&](auto element, auto dim) {
    using E = decltype(element);
    constexpr int D = decltype(dim)::value;
    if (empty == EmptyCluster::zero) {
      launch_segment_means<E, D, EmptyCluster::zero>(rows, order, offsets, clusters, means, counts, objective_parts,
                                                     nullptr, nullptr, stream);
    } else {
      launch_segment_means<E, D, EmptyCluster::keep>(rows, order, offsets, clusters, means, counts, objective_parts,
                                                     nullptr, nullptr, stream);
    }
  });
}

}  // namespace detail

void cluster_means(const DeviceHeads& rows, const DeviceLayout& layout, float* means, std::int32_t* counts,
                   void* stream) {
  detail::validate_heads(rows, "rows");
  if (layout.order == nullptr || layout.offsets == nullptr || means == nullptr) {
    throw Error("cluster_means: layout.order, layout.offsets and means must be device pointers, got a null one");
  }
  if (layout.clusters < 1)
    throw Error("cluster_means: the layout has " + std::to_string(layout.clusters) + " clusters");
  detail::segment_means(rows, layout.order, layout.offsets, layout.clusters, detail::EmptyCluster::zero, means, counts,
                        nullptr, detail::as_stream(stream));
}

void value_summary(const DeviceHeads& v, const DeviceLayout& keys, const unsigned* value_abs_max, float* value_means,
                   std::uint16_t* scaled_values, void* stream) {
  detail::validate_heads(v, "v");
  if (keys.order == nullptr || keys.offsets == nullptr || value_abs_max == nullptr || value_means == nullptr ||
      scaled_values == nullptr) {
    throw Error("value_summary: the key layout, value_abs_max, value_means and scaled_values must be device pointers, "
                "got a null one");
  }
  if (keys.clusters < 1) throw Error("value_summary: the layout has " + std::to_string(keys.clusters) + " clusters");
  detail::require_heads_per_launch(v.count(), "value_summary");
  detail::dispatch_element_and_dim(v.dtype, v.head_dim, [&](auto element, auto dim) {
    detail::launch_segment_means<decltype(element), decltype(dim)::value, detail::EmptyCluster::zero>(
        v, keys.order, keys.offsets, keys.clusters, value_means, nullptr, nullptr, value_abs_max,
        reinterpret_cast<__half*>(scaled_values), detail::as_stream(stream));
  });
}

}  // namespace svgear::cuda
