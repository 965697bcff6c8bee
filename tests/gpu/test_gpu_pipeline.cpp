// The whole CUDA pipeline through the public API against the CPU reference on the same
// (bf16-rounded) inputs: dense, full density, and the sparse methods' error vs dense; the
// optional lse output.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "svgear/svgear.hpp"
#include "test_support.hpp"

using namespace svgear;

namespace {

// bf16 copies of a workload on the device, plus the same rounded values as f32 on the host.
struct Gpu {
  HostTensor host[3];
  void* device[4] = {};
  TensorView view[4];
  HostTensor out_host;

  explicit Gpu(const SafetensorsFile& file) {
    const char* names[3] = {"q", "k", "v"};
    for (int t = 0; t < 3; ++t) {
      const HostTensor& source = file.tensors.at(names[t]);
      HostTensor bf16(DType::bf16, source.shape);
      host[t] = HostTensor(DType::f32, source.shape);
      for (std::int64_t i = 0; i < source.numel(); ++i) {
        bf16.set(i, source.at(i));
        host[t].set(i, bf16.at(i));
      }
      upload(t, bf16);
    }
    HostTensor poison(DType::bf16, host[0].shape);
    for (std::int64_t i = 0; i < poison.numel(); ++i) poison.set(i, std::nanf(""));
    upload(3, poison);
  }
  ~Gpu() {
    for (void* p : device) cudaFree(p);
  }
  void upload(int t, const HostTensor& tensor) {
    cuda::check_cuda(cudaMalloc(&device[t], tensor.bytes.size()), "cudaMalloc");
    cuda::check_cuda(cudaMemcpy(device[t], tensor.bytes.data(), tensor.bytes.size(), cudaMemcpyHostToDevice), "memcpy");
    view[t] = tensor.view_bhsd("t");
    view[t].data = device[t];
    view[t].device = Device::cuda;
  }
  const HostTensor& run(const MethodConfig& config, AttentionReport* report = nullptr, LayerState* state = nullptr,
                        const TensorView* lse = nullptr) {
    const AttentionReport r = attention(view[0], view[1], view[2], view[3], config, state, nullptr, lse);
    if (report) *report = r;
    out_host = HostTensor(DType::bf16, host[0].shape);
    cuda::check_cuda(cudaMemcpy(out_host.bytes.data(), device[3], out_host.bytes.size(), cudaMemcpyDeviceToHost), "memcpy");
    return out_host;
  }
};

SafetensorsFile small_workload(int head_dim) {
  WorkloadShape shape;
  shape.frames = 4;
  shape.height = 16;
  shape.width = 16;
  shape.heads = 3;
  shape.head_dim = head_dim;
  shape.batch = 2;
  return generate_video_workload(shape);
}

double rel_l2(const HostTensor& out, const HostTensor& ref) {
  return compare(out.view_bhsd("out"), ref.view_bhsd("ref")).rel_l2;
}

// An F32 [B, H, Sq, 1] lse output on the device, poisoned with NaN.
struct DeviceLse {
  void* data = nullptr;
  TensorView view;
  explicit DeviceLse(const std::vector<std::int64_t>& q_shape) {
    view.shape = {q_shape[0], q_shape[1], q_shape[2], 1};
    view.strides = contiguous_strides(view.shape);
    view.dtype = DType::f32;
    view.device = Device::cuda;
    cuda::check_cuda(cudaMalloc(&data, bytes()), "cudaMalloc");
    cuda::check_cuda(cudaMemset(data, 0xff, bytes()), "memset");
    view.data = data;
  }
  ~DeviceLse() { cudaFree(data); }
  DeviceLse(const DeviceLse&) = delete;
  DeviceLse& operator=(const DeviceLse&) = delete;
  std::size_t bytes() const { return std::size_t(view.shape[0] * view.shape[1] * view.shape[2]) * sizeof(float); }
  std::vector<float> download() const {
    std::vector<float> host(bytes() / sizeof(float));
    cuda::check_cuda(cudaMemcpy(host.data(), data, bytes(), cudaMemcpyDeviceToHost), "memcpy");
    return host;
  }
};

// The svgear::Error `call` throws, as its message ("" and a failure when it throws none).
std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no svgear::Error";
  return "";
}

bool all_finite(const HostTensor& t) {
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    if (!std::isfinite(t.at(i))) return false;
  }
  return true;
}

MethodConfig asynchronous(MethodConfig config) {
  config.synchronize = false;
  return config;
}

// A host function that holds a stream until open() (or 10 s, then timed_out()): what an
// asynchronous call queued behind it may not wait for.
class StreamGate {
 public:
  explicit StreamGate(cudaStream_t stream) {
    cuda::check_cuda(cudaLaunchHostFunc(stream, &StreamGate::hold, this), "cudaLaunchHostFunc");
  }
  void open() { open_ = true; }
  bool timed_out() const { return timed_out_; }

 private:
  static void CUDART_CB hold(void* self) {
    auto* gate = static_cast<StreamGate*>(self);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!gate->open_) {
      if (std::chrono::steady_clock::now() > deadline) {
        gate->timed_out_ = true;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  std::atomic<bool> open_{false}, timed_out_{false};
};

// max |a - b| over rows; NaN or Inf in `a` gives infinity.
double max_abs(const std::vector<float>& a, const HostTensor& b) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(double(a[i]) - b.at(std::int64_t(i)));
    worst = std::isfinite(diff) ? std::max(worst, diff) : INFINITY;
  }
  return worst;
}

}  // namespace

TEST(GpuPipeline, DenseAndFullDensityMatchTheCpuReference) {
  for (int d : {64, 128}) {
    Gpu gpu(small_workload(d));
    HostTensor ref(DType::f32, gpu.host[0].shape);
    dense_attention(gpu.host[0].view_bhsd("q"), gpu.host[1].view_bhsd("k"), gpu.host[2].view_bhsd("v"),
                    ref.view_bhsd("ref"));
    EXPECT_LE(rel_l2(gpu.run(preset(Method::dense)), ref), 1e-2) << "dense, D " << d;
    for (Method method : {Method::svg2, Method::ear}) {
      MethodConfig config = preset(method);
      config.density = 1.0;
      AttentionReport report;
      EXPECT_LE(rel_l2(gpu.run(config, &report), ref), 1e-2) << method_name(method) << ", D " << d;
      EXPECT_DOUBLE_EQ(report.density, 1.0);
    }
  }
}

TEST(GpuPipeline, SparseErrorsTrackTheCpuPipeline) {
  Gpu gpu(small_workload(64));
  HostTensor ref(DType::f32, gpu.host[0].shape), cpu_out(DType::f32, gpu.host[0].shape);
  dense_attention(gpu.host[0].view_bhsd("q"), gpu.host[1].view_bhsd("k"), gpu.host[2].view_bhsd("v"), ref.view_bhsd("ref"));
  // svg2, ear (the mean query probes), ear with 4 sampled rows, ear with query clusters of ~128
  // rows trimmed to 64-row tiles, ear probing values sketched to 32 dimensions
  for (int variant = 0; variant < 5; ++variant) {
    const Method method = variant == 0 ? Method::svg2 : Method::ear;
    for (double density : {0.1, 0.3}) {
      MethodConfig config = preset(method);
      config.density = density;
      config.kmeans_init = KmeansInit::strided;  // the GPU's cold start
      if (variant == 2) {
        config.probe_queries = 4;
        config.probe_mean = false;
      }
      if (variant == 3) {
        config.clusters_q = 8;
        config.query_tail_limit = 24;
      }
      if (variant == 4) config.probe_value_dims = 32;
      AttentionReport gpu_report, cpu_report;
      const double gpu_error = rel_l2(gpu.run(config, &gpu_report), ref);
      cpu_report = attention(gpu.host[0].view_bhsd("q"), gpu.host[1].view_bhsd("k"), gpu.host[2].view_bhsd("v"),
                             cpu_out.view_bhsd("out"), config);
      const double cpu_error = rel_l2(cpu_out, ref);
      // Near-tie k-means labels may differ between float64 and tensor-core distances, so the
      // selections need not be identical; the quality must be.
      EXPECT_LE(gpu_error, 1.25 * cpu_error + 1e-2) << "variant " << variant << " density " << density;
      EXPECT_NEAR(gpu_report.density, cpu_report.density, 0.05);
      EXPECT_GE(gpu_report.density, density);
      EXPECT_GT(gpu_report.selected_blocks, 0);
      EXPECT_LT(gpu_report.selected_blocks, gpu_report.total_blocks);
    }
  }
}

TEST(GpuPipeline, WarmStartKeepsQuality) {
  Gpu gpu(small_workload(128));
  HostTensor ref(DType::f32, gpu.host[0].shape);
  dense_attention(gpu.host[0].view_bhsd("q"), gpu.host[1].view_bhsd("k"), gpu.host[2].view_bhsd("v"), ref.view_bhsd("ref"));
  MethodConfig config = preset(Method::ear);
  config.density = 0.2;
  LayerState state;
  AttentionReport first, second;
  const double cold = rel_l2(gpu.run(config, &first, &state), ref);
  const double warm = rel_l2(gpu.run(config, &second, &state), ref);
  EXPECT_FALSE(first.warm_started);
  EXPECT_TRUE(second.warm_started);
  EXPECT_EQ(state.steps, 2);
  EXPECT_LE(warm, cold * 1.1 + 1e-3);
}

TEST(GpuPipeline, RejectsWhatTheCudaPathCannotTake) {
  Gpu gpu(small_workload(64));
  auto expect_error = [&](TensorView q, const std::string& keyword) {
    try {
      attention(q, gpu.view[1], gpu.view[2], gpu.view[3], preset(Method::ear));
      ADD_FAILURE() << "no error for " << keyword;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(keyword), std::string::npos) << e.what();
    }
  };
  TensorView f32 = gpu.view[0];
  f32.dtype = DType::f32;
  expect_error(f32, "BF16 or F16");
  TensorView host = gpu.view[0];
  host.data = gpu.host[0].bytes.data();
  host.dtype = DType::bf16;
  expect_error(host, "not device memory");
  TensorView strided = gpu.view[0];
  strided.strides[3] = 2;
  expect_error(strided, "last axis");
  MethodConfig sketched = preset(Method::ear);  // the CUDA probe sketches to 32 dimensions only
  sketched.probe_value_dims = 16;
  try {
    attention(gpu.view[0], gpu.view[1], gpu.view[2], gpu.view[3], sketched);
    ADD_FAILURE() << "no error for probe_value_dims 16 on CUDA tensors";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("32 dimensions only"), std::string::npos) << e.what();
  }
}

TEST(GpuPipeline, NonFiniteInputIsReported) {
  SafetensorsFile file = small_workload(64);
  file.tensors["k"].set(123, INFINITY);
  Gpu gpu(file);
  try {
    gpu.run(preset(Method::ear));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
  }
}

// The lse output against the CPU path: dense and every method at density 1 give the dense LSE
// (|difference| <= 2e-2 for bf16 inputs), the output is the same bytes with and without it, and
// a sparse EAR call's lse stays as close to dense as the CPU pipeline's does.
TEST(GpuPipeline, LseMatchesTheCpuPath) {
  for (int d : {64, 128}) {
    Gpu gpu(small_workload(d));
    const TensorView hq = gpu.host[0].view_bhsd("q"), hk = gpu.host[1].view_bhsd("k"), hv = gpu.host[2].view_bhsd("v");
    HostTensor ref(DType::f32, gpu.host[0].shape), cpu_out(DType::f32, gpu.host[0].shape);
    HostTensor cpu_lse(DType::f32, {gpu.host[0].shape[0], gpu.host[0].shape[1], gpu.host[0].shape[2], 1});
    const TensorView cpu_lse_view = cpu_lse.view_bhsd("lse");
    dense_attention(hq, hk, hv, ref.view_bhsd("ref"), &cpu_lse_view);

    const HostTensor without = gpu.run(preset(Method::dense));
    DeviceLse lse(gpu.host[0].shape);
    const HostTensor with = gpu.run(preset(Method::dense), nullptr, nullptr, &lse.view);
    EXPECT_EQ(with.bytes, without.bytes) << "dense output changed by requesting lse, D " << d;
    EXPECT_LE(max_abs(lse.download(), cpu_lse), 2e-2) << "dense, D " << d;
    for (Method method : {Method::svg2, Method::ear}) {
      MethodConfig config = preset(method);
      config.density = 1.0;
      DeviceLse full(gpu.host[0].shape);
      gpu.run(config, nullptr, nullptr, &full.view);
      EXPECT_LE(max_abs(full.download(), cpu_lse), 2e-2) << method_name(method) << " at density 1, D " << d;
    }

    MethodConfig ear = preset(Method::ear);
    ear.density = 0.2;
    ear.kmeans_init = KmeansInit::strided;
    HostTensor cpu_ear_lse(DType::f32, cpu_lse.shape);
    const TensorView cpu_ear_lse_view = cpu_ear_lse.view_bhsd("lse");
    attention(hq, hk, hv, cpu_out.view_bhsd("out"), ear, nullptr, nullptr, &cpu_ear_lse_view);
    std::vector<float> cpu_ear(std::size_t(cpu_ear_lse.numel()));
    for (std::size_t i = 0; i < cpu_ear.size(); ++i) cpu_ear[i] = cpu_ear_lse.at(std::int64_t(i));
    DeviceLse sparse(gpu.host[0].shape);
    gpu.run(ear, nullptr, nullptr, &sparse.view);
    EXPECT_LE(max_abs(sparse.download(), cpu_lse), 2 * max_abs(cpu_ear, cpu_lse) + 0.05) << "EAR 0.2, D " << d;
  }
}

// What the output is for: svgear over two disjoint key sets (views into k and v), merged by
// lse, equals one call over all keys.
TEST(GpuPipeline, LseMergesAttentionOverTwoKeySets) {
  Gpu gpu(small_workload(64));
  const std::int64_t sk = gpu.view[1].shape[2], split = sk - 77, d = gpu.view[1].shape[3];
  auto part = [&](const TensorView& t, std::int64_t begin, std::int64_t end) {
    TensorView view = t;
    view.data = static_cast<std::uint16_t*>(t.data) + begin * t.strides[2];
    view.shape[2] = end - begin;
    return view;
  };
  auto run_on = [&](const TensorView& k, const TensorView& v, DeviceLse& lse) {
    HostTensor out(DType::bf16, gpu.host[0].shape);
    attention(gpu.view[0], k, v, gpu.view[3], preset(Method::dense), nullptr, nullptr, &lse.view);
    cuda::check_cuda(cudaMemcpy(out.bytes.data(), gpu.device[3], out.bytes.size(), cudaMemcpyDeviceToHost), "memcpy");
    return out;
  };
  DeviceLse full_lse(gpu.host[0].shape), lse1(gpu.host[0].shape), lse2(gpu.host[0].shape);
  const HostTensor full = run_on(gpu.view[1], gpu.view[2], full_lse);
  const HostTensor out1 = run_on(part(gpu.view[1], 0, split), part(gpu.view[2], 0, split), lse1);
  const HostTensor out2 = run_on(part(gpu.view[1], split, sk), part(gpu.view[2], split, sk), lse2);
  const std::vector<float> l1 = lse1.download(), l2 = lse2.download(), lf = full_lse.download();
  HostTensor merged(DType::f32, gpu.host[0].shape);
  double lse_error = 0;
  for (std::size_t row = 0; row < lf.size(); ++row) {
    const double m = std::max(l1[row], l2[row]), w1 = std::exp(l1[row] - m), w2 = std::exp(l2[row] - m);
    lse_error = std::max(lse_error, std::fabs(m + std::log(w1 + w2) - lf[row]));
    for (std::int64_t t = 0; t < d; ++t) {
      const std::int64_t i = std::int64_t(row) * d + t;
      merged.set(i, float((out1.at(i) * w1 + out2.at(i) * w2) / (w1 + w2)));
    }
  }
  EXPECT_LE(lse_error, 2e-2);
  EXPECT_LE(rel_l2(merged, full), 1e-2);
}

TEST(GpuPipeline, RejectsABadLseOutput) {
  Gpu gpu(small_workload(64));
  auto expect_error = [&](const TensorView& lse, const std::string& keyword) {
    try {
      attention(gpu.view[0], gpu.view[1], gpu.view[2], gpu.view[3], preset(Method::ear), nullptr, nullptr, &lse);
      ADD_FAILURE() << "no error for " << keyword;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(keyword), std::string::npos) << e.what();
    }
  };
  DeviceLse lse(gpu.host[0].shape);
  TensorView bf16 = lse.view;
  bf16.dtype = DType::bf16;
  expect_error(bf16, "must be F32");
  TensorView shape = lse.view;
  shape.shape[2] -= 1;
  expect_error(shape, "[B, H, Sq, 1]");
  HostTensor host_lse(DType::f32, {lse.view.shape[0], lse.view.shape[1], lse.view.shape[2], 1});
  TensorView host = lse.view;
  host.data = host_lse.bytes.data();
  expect_error(host, "not device memory");
  TensorView on_cpu = lse.view;
  on_cpu.device = Device::cpu;
  expect_error(on_cpu, "different devices");
}

// synchronize = false changes when the call returns, not what it computes: every method's
// output and lse equal a synchronous run's bytes, cold and warm; the report is the partial one.
TEST(GpuPipeline, AsynchronousCallsMatchSynchronousOnesBitForBit) {
  Gpu gpu(small_workload(64));
  for (Method method : {Method::dense, Method::svg2, Method::ear}) {
    MethodConfig config = preset(method);
    if (method != Method::dense) config.density = 0.2;
    LayerState sync_state, async_state;
    for (int call = 0; call < 3; ++call) {  // a cold start, then warm starts
      const std::string where = method_name(method) + " call " + std::to_string(call);
      DeviceLse sync_lse(gpu.host[0].shape), async_lse(gpu.host[0].shape);
      AttentionReport sync_report, async_report;
      const HostTensor sync_out = gpu.run(config, &sync_report, &sync_state, &sync_lse.view);
      const HostTensor async_out = gpu.run(asynchronous(config), &async_report, &async_state, &async_lse.view);
      EXPECT_EQ(async_out.bytes, sync_out.bytes) << where;
      EXPECT_EQ(async_lse.download(), sync_lse.download()) << where;
      EXPECT_TRUE(sync_report.complete) << where;
      EXPECT_FALSE(async_report.complete) << where;
      EXPECT_TRUE(std::isnan(async_report.density)) << where;
      EXPECT_EQ(async_report.exact_pairs, -1) << where;
      EXPECT_EQ(async_report.selected_blocks, -1) << where;
      EXPECT_TRUE(std::isnan(async_report.times.check_ms) && std::isnan(async_report.times.attend_ms) &&
                  std::isnan(async_report.times.total_ms))
          << where;
      EXPECT_EQ(async_report.total_blocks, sync_report.total_blocks) << where;
      EXPECT_EQ(async_report.warm_started, sync_report.warm_started) << where;
      EXPECT_EQ(async_report.warm_started, method != Method::dense && call > 0) << where;
    }
    EXPECT_NO_THROW(synchronize(async_state));
    EXPECT_EQ(async_state.steps, sync_state.steps);
  }
}

// An asynchronous call cannot raise a NaN/Inf input itself: the state's next call raises it
// (and does nothing else), or svgear::synchronize does; once, and the state starts cold again.
TEST(GpuPipeline, AsynchronousNonFiniteInputIsRaisedLaterOnce) {
  SafetensorsFile file = small_workload(64);
  Gpu clean(file);
  file.tensors["k"].set(123, INFINITY);
  Gpu poisoned(file);
  const MethodConfig config = asynchronous(preset(Method::ear));
  LayerState state;
  clean.run(config, nullptr, &state);
  AttentionReport report;
  EXPECT_NO_THROW(poisoned.run(config, &report, &state));
  EXPECT_FALSE(report.complete);
  EXPECT_TRUE(report.warm_started);
  EXPECT_EQ(state.steps, 2);

  const std::string deferred = error_of([&] { clean.run(config, nullptr, &state); });
  EXPECT_NE(deferred.find("earlier asynchronous call"), std::string::npos) << deferred;
  EXPECT_NE(deferred.find("1 non-finite"), std::string::npos) << deferred;
  EXPECT_EQ(state.steps, 2) << "the call that raised the deferred error ran";
  const HostTensor& out = clean.run(config, &report, &state);
  EXPECT_FALSE(report.warm_started) << "centroids refined from the Inf input were kept";
  EXPECT_NO_THROW(synchronize(state));
  EXPECT_TRUE(all_finite(out));

  poisoned.run(config, nullptr, &state);
  const std::string raised = error_of([&] { synchronize(state); });
  EXPECT_NE(raised.find("earlier asynchronous call"), std::string::npos) << raised;
  EXPECT_NO_THROW(synchronize(state));  // raised once
  EXPECT_NO_THROW(clean.run(config, nullptr, &state));
  EXPECT_NO_THROW(synchronize(state));
}

// A synchronous call that finds non-finite inputs has already refined the state's centroids
// from them in place: it must not leave them for the next warm start.
TEST(GpuPipeline, NonFiniteInputLeavesTheStateCold) {
  SafetensorsFile file = small_workload(64);
  Gpu clean(file);
  file.tensors["v"].set(77, std::nanf(""));
  Gpu poisoned(file);
  LayerState state;
  AttentionReport report;
  clean.run(preset(Method::ear), nullptr, &state);
  const std::string message = error_of([&] { poisoned.run(preset(Method::ear), nullptr, &state); });
  EXPECT_NE(message.find("non-finite"), std::string::npos) << message;
  EXPECT_EQ(message.find("earlier"), std::string::npos) << message;
  const HostTensor& out = clean.run(preset(Method::ear), &report, &state);
  EXPECT_FALSE(report.warm_started);
  EXPECT_TRUE(all_finite(out));
}

TEST(GpuPipeline, AsynchronousCallNeedsAState) {
  Gpu gpu(small_workload(64));
  const std::string message = error_of([&] { gpu.run(asynchronous(preset(Method::ear))); });
  EXPECT_NE(message.find("needs a LayerState"), std::string::npos) << message;
}

// The point of the mode: a warm asynchronous call returns while the stream is still busy with
// earlier work (here a host function holding it), so the host can queue the next layer. Any
// synchronization inside the call would wait for the gate's 10 s timeout.
TEST(GpuPipeline, AsynchronousCallDoesNotWaitForTheStream) {
  Gpu gpu(small_workload(64));
  cudaStream_t stream = nullptr;
  cuda::check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  const MethodConfig config = asynchronous(preset(Method::ear));
  LayerState state;
  attention(gpu.view[0], gpu.view[1], gpu.view[2], gpu.view[3], config, &state, stream);  // cold: allocates
  synchronize(state);
  StreamGate gate(stream);
  const AttentionReport report = attention(gpu.view[0], gpu.view[1], gpu.view[2], gpu.view[3], config, &state, stream);
  EXPECT_FALSE(gate.timed_out()) << "the asynchronous call waited for the stream";
  gate.open();
  EXPECT_NO_THROW(synchronize(state));
  cuda::check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  cuda::check_cuda(cudaStreamDestroy(stream), "cudaStreamDestroy");
  EXPECT_TRUE(report.warm_started);
  EXPECT_FALSE(report.complete);
}
