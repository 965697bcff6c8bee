// What the GPU learns about a call only while it runs: how many inputs were NaN or Inf, and
// whether the attention kernel flagged an internal error. A synchronous call reads both at its
// end; an asynchronous one (MethodConfig::synchronize = false) copies them into pinned memory
// its LayerState owns, and the state's next call or svgear::synchronize reads them there.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace svgear::cuda {

// The call's counters as they lie at the front of its device buffer: [0] the non-finite input
// count, [1] the attention kernel's error flags (an int32 in the low bytes).
inline constexpr int kCallCounters = 2;

// Throws svgear::Error for non-finite inputs (ErrorKind::value) or kernel flags. `deferred`:
// the counters are an earlier asynchronous call's, and the message says so.
void raise_call_errors(const std::int64_t* counters, bool deferred);

// One state's landing place for the counters of its asynchronous calls. Not thread-safe (nor
// is a LayerState).
class DeferredCheck {
 public:
  DeferredCheck();  // on the current device
  ~DeferredCheck();  // waits for a copy still in flight before freeing its target
  DeferredCheck(const DeferredCheck&) = delete;
  DeferredCheck& operator=(const DeferredCheck&) = delete;

  int device() const { return device_; }
  bool pending() const { return pending_; }

  // Queues the copy of `counters` (device, kCallCounters values) behind the work already on
  // `stream`. The previous copy must have been read (wait_and_raise): the pinned memory is
  // reused.
  void enqueue(const std::int64_t* counters, cudaStream_t stream);

  // Waits for the queued copy (normally long done) and raises what it holds, once; returns at
  // once when nothing is pending.
  void wait_and_raise();

 private:
  std::int64_t* host_ = nullptr;  // pinned: kCallCounters values
  cudaEvent_t copied_ = nullptr;
  int device_ = 0;
  bool pending_ = false;
};

}  // namespace svgear::cuda
