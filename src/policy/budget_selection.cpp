#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "policy/selection_policy.hpp"

namespace svgear {

namespace {

void mark(const BlockGrid& grid, int i, int j, BlockSelection& selection) {
  std::uint8_t& flag = selection.exact[grid.index(i, j)];
  if (flag) return;
  flag = 1;
  selection.exact_pairs += grid.cost(i, j);
  ++selection.selected_blocks;
}

BlockSelection empty_selection(const BlockGrid& grid) {
  BlockSelection selection;
  selection.exact.assign(std::size_t(grid.query_clusters()) * std::size_t(grid.key_clusters()), 0);
  return selection;
}

// Indices of `values` in descending order, ties broken by the lower index (deterministic).
std::vector<std::size_t> descending_order(std::span<const double> values) {
  std::vector<std::size_t> order(values.size());
  std::iota(order.begin(), order.end(), std::size_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return values[a] > values[b]; });
  return order;
}

}  // namespace

std::vector<BlockSelection> take_blocks_by_priority(std::span<const BlockGrid> grids,
                                                    std::span<const std::vector<double>> priorities,
                                                    const SelectionBudget& budget) {
  struct Candidate {
    double priority;
    std::uint32_t head;
    std::uint32_t block;
  };
  std::vector<Candidate> candidates;
  std::vector<BlockSelection> selections;
  std::int64_t total_pairs = 0;
  for (std::size_t head = 0; head < grids.size(); ++head) {
    const BlockGrid& grid = grids[head];
    selections.push_back(empty_selection(grid));
    total_pairs += grid.total_pairs();
    for (int i = 0; i < grid.query_clusters(); ++i) {
      for (int j = 0; j < grid.key_clusters(); ++j) {
        if (grid.cost(i, j) == 0) continue;  // empty blocks are never selected
        candidates.push_back({priorities[head][grid.index(i, j)], std::uint32_t(head), std::uint32_t(grid.index(i, j))});
      }
    }
  }
  // Candidates are in (head, block) order already, so a stable sort breaks ties by that.
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& a, const Candidate& b) { return a.priority > b.priority; });
  std::int64_t taken = 0;
  auto take = [&](const Candidate& c) {
    const BlockGrid& grid = grids[c.head];
    const int ck = grid.key_clusters();
    const std::int64_t before = selections[c.head].exact_pairs;
    mark(grid, int(c.block / std::uint32_t(ck)), int(c.block % std::uint32_t(ck)), selections[c.head]);
    taken += selections[c.head].exact_pairs - before;
  };
  if (budget.every_query_cluster_needs_a_block) {
    std::vector<std::vector<bool>> covered;
    for (const BlockGrid& grid : grids) covered.emplace_back(std::size_t(grid.query_clusters()), false);
    for (const Candidate& c : candidates) {
      const std::size_t row = c.block / std::uint32_t(grids[c.head].key_clusters());
      if (covered[c.head][row]) continue;
      covered[c.head][row] = true;
      take(c);
    }
  }
  // Integer target: compare pairs exactly, no rounding of the density across the loop.
  const auto target = std::int64_t(std::ceil(budget.density * double(total_pairs)));
  for (const Candidate& c : candidates) {
    if (taken >= target) break;
    take(c);
  }
  return selections;
}

BlockSelection take_blocks_by_priority(const BlockGrid& grid, std::span<const double> priority,
                                       const SelectionBudget& budget) {
  const std::vector<double> copy(priority.begin(), priority.end());
  return take_blocks_by_priority(std::span<const BlockGrid>(&grid, 1), std::span<const std::vector<double>>(&copy, 1),
                                 budget)
      .front();
}

BlockSelection take_blocks_by_top_p(const BlockGrid& grid, std::span<const double> criticality,
                                    double top_p, double min_key_fraction) {
  BlockSelection selection = empty_selection(grid);
  const int ck = grid.key_clusters();
  const auto floor_count = std::int64_t(std::ceil(min_key_fraction * ck));
  for (int i = 0; i < grid.query_clusters(); ++i) {
    if (grid.q_sizes[std::size_t(i)] == 0) continue;
    const std::span<const double> row = criticality.subspan(grid.index(i, 0), std::size_t(ck));
    double mass = 0;
    std::int64_t taken = 0;
    for (std::size_t j : descending_order(row)) {
      if (grid.k_sizes[j] == 0) continue;
      // Stop once both the mass target and the floor are met; always take at least one.
      if (taken > 0 && mass >= top_p && taken >= floor_count) break;
      mark(grid, i, int(j), selection);
      mass += row[j];
      ++taken;
    }
  }
  return selection;
}

}  // namespace svgear
