// The built-in workload's shape flags, shared by `svgear demo`, `svgear gen` and svgear-bench.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "svgear/workload.hpp"

namespace svgear::cli {

// --frames, --height, --width, --heads, --head-dim, --batch, and `seed_flag` unless it is empty.
inline void add_workload_options(CLI::App& command, WorkloadShape& shape, const std::string& seed_flag) {
  command.add_option("--frames", shape.frames, "Frames of the token grid")->capture_default_str();
  command.add_option("--height", shape.height, "Token rows per frame")->capture_default_str();
  command.add_option("--width", shape.width, "Token columns per frame")->capture_default_str();
  command.add_option("--heads", shape.heads, "Attention heads")->capture_default_str();
  command.add_option("--head-dim", shape.head_dim, "Head dimension D")->capture_default_str();
  command.add_option("--batch", shape.batch, "Batch size B")->capture_default_str();
  if (!seed_flag.empty()) {
    command.add_option(seed_flag, shape.seed, "Seed of the built-in workload")->capture_default_str();
  }
}

}  // namespace svgear::cli
