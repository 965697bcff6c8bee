#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/cuda_check.hpp"
#include "cuda/finite_check.hpp"

namespace svgear::cuda {

namespace {

// 16-bit floats are non-finite exactly when their exponent bits are all ones: 5 bits at 10 for
// f16, 8 bits at 7 for bf16. Checking the bits lets one thread test 8 elements from a 16-byte load.
template <int kExponentShift, unsigned kExponentMask>
__device__ unsigned count_in(uint4 chunk) {
  unsigned count = 0;
  const unsigned words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const unsigned bits = (words[w] >> (16 * half)) & 0xffffu;
      count += ((bits >> kExponentShift) & kExponentMask) == kExponentMask ? 1u : 0u;
    }
  }
  return count;
}

// One thread per 8 elements (16 bytes) of a row; rows are 16-byte aligned (the pipeline checks).
template <int kExponentShift, unsigned kExponentMask>
__global__ void count_non_finite_kernel(const unsigned char* data, int heads, std::int64_t tokens, int chunks_per_row,
                                        std::int64_t stride_b, std::int64_t stride_h, std::int64_t stride_s,
                                        std::int64_t total_chunks, unsigned long long* count) {
  unsigned local = 0;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total_chunks;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / chunks_per_row, chunk = i % chunks_per_row;
    const std::int64_t s = row % tokens, bh = row / tokens, b = bh / heads, h = bh % heads;
    const std::int64_t element = b * stride_b + h * stride_h + s * stride_s + chunk * 8;
    local += count_in<kExponentShift, kExponentMask>(*reinterpret_cast<const uint4*>(data + 2 * element));
  }
  if (local != 0) atomicAdd(count, static_cast<unsigned long long>(local));
}

}  // namespace

void count_non_finite(const DeviceHeads& tensor, std::int64_t* count, void* stream) {
  const int chunks_per_row = tensor.head_dim / 8;
  const std::int64_t total = tensor.count() * tensor.tokens * chunks_per_row;
  const int threads = 256;
  const int blocks = int(std::min<std::int64_t>((total + threads - 1) / threads, 132 * 8));
  auto* counter = reinterpret_cast<unsigned long long*>(count);
  const auto s = static_cast<cudaStream_t>(stream);
  const DeviceTensor& t = tensor.tensor;
  const auto* data = static_cast<const unsigned char*>(t.data);
  if (tensor.dtype == DType::bf16) {
    count_non_finite_kernel<7, 0xffu><<<blocks, threads, 0, s>>>(data, tensor.heads, tensor.tokens, chunks_per_row,
                                                                 t.stride_b, t.stride_h, t.stride_s, total, counter);
  } else {
    count_non_finite_kernel<10, 0x1fu><<<blocks, threads, 0, s>>>(data, tensor.heads, tensor.tokens, chunks_per_row,
                                                                  t.stride_b, t.stride_h, t.stride_s, total, counter);
  }
  check_launch("count_non_finite_kernel");
}

}  // namespace svgear::cuda
