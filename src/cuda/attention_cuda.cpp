// The CUDA pipeline: validation at the boundary, then the stages of src/cuda/stages.hpp and the
// attention kernel on the caller's stream, timed with CUDA events, with one synchronization at
// the end for the report; or, asynchronously, none: the input check is deferred to the state.
#include "cuda/attention_cuda.hpp"

#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <string>

#include "core/validation.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/deferred_check.hpp"
#include "cuda/device_buffer.hpp"
#include "cuda/finite_check.hpp"
#include "cuda/sparse_attention.hpp"
#include "cuda/stages.hpp"
#include "svgear/error.hpp"

namespace svgear::cuda {

namespace {

// The centroids a LayerState keeps on the device between steps.
struct DeviceCentroids {
  float* q = nullptr;
  float* k = nullptr;
  ~DeviceCentroids() {
    cudaFree(q);
    cudaFree(k);
  }
};

void check_cuda_view(const TensorView& t, const char* name, DType dtype) {
  const std::string n = std::string("tensor '") + name + "'";
  if (t.dtype != DType::bf16 && t.dtype != DType::f16) {
    throw Error(n + " is " + dtype_name(t.dtype) + ": the CUDA path takes BF16 or F16 (convert, e.g. .to(torch.bfloat16))", ErrorKind::type);
  }
  if (t.dtype != dtype) throw Error(n + " is " + dtype_name(t.dtype) + " but q is " + dtype_name(dtype) + ": use one dtype", ErrorKind::type);
  if (t.shape[3] != 64 && t.shape[3] != 128) {
    throw Error(n + " has head dim " + std::to_string(t.shape[3]) + ": the CUDA path supports D = 64 and 128");
  }
  if (t.strides[3] != 1) throw Error(n + " has a non-contiguous last axis: make it contiguous (.contiguous())");
  const bool aligned = reinterpret_cast<std::uintptr_t>(t.data) % 16 == 0 && t.strides[0] % 8 == 0 &&
                       t.strides[1] % 8 == 0 && t.strides[2] % 8 == 0;
  if (!aligned) throw Error(n + " rows are not 16-byte aligned: pass a contiguous tensor");
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, t.data) != cudaSuccess ||
      (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)) {
    cudaGetLastError();  // clear the sticky-free error of a failed query
    throw Error(n + " is marked as a CUDA tensor but its pointer is not device memory");
  }
}

// The log-sum-exp output (dtype, shape and device already validated): device memory, aligned floats.
void check_cuda_lse(const TensorView& lse) {
  if (reinterpret_cast<std::uintptr_t>(lse.data) % alignof(float) != 0) {
    throw Error("tensor 'lse' is not 4-byte aligned: pass a float32 tensor");
  }
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, lse.data) != cudaSuccess ||
      (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)) {
    cudaGetLastError();  // clear the error of a failed query
    throw Error("tensor 'lse' is marked as a CUDA tensor but its pointer is not device memory");
  }
}

DeviceHeads heads_of(const TensorView& t) {
  DeviceHeads h;
  h.dtype = t.dtype;
  h.batch = int(t.shape[0]);
  h.heads = int(t.shape[1]);
  h.tokens = t.shape[2];
  h.head_dim = int(t.shape[3]);
  h.tensor = DeviceTensor{t.data, t.strides[0], t.strides[1], t.strides[2]};
  return h;
}

// Events around each stage; read once after the final synchronization. A disabled timer (an
// asynchronous call: nothing would read the events) records nothing.
class StageTimer {
 public:
  StageTimer(cudaStream_t stream, bool enabled) : stream_(stream) {
    if (!enabled) return;
    for (cudaEvent_t& e : events_) check_cuda(cudaEventCreate(&e), "cudaEventCreate");
  }
  ~StageTimer() {
    for (cudaEvent_t e : events_) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }
  StageTimer(const StageTimer&) = delete;
  StageTimer& operator=(const StageTimer&) = delete;
  void mark(int index) {
    const cudaEvent_t event = events_[std::size_t(index)];
    if (event != nullptr) check_cuda(cudaEventRecord(event, stream_), "cudaEventRecord");
  }
  double ms(int from, int to) const {
    float value = 0;
    check_cuda(cudaEventElapsedTime(&value, events_[std::size_t(from)], events_[std::size_t(to)]), "cudaEventElapsedTime");
    return value;
  }

 private:
  cudaStream_t stream_;
  std::array<cudaEvent_t, 7> events_{};
};

// A second stream that starts after everything enqueued on `parent` so far; join() makes the
// parent wait for everything enqueued on it. The stream and events are released once their
// work completes.
class ForkedStream {
 public:
  explicit ForkedStream(cudaStream_t parent) : parent_(parent) {
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check_cuda(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    check_cuda(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    check_cuda(cudaEventRecord(fork_, parent_), "cudaEventRecord (fork)");
    check_cuda(cudaStreamWaitEvent(stream_, fork_, 0), "cudaStreamWaitEvent (fork)");
  }
  ~ForkedStream() {
    cudaEventDestroy(fork_);
    cudaEventDestroy(join_);
    cudaStreamDestroy(stream_);
  }
  ForkedStream(const ForkedStream&) = delete;
  ForkedStream& operator=(const ForkedStream&) = delete;

  void* get() const { return stream_; }
  void join() const {
    check_cuda(cudaEventRecord(join_, stream_), "cudaEventRecord (join)");
    check_cuda(cudaStreamWaitEvent(parent_, join_, 0), "cudaStreamWaitEvent (join)");
  }

 private:
  cudaStream_t parent_, stream_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
};

template <typename T>
std::vector<T> to_host(const T* device, std::size_t count, cudaStream_t stream) {
  std::vector<T> host(count);
  if (count) check_cuda(cudaMemcpyAsync(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  return host;
}

// The call's centroids become the state's, for the next step's warm start.
void keep_centroids(LayerState& state, const std::array<std::int64_t, 5>& signature,
                    std::shared_ptr<DeviceCentroids> cache) {
  state.signature = signature;
  state.device_centroids = std::move(cache);
  state.q_centroids.clear();
  state.k_centroids.clear();
  ++state.steps;
}

// Centroids refined from inputs that turned out non-finite would poison every later warm start.
void forget_centroids(LayerState& state) {
  state.device_centroids.reset();
  state.signature = {};
}

// The state's landing place for the counters of an asynchronous call, on the current device.
DeferredCheck& deferred_check_of(LayerState& state) {
  auto check = std::static_pointer_cast<DeferredCheck>(state.deferred_check);
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (check == nullptr || check->device() != device) {
    check = std::make_shared<DeferredCheck>();
    state.deferred_check = check;
  }
  return *check;
}

// What an asynchronous call knows on the host (AttentionReport's sentinels for the rest).
AttentionReport partial_report(bool warm_started, std::int64_t total_blocks) {
  AttentionReport report;
  report.complete = false;
  report.warm_started = warm_started;
  report.total_blocks = total_blocks;
  report.exact_pairs = report.selected_blocks = -1;
  report.density = NAN;
  report.times = StageTimes{NAN, NAN, NAN, NAN, NAN, NAN, NAN};
  return report;
}

}  // namespace

void synchronize(LayerState& state) {
  const auto check = std::static_pointer_cast<DeferredCheck>(state.deferred_check);
  if (check == nullptr || !check->pending()) return;
  try {
    check->wait_and_raise();
  } catch (...) {
    forget_centroids(state);
    throw;
  }
}

AttentionReport attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                          const MethodConfig& config, LayerState* state, void* stream_handle, PlanExport* plan,
                          const TensorView* lse) {
  if (state != nullptr) cuda::synchronize(*state);  // an earlier asynchronous call's error comes first
  validate_attention_inputs(q, k, v, out, config, lse);
  if (config.policy == SelectionPolicyKind::error_aware) {
    require_cuda_value_sketch(config.probe_value_dims, int(q.head_dim()));
  }
  // A plan export reads the plan back, so it synchronizes whatever the config says.
  const bool synchronous = config.synchronize || plan != nullptr;
  if (!synchronous && state == nullptr) {
    throw Error("synchronize = false needs a LayerState: it keeps the check of the inputs for NaN/Inf until "
                "the state's next call or svgear_state_synchronize; pass a state or keep synchronize = true");
  }
  check_cuda_view(q, "q", q.dtype);
  check_cuda_view(k, "k", q.dtype);
  check_cuda_view(v, "v", q.dtype);
  check_cuda_view(out, "out", q.dtype);
  if (lse != nullptr) check_cuda_lse(*lse);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const DeviceHeads qh = heads_of(q), kh = heads_of(k), vh = heads_of(v);
  const std::int64_t bh = qh.count(), sq = q.tokens(), sk = k.tokens();
  const int d = int(q.head_dim());

  AttentionReport report;
  StageTimer timer(stream, synchronous);
  timer.mark(0);
  // The call's counters (deferred_check.hpp), then the exact pairs of each head.
  DeviceBuffer<std::int64_t> counters(kCallCounters + std::size_t(bh), stream);
  check_cuda(cudaMemsetAsync(counters.get(), 0, counters.size() * sizeof(std::int64_t), stream), "cudaMemsetAsync");
  std::int64_t* non_finite = counters.get();
  auto* error_flags = reinterpret_cast<std::int32_t*>(counters.get() + 1);
  std::int64_t* exact_pairs = counters.get() + kCallCounters;
  // The EAR probe's max |v| per head comes out of the same read of v.
  const bool probes = config.policy == SelectionPolicyKind::error_aware;
  DeviceBuffer<unsigned> v_abs_max(probes ? std::size_t(bh) : 0, stream);
  if (probes) {
    check_cuda(cudaMemsetAsync(v_abs_max.get(), 0, v_abs_max.size() * sizeof(unsigned), stream), "cudaMemsetAsync");
  }
  const bool dense = config.policy == SelectionPolicyKind::all_blocks && config.compensation == Compensation::drop;
  // Dense reads q, k and v here. A sparse call checks q and k in k-means' first assignment,
  // which loads them anyway, and v on Q's side stream below, beside K's longer k-means (nothing
  // reads v or its max before the two streams join), so check_ms is 0 there and the check's
  // time, where it shows at all, is in cluster_ms.
  if (dense) count_non_finite(qh, kh, vh, non_finite, nullptr, stream);
  timer.mark(1);

  SparseAttentionProblem problem;
  problem.dtype = q.dtype;
  problem.batch = qh.batch;
  problem.heads = qh.heads;
  problem.sq = sq;
  problem.sk = sk;
  problem.head_dim = d;
  problem.q = qh.tensor;
  problem.k = kh.tensor;
  problem.v = vh.tensor;
  problem.out = DeviceTensor{out.data, out.strides[0], out.strides[1], out.strides[2]};
  if (lse != nullptr) {
    problem.lse = DeviceRows{static_cast<float*>(lse->data), lse->strides[0], lse->strides[1], lse->strides[2]};
  }
  problem.error_flags = error_flags;

  const int cq = dense ? 1 : config.clusters_q, ck = dense ? 1 : config.clusters_k;
  const std::array<std::int64_t, 5> signature{q.batch(), q.heads(), d, cq, ck};  // of the state's centroids
  DeviceBuffer<float> value_means, scores;
  DeviceBuffer<std::int32_t> q_labels, k_labels, q_counts, k_counts, q_order, k_order, q_offsets, k_offsets;
  DeviceBuffer<std::int32_t> selected_offsets, selected_clusters, compensated_offsets, compensated_clusters, tiles;
  DeviceBuffer<std::uint8_t> exact;
  std::shared_ptr<DeviceCentroids> cache;
  if (dense) {
    timer.mark(2);
    timer.mark(3);
    timer.mark(4);
  } else {
    // Cluster, warm-started from the state's device centroids when they fit this call.
    report.warm_started = state != nullptr && state->device_centroids != nullptr && state->signature == signature;
    if (report.warm_started) {
      cache = std::static_pointer_cast<DeviceCentroids>(state->device_centroids);
    } else {
      cache = std::make_shared<DeviceCentroids>();
      check_cuda(cudaMalloc(&cache->q, sizeof(float) * std::size_t(bh * cq * d)), "cudaMalloc");
      check_cuda(cudaMalloc(&cache->k, sizeof(float) * std::size_t(bh * ck * d)), "cudaMalloc");
    }
    const int iterations = report.warm_started ? config.kmeans_warm_iterations : config.kmeans_iterations;
    q_labels = DeviceBuffer<std::int32_t>(std::size_t(bh * sq), stream);
    k_labels = DeviceBuffer<std::int32_t>(std::size_t(bh * sk), stream);
    q_counts = DeviceBuffer<std::int32_t>(std::size_t(bh * cq), stream);
    k_counts = DeviceBuffer<std::int32_t>(std::size_t(bh * ck), stream);
    q_order = DeviceBuffer<std::int32_t>(std::size_t(bh * sq), stream);
    k_order = DeviceBuffer<std::int32_t>(std::size_t(bh * sk), stream);
    q_offsets = DeviceBuffer<std::int32_t>(std::size_t(bh * (cq + 1)), stream);
    k_offsets = DeviceBuffer<std::int32_t>(std::size_t(bh * (ck + 1)), stream);
    // Q's and K's k-means are independent: Q's runs on a side stream, so its small kernels (the
    // sort, the means) fill the gaps of K's.
    {
      const ForkedStream side(stream);
      count_non_finite(vh, non_finite, probes ? v_abs_max.get() : nullptr, side.get());
      kmeans(qh,
             KmeansSettings{cq, iterations, report.warm_started ? cache->q : nullptr, non_finite,
                            config.query_tail_limit},
             KmeansOutputs{cache->q, q_labels.get(), q_counts.get(), q_order.get(), q_offsets.get(), nullptr, {}, nullptr},
             side.get());
      kmeans(kh, KmeansSettings{ck, iterations, report.warm_started ? cache->k : nullptr, non_finite},
             KmeansOutputs{cache->k, k_labels.get(), k_counts.get(), k_order.get(), k_offsets.get(), nullptr, {}, nullptr}, stream);
      side.join();
    }
    timer.mark(2);

    // Score: key/value means of the final key clusters, criticality, and the EAR probe. The key
    // means are K's final centroids: the last update averaged exactly these clusters (an empty
    // cluster keeps a stale centroid instead of zeros, but no stage reads an empty cluster's mean).
    const DeviceLayout q_layout{q_order.get(), q_offsets.get(), cq}, k_layout{k_order.get(), k_offsets.get(), ck};
    const float* key_means = cache->k;
    value_means = DeviceBuffer<float>(std::size_t(bh * ck * d), stream);
    scores = DeviceBuffer<float>(std::size_t(bh * cq * ck), stream);
    DeviceKeySummary summary{key_means, value_means.get(), k_counts.get(), v_abs_max.get()};
    // The EAR probe's fp16 copy of v in key order comes out of the value means' read of v, and its
    // mean rows are Q's final centroids (the means of exactly these query clusters).
    DeviceBuffer<std::uint16_t> scaled_values(probes ? std::size_t(bh * sk * d) : 0, stream);
    if (probes) {
      value_summary(vh, k_layout, v_abs_max.get(), value_means.get(), scaled_values.get(), stream);
      summary.scaled_values = scaled_values.get();
      summary.query_means = cache->q;
    } else {
      cluster_means(vh, k_layout, value_means.get(), nullptr, stream);
    }
    if (config.policy == SelectionPolicyKind::error_aware) {
      probe_compensation_error(qh, kh, vh, q_layout, k_layout, summary, config.probe_queries, config.probe_mean,
                               scores.get(), stream, config.probe_value_dims);
    } else {
      centroid_criticality(cache->q, key_means, k_counts.get(), bh, cq, ck, d, scores.get(), stream);
    }
    timer.mark(3);

    // Select into the kernel's CSR lists.
    const std::size_t rows = std::size_t(bh * cq), blocks = rows * std::size_t(ck);
    selected_offsets = DeviceBuffer<std::int32_t>(rows + 1, stream);
    selected_clusters = DeviceBuffer<std::int32_t>(blocks, stream);
    exact = DeviceBuffer<std::uint8_t>(blocks, stream);
    const bool compensate = config.compensation == Compensation::centroid;
    if (compensate) {
      compensated_offsets = DeviceBuffer<std::int32_t>(rows + 1, stream);
      compensated_clusters = DeviceBuffer<std::int32_t>(blocks, stream);
    }
    const DeviceBlockGrid grid{bh, cq, ck, sq, sk, q_offsets.get(), k_offsets.get()};
    const DeviceBlockSelection selection{selected_offsets.get(),    selected_clusters.get(),
                                         compensated_offsets.get(), compensated_clusters.get(),
                                         exact_pairs,               exact.get()};
    if (config.top_p) {
      take_blocks_by_top_p(grid, scores.get(), *config.top_p, config.min_key_fraction, selection, stream);
    } else {
      DensityBudget budget;
      budget.density = config.policy == SelectionPolicyKind::all_blocks ? 1.0 : config.density;
      budget.every_query_cluster_needs_a_block = !compensate;
      budget.call_wide = config.budget_scope == BudgetScope::call;
      take_blocks_by_priority(grid, scores.get(),
                              config.policy == SelectionPolicyKind::error_aware ? BlockScore::error_per_pair
                                                                                : BlockScore::priority,
                              budget, selection, stream);
    }
    const std::int64_t capacity = query_tile_capacity(int(bh), sq, cq);
    tiles = DeviceBuffer<std::int32_t>(std::size_t(capacity * 3), stream);
    problem.tile_count = build_query_tiles(q_offsets.get(), int(bh), sq, cq, tiles.get(), capacity, stream);
    problem.tiles = tiles.get();
    problem.query_clusters = cq;
    problem.key_clusters = ck;
    problem.q_order = q_order.get();
    problem.q_offsets = q_offsets.get();
    problem.k_order = k_order.get();
    problem.k_offsets = k_offsets.get();
    problem.selected_offsets = selected_offsets.get();
    problem.selected_clusters = selected_clusters.get();
    if (compensate) {
      problem.compensated_offsets = compensated_offsets.get();
      problem.compensated_clusters = compensated_clusters.get();
      problem.key_means = cache->k;
      problem.value_means = value_means.get();
      problem.key_counts = k_counts.get();
    }
    timer.mark(4);
  }
  sparse_attention(problem, stream);
  timer.mark(5);

  if (!synchronous) {
    // Nothing blocks: the input check lands in the state's pinned memory, read by its next call
    // (which waited for the previous copy above, so the memory is free). The scratch buffers
    // go back to the pool in stream order, behind this work.
    deferred_check_of(*state).enqueue(counters.get(), stream);
    if (!dense) keep_centroids(*state, signature, std::move(cache));
    return partial_report(report.warm_started, dense ? 0 : bh * cq * ck);
  }

  // The one synchronization: counters for the report and the input check.
  const std::vector<std::int64_t> host_counters = to_host(counters.get(), counters.size(), stream);
  std::int32_t selected_blocks = 0;  // the CSR's last offset
  if (!dense) {
    check_cuda(cudaMemcpyAsync(&selected_blocks, selected_offsets.get() + selected_offsets.size() - 1,
                               sizeof selected_blocks, cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync");
  }
  if (plan != nullptr && !dense) {
    plan->query_clusters = cq;
    plan->key_clusters = ck;
    plan->q_order = to_host(q_order.get(), q_order.size(), stream);
    plan->k_order = to_host(k_order.get(), k_order.size(), stream);
    plan->q_offsets = to_host(q_offsets.get(), q_offsets.size(), stream);
    plan->k_offsets = to_host(k_offsets.get(), k_offsets.size(), stream);
    plan->exact = to_host(exact.get(), exact.size(), stream);
  }
  timer.mark(6);
  check_cuda(cudaStreamSynchronize(stream), "the svgear attention pipeline");
  try {
    raise_call_errors(host_counters.data(), false);
  } catch (const Error&) {
    if (report.warm_started) forget_centroids(*state);  // refined in place from these inputs
    throw;
  }

  report.times.check_ms = timer.ms(0, 1);
  report.times.cluster_ms = timer.ms(1, 2);
  report.times.score_ms = timer.ms(2, 3);
  report.times.select_ms = timer.ms(3, 4);
  report.times.attend_ms = timer.ms(4, 5);
  report.times.total_ms = timer.ms(0, 5);
  if (dense) {
    report.exact_pairs = bh * sq * sk;
  } else {
    for (std::int64_t h = 0; h < bh; ++h) report.exact_pairs += host_counters[std::size_t(kCallCounters + h)];
    report.total_blocks = bh * cq * ck;
    report.selected_blocks = selected_blocks;
  }
  report.density = double(report.exact_pairs) / (double(bh) * double(sq) * double(sk));
  if (state != nullptr && !dense) keep_centroids(*state, signature, std::move(cache));
  return report;
}

}  // namespace svgear::cuda
