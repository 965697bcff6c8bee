#include "svgear/config.hpp"

#include <cmath>

#include "cpu/tile_alignment.hpp"
#include "svgear/error.hpp"

namespace svgear {

MethodConfig preset(Method method) {
  MethodConfig config;
  config.method = method;
  switch (method) {
    case Method::dense:
      config.policy = SelectionPolicyKind::all_blocks;
      config.compensation = Compensation::drop;
      config.density = 1.0;
      break;
    case Method::svg2:
      // Criticality is a per-query distribution, so it ranks blocks within a head, not across.
      config.policy = SelectionPolicyKind::criticality;
      config.compensation = Compensation::drop;
      config.budget_scope = BudgetScope::head;
      break;
    case Method::ear:
      // Probed errors are in the output's units in every head, so blocks compete call-wide.
      config.policy = SelectionPolicyKind::error_aware;
      config.compensation = Compensation::centroid;
      config.budget_scope = BudgetScope::call;
      break;
  }
  return config;
}

Method parse_method(std::string_view name) {
  if (name == "dense") return Method::dense;
  if (name == "svg2") return Method::svg2;
  if (name == "ear") return Method::ear;
  throw Error("unknown method '" + std::string(name) + "': choose dense, svg2 or ear");
}

std::string method_name(Method method) {
  switch (method) {
    case Method::dense: return "dense";
    case Method::svg2: return "svg2";
    case Method::ear: return "ear";
  }
  return "unknown";
}

std::string policy_name(SelectionPolicyKind policy) {
  switch (policy) {
    case SelectionPolicyKind::all_blocks: return "all";
    case SelectionPolicyKind::criticality: return "criticality";
    case SelectionPolicyKind::error_aware: return "error-aware";
  }
  return "unknown";
}

std::string compensation_name(Compensation compensation) {
  return compensation == Compensation::drop ? "drop" : "centroid";
}

SelectionPolicyKind parse_policy(std::string_view name) {
  if (name == "all") return SelectionPolicyKind::all_blocks;
  if (name == "criticality") return SelectionPolicyKind::criticality;
  if (name == "error-aware") return SelectionPolicyKind::error_aware;
  throw Error("unknown selection policy '" + std::string(name) +
              "': choose all, criticality or error-aware");
}

Compensation parse_compensation(std::string_view name) {
  if (name == "drop") return Compensation::drop;
  if (name == "centroid") return Compensation::centroid;
  throw Error("unknown compensation '" + std::string(name) + "': choose drop or centroid");
}

BudgetScope parse_budget_scope(std::string_view name) {
  if (name == "call") return BudgetScope::call;
  if (name == "head") return BudgetScope::head;
  throw Error("unknown budget scope '" + std::string(name) + "': choose call or head");
}

std::string budget_scope_name(BudgetScope scope) { return scope == BudgetScope::call ? "call" : "head"; }

namespace {
void require(bool ok, const std::string& message) {
  if (!ok) throw Error(message);
}
}  // namespace

void validate(const MethodConfig& config) {
  require(std::isfinite(config.density) && config.density > 0 && config.density <= 1,
          "density " + std::to_string(config.density) +
              " is outside (0, 1]: it is the fraction of query-key pairs computed exactly");
  if (config.top_p) {
    require(std::isfinite(*config.top_p) && *config.top_p > 0 && *config.top_p <= 1,
            "top-p " + std::to_string(*config.top_p) + " is outside (0, 1]");
    require(config.policy == SelectionPolicyKind::criticality,
            "top-p selection needs the criticality policy (method svg2)");
  }
  require(std::isfinite(config.min_key_fraction) && config.min_key_fraction >= 0 &&
              config.min_key_fraction <= 1,
          "min key fraction " + std::to_string(config.min_key_fraction) + " is outside [0, 1]");
  require(config.clusters_q >= 1, "clusters_q must be at least 1, got " +
                                      std::to_string(config.clusters_q));
  require(config.clusters_k >= 1, "clusters_k must be at least 1, got " +
                                      std::to_string(config.clusters_k));
  require(config.kmeans_iterations >= 1 && config.kmeans_iterations <= 1000,
          "k-means iterations must be in [1, 1000], got " +
              std::to_string(config.kmeans_iterations));
  require(config.kmeans_warm_iterations >= 1 && config.kmeans_warm_iterations <= 1000,
          "warm k-means iterations must be in [1, 1000], got " +
              std::to_string(config.kmeans_warm_iterations));
  require(config.query_tail_limit >= 0 && config.query_tail_limit <= cpu::kMaxTailLimit,
          "query tail limit must be in [0, " + std::to_string(cpu::kMaxTailLimit) + "] rows (0: off), got " +
              std::to_string(config.query_tail_limit));
  require(config.query_tail_limit == 0 || config.clusters_q <= cpu::kMaxAlignedClusters,
          "a query tail limit needs at most " + std::to_string(cpu::kMaxAlignedClusters) +
              " query clusters (the CUDA walk keeps two ints per cluster in shared memory), got " +
              std::to_string(config.clusters_q) + ": set query_tail_limit to 0");
  require(config.probe_queries >= 0 && config.probe_queries <= 4096,
          "probe queries per cluster must be in [0, 4096], got " +
              std::to_string(config.probe_queries));
  require(config.probe_queries >= 1 || config.probe_mean,
          "the EAR probe needs a probe row per query cluster: set probe_queries to at least 1 or turn on "
          "probe_mean");
  require(config.probe_value_dims >= 0 && config.probe_value_dims <= 4096 && config.probe_value_dims % 16 == 0,
          "probe value dims must be 0 (every dimension) or a multiple of 16 up to 4096, got " +
              std::to_string(config.probe_value_dims));
}

}  // namespace svgear
