#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/cuda_check.hpp"
#include "cuda/finite_check.hpp"

namespace svgear::cuda {

namespace {

template <typename T>
__device__ bool finite_value(T x) {
  return isfinite(float(x));
}

// One thread per element of a row-major walk over [BH][S][D]; strides reach the real layout.
template <typename T>
__global__ void count_non_finite_kernel(const T* data, int heads, std::int64_t tokens, int dim, std::int64_t stride_b,
                                        std::int64_t stride_h, std::int64_t stride_s, std::int64_t total,
                                        unsigned long long* count) {
  unsigned local = 0;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t d = i % dim, s = (i / dim) % tokens, bh = i / (dim * tokens);
    const std::int64_t b = bh / heads, h = bh % heads;
    local += finite_value(data[b * stride_b + h * stride_h + s * stride_s + d]) ? 0u : 1u;
  }
  if (local != 0) atomicAdd(count, static_cast<unsigned long long>(local));
}

}  // namespace

void count_non_finite(const DeviceHeads& tensor, std::int64_t* count, void* stream) {
  const std::int64_t total = tensor.count() * tensor.tokens * tensor.head_dim;
  const int threads = 256;
  const int blocks = int(std::min<std::int64_t>((total + threads - 1) / threads, 132 * 16));
  auto* counter = reinterpret_cast<unsigned long long*>(count);
  const auto s = static_cast<cudaStream_t>(stream);
  const DeviceTensor& t = tensor.tensor;
  if (tensor.dtype == DType::bf16) {
    count_non_finite_kernel<<<blocks, threads, 0, s>>>(static_cast<const __nv_bfloat16*>(t.data), tensor.heads,
                                                       tensor.tokens, tensor.head_dim, t.stride_b, t.stride_h,
                                                       t.stride_s, total, counter);
  } else {
    count_non_finite_kernel<<<blocks, threads, 0, s>>>(static_cast<const __half*>(t.data), tensor.heads, tensor.tokens,
                                                       tensor.head_dim, t.stride_b, t.stride_h, t.stride_s, total,
                                                       counter);
  }
  check_launch("count_non_finite_kernel");
}

}  // namespace svgear::cuda
