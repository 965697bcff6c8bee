// Method flags shared by `svgear eval` and `svgear demo`, with the library's defaults.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "svgear/config.hpp"
#include "workload_options.hpp"

namespace svgear::cli {

struct MethodOptions {
  MethodConfig defaults = preset(Method::ear);
  std::optional<double> density;
  std::optional<double> top_p;
  std::string policy;        // empty: the method's own
  std::string compensation;  // empty: the method's own
  std::string init = "kmeans++";
  std::string budget_scope;  // empty: the method's own
};

// Adds --clusters-q, --clusters-k, --kmeans-iters, --warm-iters, --probe-queries, --probe-mean, --seed,
// --init, --policy, --compensation (and, with `with_budget`, --density and --top-p).
void add_method_options(CLI::App& command, MethodOptions& options, bool with_budget);

// The configuration of `method` with the flags applied; throws svgear::Error for bad values.
MethodConfig make_config(Method method, const MethodOptions& options);

}  // namespace svgear::cli
