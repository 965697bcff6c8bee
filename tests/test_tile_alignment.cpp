// The tile alignment of query clusters (cpu/tile_alignment.hpp): the rule on hand-made clusters,
// its invariants on random ones, and k-means and the pipeline with it.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "cpu/kmeans.hpp"
#include "cpu/tile_alignment.hpp"
#include "cpu/vector_ops.hpp"
#include "test_support.hpp"

using namespace svgear;

namespace {

constexpr int kTile = cpu::kQueryTileRows;

// Rows labelled cluster by cluster: sizes[c] rows of cluster c, in order.
std::vector<std::int32_t> labels_of_sizes(const std::vector<int>& sizes) {
  std::vector<std::int32_t> labels;
  for (std::size_t c = 0; c < sizes.size(); ++c) labels.insert(labels.end(), std::size_t(sizes[c]), std::int32_t(c));
  return labels;
}

std::vector<std::int64_t> sizes_of(const std::vector<std::int32_t>& labels, int clusters) {
  std::vector<std::int64_t> sizes(std::size_t(clusters), 0);
  for (std::int32_t label : labels) ++sizes[std::size_t(label)];
  return sizes;
}

cpu::TileAlignment tail_limit(int limit) {
  cpu::TileAlignment alignment;
  alignment.tail_limit = limit;
  return alignment;
}

}  // namespace

TEST(TileAlignment, MovesTheCheapestTailRowsToRunnerUpsWithRoom) {
  // Cluster 0: 64 + 3 rows (donor); cluster 1: 40 rows (receiver, room 24); cluster 2: 64 + 50
  // (receiver, room 14); cluster 3: 128 rows (no tail: neither).
  std::vector<std::int32_t> labels = labels_of_sizes({67, 40, 114, 128});
  cpu::RunnerUps runner_ups{std::vector<std::int32_t>(labels.size(), 3), std::vector<float>(labels.size(), 5.0f)};
  // Cluster 0's cheapest rows: 10 (-> 3: no room, skipped), 20 (-> 1), 30 (-> 2), 40 (-> 1), 50 (-> 1).
  const std::vector<std::pair<int, int>> cheap{{10, 3}, {20, 1}, {30, 2}, {40, 1}, {50, 1}};
  float regret = 0.5f;
  for (auto [row, runner_up] : cheap) {
    runner_ups.labels[std::size_t(row)] = runner_up;
    runner_ups.regrets[std::size_t(row)] = regret;
    regret += 0.25f;
  }
  const std::vector<std::int32_t> before = labels;
  EXPECT_EQ(cpu::align_clusters_to_tiles(labels, runner_ups, 4, tail_limit(8)), 3);
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const bool moved = i == 20 || i == 30 || i == 40;
    EXPECT_EQ(labels[i], moved ? runner_ups.labels[i] : before[i]) << "row " << i;
  }
  EXPECT_EQ(sizes_of(labels, 4), (std::vector<std::int64_t>{64, 42, 115, 128}));
  EXPECT_EQ(cpu::count_row_tiles(labels, 4, kTile), cpu::count_row_tiles(before, 4, kTile) - 1);
}

TEST(TileAlignment, DonatesAllOrNothingAndKeepsRolesFixed) {
  // Donor 0 (64 + 2) has only one candidate with room: it gives nothing. Donor 1 (64 + 1) may
  // not send its row to donor 0 (a donor never receives), nor to cluster 2 (a whole tile, no
  // room); a cluster of 20 rows (under a tile) never donates, it receives.
  std::vector<std::int32_t> labels = labels_of_sizes({66, 65, 64, 20});
  cpu::RunnerUps runner_ups{std::vector<std::int32_t>(labels.size(), 2), std::vector<float>(labels.size(), 1.0f)};
  runner_ups.labels[0] = 3;     // donor 0's only candidate
  runner_ups.labels[66] = 0;    // donor 1 -> donor 0: not a candidate
  runner_ups.labels[67] = 3;    // donor 1 -> cluster 3: moves
  for (std::size_t i = 195; i < labels.size(); ++i) runner_ups.labels[i] = 0;  // cluster 3 never donates
  const std::vector<std::int32_t> before = labels;
  EXPECT_EQ(cpu::align_clusters_to_tiles(labels, runner_ups, 4, tail_limit(8)), 1);
  EXPECT_EQ(sizes_of(labels, 4), (std::vector<std::int64_t>{66, 64, 64, 21}));
  EXPECT_EQ(labels[67], 3);
  EXPECT_EQ(std::count(labels.begin(), labels.end(), 0), 66);
  // Off: nothing moves.
  std::vector<std::int32_t> unchanged = before;
  EXPECT_EQ(cpu::align_clusters_to_tiles(unchanged, runner_ups, 4, tail_limit(0)), 0);
  EXPECT_EQ(unchanged, before);
}

TEST(TileAlignment, RandomClustersNeverGainTilesAndMoveOnlyToRunnerUps) {
  cpu::SplitMix64 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const int clusters = 1 + int(rng.next() % 40);
    std::vector<int> sizes(static_cast<std::size_t>(clusters), 0);
    for (int& size : sizes) size = int(rng.next() % 300);
    std::vector<std::int32_t> labels = labels_of_sizes(sizes);
    if (labels.empty()) continue;
    std::shuffle(labels.begin(), labels.end(), std::mt19937(unsigned(trial)));
    cpu::RunnerUps runner_ups;
    for (std::size_t i = 0; i < labels.size(); ++i) {
      runner_ups.labels.push_back(std::int32_t(rng.next() % std::uint64_t(clusters)));
      runner_ups.regrets.push_back(float(rng.next() % 16) * 0.125f);  // many ties
    }
    const int limit = 1 + int(rng.next() % 32);
    const std::vector<std::int32_t> before = labels;
    const std::int64_t moved = cpu::align_clusters_to_tiles(labels, runner_ups, clusters, tail_limit(limit));
    std::int64_t changed = 0;
    for (std::size_t i = 0; i < labels.size(); ++i) {
      if (labels[i] == before[i]) continue;
      ++changed;
      EXPECT_EQ(labels[i], runner_ups.labels[i]);
    }
    EXPECT_EQ(changed, moved);
    const auto old_sizes = sizes_of(before, clusters), new_sizes = sizes_of(labels, clusters);
    std::int64_t emptied_tails = 0;
    for (int c = 0; c < clusters; ++c) {
      const std::int64_t n = old_sizes[std::size_t(c)], m = new_sizes[std::size_t(c)];
      const bool donor = n > kTile && n % kTile >= 1 && n % kTile <= limit;
      if (donor) {
        EXPECT_TRUE(m == n || m == n - n % kTile) << "donor " << c << ": all of its tail or nothing";
        emptied_tails += m != n;
      } else {
        EXPECT_GE(m, n) << "cluster " << c << " is no donor";
        EXPECT_EQ((m + kTile - 1) / kTile, (n + kTile - 1) / kTile) << "receiver " << c << " gained a tile";
      }
    }
    EXPECT_EQ(cpu::count_row_tiles(labels, clusters, kTile), cpu::count_row_tiles(before, clusters, kTile) - emptied_tails);
  }
}

TEST(TileAlignment, KmeansMovesFewRowsForFewerTilesAndKeepsCentroidsMeans) {
  const std::int64_t n = 4000, d = 16;
  const HostTensor points = svgear::testing::clustered_tensor(1, 1, n, d, 12, 0.9, 31);
  const float* x = reinterpret_cast<const float*>(points.bytes.data());
  cpu::KmeansOptions options;
  options.clusters = 24;
  options.iterations = 8;
  options.init = KmeansInit::strided;
  const cpu::KmeansResult plain = cpu::kmeans(x, n, d, options);
  options.alignment.tail_limit = 24;
  const cpu::KmeansResult aligned = cpu::kmeans(x, n, d, options);
  EXPECT_EQ(plain.aligned_rows, 0);
  EXPECT_GT(aligned.aligned_rows, 0);
  EXPECT_LT(aligned.aligned_rows, n / 20);
  EXPECT_LT(cpu::count_row_tiles(aligned.labels, 24, kTile), cpu::count_row_tiles(plain.labels, 24, kTile));
  // Up to the last assignment both runs are the same; the objective grows by the moved rows'
  // regrets only.
  EXPECT_EQ(aligned.objective.size(), plain.objective.size());
  EXPECT_GT(aligned.objective.back(), plain.objective.back());
  EXPECT_LT(aligned.objective.back(), plain.objective.back() * 1.01);
  std::vector<double> sums(std::size_t(24 * d), 0.0);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t c = aligned.labels[std::size_t(i)];
    for (std::int64_t j = 0; j < d; ++j) sums[std::size_t(c * d + j)] += x[i * d + j];
  }
  for (int c = 0; c < 24; ++c) {
    ASSERT_GT(aligned.counts[std::size_t(c)], 0);
    for (std::int64_t j = 0; j < d; ++j) {
      EXPECT_NEAR(aligned.centroids[std::size_t(c * d + j)], sums[std::size_t(c * d + j)] / aligned.counts[std::size_t(c)],
                  1e-5);
    }
  }
}

TEST(TileAlignment, RunnerUpIsTheNearestOtherCentroid) {
  const std::int64_t n = 300, d = 8;
  const HostTensor points = svgear::testing::clustered_tensor(1, 1, n, d, 6, 0.7, 5);
  const float* x = reinterpret_cast<const float*>(points.bytes.data());
  std::vector<float> centroids(x, x + 7 * d);  // 7 of the points
  std::vector<std::int32_t> labels;
  cpu::RunnerUps runner_ups;
  cpu::assign_to_nearest_centroid(x, n, d, centroids.data(), 7, labels, &runner_ups);
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<std::pair<double, int>> by_distance;
    for (int c = 0; c < 7; ++c) by_distance.push_back({cpu::squared_distance(x + i * d, &centroids[std::size_t(c * d)], d), c});
    std::sort(by_distance.begin(), by_distance.end());
    EXPECT_EQ(labels[std::size_t(i)], by_distance[0].second);
    EXPECT_EQ(runner_ups.labels[std::size_t(i)], by_distance[1].second);
    EXPECT_FLOAT_EQ(runner_ups.regrets[std::size_t(i)], float(by_distance[1].first - by_distance[0].first));
  }
  // One cluster: the runner-up is the point's own cluster, at no regret.
  cpu::assign_to_nearest_centroid(x, n, d, centroids.data(), 1, labels, &runner_ups);
  EXPECT_EQ(runner_ups.labels, std::vector<std::int32_t>(std::size_t(n), 0));
  EXPECT_EQ(runner_ups.regrets, std::vector<float>(std::size_t(n), 0.0f));
}

