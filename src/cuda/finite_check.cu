#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "cuda/device_common.cuh"
#include "cuda/finite_check.hpp"
#include "cuda/non_finite_bits.cuh"

namespace svgear::cuda {

namespace {

// Calls f with each of the 8 16-bit elements of a 16-byte chunk (their bits, in the low half).
template <class F>
__device__ __forceinline__ void for_each_element(uint4 chunk, F f) {
  const unsigned words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int half = 0; half < 2; ++half) f((words[w] >> (16 * half)) & 0xffffu);
  }
}

// The largest magnitude among the chunk's non-NaN elements, as 15-bit magnitude bits (16-bit
// floats order as their magnitude bits; NaN, above the infinity pattern, is skipped as fmaxf
// skips it).
template <int kExponentShift, unsigned kExponentMask>
__device__ __forceinline__ unsigned largest_magnitude_in(uint4 chunk) {
  constexpr unsigned kInfinity = kExponentMask << kExponentShift;
  unsigned largest = 0;
  for_each_element(chunk, [&](unsigned bits) {
    const unsigned magnitude = bits & 0x7fffu;
    if (magnitude <= kInfinity) largest = max(largest, magnitude);
  });
  return largest;
}

// Magnitude bits of a bf16 (exponent shift 7) or f16 value as the bits of the same float.
template <int kExponentShift>
__device__ __forceinline__ unsigned float_bits_of(unsigned magnitude) {
  if constexpr (kExponentShift == 7) {
    return magnitude << 16;
  } else {
    return __float_as_uint(__half2float(__ushort_as_half(static_cast<unsigned short>(magnitude))));
  }
}

struct CheckedTensor {
  const unsigned char* data;
  std::int64_t stride_b, stride_h, stride_s;  // elements
  int heads, tokens;
};

constexpr int kThreads = 256;
constexpr int kChunksPerThread = 4;  // 16-byte loads in flight per thread and pass

// blockIdx.z names the tensor, blockIdx.y the (batch, head); the x blocks stride over that head's
// 16-byte chunks (row s, chunk c of the row). Index math in 32 bits: a head's chunks are below
// 2^30 (the caller checks), so the old per-chunk 64-bit divisions are gone.
template <int kExponentShift, unsigned kExponentMask>
__global__ void __launch_bounds__(kThreads)
    count_non_finite_kernel(CheckedTensor t0, CheckedTensor t1, CheckedTensor t2, int chunks_per_row,
                            unsigned long long* count, unsigned* v_abs_max) {
  // gridDim.z tensors: t0 .. t2 (one tensor: t0 alone).
  const CheckedTensor& t = blockIdx.z == 0 ? t0 : blockIdx.z == 1 ? t1 : t2;
  const int bh = int(blockIdx.y);
  const std::int64_t head_offset = std::int64_t(bh / t.heads) * t.stride_b + std::int64_t(bh % t.heads) * t.stride_h;
  const unsigned char* head = t.data + 2 * head_offset;
  const int total = t.tokens * chunks_per_row;
  const int step = int(gridDim.x) * kThreads;
  const bool want_max = blockIdx.z == gridDim.z - 1 && v_abs_max != nullptr;  // the last tensor; block-uniform
  unsigned local = 0, largest = 0;
  for (int base = int(blockIdx.x) * kThreads * kChunksPerThread + int(threadIdx.x); base < total;
       base += step * kChunksPerThread) {
    uint4 chunk[kChunksPerThread];
#pragma unroll
    for (int u = 0; u < kChunksPerThread; ++u) {
      const int i = base + u * kThreads;
      chunk[u] = make_uint4(0, 0, 0, 0);
      if (i < total) {
        const int s = i / chunks_per_row, c = i - s * chunks_per_row;
        chunk[u] = *reinterpret_cast<const uint4*>(head + 2 * (std::int64_t(s) * t.stride_s + 8 * c));
      }
    }
#pragma unroll
    for (int u = 0; u < kChunksPerThread; ++u) {
      local += detail::count_non_finite_in(chunk[u], kExponentMask << kExponentShift);
      if (want_max) largest = max(largest, largest_magnitude_in<kExponentShift, kExponentMask>(chunk[u]));
    }
  }
  if (want_max) {
    largest = detail::warp_max(largest);
    if (threadIdx.x % 32 == 0 && largest != 0) atomicMax(v_abs_max + bh, float_bits_of<kExponentShift>(largest));
  }
  local = detail::warp_sum(local);
  if (threadIdx.x % 32 == 0 && local != 0) atomicAdd(count, static_cast<unsigned long long>(local));
}

CheckedTensor checked(const DeviceHeads& tensor) {
  const DeviceTensor& t = tensor.tensor;
  return {static_cast<const unsigned char*>(t.data), t.stride_b, t.stride_h, t.stride_s, tensor.heads,
          int(tensor.tokens)};
}

// One launch over `n` (1 or 3) tensors of the same dtype, head_dim and heads; abs_max gets the
// last one's per-head max |x|.
void launch_count(const DeviceHeads* const* tensors, int n, std::int64_t* count, unsigned* abs_max, void* stream) {
  const DeviceHeads& first = *tensors[0];
  const int chunks_per_row = first.head_dim / 8;
  std::int64_t most_chunks = 0;
  for (int i = 0; i < n; ++i) {
    const DeviceHeads& t = *tensors[i];
    if (t.dtype != first.dtype || t.head_dim != first.head_dim || t.count() != first.count()) {
      throw Error("count_non_finite: q, k and v must share dtype, head_dim, batch and heads");
    }
    if (!detail::rows_aligned_16(t)) {
      throw Error("count_non_finite: rows must be 16-byte aligned (D a multiple of 8, aligned strides and base)");
    }
    most_chunks = std::max(most_chunks, t.tokens * chunks_per_row);
  }
  // 2^30 chunks (16 GiB per head) keeps the kernel's int32 positions, stride included, below 2^31.
  if (most_chunks >= (std::int64_t(1) << 30)) {
    throw Error("count_non_finite: " + std::to_string(most_chunks) + " 16-byte chunks per head exceed the int32 index");
  }
  if (first.count() > 65535) throw Error("count_non_finite: more than 65535 (batch, head) pairs in one launch");
  // About 16 CTAs of 256 threads per SM in all, at least one per head and tensor.
  const std::int64_t per_block = std::int64_t(kThreads) * kChunksPerThread;
  const std::int64_t wanted =
      std::max<std::int64_t>(1, std::int64_t(detail::device_sm_count()) * 16 / (n * first.count()));
  const unsigned blocks_x = unsigned(std::clamp<std::int64_t>((most_chunks + per_block - 1) / per_block, 1, wanted));
  const dim3 grid(blocks_x, unsigned(first.count()), unsigned(n));
  auto* counter = reinterpret_cast<unsigned long long*>(count);
  const auto s = static_cast<cudaStream_t>(stream);
  const CheckedTensor t0 = checked(*tensors[0]), t1 = checked(*tensors[n > 1 ? 1 : 0]),
                      t2 = checked(*tensors[n > 2 ? 2 : 0]);
  if (first.dtype == DType::bf16) {
    count_non_finite_kernel<7, 0xffu><<<grid, kThreads, 0, s>>>(t0, t1, t2, chunks_per_row, counter, abs_max);
  } else {
    count_non_finite_kernel<10, 0x1fu><<<grid, kThreads, 0, s>>>(t0, t1, t2, chunks_per_row, counter, abs_max);
  }
  check_launch("count_non_finite_kernel");
}

}  // namespace

void count_non_finite(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v, std::int64_t* count,
                      unsigned* v_abs_max, void* stream) {
  const DeviceHeads* tensors[3] = {&q, &k, &v};
  launch_count(tensors, 3, count, v_abs_max, stream);
}

void count_non_finite(const DeviceHeads& x, std::int64_t* count, unsigned* abs_max, void* stream) {
  const DeviceHeads* tensors[1] = {&x};
  launch_count(tensors, 1, count, abs_max, stream);
}

}  // namespace svgear::cuda
