// svgear-stage-bench: times each CUDA stage before attention on its own (src/cuda/stages.hpp),
// so a device run shows where the time goes: k-means of Q and of K (cold from the strided init,
// and warm from the cold result as in a denoising loop), the two concurrently as the pipeline
// runs them, the cluster layout and one assignment alone, cluster means of K and V, centroid
// criticality, the EAR probe and the call-wide selection. Inputs: the built-in video workload
// (realistic clusters) or, with --random, Gaussian values, as bf16 [B, H, S, D] on the device.
// Each stage: warm-up calls, then --repeats calls between CUDA events; the median and the
// fastest are printed, with the tensor-core rate for the GEMM-like stages.
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cpu/random.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/finite_check.hpp"
#include "cuda/stages.hpp"
#include "probe_mean_flag.hpp"
#include "svgear/config.hpp"
#include "svgear/dtype.hpp"
#include "svgear/error.hpp"
#include "svgear/workload.hpp"

using namespace svgear;
using cuda::check_cuda;

namespace {

// A device array freed on scope exit.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return ptr_; }
  std::size_t size() const { return count_; }

 private:
  T* ptr_ = nullptr;
  std::size_t count_;
};

struct Shape {
  int batch = 2, heads = 12, frames = 21, height = 30, width = 52, head_dim = 128;
  std::int64_t tokens() const { return std::int64_t(frames) * height * width; }
  std::int64_t heads_total() const { return std::int64_t(batch) * heads; }
  std::size_t elements() const { return std::size_t(heads_total() * tokens() * head_dim); }
};

// q, k, v as bf16 bits, [B, H, S, D] contiguous.
std::vector<std::vector<std::uint16_t>> make_inputs(const Shape& shape, bool random, std::uint64_t seed) {
  std::vector<std::vector<std::uint16_t>> out(3, std::vector<std::uint16_t>(shape.elements()));
  if (random) {
    cpu::SplitMix64 rng(seed);
    for (auto& tensor : out) {
      for (auto& x : tensor) {  // Irwin-Hall(4) approximation of a unit normal: fast and bounded
        double sum = 0;
        for (int i = 0; i < 4; ++i) sum += rng.uniform();
        x = float_to_bf16(float((sum - 2.0) * std::sqrt(3.0)));
      }
    }
    return out;
  }
  WorkloadShape w;
  w.batch = shape.batch;
  w.heads = shape.heads;
  w.frames = shape.frames;
  w.height = shape.height;
  w.width = shape.width;
  w.head_dim = shape.head_dim;
  w.seed = seed;
  const SafetensorsFile file = generate_video_workload(w);
  const char* names[3] = {"q", "k", "v"};
  for (int t = 0; t < 3; ++t) {
    const HostTensor& source = file.tensors.at(names[t]);
    for (std::size_t i = 0; i < out[std::size_t(t)].size(); ++i) {
      out[std::size_t(t)][i] = float_to_bf16(source.at(std::int64_t(i)));
    }
  }
  return out;
}

struct Timing {
  double median_ms = 0, min_ms = 0;
};

// `prepare` runs before each call outside the timed window (e.g. restoring warm-start centroids).
Timing time_stage(cudaStream_t stream, int warmup, int repeats, const std::function<void()>& prepare,
                  const std::function<void()>& stage) {
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<double> ms;
  for (int r = -warmup; r < repeats; ++r) {
    if (prepare) prepare();
    check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
    stage();
    check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(stop), "the timed stage");
    check_cuda(cudaGetLastError(), "the timed stage");
    float elapsed = 0;
    check_cuda(cudaEventElapsedTime(&elapsed, start, stop), "cudaEventElapsedTime");
    if (r >= 0) ms.push_back(elapsed);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}

// Per-tensor clustering outputs, as the pipeline keeps them.
struct Clustering {
  DeviceArray<float> centroids, seed;  // seed: the cold result, restored before each warm call
  DeviceArray<std::int32_t> labels, counts, order, offsets;
  int clusters;
  Clustering(std::int64_t heads_total, std::int64_t tokens, int clusters_, int d)
      : centroids(std::size_t(heads_total * clusters_ * d)),
        seed(std::size_t(heads_total * clusters_ * d)),
        labels(std::size_t(heads_total * tokens)),
        counts(std::size_t(heads_total * clusters_)),
        order(std::size_t(heads_total * tokens)),
        offsets(std::size_t(heads_total * (clusters_ + 1))),
        clusters(clusters_) {}
  cuda::KmeansOutputs outputs() const {
    return {centroids.get(), labels.get(), counts.get(), order.get(), offsets.get(), nullptr, {}, nullptr};
  }
  cuda::DeviceLayout layout() const { return {order.get(), offsets.get(), clusters}; }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"svgear-stage-bench: the CUDA stages before attention, one at a time"};
  Shape shape;
  const MethodConfig library_defaults;  // the probe rows and warm iterations the library takes unless told otherwise
  int clusters_q = 256, clusters_k = 1024, probes = library_defaults.probe_queries, cold_iterations = 10,
      warm_iterations = library_defaults.kmeans_warm_iterations, repeats = 10, warmup = 2;
  double density = 0.12;
  bool random = false, probe_mean = library_defaults.probe_mean;
  std::uint64_t seed = 0;
  app.add_option("--batch", shape.batch)->capture_default_str();
  app.add_option("--heads", shape.heads)->capture_default_str();
  app.add_option("--frames", shape.frames)->capture_default_str();
  app.add_option("--height", shape.height)->capture_default_str();
  app.add_option("--width", shape.width)->capture_default_str();
  app.add_option("--head-dim", shape.head_dim)->capture_default_str();
  app.add_option("--clusters-q", clusters_q)->capture_default_str();
  app.add_option("--clusters-k", clusters_k)->capture_default_str();
  app.add_option("--probe-queries", probes)->capture_default_str();
  svgear::cli::add_probe_mean_flag(app, probe_mean);
  app.add_option("--cold-iterations", cold_iterations)->capture_default_str();
  app.add_option("--warm-iterations", warm_iterations)->capture_default_str();
  app.add_option("--density", density, "Selection density")->capture_default_str();
  app.add_option("--repeats", repeats, "Timed calls per stage")->capture_default_str();
  app.add_option("--warmup", warmup, "Untimed calls per stage first")->capture_default_str();
  app.add_option("--seed", seed)->capture_default_str();
  app.add_flag("--random", random, "Gaussian inputs instead of the built-in workload");
  CLI11_PARSE(app, argc, argv);
  try {
    if (repeats < 1 || warmup < 0) throw Error("--repeats must be >= 1 and --warmup >= 0");
    const std::int64_t bh = shape.heads_total(), s = shape.tokens();
    const int d = shape.head_dim;
    cudaDeviceProp prop{};
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
    std::printf("inputs: %s, B=%d H=%d S=%lld D=%d, Cq=%d Ck=%d, %d sampled probes%s per query cluster\n",
                random ? "random" : "built-in workload", shape.batch, shape.heads, static_cast<long long>(s), d,
                clusters_q, clusters_k, probes, probe_mean ? " + the mean query" : "");
    std::fflush(stdout);

    const auto host = make_inputs(shape, random, seed);
    std::vector<std::unique_ptr<DeviceArray<std::uint16_t>>> qkv;
    std::vector<cuda::DeviceHeads> heads;
    for (const auto& tensor : host) {
      qkv.push_back(std::make_unique<DeviceArray<std::uint16_t>>(tensor.size()));
      check_cuda(cudaMemcpy(qkv.back()->get(), tensor.data(), tensor.size() * 2, cudaMemcpyHostToDevice), "upload");
      cuda::DeviceHeads h;
      h.dtype = DType::bf16;
      h.batch = shape.batch;
      h.heads = shape.heads;
      h.tokens = s;
      h.head_dim = d;
      h.tensor = cuda::DeviceTensor{qkv.back()->get(), shape.heads * s * d, s * d, d};
      heads.push_back(h);
    }
    const cuda::DeviceHeads &q = heads[0], &k = heads[1], &v = heads[2];

    cudaStream_t stream, side;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), "cudaStreamCreate");
    cudaEvent_t fork, join;
    check_cuda(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventCreateWithFlags(&join, cudaEventDisableTiming), "cudaEventCreate");

    Clustering qc(bh, s, clusters_q, d), kc(bh, s, clusters_k, d);
    DeviceArray<float> key_means(std::size_t(bh * clusters_k * d)), value_means(std::size_t(bh * clusters_k * d));
    DeviceArray<float> scores(std::size_t(bh * clusters_q * clusters_k));
    const std::size_t rows = std::size_t(bh * clusters_q), blocks = rows * std::size_t(clusters_k);
    DeviceArray<std::int32_t> selected_offsets(rows + 1), selected(blocks), compensated_offsets(rows + 1),
        compensated(blocks);
    DeviceArray<std::int64_t> pairs{std::size_t(bh)};
    DeviceArray<std::uint8_t> exact(blocks);

    struct Row {
      std::string name;
      Timing t;
      double tflop;  // tensor-core work of the stage (0: not GEMM-like)
    };
    std::vector<Row> table;
    auto run = [&](const std::string& name, double tflop, const std::function<void()>& prepare,
                   const std::function<void()>& stage) {
      const Timing t = time_stage(stream, warmup, repeats, prepare, stage);
      table.push_back({name, t, tflop});
      std::printf("  %-34s %9.3f ms\n", name.c_str(), t.median_ms);
      std::fflush(stdout);
    };
    const double assign_q = 2.0 * double(bh) * double(s) * clusters_q * d * 1e-12;  // one term, one iteration
    const double assign_k = 2.0 * double(bh) * double(s) * clusters_k * d * 1e-12;
    const double probe_rows = double(std::min<std::int64_t>(std::int64_t(clusters_q) * probes, s));
    const double probe_flop = 8.0 * double(bh) * probe_rows * double(s) * d * 1e-12;  // two sweeps of QK^T + PV

    std::printf("timing (median of %d after %d warm-up calls):\n", repeats, warmup);
    auto cold = [&](const cuda::DeviceHeads& x, Clustering& c) {
      cuda::kmeans(x, cuda::KmeansSettings{c.clusters, cold_iterations, nullptr}, c.outputs(), stream);
    };
    run("kmeans Q cold (" + std::to_string(cold_iterations) + " it.)", assign_q * cold_iterations, nullptr,
        [&] { cold(q, qc); });
    run("kmeans K cold (" + std::to_string(cold_iterations) + " it.)", assign_k * cold_iterations, nullptr,
        [&] { cold(k, kc); });
    check_cuda(
        cudaMemcpyAsync(qc.seed.get(), qc.centroids.get(), qc.centroids.size() * 4, cudaMemcpyDeviceToDevice, stream),
        "seed copy");
    check_cuda(
        cudaMemcpyAsync(kc.seed.get(), kc.centroids.get(), kc.centroids.size() * 4, cudaMemcpyDeviceToDevice, stream),
        "seed copy");
    auto restore = [&](Clustering& c) {
      check_cuda(
          cudaMemcpyAsync(c.centroids.get(), c.seed.get(), c.centroids.size() * 4, cudaMemcpyDeviceToDevice, stream),
          "restore centroids");
    };
    auto warm = [&](const cuda::DeviceHeads& x, Clustering& c, cudaStream_t on) {
      cuda::kmeans(x, cuda::KmeansSettings{c.clusters, warm_iterations, c.centroids.get()}, c.outputs(), on);
    };
    const std::string warm_it = " (" + std::to_string(warm_iterations) + " it.)";
    run(
        "kmeans Q warm" + warm_it, assign_q * warm_iterations, [&] { restore(qc); }, [&] { warm(q, qc, stream); });
    run(
        "kmeans K warm" + warm_it, assign_k * warm_iterations, [&] { restore(kc); }, [&] { warm(k, kc, stream); });
    run(
        "kmeans Q+K warm, two streams", (assign_q + assign_k) * warm_iterations,
        [&] {
          restore(qc);
          restore(kc);
        },
        [&] {
          check_cuda(cudaEventRecord(fork, stream), "fork");
          check_cuda(cudaStreamWaitEvent(side, fork, 0), "fork");
          warm(q, qc, side);
          warm(k, kc, stream);
          check_cuda(cudaEventRecord(join, side), "join");
          check_cuda(cudaStreamWaitEvent(stream, join, 0), "join");
        });
    run("assign K (two terms, alone)", 2 * assign_k, nullptr,
        [&] { cuda::assign_to_nearest_centroid(k, kc.centroids.get(), clusters_k, kc.labels.get(), stream); });
    run("cluster layout K (sort)", 0, nullptr,
        [&] { cuda::cluster_layout(kc.labels.get(), bh, s, clusters_k, kc.order.get(), kc.offsets.get(), stream); });
    run("cluster means K", 0, nullptr,
        [&] { cuda::cluster_means(k, kc.layout(), key_means.get(), kc.counts.get(), stream); });
    run("cluster means V", 0, nullptr,
        [&] { cuda::cluster_means(v, kc.layout(), value_means.get(), nullptr, stream); });
    // What the pipeline does for EAR instead: the value means and the probe's fp16 copy of v in
    // one read, with max |v| from the input check (computed once here, untimed).
    DeviceArray<std::int64_t> non_finite{1};
    DeviceArray<unsigned> v_abs_max{std::size_t(bh)};
    check_cuda(cudaMemsetAsync(v_abs_max.get(), 0, bh * sizeof(unsigned), stream), "cudaMemsetAsync");
    cuda::count_non_finite(q, k, v, non_finite.get(), v_abs_max.get(), stream);
    DeviceArray<std::uint16_t> scaled_values(std::size_t(bh * s * d));
    run("value summary V (means + fp16 copy)", 0, nullptr, [&] {
      cuda::value_summary(v, kc.layout(), v_abs_max.get(), value_means.get(), scaled_values.get(), stream);
    });
    run("centroid criticality", 0, nullptr, [&] {
      cuda::centroid_criticality(qc.centroids.get(), key_means.get(), kc.counts.get(), bh, clusters_q, clusters_k, d,
                                 scores.get(), stream);
    });
    const cuda::DeviceKeySummary summary{key_means.get(), value_means.get(), kc.counts.get()};
    run("EAR probe (alone)", probe_flop, nullptr, [&] {
      cuda::probe_compensation_error(q, k, v, qc.layout(), kc.layout(), summary, probes, probe_mean, scores.get(),
                                     stream);
    });
    cuda::DeviceKeySummary pipeline_summary = summary;
    pipeline_summary.value_abs_max = v_abs_max.get();
    pipeline_summary.scaled_values = scaled_values.get();
    pipeline_summary.query_means = qc.centroids.get();
    run("EAR probe (the pipeline's inputs)", probe_flop, nullptr, [&] {
      cuda::probe_compensation_error(q, k, v, qc.layout(), kc.layout(), pipeline_summary, probes, probe_mean,
                                     scores.get(), stream);
    });
    const cuda::DeviceBlockGrid grid{bh, clusters_q, clusters_k, s, s, qc.offsets.get(), kc.offsets.get()};
    const cuda::DeviceBlockSelection selection{selected_offsets.get(), selected.get(), compensated_offsets.get(),
                                               compensated.get(),      pairs.get(),    exact.get()};
    run("selection (EAR, call-wide)", 0, nullptr, [&] {
      cuda::take_blocks_by_priority(grid, scores.get(), cuda::BlockScore::error_per_pair,
                                    cuda::DensityBudget{density, false, true}, selection, stream);
    });

    std::printf("\n%-36s %10s %10s %10s\n", "stage", "median ms", "min ms", "TF/s");
    for (const Row& r : table) {
      if (r.tflop > 0) {
        std::printf("%-36s %10.3f %10.3f %10.1f\n", r.name.c_str(), r.t.median_ms, r.t.min_ms,
                    r.tflop / (r.t.median_ms * 1e-3));
      } else {
        std::printf("%-36s %10.3f %10.3f %10s\n", r.name.c_str(), r.t.median_ms, r.t.min_ms, "-");
      }
    }
    auto median_of = [&](const std::string& prefix) {
      for (const Row& r : table)
        if (r.name.rfind(prefix, 0) == 0) return r.t.median_ms;
      return 0.0;
    };
    const double before_attention = median_of("kmeans Q+K warm") + median_of("value summary V") +
                                    median_of("EAR probe (the pipeline");
    std::printf(
        "\npipeline before attention (EAR, warm): k-means Q+K %.3f + value summary %.3f + probe %.3f = %.3f ms\n",
        median_of("kmeans Q+K warm"), median_of("value summary V"), median_of("EAR probe (the pipeline"),
        before_attention);
    cudaEventDestroy(fork);
    cudaEventDestroy(join);
    cudaStreamDestroy(side);
    cudaStreamDestroy(stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "svgear-stage-bench: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
