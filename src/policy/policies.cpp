// The selection policies of the published methods.
#include <vector>

#include "policy/selection_policy.hpp"

namespace svgear {

namespace {

class AllBlocksPolicy final : public SelectionPolicy {
 public:
  BlockSelection select(const BlockStatistics& stats, const SelectionBudget&) const override {
    SelectionBudget everything;
    everything.density = 1.0;
    const std::vector<double> flat(stats.criticality.size(), 1.0);
    return take_blocks_by_priority(stats.grid, flat, everything);
  }
};

// SVG2: compute where the centroid scores put the attention mass.
class CriticalityPolicy final : public SelectionPolicy {
 public:
  BlockSelection select(const BlockStatistics& stats, const SelectionBudget& budget) const override {
    if (budget.top_p) {
      return take_blocks_by_top_p(stats.grid, stats.criticality, *budget.top_p, budget.min_key_fraction);
    }
    return take_blocks_by_priority(stats.grid, stats.criticality, budget);
  }
};

// SVG-EAR: compute where compensation would err most per pair computed. The probe's error is
// already the block's total (n^Q_i queries), so dividing by the cost n^Q_i n^K_j gives the
// error removed per exactly computed pair.
class ErrorAwarePolicy final : public SelectionPolicy {
 public:
  bool needs_error_probe() const override { return true; }
  BlockSelection select(const BlockStatistics& stats, const SelectionBudget& budget) const override {
    const BlockGrid& grid = stats.grid;
    std::vector<double> error_per_cost(stats.compensation_error.size(), 0.0);
    for (int i = 0; i < grid.query_clusters(); ++i) {
      for (int j = 0; j < grid.key_clusters(); ++j) {
        const std::int64_t cost = grid.cost(i, j);
        if (cost > 0) error_per_cost[grid.index(i, j)] = stats.compensation_error[grid.index(i, j)] / double(cost);
      }
    }
    return take_blocks_by_priority(grid, error_per_cost, budget);
  }
};

}  // namespace

std::unique_ptr<SelectionPolicy> make_selection_policy(SelectionPolicyKind kind) {
  switch (kind) {
    case SelectionPolicyKind::all_blocks: return std::make_unique<AllBlocksPolicy>();
    case SelectionPolicyKind::criticality: return std::make_unique<CriticalityPolicy>();
    case SelectionPolicyKind::error_aware: return std::make_unique<ErrorAwarePolicy>();
  }
  return nullptr;
}

}  // namespace svgear
