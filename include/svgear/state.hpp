// What one attention layer keeps across denoising steps: the k-means centroids of the last
// step (so the next step warm-starts with a few iterations instead of a cold clustering) and
// how many steps it has seen. One LayerState per layer; not shared between threads.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

namespace svgear {

struct LayerState {
  std::int64_t steps = 0;
  // Shape the cached centroids belong to: B, H, D, clusters_q, clusters_k. A call with another
  // shape starts cold and replaces the cache.
  std::array<std::int64_t, 5> signature{};
  std::vector<float> q_centroids;  // [B*H][clusters_q][D]
  std::vector<float> k_centroids;  // [B*H][clusters_k][D]
  // The CUDA path keeps its centroids on the device instead (opaque; freed with the state).
  std::shared_ptr<void> device_centroids;

  bool has_centroids() const { return !q_centroids.empty() || device_centroids != nullptr; }
  void reset() { *this = LayerState{}; }
};

}  // namespace svgear
