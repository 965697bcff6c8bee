#include "cpu/kmeans.hpp"

#include <algorithm>
#include <cstring>
#include <limits>

#include "cpu/random.hpp"
#include "cpu/vector_ops.hpp"

namespace svgear::cpu {

namespace {

// k-means++ (Arthur & Vassilvitskii 2007): each next centroid is drawn with probability
// proportional to the squared distance to the nearest centroid chosen so far.
std::vector<float> kmeans_plus_plus_init(const float* points, std::int64_t n, std::int64_t d,
                                         int clusters, std::uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<float> centroids(std::size_t(clusters) * std::size_t(d));
  std::vector<double> nearest(std::size_t(n), std::numeric_limits<double>::infinity());
  std::int64_t chosen = std::int64_t(rng.next() % std::uint64_t(n));
  for (int c = 0; c < clusters; ++c) {
    std::memcpy(&centroids[std::size_t(c) * std::size_t(d)], points + chosen * d,
                sizeof(float) * std::size_t(d));
    if (c + 1 == clusters) break;
    const float* centroid = &centroids[std::size_t(c) * std::size_t(d)];
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      nearest[std::size_t(i)] =
          std::min(nearest[std::size_t(i)], squared_distance(points + i * d, centroid, d));
    }
    double total = 0;  // serial sum: the draw must not depend on the thread count
    for (double distance : nearest) total += distance;
    if (total <= 0) {  // every point coincides with a centroid: take the next point in order
      chosen = (chosen + 1) % n;
      continue;
    }
    double target = rng.uniform() * total;
    chosen = n - 1;
    for (std::int64_t i = 0; i < n; ++i) {
      target -= nearest[std::size_t(i)];
      if (target < 0 && nearest[std::size_t(i)] > 0) {
        chosen = i;
        break;
      }
    }
  }
  return centroids;
}

std::vector<float> strided_init(const float* points, std::int64_t n, std::int64_t d,
                                int clusters) {
  std::vector<float> centroids(std::size_t(clusters) * std::size_t(d));
  for (int c = 0; c < clusters; ++c) {
    const std::int64_t source = std::int64_t(c) * n / clusters;
    std::memcpy(&centroids[std::size_t(c) * std::size_t(d)], points + source * d,
                sizeof(float) * std::size_t(d));
  }
  return centroids;
}

}  // namespace

double assign_to_nearest_centroid(const float* points, std::int64_t n, std::int64_t d,
                                  const float* centroids, int clusters,
                                  std::vector<std::int32_t>& labels, RunnerUps* runner_ups) {
  labels.resize(std::size_t(n));
  if (runner_ups != nullptr) {
    runner_ups->labels.resize(std::size_t(n));
    runner_ups->regrets.resize(std::size_t(n));
  }
  double objective = 0;
#pragma omp parallel for schedule(static) reduction(+ : objective)
  for (std::int64_t i = 0; i < n; ++i) {
    const double infinity = std::numeric_limits<double>::infinity();
    double best = infinity, second = infinity;
    std::int32_t best_label = 0, second_label = 0;
    for (int c = 0; c < clusters; ++c) {
      const double distance = squared_distance(points + i * d, centroids + std::int64_t(c) * d, d);
      if (distance < best) {
        second = best;
        second_label = best_label;
        best = distance;
        best_label = c;
      } else if (distance < second) {
        second = distance;
        second_label = c;
      }
    }
    labels[std::size_t(i)] = best_label;
    objective += best;
    if (runner_ups != nullptr) {
      const bool alone = second == infinity;  // a single cluster: no runner-up
      runner_ups->labels[std::size_t(i)] = alone ? best_label : second_label;
      runner_ups->regrets[std::size_t(i)] = alone ? 0.0f : float(second - best);
    }
  }
  return objective;
}

void update_centroids(const float* points, std::int64_t n, std::int64_t d,
                      const std::vector<std::int32_t>& labels, int clusters,
                      std::vector<float>& centroids, std::vector<std::int64_t>& counts) {
  std::vector<double> sums(std::size_t(clusters) * std::size_t(d), 0.0);
  counts.assign(std::size_t(clusters), 0);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t label = labels[std::size_t(i)];
    ++counts[std::size_t(label)];
    double* sum = &sums[std::size_t(label) * std::size_t(d)];
    for (std::int64_t j = 0; j < d; ++j) sum[j] += points[i * d + j];
  }
  for (int c = 0; c < clusters; ++c) {
    if (counts[std::size_t(c)] == 0) continue;
    const double inverse = 1.0 / double(counts[std::size_t(c)]);
    for (std::int64_t j = 0; j < d; ++j) {
      const std::size_t at = std::size_t(c) * std::size_t(d) + std::size_t(j);
      centroids[at] = float(sums[at] * inverse);
    }
  }
}

KmeansResult kmeans(const float* points, std::int64_t n, std::int64_t d,
                    const KmeansOptions& options, const float* warm_centroids) {
  KmeansResult result;
  const int clusters = options.clusters;
  if (warm_centroids != nullptr) {
    result.centroids.assign(warm_centroids, warm_centroids + std::int64_t(clusters) * d);
  } else if (options.init == KmeansInit::kmeans_plus_plus) {
    result.centroids = kmeans_plus_plus_init(points, n, d, clusters, options.seed);
  } else {
    result.centroids = strided_init(points, n, d, clusters);
  }
  for (int iteration = 0; iteration < options.iterations; ++iteration) {
    const bool align = iteration + 1 == options.iterations && options.alignment.tail_limit > 0;
    RunnerUps runner_ups;
    result.objective.push_back(assign_to_nearest_centroid(points, n, d, result.centroids.data(),
                                                          clusters, result.labels,
                                                          align ? &runner_ups : nullptr));
    if (align) {
      const std::vector<std::int32_t> nearest = result.labels;
      result.aligned_rows = align_clusters_to_tiles(result.labels, runner_ups, clusters, options.alignment);
      // A moved row now sits at its runner-up's distance: the objective counts it there, as
      // the update's centroids (and the CUDA path's objective) see it.
      for (std::size_t i = 0; i < nearest.size(); ++i) {
        if (result.labels[i] != nearest[i]) result.objective.back() += double(runner_ups.regrets[i]);
      }
    }
    update_centroids(points, n, d, result.labels, clusters, result.centroids, result.counts);
  }
  return result;
}

}  // namespace svgear::cpu
