// The whole CUDA pipeline through the public API against the CPU reference on the same
// (bf16-rounded) inputs: dense, full density, and the sparse methods' error vs dense.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>

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
  const HostTensor& run(const MethodConfig& config, AttentionReport* report = nullptr, LayerState* state = nullptr) {
    const AttentionReport r = attention(view[0], view[1], view[2], view[3], config, state);
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
  for (Method method : {Method::svg2, Method::ear}) {
    for (double density : {0.1, 0.3}) {
      MethodConfig config = preset(method);
      config.density = density;
      config.kmeans_init = KmeansInit::strided;  // the GPU's cold start
      AttentionReport gpu_report, cpu_report;
      const double gpu_error = rel_l2(gpu.run(config, &gpu_report), ref);
      cpu_report = attention(gpu.host[0].view_bhsd("q"), gpu.host[1].view_bhsd("k"), gpu.host[2].view_bhsd("v"),
                             cpu_out.view_bhsd("out"), config);
      const double cpu_error = rel_l2(cpu_out, ref);
      // Near-tie k-means labels may differ between float64 and tensor-core distances, so the
      // selections need not be identical; the quality must be.
      EXPECT_LE(gpu_error, 1.25 * cpu_error + 1e-2) << method_name(method) << " density " << density;
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
