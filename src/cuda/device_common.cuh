// What every stage's .cu shares: the 16-bit element types, head addressing, launch helpers
// and the dtype x head_dim dispatch (error checks: cuda/cuda_check.hpp; scratch memory:
// cuda/device_buffer.hpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/cuda_check.hpp"
#include "cuda/device_buffer.hpp"
#include "cuda/stages.hpp"
#include "svgear/error.hpp"

namespace svgear::cuda::detail {

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

template <class T>
inline void zero_async(T* ptr, std::size_t count, cudaStream_t stream, const char* what) {
  if (count > 0) check_cuda(cudaMemsetAsync(ptr, 0, count * sizeof(T), stream), what);
}

// The current device's SM count, for grids sized to fill it (an H100 SXM has 132, a PCIe 114).
inline int device_sm_count() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

inline unsigned grid_for(std::int64_t items, int threads) {
  const std::int64_t blocks = (items + threads - 1) / threads;
  // Grid-stride loops cover the rest: no stage needs more than this many blocks at once.
  return unsigned(blocks < 1 ? 1 : (blocks > (std::int64_t(1) << 20) ? (std::int64_t(1) << 20) : blocks));
}

// Runs a CUB device algorithm: call(nullptr, bytes) sizes its temporary storage, then
// call(storage, bytes) does the work; the storage is released in stream order.
template <class Call>
void run_cub(const char* what, cudaStream_t stream, Call call) {
  std::size_t bytes = 0;
  check_cuda(call(nullptr, bytes), what);
  DeviceBuffer<unsigned char> storage(bytes, stream);
  check_cuda(call(storage.get(), bytes), what);
}

// Kernels put the heads on gridDim.y.
inline void require_heads_per_launch(std::int64_t heads_total, const char* stage) {
  if (heads_total < 1 || heads_total > 65535) {
    throw Error(std::string(stage) + ": batch * heads = " + std::to_string(heads_total) +
                " is outside the 1..65535 heads one launch covers: split the batch");
  }
}

// f(i) for every i in [0, n), over a grid-stride loop.
template <class F>
__device__ __forceinline__ void for_each_index(std::int64_t n, F f) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    f(i);
  }
}

// --- 16-bit element types ---------------------------------------------------------------------

template <class E>
struct Element;

template <>
struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Element<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

// --- head addressing --------------------------------------------------------------------------

// The rows of one (b, h) of a DeviceTensor.
template <class E>
struct HeadRows {
  const E* base;
  std::int64_t stride_s;
  __device__ __forceinline__ const E* row(std::int64_t s) const { return base + s * stride_s; }
};

template <class E>
__device__ __forceinline__ HeadRows<E> head_rows(const DeviceTensor& t, int heads, std::int64_t bh) {
  const std::int64_t b = bh / heads, h = bh % heads;
  return {static_cast<const E*>(t.data) + b * t.stride_b + h * t.stride_h, t.stride_s};
}

// Whether every row start of the tensor is 16-byte aligned (then rows load as 16-byte chunks).
inline bool rows_aligned_16(const DeviceHeads& t) {
  const auto address = reinterpret_cast<std::uintptr_t>(t.tensor.data);
  const bool b_ok = t.batch == 1 || t.tensor.stride_b % 8 == 0;
  const bool h_ok = t.heads == 1 || t.tensor.stride_h % 8 == 0;
  const bool s_ok = t.tokens == 1 || t.tensor.stride_s % 8 == 0;
  return address % 16 == 0 && b_ok && h_ok && s_ok;
}

// Throws svgear::Error naming `what` unless the tensor is one the stages accept.
inline void validate_heads(const DeviceHeads& t, const char* what) {
  const std::string name = std::string("tensor '") + what + "'";
  if (t.dtype != DType::bf16 && t.dtype != DType::f16) {
    throw Error(name + " is " + dtype_name(t.dtype) + ": the CUDA stages take BF16 or F16");
  }
  if (t.head_dim != 64 && t.head_dim != 128) {
    throw Error(name + " has head_dim " + std::to_string(t.head_dim) + ": the CUDA stages take 64 or 128");
  }
  if (t.batch < 1 || t.heads < 1 || t.tokens < 1) {
    throw Error(name + " has batch " + std::to_string(t.batch) + ", heads " + std::to_string(t.heads) + ", tokens " +
                std::to_string(t.tokens) + ": each must be at least 1");
  }
  if (t.tensor.data == nullptr) throw Error(name + " has a null data pointer");
  if (t.tokens > INT32_MAX) throw Error(name + " has more than 2^31 - 1 tokens: int32 orders cannot index them");
}

// Calls f(E{}, std::integral_constant<int, D>{}) for the tensor's element type and head dim.
template <class F>
void dispatch_element_and_dim(DType dtype, int head_dim, F&& f) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (dtype == DType::bf16) {
    if (head_dim == 64) return f(__nv_bfloat16{}, D64{});
    if (head_dim == 128) return f(__nv_bfloat16{}, D128{});
  } else if (dtype == DType::f16) {
    if (head_dim == 64) return f(__half{}, D64{});
    if (head_dim == 128) return f(__half{}, D128{});
  }
  throw Error("unsupported dtype " + dtype_name(dtype) + " / head_dim " + std::to_string(head_dim) +
              " for the CUDA stages: use bf16 or f16 with head_dim 64 or 128");
}

// --- warp helpers -----------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ T quad_sum(T x) {  // over the 4 lanes of an mma row quad
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

template <class T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ unsigned warp_max(unsigned x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

}  // namespace svgear::cuda::detail
