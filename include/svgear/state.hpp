// What one attention layer keeps across denoising steps: the k-means centroids of the last
// step (so the next step warm-starts with a few iterations instead of a cold clustering) and
// how many steps it has seen. One LayerState per layer; not shared between threads.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
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
  // The CUDA path's deferred input check (opaque): where an asynchronous call
  // (MethodConfig::synchronize = false) leaves its NaN/Inf count for the next call or
  // svgear::synchronize to read.
  std::shared_ptr<void> deferred_check;

  bool has_centroids() const { return !q_centroids.empty() || device_centroids != nullptr; }
  // Forgets the centroids and the step count, not the deferred check: an error of an earlier
  // asynchronous call still surfaces.
  void reset() {
    std::shared_ptr<void> check = std::move(deferred_check);
    *this = LayerState{};
    deferred_check = std::move(check);
  }
};

}  // namespace svgear
