// Stream-ordered device memory owned by the pipeline for one call (cudaMallocAsync: after the
// first call the pool serves allocations without a device synchronization).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "cuda/cuda_check.hpp"

namespace svgear::cuda {

// The default pool of cudaMallocAsync hands its free memory back to the driver at every
// synchronization (release threshold 0), so each pipeline call after a synchronizing one would
// map its scratch afresh: host time (milliseconds for the probe's hundreds of MB) during which
// the GPU runs dry. Raising the threshold once per device keeps the memory for the next call.
inline void keep_pool_memory() {
  static std::atomic<std::uint64_t> kept{0};  // one bit per device id < 64
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 0 || device >= 64) return;
  const std::uint64_t bit = std::uint64_t(1) << device;
  if ((kept.load(std::memory_order_relaxed) & bit) != 0) return;
  cudaMemPool_t pool = nullptr;
  check_cuda(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
  std::uint64_t threshold = UINT64_MAX;
  check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold),
             "cudaMemPoolSetAttribute (release threshold)");
  kept.fetch_or(bit, std::memory_order_relaxed);
}

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t count, cudaStream_t stream) : count_(count), stream_(stream) {
    if (count_ > 0) {
      keep_pool_memory();
      check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&data_), count_ * sizeof(T), stream_), "cudaMallocAsync");
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
    std::swap(stream_, other.stream_);
    return *this;
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFreeAsync(data_, stream_);  // no throwing from a destructor
  }

  T* get() const { return data_; }
  std::size_t size() const { return count_; }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace svgear::cuda
