// The ground truth behind the built-in workload (src/workload/video_workload.cpp), for tests
// and diagnostics: which semantic class covers each token, and what each head attends by.
// Not public API: the generated file carries only q, k, v and the grid.
#pragma once

#include <cstdint>
#include <vector>

#include "svgear/workload.hpp"

namespace svgear {

// Heads cycle through these roles (head h has role h % 4); the strength of each varies by seed.
enum class WorkloadHeadRole {
  semantic,  // ~no positional component: attends to tokens of the same class anywhere
  local,     // positional in t, y and x: attends to a 3D neighbourhood
  temporal,  // positional in y and x only: the same place across frames (SVG1's temporal head)
  spatial,   // strongly positional in t: the same frame (SVG1's spatial head)
};

WorkloadHeadRole video_workload_head_role(int head);

// Number of classes in batch element `batch_index`: kBackgroundClasses regions, then objects.
inline constexpr int kWorkloadBackgroundClasses = 4;
int video_workload_class_count(const WorkloadShape& shape, int batch_index);

// Class id of every token s = (f * height + y) * width + x of batch element `batch_index`, as
// the generator drew it: ids below kWorkloadBackgroundClasses are background regions, the rest
// moving objects (later objects drawn on top). Throws svgear::Error for an invalid shape.
std::vector<std::int32_t> video_workload_classes(const WorkloadShape& shape, int batch_index);

}  // namespace svgear
