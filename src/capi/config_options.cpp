#include "capi/config_options.hpp"

#include <charconv>
#include <cmath>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "svgear/error.hpp"

namespace svgear::capi {

namespace {

std::string quoted(std::string_view text) { return "'" + std::string(text) + "'"; }

double parse_real(std::string_view key, std::string_view text) {
  // std::from_chars for double is exact and locale-independent.
  double value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size() || !std::isfinite(value)) {
    throw Error("option " + std::string(key) + " = " + quoted(text) + " is not a finite number");
  }
  return value;
}

long long parse_integer(std::string_view key, std::string_view text) {
  long long value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size()) {
    throw Error("option " + std::string(key) + " = " + quoted(text) + " is not an integer");
  }
  return value;
}

int parse_int(std::string_view key, std::string_view text) {
  const long long value = parse_integer(key, text);
  if (value < -1'000'000'000LL || value > 1'000'000'000LL) {
    throw Error("option " + std::string(key) + " = " + quoted(text) + " is out of range");
  }
  return int(value);
}

bool parse_bool(std::string_view key, std::string_view text) {
  if (text == "true" || text == "1") return true;
  if (text == "false" || text == "0") return false;
  throw Error("option " + std::string(key) + " = " + quoted(text) + ": choose true or false");
}

KmeansInit parse_init(std::string_view text) {
  if (text == "kmeans++") return KmeansInit::kmeans_plus_plus;
  if (text == "strided") return KmeansInit::strided;
  throw Error("option init = " + quoted(text) + ": choose kmeans++ or strided");
}

using Setter = std::function<void(MethodConfig&, std::string_view key, std::string_view value)>;

const std::map<std::string, Setter, std::less<>>& setters() {
  static const std::map<std::string, Setter, std::less<>> table = {
      {"density", [](MethodConfig& c, auto key, auto v) { c.density = parse_real(key, v); }},
      {"top_p",
       [](MethodConfig& c, auto key, auto v) {
         if (v == "none" || v.empty()) {
           c.top_p.reset();
         } else {
           c.top_p = parse_real(key, v);
         }
       }},
      {"min_key_fraction", [](MethodConfig& c, auto key, auto v) { c.min_key_fraction = parse_real(key, v); }},
      {"clusters_q", [](MethodConfig& c, auto key, auto v) { c.clusters_q = parse_int(key, v); }},
      {"clusters_k", [](MethodConfig& c, auto key, auto v) { c.clusters_k = parse_int(key, v); }},
      {"kmeans_iters", [](MethodConfig& c, auto key, auto v) { c.kmeans_iterations = parse_int(key, v); }},
      {"warm_iters", [](MethodConfig& c, auto key, auto v) { c.kmeans_warm_iterations = parse_int(key, v); }},
      {"query_tail_limit", [](MethodConfig& c, auto key, auto v) { c.query_tail_limit = parse_int(key, v); }},
      {"probe_queries", [](MethodConfig& c, auto key, auto v) { c.probe_queries = parse_int(key, v); }},
      {"probe_mean", [](MethodConfig& c, auto key, auto v) { c.probe_mean = parse_bool(key, v); }},
      {"probe_value_dims", [](MethodConfig& c, auto key, auto v) { c.probe_value_dims = parse_int(key, v); }},
      {"seed",
       [](MethodConfig& c, auto key, auto v) {
         const long long seed = parse_integer(key, v);
         if (seed < 0) throw Error("option seed = " + quoted(v) + " must be non-negative");
         c.seed = std::uint64_t(seed);
       }},
      {"init", [](MethodConfig& c, auto, auto v) { c.kmeans_init = parse_init(v); }},
      {"budget_scope", [](MethodConfig& c, auto, auto v) { c.budget_scope = parse_budget_scope(v); }},
      {"policy", [](MethodConfig& c, auto, auto v) { c.policy = parse_policy(v); }},
      {"compensation", [](MethodConfig& c, auto, auto v) { c.compensation = parse_compensation(v); }},
      {"synchronize", [](MethodConfig& c, auto key, auto v) { c.synchronize = parse_bool(key, v); }},
  };
  return table;
}

}  // namespace

void set_option(MethodConfig& config, std::string_view key, std::string_view value) {
  const auto& table = setters();
  const auto found = table.find(key);
  if (found == table.end()) {
    std::string known;
    for (const auto& [name, setter] : table) known += (known.empty() ? "" : ", ") + name;
    throw Error("unknown option " + quoted(key) + ": svgear accepts " + known);
  }
  found->second(config, key, value);
}

std::string describe(const MethodConfig& config) {
  nlohmann::json json = {
      {"method", method_name(config.method)},
      {"policy", policy_name(config.policy)},
      {"compensation", compensation_name(config.compensation)},
      {"density", config.density},
      {"top_p", config.top_p ? nlohmann::json(*config.top_p) : nlohmann::json(nullptr)},
      {"min_key_fraction", config.min_key_fraction},
      {"budget_scope", budget_scope_name(config.budget_scope)},
      {"clusters_q", config.clusters_q},
      {"clusters_k", config.clusters_k},
      {"kmeans_iters", config.kmeans_iterations},
      {"warm_iters", config.kmeans_warm_iterations},
      {"query_tail_limit", config.query_tail_limit},
      {"probe_queries", config.probe_queries},
      {"probe_mean", config.probe_mean},
      {"probe_value_dims", config.probe_value_dims},
      {"init", config.kmeans_init == KmeansInit::strided ? "strided" : "kmeans++"},
      {"seed", config.seed},
      {"synchronize", config.synchronize},
  };
  return json.dump();
}

}  // namespace svgear::capi
