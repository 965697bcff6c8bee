#include <gtest/gtest.h>

#include "cpu/kmeans.hpp"
#include "cpu/vector_ops.hpp"
#include "test_support.hpp"

using namespace svgear;
using svgear::testing::clustered_tensor;

namespace {
cpu::KmeansOptions options(int clusters, int iterations, KmeansInit init = KmeansInit::kmeans_plus_plus) {
  cpu::KmeansOptions o;
  o.clusters = clusters;
  o.iterations = iterations;
  o.init = init;
  o.seed = 3;
  return o;
}
}  // namespace

TEST(Kmeans, ObjectiveNeverIncreases) {
  for (KmeansInit init : {KmeansInit::kmeans_plus_plus, KmeansInit::strided}) {
    const HostTensor points = clustered_tensor(1, 1, 700, 24, 20, 0.8, 17);
    const float* x = reinterpret_cast<const float*>(points.bytes.data());
    const cpu::KmeansResult result = cpu::kmeans(x, 700, 24, options(32, 25, init));
    ASSERT_EQ(result.objective.size(), 25u);
    for (std::size_t t = 1; t < result.objective.size(); ++t) {
      EXPECT_LE(result.objective[t], result.objective[t - 1] * (1 + 1e-12)) << "iteration " << t;
    }
    EXPECT_LT(result.objective.back(), result.objective.front());  // it did something
  }
}

TEST(Kmeans, CentroidsAreMeansOfTheirPointsAndLabelsAreNearest) {
  const HostTensor points = clustered_tensor(1, 1, 500, 8, 10, 0.5, 23);
  const float* x = reinterpret_cast<const float*>(points.bytes.data());
  const cpu::KmeansResult r = cpu::kmeans(x, 500, 8, options(10, 15));
  std::vector<double> sums(80, 0.0);
  std::vector<std::int64_t> counts(10, 0);
  for (int i = 0; i < 500; ++i) {
    ++counts[std::size_t(r.labels[std::size_t(i)])];
    for (int j = 0; j < 8; ++j) sums[std::size_t(r.labels[std::size_t(i)] * 8 + j)] += x[i * 8 + j];
  }
  EXPECT_EQ(counts, r.counts);
  for (int c = 0; c < 10; ++c) {
    if (counts[std::size_t(c)] == 0) continue;
    for (int j = 0; j < 8; ++j) {
      EXPECT_NEAR(r.centroids[std::size_t(c * 8 + j)], sums[std::size_t(c * 8 + j)] / double(counts[std::size_t(c)]), 1e-5);
    }
  }
}

TEST(Kmeans, DeterministicAndSeeded) {
  const HostTensor points = clustered_tensor(1, 1, 400, 16, 30, 1.0, 29);
  const float* x = reinterpret_cast<const float*>(points.bytes.data());
  const cpu::KmeansResult a = cpu::kmeans(x, 400, 16, options(24, 5));
  const cpu::KmeansResult b = cpu::kmeans(x, 400, 16, options(24, 5));
  EXPECT_EQ(a.labels, b.labels);
  EXPECT_EQ(a.centroids, b.centroids);
  cpu::KmeansOptions other = options(24, 5);
  other.seed = 4;
  EXPECT_NE(cpu::kmeans(x, 400, 16, other).centroids, a.centroids);
}

TEST(Kmeans, WarmStartContinuesFromGivenCentroids) {
  const HostTensor points = clustered_tensor(1, 1, 600, 16, 12, 0.6, 31);
  const float* x = reinterpret_cast<const float*>(points.bytes.data());
  const cpu::KmeansResult cold = cpu::kmeans(x, 600, 16, options(12, 20));
  const cpu::KmeansResult warm = cpu::kmeans(x, 600, 16, options(12, 1), cold.centroids.data());
  // Starting at a converged solution, one more iteration keeps the objective.
  EXPECT_LE(warm.objective.front(), cold.objective.back() * (1 + 1e-9));
}

TEST(Kmeans, EmptyClusterKeepsItsCentroid) {
  // 4 distinct points, 6 clusters: at least two clusters stay empty every iteration.
  std::vector<float> x = {0, 0, 1, 1, 5, 5, 9, 9};
  std::vector<float> warm = {0, 0, 1, 1, 5, 5, 9, 9, 100, 100, -100, -100};
  const cpu::KmeansResult r = cpu::kmeans(x.data(), 4, 2, options(6, 3), warm.data());
  EXPECT_EQ(r.counts[4], 0);
  EXPECT_EQ(r.centroids[8], 100.0f);
  EXPECT_EQ(r.centroids[10], -100.0f);
  EXPECT_DOUBLE_EQ(r.objective.back(), 0.0);
}

TEST(Kmeans, AsManyClustersAsPointsAndSinglePoint) {
  std::vector<float> x = {3, 1, 4, 1, 5, 9};
  const cpu::KmeansResult r = cpu::kmeans(x.data(), 3, 2, options(3, 4));
  EXPECT_DOUBLE_EQ(r.objective.back(), 0.0);  // each point its own cluster
  const cpu::KmeansResult one = cpu::kmeans(x.data(), 1, 2, options(1, 2));
  EXPECT_EQ(one.labels, std::vector<std::int32_t>{0});
}
