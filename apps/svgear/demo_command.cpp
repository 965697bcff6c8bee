#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.hpp"
#include "method_options.hpp"
#include "c_api_call.hpp"
#include "svgear/attention.hpp"
#include "svgear/error.hpp"
#include "svgear/metrics.hpp"
#include "svgear/workload.hpp"

namespace svgear::cli {

namespace {

struct DemoOptions {
  WorkloadShape shape;
  std::vector<double> densities{0.1, 0.2, 0.3};
  MethodOptions method_options;
};

struct Variant {
  const char* label;
  Method method;
  const char* compensation;  // override, or "" for the method's own
};

// SVG2, SVG2's selection with EAR's compensation (what compensation alone buys), and EAR.
constexpr Variant kVariants[] = {
    {"svg2", Method::svg2, ""}, {"svg2+centroid", Method::svg2, "centroid"}, {"ear", Method::ear, ""}};

void print_row(const char* label, const MethodConfig& config, const char* requested, const AttentionReport& report,
               const Comparison& comparison) {
  std::printf("%-14s %-12s %-9s %-6s %9s %9.4f %11.3e %9.6f %10.1f\n", label, policy_name(config.policy).c_str(),
              compensation_name(config.compensation).c_str(),
              config.policy == SelectionPolicyKind::all_blocks ? "-" : budget_scope_name(config.budget_scope).c_str(),
              requested, report.density, comparison.rel_l2,
              comparison.cosine, report.times.total_ms);
  std::fflush(stdout);
}

void run_demo(const DemoOptions& options) {
  for (double density : options.densities) {
    if (!(density > 0 && density <= 1)) throw Error("--densities: " + std::to_string(density) + " is outside (0, 1]");
  }
  const WorkloadShape& shape = options.shape;
  std::printf("svgear demo: built-in video workload, %d frames x %d x %d tokens (S = %lld), batch %d, %d heads, "
              "D = %d, seed %llu\n",
              shape.frames, shape.height, shape.width, static_cast<long long>(shape.tokens()), shape.batch,
              shape.heads, shape.head_dim, static_cast<unsigned long long>(shape.seed));
  const SafetensorsFile workload = generate_video_workload(shape);
  const TensorView q = workload.tensors.at("q").view_bhsd("q"), k = workload.tensors.at("k").view_bhsd("k"),
                   v = workload.tensors.at("v").view_bhsd("v");
  MethodConfig clusters = make_config(Method::ear, [&] {
    MethodOptions o = options.method_options;
    o.density = 1.0;
    return o;
  }());
  const std::string sampled = std::to_string(clusters.probe_queries) + " sampled queries";
  const std::string probe_rows = clusters.probe_queries == 0 ? "the mean query"
                                 : clusters.probe_mean       ? sampled + " + the mean query"
                                                             : sampled;
  std::printf("clusters: %d query x %d key per head, k-means %d iterations, EAR probe rows: %s per cluster\n\n",
              clusters.clusters_q, clusters.clusters_k, clusters.kmeans_iterations, probe_rows.c_str());
  std::printf("%-14s %-12s %-9s %-6s %9s %9s %11s %9s %10s\n", "method", "policy", "compens.", "budget", "requested",
              "density",
              "rel_l2", "cosine", "time_ms");

  HostTensor reference(DType::f32, workload.tensors.at("q").shape), out(DType::f32, reference.shape);
  const MethodConfig dense = preset(Method::dense);
  const auto start = std::chrono::steady_clock::now();
  dense_attention(q, k, v, reference.view_bhsd("reference"));
  AttentionReport dense_report;
  dense_report.times.total_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  print_row("dense", dense, "1", dense_report, Comparison{});

  std::vector<std::pair<double, double>> svg2_vs_ear;
  for (double density : options.densities) {
    char requested[32];
    std::snprintf(requested, sizeof requested, "%.3g", density);
    double svg2_error = 0, ear_error = 0;
    for (const Variant& variant : kVariants) {
      MethodOptions o = options.method_options;
      o.density = density;
      if (*variant.compensation) o.compensation = variant.compensation;
      const MethodConfig config = make_config(variant.method, o);
      const AttentionReport report = attention_through_c_api(q, k, v, out.view_bhsd("out"), config);
      const Comparison comparison = compare(out.view_bhsd("out"), reference.view_bhsd("reference"));
      print_row(variant.label, config, requested, report, comparison);
      if (variant.method == Method::svg2 && !*variant.compensation) svg2_error = comparison.rel_l2;
      if (variant.method == Method::ear) ear_error = comparison.rel_l2;
    }
    svg2_vs_ear.emplace_back(svg2_error, ear_error);
  }
  std::printf("\nEAR error / SVG2 error at the same budget:");
  for (std::size_t i = 0; i < svg2_vs_ear.size(); ++i) {
    std::printf("  %.3g: %.3f", options.densities[i], svg2_vs_ear[i].second / svg2_vs_ear[i].first);
  }
  std::printf("\n");
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto options = std::make_shared<DemoOptions>();
  CLI::App* demo = app.add_subcommand(
      "demo", "Dense, SVG2 and SVG-EAR on the built-in workload at a few densities: error vs dense and time");
  add_workload_options(*demo, options->shape, "--workload-seed");
  demo->add_option("--densities", options->densities, "Budgets to compare")->delimiter(',')->capture_default_str();
  add_method_options(*demo, options->method_options, false);
  demo->callback([options] { run_demo(*options); });
}

}  // namespace svgear::cli
