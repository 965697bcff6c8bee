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

BlockSelection take_blocks_by_priority(const BlockGrid& grid, std::span<const double> priority,
                                       const SelectionBudget& budget) {
  BlockSelection selection = empty_selection(grid);
  const int ck = grid.key_clusters();
  const std::vector<std::size_t> order = descending_order(priority);
  if (budget.every_query_cluster_needs_a_block) {
    std::vector<bool> covered(std::size_t(grid.query_clusters()), false);
    for (std::size_t block : order) {
      const int i = int(block / std::size_t(ck)), j = int(block % std::size_t(ck));
      if (covered[std::size_t(i)] || grid.cost(i, j) == 0) continue;
      covered[std::size_t(i)] = true;
      mark(grid, i, j, selection);
    }
  }
  // Integer target: compare pairs exactly, no rounding of the density across the loop.
  const auto target = std::int64_t(std::ceil(budget.density * double(grid.total_pairs())));
  for (std::size_t block : order) {
    if (selection.exact_pairs >= target) break;
    const int i = int(block / std::size_t(ck)), j = int(block % std::size_t(ck));
    if (grid.cost(i, j) > 0) mark(grid, i, j, selection);
  }
  return selection;
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
