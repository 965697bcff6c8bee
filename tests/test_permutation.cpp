#include <gtest/gtest.h>

#include <cstring>

#include "cpu/permutation.hpp"
#include "test_support.hpp"

using namespace svgear;

TEST(Permutation, StableCountingSortMakesContiguousClusters) {
  const std::vector<std::int32_t> labels = {2, 0, 2, 1, 0, 2, 4};  // cluster 3 empty
  const cpu::ClusterLayout layout = cpu::cluster_layout(labels, 5);
  EXPECT_EQ(layout.offsets, (std::vector<std::int64_t>{0, 2, 3, 6, 6, 7}));
  EXPECT_EQ(layout.order, (std::vector<std::int64_t>{1, 4, 3, 0, 2, 5, 6}));
  EXPECT_EQ(layout.size(3), 0);
}

TEST(Permutation, GatherThenScatterIsExactRoundTrip) {
  cpu::SplitMix64 rng(5);
  const std::int64_t n = 1001, d = 7;
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (auto& label : labels) label = std::int32_t(rng.next() % 37);
  const cpu::ClusterLayout layout = cpu::cluster_layout(labels, 37);
  const HostTensor rows = svgear::testing::random_tensor({n, d}, 9);
  const float* src = reinterpret_cast<const float*>(rows.bytes.data());
  std::vector<float> permuted(static_cast<std::size_t>(n * d)), back(static_cast<std::size_t>(n * d), -1.0f);
  cpu::gather_rows(src, d, layout, permuted.data());
  for (std::int64_t p = 0; p < n; ++p) {
    // Every permuted row belongs to the cluster whose range holds it.
    const std::int32_t label = labels[std::size_t(layout.order[std::size_t(p)])];
    EXPECT_GE(p, layout.offsets[std::size_t(label)]);
    EXPECT_LT(p, layout.offsets[std::size_t(label) + 1]);
  }
  cpu::scatter_rows(permuted.data(), d, layout, back.data());
  EXPECT_EQ(0, std::memcmp(back.data(), src, sizeof(float) * std::size_t(n * d)));
}
