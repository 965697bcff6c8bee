// Lloyd's k-means of one (batch, head)'s queries or keys (Euclidean), as SVG2 clusters them.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/tile_alignment.hpp"
#include "svgear/config.hpp"

namespace svgear::cpu {

struct KmeansOptions {
  int clusters = 1;
  int iterations = 1;
  KmeansInit init = KmeansInit::kmeans_plus_plus;
  std::uint64_t seed = 0;
  // Between the last assignment and the last update, trim small tails to whole row tiles
  // (tile_alignment.hpp); off unless alignment.tail_limit > 0.
  TileAlignment alignment;
};

struct KmeansResult {
  // [clusters][d]: the mean of the points labelled with each cluster after the last
  // iteration. An empty cluster keeps its previous centroid (Lloyd's objective then still
  // never increases) and has count 0.
  std::vector<float> centroids;
  std::vector<std::int32_t> labels;     // [n], nearest centroid at the last assignment
  std::vector<std::int64_t> counts;     // [clusters]
  // Sum of squared distances at each assignment (the last one after the tile alignment, which
  // moves rows to their runner-up's distance).
  std::vector<double> objective;
  std::int64_t aligned_rows = 0;        // rows the tile alignment moved after the last assignment
};

// points: [n][d] row-major. `warm_centroids` ([clusters][d]) replaces the initialisation when
// non-null. Requires 1 <= clusters <= n (the pipeline validates this for users).
// Deterministic for a fixed seed regardless of the thread count.
KmeansResult kmeans(const float* points, std::int64_t n, std::int64_t d,
                    const KmeansOptions& options, const float* warm_centroids = nullptr);

// Nearest centroid of every point (lowest index on ties); returns the objective. With
// runner_ups, also each point's nearest other centroid (lowest index on ties) and the regret
// d(runner-up) - d(nearest), rounded to float (0 when there is a single cluster: no runner-up,
// the point's own label).
double assign_to_nearest_centroid(const float* points, std::int64_t n, std::int64_t d,
                                  const float* centroids, int clusters,
                                  std::vector<std::int32_t>& labels, RunnerUps* runner_ups = nullptr);

// Centroid = mean of its points (float64 sums); empty clusters keep their centroid.
void update_centroids(const float* points, std::int64_t n, std::int64_t d,
                      const std::vector<std::int32_t>& labels, int clusters,
                      std::vector<float>& centroids, std::vector<std::int64_t>& counts);

}  // namespace svgear::cpu
