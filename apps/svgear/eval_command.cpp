#include <chrono>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "method_options.hpp"
#include "c_api_call.hpp"
#include "svgear/attention.hpp"
#include "svgear/error.hpp"
#include "svgear/metrics.hpp"
#include "svgear/safetensors.hpp"

namespace svgear::cli {

namespace {

struct EvalOptions {
  std::string input, output, method;
  bool json = false;
  MethodOptions method_options;
};

const HostTensor& require_tensor(const SafetensorsFile& file, const std::string& path, const char* name) {
  const auto found = file.tensors.find(name);
  if (found == file.tensors.end()) {
    throw Error(path + " has no tensor '" + std::string(name) + "': svgear eval needs tensors q, k and v (see svgear gen)");
  }
  return found->second;
}

std::int64_t metadata_extent(const SafetensorsFile& file, const std::string& path, const std::string& key) {
  const std::string& text = file.metadata.at(key);
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || value <= 0) {
    throw Error(path + ": metadata '" + key + "' is '" + text + "', expected a positive integer");
  }
  return value;
}

// S must equal frames * height * width when the file names its token grid.
void check_token_grid(const SafetensorsFile& file, const std::string& path, std::int64_t tokens) {
  const int present = int(file.metadata.count("frames") + file.metadata.count("height") + file.metadata.count("width"));
  if (present == 0) return;
  if (present != 3) throw Error(path + ": metadata names only part of the token grid: give frames, height and width");
  const std::int64_t frames = metadata_extent(file, path, "frames"), height = metadata_extent(file, path, "height"),
                     width = metadata_extent(file, path, "width");
  if (frames * height * width != tokens) {
    throw Error(path + ": q has S = " + std::to_string(tokens) + " tokens but the metadata grid is frames " +
                std::to_string(frames) + " x height " + std::to_string(height) + " x width " + std::to_string(width) +
                " = " + std::to_string(frames * height * width));
  }
}

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

void run_eval(const EvalOptions& options) {
  const Method method = parse_method(options.method);
  const MethodConfig config = make_config(method, options.method_options);
  const SafetensorsFile file = read_safetensors(options.input);
  const HostTensor& q = require_tensor(file, options.input, "q");
  const HostTensor& k = require_tensor(file, options.input, "k");
  const HostTensor& v = require_tensor(file, options.input, "v");
  const TensorView qv = q.view_bhsd("tensor 'q'"), kv = k.view_bhsd("tensor 'k'"), vv = v.view_bhsd("tensor 'v'");
  check_token_grid(file, options.input, qv.tokens());

  HostTensor reference(DType::f32, q.shape), out(DType::f32, q.shape);
  const auto dense_start = std::chrono::steady_clock::now();
  dense_attention(qv, kv, vv, reference.view_bhsd("reference"));
  const double dense_ms = milliseconds_since(dense_start);
  const AttentionReport report = attention_through_c_api(qv, kv, vv, out.view_bhsd("out"), config);
  const Comparison comparison = compare(out.view_bhsd("out"), reference.view_bhsd("reference"));

  if (!options.output.empty()) {
    SafetensorsFile result;
    result.tensors.emplace("out", std::move(out));
    result.metadata = file.metadata;
    write_safetensors(options.output, result);
  }
  if (options.json) {
    nlohmann::json j;
    j["method"] = method_name(method);
    j["policy"] = policy_name(config.policy);
    j["compensation"] = compensation_name(config.compensation);
    j["requested_density"] = config.top_p ? nlohmann::json(nullptr) : nlohmann::json(config.density);
    j["top_p"] = config.top_p ? nlohmann::json(*config.top_p) : nlohmann::json(nullptr);
    j["density"] = report.density;
    j["rel_l2"] = comparison.rel_l2;
    j["cosine"] = comparison.cosine;
    j["max_abs"] = comparison.max_abs;
    j["time_ms"] = report.times.total_ms;
    j["dense_time_ms"] = dense_ms;
    j["stages_ms"] = {{"cluster", report.times.cluster_ms}, {"permute", report.times.permute_ms},
                      {"score", report.times.score_ms},     {"select", report.times.select_ms},
                      {"attend", report.times.attend_ms}};
    j["shape"] = {qv.batch(), qv.heads(), qv.tokens(), qv.head_dim()};
    j["blocks"] = {{"selected", report.selected_blocks}, {"total", report.total_blocks}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("method %s (%s + %s)  density %.4f  rel_l2 %.4e  cosine %.6f  time %.1f ms  (dense %.1f ms)\n",
                method_name(method).c_str(), policy_name(config.policy).c_str(),
                compensation_name(config.compensation).c_str(), report.density, comparison.rel_l2,
                comparison.cosine, report.times.total_ms, dense_ms);
  }
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto options = std::make_shared<EvalOptions>();
  CLI::App* eval = app.add_subcommand("eval", "Run one method on a file's q, k, v and compare it with dense attention");
  eval->add_option("--input", options->input, "safetensors file with q, k, v ([B,H,S,D] or [H,S,D])")->required();
  eval->add_option("--method", options->method, "dense, svg2 or ear")->required();
  eval->add_option("--output", options->output, "Write the output as tensor 'out' (F32, shape of q)");
  eval->add_flag("--json", options->json, "Print one JSON object instead of a line of text");
  add_method_options(*eval, options->method_options, true);
  eval->callback([options] { run_eval(*options); });
}

}  // namespace svgear::cli
