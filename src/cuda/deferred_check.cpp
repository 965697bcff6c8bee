#include "cuda/deferred_check.hpp"

#include <cstring>
#include <string>

#include "cuda/cuda_check.hpp"
#include "svgear/error.hpp"

namespace svgear::cuda {

void raise_call_errors(const std::int64_t* counters, bool deferred) {
  const std::string whose = deferred ? "an earlier asynchronous call on this state (synchronize = false): " : "";
  if (counters[0] != 0) {
    throw Error(whose + "q, k or v holds " + std::to_string(counters[0]) +
                " non-finite values (NaN or Inf): svgear needs finite inputs; " +
                (deferred ? "that call's output is not valid" : "the output is not valid"));
  }
  std::int32_t flags = 0;
  std::memcpy(&flags, &counters[1], sizeof flags);
  if (flags != 0) throw Error(whose + "internal error: the attention kernel reported flags " + std::to_string(flags));
}

DeferredCheck::DeferredCheck() {
  check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
  check_cuda(cudaMallocHost(reinterpret_cast<void**>(&host_), kCallCounters * sizeof(std::int64_t)), "cudaMallocHost");
  const cudaError_t created = cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming);
  if (created != cudaSuccess) {
    cudaFreeHost(host_);
    check_cuda(created, "cudaEventCreateWithFlags");
  }
}

DeferredCheck::~DeferredCheck() {
  if (pending_) cudaEventSynchronize(copied_);  // no throwing from a destructor
  cudaEventDestroy(copied_);
  cudaFreeHost(host_);
}

void DeferredCheck::enqueue(const std::int64_t* counters, cudaStream_t stream) {
  if (pending_) throw Error("internal error: DeferredCheck::enqueue over an unread check", ErrorKind::runtime);
  check_cuda(cudaMemcpyAsync(host_, counters, kCallCounters * sizeof(std::int64_t), cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (deferred check)");
  const cudaError_t recorded = cudaEventRecord(copied_, stream);
  if (recorded != cudaSuccess) {
    cudaStreamSynchronize(stream);  // the copy must land before anyone frees its target
    check_cuda(recorded, "cudaEventRecord (deferred check)");
  }
  pending_ = true;
}

void DeferredCheck::wait_and_raise() {
  if (!pending_) return;
  pending_ = false;  // raised once, whatever follows
  check_cuda(cudaEventSynchronize(copied_), "an earlier asynchronous svgear call");
  raise_call_errors(host_, true);
}

}  // namespace svgear::cuda
