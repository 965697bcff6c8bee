// The built-in video-like workload: Q, K, V for tokens on a frames x height x width grid, so
// every method runs with no model and no GPU. Tokens belong to semantic classes (a textured
// background and objects moving across frames); each head projects class features plus
// texture noise, then applies 3D RoPE whose strength varies by head (some heads attend by
// content, some by position), as in a video DiT's self-attention.
#pragma once

#include <cstdint>

#include "svgear/safetensors.hpp"

namespace svgear {

struct WorkloadShape {
  int frames = 8;
  int height = 24;
  int width = 24;
  int heads = 4;
  int head_dim = 64;
  int batch = 1;
  std::uint64_t seed = 0;

  std::int64_t tokens() const { return std::int64_t(frames) * height * width; }
};

// Tensors `q`, `k`, `v` as F32 [B, H, S, D] with metadata frames/height/width. Deterministic
// for a given shape and seed on every platform. Throws svgear::Error for non-positive sizes.
SafetensorsFile generate_video_workload(const WorkloadShape& shape);

}  // namespace svgear
