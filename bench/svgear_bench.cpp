// svgear-bench: times the CUDA path on the built-in workload at one shape (CUDA events, median
// of repeated calls after warm-up; EAR and SVG2 warm-start k-means from the previous call's
// centroids, as in a denoising loop) and leaves, for bench/gpu_bench.py, the bf16 q/k/v and
// EAR's cluster-permuted block selection in --dump, with result.json.
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "cuda/attention_cuda.hpp"
#include "cuda/cuda_check.hpp"
#include "probe_mean_flag.hpp"
#include "svgear/svgear.hpp"
#include "workload_options.hpp"

using namespace svgear;

namespace {

struct DeviceQkv {
  std::vector<std::uint16_t> host[3];
  void* device[4] = {nullptr, nullptr, nullptr, nullptr};
  TensorView view[4];
  ~DeviceQkv() {
    for (void* p : device) cudaFree(p);
  }
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

template <typename T>
void write_raw(const std::string& path, const std::vector<T>& values) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(values.data()), std::streamsize(values.size() * sizeof(T)));
  if (!out) throw Error("cannot write " + path);
}

struct Timing {
  StageTimes median;
  double density = 0;
};

Timing time_method(const DeviceQkv& qkv, const MethodConfig& config, int repeats, cuda::PlanExport* plan) {
  LayerState state;
  std::vector<double> check, cluster, score, select, attend, total;
  Timing timing;
  for (int r = -2; r < repeats; ++r) {  // two warm-ups: the cold start, then the first warm call
    const AttentionReport report = attention(qkv.view[0], qkv.view[1], qkv.view[2], qkv.view[3], config, &state);
    timing.density = report.density;
    if (r < 0) continue;
    check.push_back(report.times.check_ms);
    cluster.push_back(report.times.cluster_ms);
    score.push_back(report.times.score_ms);
    select.push_back(report.times.select_ms);
    attend.push_back(report.times.attend_ms);
    total.push_back(report.times.total_ms);
  }
  timing.median.check_ms = median(check);
  timing.median.cluster_ms = median(cluster);
  timing.median.score_ms = median(score);
  timing.median.select_ms = median(select);
  timing.median.attend_ms = median(attend);
  timing.median.total_ms = median(total);
  if (plan) cuda::attention(qkv.view[0], qkv.view[1], qkv.view[2], qkv.view[3], config, &state, nullptr, plan);
  return timing;
}

// What the attention kernel does with a plan, to compare with the pairs it is credited for: the
// sm90 kernel runs one CTA per 128 rows of a query cluster (two 64-row consumers), each walking
// 128-key steps over its selected clusters' keys and then 128-pseudo-key steps over the
// compensated clusters (non-empty, not selected). A CTA with one 64-row tile (a cluster's odd
// last 64 rows) splits those steps between its two consumers.
nlohmann::json plan_statistics(const cuda::PlanExport& plan, bool compensation) {
  const int cq = plan.query_clusters, ck = plan.key_clusters;
  const std::size_t heads = plan.q_offsets.size() / std::size_t(cq + 1);
  double exact_pairs = 0, ctas = 0, lone_ctas = 0, row_slots = 0, rows = 0, exact_steps = 0, pseudo_steps = 0,
         computed_pairs = 0;
  std::vector<int> key_sizes(static_cast<std::size_t>(ck));
  for (std::size_t bh = 0; bh < heads; ++bh) {
    const std::int32_t* qo = &plan.q_offsets[bh * std::size_t(cq + 1)];
    const std::int32_t* ko = &plan.k_offsets[bh * std::size_t(ck + 1)];
    for (int j = 0; j < ck; ++j) key_sizes[std::size_t(j)] = ko[j + 1] - ko[j];
    for (int c = 0; c < cq; ++c) {
      const int n = qo[c + 1] - qo[c];
      if (n <= 0) continue;
      const std::uint8_t* taken = &plan.exact[(bh * std::size_t(cq) + std::size_t(c)) * std::size_t(ck)];
      long long exact_keys = 0, compensated = 0;
      for (int j = 0; j < ck; ++j) {
        if (taken[j]) exact_keys += key_sizes[std::size_t(j)];
        else compensated += compensation && key_sizes[std::size_t(j)] > 0;
      }
      const int cluster_ctas = (n + 127) / 128;
      const double steps_e = double((exact_keys + 127) / 128), steps_c = double((compensated + 127) / 128);
      exact_pairs += double(n) * double(exact_keys);
      ctas += cluster_ctas;
      lone_ctas += (n % 128) > 0 && (n % 128) <= 64;
      row_slots += 64.0 * double((n + 63) / 64);
      rows += n;
      exact_steps += cluster_ctas * steps_e;
      pseudo_steps += cluster_ctas * steps_c;
      computed_pairs += 64.0 * double((n + 63) / 64) * 128.0 * (steps_e + steps_c);
    }
  }
  nlohmann::json stats;
  stats["exact_pairs"] = exact_pairs;
  stats["ctas"] = ctas;
  stats["ctas_with_one_row_tile"] = lone_ctas;
  stats["row_padding"] = row_slots / std::max(rows, 1.0) - 1.0;  // 64-row consumer tiles over real rows
  stats["exact_steps_per_cta"] = exact_steps / std::max(ctas, 1.0);
  stats["pseudo_steps_per_cta"] = pseudo_steps / std::max(ctas, 1.0);
  // Pairs the consumers compute (64-row tiles with work, 128-key steps) over the exact pairs.
  stats["computed_over_exact"] = computed_pairs / std::max(exact_pairs, 1.0);
  return stats;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"svgear-bench: the CUDA path on the built-in workload at one shape"};
  WorkloadShape shape;
  double density = 0.12;
  const MethodConfig library_defaults;  // the probe rows the library takes unless told otherwise
  int clusters_q = 256, clusters_k = 1024, repeats = 10, probes = library_defaults.probe_queries;
  int warm_iterations = library_defaults.kmeans_warm_iterations;
  int query_tail_limit = library_defaults.query_tail_limit;
  int probe_value_dims = library_defaults.probe_value_dims;
  bool probe_mean = library_defaults.probe_mean;
  std::string dump;
  cli::add_workload_options(app, shape, "");
  app.add_option("--density", density)->capture_default_str();
  app.add_option("--clusters-q", clusters_q)->capture_default_str();
  app.add_option("--clusters-k", clusters_k)->capture_default_str();
  app.add_option("--probe-queries", probes)->capture_default_str();
  svgear::cli::add_probe_mean_flag(app, probe_mean);
  app.add_option("--warm-iters", warm_iterations, "k-means iterations of a warm-started call (EAR, SVG2)")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  app.add_option("--query-tail-limit", query_tail_limit,
                 "EAR and SVG2: query clusters hand tails of at most this many rows past whole 64-row tiles to "
                 "their second-nearest clusters (0: off)")
      ->capture_default_str()
      ->check(CLI::Range(0, 32));
  app.add_option("--probe-value-dims", probe_value_dims,
                 "EAR probe: values sketched to this many dimensions (32 on CUDA; 0: all)")
      ->capture_default_str();
  app.add_option("--repeats", repeats)->capture_default_str();
  app.add_option("--dump", dump, "Folder for q/k/v, the EAR selection and result.json")->required();
  CLI11_PARSE(app, argc, argv);
  try {
    std::printf("generating the built-in workload: B=%d H=%d S=%lld D=%d\n", shape.batch, shape.heads,
                static_cast<long long>(shape.tokens()), shape.head_dim);
    std::fflush(stdout);
    const SafetensorsFile workload = generate_video_workload(shape);
    DeviceQkv qkv;
    const std::array<std::int64_t, 4> dims{shape.batch, shape.heads, shape.tokens(), shape.head_dim};
    const std::size_t count = std::size_t(dims[0] * dims[1] * dims[2] * dims[3]);
    const char* names[3] = {"q", "k", "v"};
    for (int t = 0; t < 4; ++t) {
      cuda::check_cuda(cudaMalloc(&qkv.device[t], count * 2), "cudaMalloc");
      if (t < 3) {
        const HostTensor& source = workload.tensors.at(names[t]);
        qkv.host[t].resize(count);
        for (std::size_t i = 0; i < count; ++i) qkv.host[t][i] = float_to_bf16(source.at(std::int64_t(i)));
        cuda::check_cuda(cudaMemcpy(qkv.device[t], qkv.host[t].data(), count * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
      }
      qkv.view[t] = TensorView{qkv.device[t], DType::bf16, Device::cuda, dims, contiguous_strides(dims)};
    }

    MethodConfig dense = preset(Method::dense);
    MethodConfig ear = preset(Method::ear), svg2 = preset(Method::svg2);
    for (MethodConfig* c : {&ear, &svg2}) {
      c->density = density;
      c->clusters_q = clusters_q;
      c->clusters_k = clusters_k;
      c->probe_queries = probes;
      c->probe_mean = probe_mean;
      c->kmeans_warm_iterations = warm_iterations;
      c->query_tail_limit = query_tail_limit;
      c->probe_value_dims = probe_value_dims;
    }
    std::printf("timing dense, EAR, SVG2 (%d repeats each)\n", repeats);
    std::fflush(stdout);
    const Timing dense_timing = time_method(qkv, dense, repeats, nullptr);
    cuda::PlanExport plan;
    const Timing ear_timing = time_method(qkv, ear, repeats, &plan);
    const Timing svg2_timing = time_method(qkv, svg2, repeats, nullptr);

    nlohmann::json result;
    result["shape"] = dims;
    result["clusters_q"] = clusters_q;
    result["clusters_k"] = clusters_k;
    result["warm_iterations"] = warm_iterations;
    result["query_tail_limit"] = query_tail_limit;
    result["probe_value_dims"] = probe_value_dims;
    result["density"] = ear_timing.density;
    result["ear_plan"] = plan_statistics(plan, true);
    result["svg2_density"] = svg2_timing.density;
    result["times_ms"] = {{"dense_ms", dense_timing.median.attend_ms},
                          {"ear_ms", ear_timing.median.total_ms},
                          {"svg2_ms", svg2_timing.median.total_ms},
                          {"check_ms", ear_timing.median.check_ms},
                          {"cluster_ms", ear_timing.median.cluster_ms},
                          {"score_ms", ear_timing.median.score_ms},
                          {"select_ms", ear_timing.median.select_ms},
                          {"permute_ms", 0.0},
                          {"attend_ms", ear_timing.median.attend_ms},
                          {"svg2_attend_ms", svg2_timing.median.attend_ms}};
    std::printf("%s\n", result.dump().c_str());
    for (int t = 0; t < 3; ++t) write_raw(dump + "/" + names[t] + ".bf16", qkv.host[t]);
    write_raw(dump + "/q_order.i32", plan.q_order);
    write_raw(dump + "/k_order.i32", plan.k_order);
    write_raw(dump + "/q_offsets.i32", plan.q_offsets);
    write_raw(dump + "/k_offsets.i32", plan.k_offsets);
    write_raw(dump + "/selected.u8", plan.exact);
    std::ofstream(dump + "/result.json") << result.dump(1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "svgear-bench: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
