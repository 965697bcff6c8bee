// --probe-mean / --no-probe-mean, shared by `svgear eval`, `svgear demo`, svgear-bench and
// svgear-stage-bench.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace svgear::cli {

// The help states the default itself: CLI11's capture_default_str would show {false}, the value
// --no-probe-mean sets, which reads as the default.
inline CLI::Option* add_probe_mean_flag(CLI::App& command, bool& probe_mean) {
  return command.add_flag("--probe-mean,!--no-probe-mean", probe_mean,
                          std::string("EAR probe: also probe each query cluster with its mean query (default: ") +
                              (probe_mean ? "on" : "off") + ")");
}

}  // namespace svgear::cli
