#include "c_api_call.hpp"

#include <charconv>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "svgear/error.hpp"
#include "svgear/svgear.h"

namespace svgear::cli {

namespace {

// Shortest text that parses back to the same double.
std::string exact_text(double value) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, result.ptr);
}

std::vector<std::pair<std::string, std::string>> options_of(const MethodConfig& config) {
  return {
      {"policy", policy_name(config.policy)},
      {"compensation", compensation_name(config.compensation)},
      {"budget_scope", budget_scope_name(config.budget_scope)},
      {"density", exact_text(config.density)},
      {"top_p", config.top_p ? exact_text(*config.top_p) : "none"},
      {"min_key_fraction", exact_text(config.min_key_fraction)},
      {"clusters_q", std::to_string(config.clusters_q)},
      {"clusters_k", std::to_string(config.clusters_k)},
      {"kmeans_iters", std::to_string(config.kmeans_iterations)},
      {"warm_iters", std::to_string(config.kmeans_warm_iterations)},
      {"query_tail_limit", std::to_string(config.query_tail_limit)},
      {"probe_queries", std::to_string(config.probe_queries)},
      {"probe_mean", config.probe_mean ? "true" : "false"},
      {"probe_value_dims", std::to_string(config.probe_value_dims)},
      {"init", config.kmeans_init == KmeansInit::strided ? "strided" : "kmeans++"},
      {"seed", std::to_string(config.seed)},
      {"synchronize", config.synchronize ? "true" : "false"},
  };
}

void check(svgear_status status) {
  if (status == SVGEAR_OK) return;
  const ErrorKind kind = status == SVGEAR_ERROR_TYPE      ? ErrorKind::type
                         : status == SVGEAR_ERROR_VALUE ? ErrorKind::value
                                                        : ErrorKind::runtime;
  throw Error(svgear_last_error(), kind);
}

// A DLTensor over a host view; owns the shape and stride arrays it points to.
struct HostDLTensor {
  std::int64_t shape[4];
  std::int64_t strides[4];
  DLTensor tensor{};

  explicit HostDLTensor(const TensorView& view) {
    for (int axis = 0; axis < 4; ++axis) {
      shape[axis] = view.shape[std::size_t(axis)];
      strides[axis] = view.strides[std::size_t(axis)];
    }
    tensor.data = view.data;
    tensor.device = {kDLCPU, 0};
    tensor.ndim = 4;
    tensor.dtype = view.dtype == DType::f32   ? DLDataType{kDLFloat, 32, 1}
                   : view.dtype == DType::f16 ? DLDataType{kDLFloat, 16, 1}
                                              : DLDataType{kDLBfloat, 16, 1};
    tensor.shape = shape;
    tensor.strides = strides;
    tensor.byte_offset = 0;
  }
  HostDLTensor(const HostDLTensor&) = delete;  // `tensor` points into this object
  HostDLTensor& operator=(const HostDLTensor&) = delete;
};

}  // namespace

AttentionReport attention_through_c_api(const TensorView& q, const TensorView& k, const TensorView& v,
                                        const TensorView& out, const MethodConfig& config) {
  svgear_config* raw = nullptr;
  check(svgear_config_create(method_name(config.method).c_str(), &raw));
  const std::unique_ptr<svgear_config, void (*)(svgear_config*)> handle(raw, svgear_config_destroy);
  for (const auto& [key, value] : options_of(config)) check(svgear_config_set(raw, key.c_str(), value.c_str()));

  const HostDLTensor q_dl(q), k_dl(k), v_dl(v), out_dl(out);
  svgear_report report{};
  check(svgear_attention(raw, nullptr, &q_dl.tensor, &k_dl.tensor, &v_dl.tensor, &out_dl.tensor, nullptr,
                         SVGEAR_LAYOUT_BHSD, nullptr, &report));
  AttentionReport result;
  result.density = report.density;
  result.exact_pairs = report.exact_pairs;
  result.selected_blocks = report.selected_blocks;
  result.total_blocks = report.total_blocks;
  result.warm_started = report.warm_started != 0;
  result.complete = report.complete != 0;
  result.times = {report.check_ms, report.cluster_ms, report.permute_ms, report.score_ms,
                  report.select_ms, report.attend_ms, report.total_ms};
  return result;
}

}  // namespace svgear::cli
