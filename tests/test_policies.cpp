#include <gtest/gtest.h>

#include "policy/selection_policy.hpp"

using namespace svgear;

namespace {
BlockGrid grid(std::vector<std::int64_t> q, std::vector<std::int64_t> k) { return {std::move(q), std::move(k)}; }
}  // namespace

TEST(Policies, BudgetTakesBlocksInPriorityOrderUntilReached) {
  const BlockGrid g = grid({10, 10}, {5, 15});  // 400 pairs; block costs 50, 150, 50, 150
  const std::vector<double> priority = {0.9, 0.1, 0.5, 0.7};
  SelectionBudget budget;
  budget.density = 0.3;  // 120 pairs: blocks 0 (50) then 3 (150) -> 200
  const BlockSelection s = take_blocks_by_priority(g, priority, budget);
  EXPECT_EQ(s.exact, (std::vector<std::uint8_t>{1, 0, 0, 1}));
  EXPECT_EQ(s.exact_pairs, 200);
  budget.density = 0.125;  // exactly block 0
  EXPECT_EQ(take_blocks_by_priority(g, priority, budget).exact_pairs, 50);
  budget.density = 1.0;
  EXPECT_EQ(take_blocks_by_priority(g, priority, budget).exact_pairs, 400);
}

TEST(Policies, DropModeGivesEveryQueryClusterABlock) {
  const BlockGrid g = grid({10, 10, 0}, {5, 15});
  const std::vector<double> priority = {0.9, 0.8, 0.1, 0.2, 1.0, 1.0};
  SelectionBudget budget;
  budget.density = 0.01;
  budget.every_query_cluster_needs_a_block = true;
  const BlockSelection s = take_blocks_by_priority(g, priority, budget);
  EXPECT_EQ(s.exact, (std::vector<std::uint8_t>{1, 0, 0, 1, 0, 0}));  // empty query cluster 2: nothing
}

TEST(Policies, EmptyBlocksAreNeverSelected) {
  const BlockGrid g = grid({4, 4}, {0, 8});
  const std::vector<double> priority = {1.0, 0.0, 1.0, 0.0};
  SelectionBudget budget;
  budget.density = 1.0;
  const BlockSelection s = take_blocks_by_priority(g, priority, budget);
  EXPECT_EQ(s.exact, (std::vector<std::uint8_t>{0, 1, 0, 1}));
  EXPECT_EQ(s.selected_blocks, 2);
}

TEST(Policies, TopPReachesMassWithFloor) {
  const BlockGrid g = grid({3}, {2, 2, 2, 2});
  const std::vector<double> criticality = {0.5, 0.3, 0.15, 0.05};
  EXPECT_EQ(take_blocks_by_top_p(g, criticality, 0.8, 0.0).exact, (std::vector<std::uint8_t>{1, 1, 0, 0}));
  EXPECT_EQ(take_blocks_by_top_p(g, criticality, 0.81, 0.0).exact, (std::vector<std::uint8_t>{1, 1, 1, 0}));
  EXPECT_EQ(take_blocks_by_top_p(g, criticality, 0.1, 0.0).exact, (std::vector<std::uint8_t>{1, 0, 0, 0}));
  EXPECT_EQ(take_blocks_by_top_p(g, criticality, 0.1, 0.75).exact, (std::vector<std::uint8_t>{1, 1, 1, 0}));
}

TEST(Policies, ErrorAwareRanksByErrorPerCost) {
  BlockStatistics stats;
  stats.grid = grid({10}, {1, 100});
  stats.criticality = {0.01, 0.99};           // SVG2 would take the big block
  stats.compensation_error = {5.0, 50.0};      // per pair: 0.5 vs 0.05
  SelectionBudget budget;
  budget.density = 0.005;
  auto select = [&](SelectionPolicyKind kind) {
    return take_blocks_by_priority(stats.grid, make_selection_policy(kind)->block_priority(stats), budget).exact;
  };
  EXPECT_EQ(select(SelectionPolicyKind::error_aware), (std::vector<std::uint8_t>{1, 0}));
  EXPECT_EQ(select(SelectionPolicyKind::criticality), (std::vector<std::uint8_t>{0, 1}));
}

TEST(Policies, CallWideBudgetLetsHeadsCompete) {
  // Head 0's blocks all outrank head 1's: a shared budget goes to head 0 first, and the floor
  // (drop mode) still gives head 1's query cluster one block.
  const std::vector<BlockGrid> grids = {grid({10}, {10, 10}), grid({10}, {10, 10})};
  const std::vector<std::vector<double>> priorities = {{0.9, 0.8}, {0.2, 0.1}};
  SelectionBudget budget;
  budget.density = 0.5;  // 200 of 400 pairs
  std::vector<BlockSelection> s = take_blocks_by_priority(grids, priorities, budget);
  EXPECT_EQ(s[0].exact, (std::vector<std::uint8_t>{1, 1}));
  EXPECT_EQ(s[1].exact, (std::vector<std::uint8_t>{0, 0}));
  budget.every_query_cluster_needs_a_block = true;
  s = take_blocks_by_priority(grids, priorities, budget);
  EXPECT_EQ(s[0].exact, (std::vector<std::uint8_t>{1, 0}));
  EXPECT_EQ(s[1].exact, (std::vector<std::uint8_t>{1, 0}));
  // Ties across heads: the lower head first.
  const std::vector<std::vector<double>> ties = {{0.5, 0.5}, {0.5, 0.5}};
  budget.every_query_cluster_needs_a_block = false;
  budget.density = 0.25;
  s = take_blocks_by_priority(grids, ties, budget);
  EXPECT_EQ(s[0].exact, (std::vector<std::uint8_t>{1, 0}));
  EXPECT_EQ(s[1].exact_pairs, 0);
}
