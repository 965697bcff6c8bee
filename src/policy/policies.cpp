// The selection policies of the published methods.
#include <vector>

#include "policy/selection_policy.hpp"

namespace svgear {

namespace {

// Dense through the block machinery: every block ties, and the pipeline's budget is 1.
class AllBlocksPolicy final : public SelectionPolicy {
 public:
  std::vector<double> block_priority(const BlockStatistics& stats) const override {
    return std::vector<double>(stats.criticality.size(), 1.0);
  }
};

// SVG2: compute where the centroid scores put the attention mass.
class CriticalityPolicy final : public SelectionPolicy {
 public:
  std::vector<double> block_priority(const BlockStatistics& stats) const override { return stats.criticality; }
};

// SVG-EAR: compute where compensation would err most per pair computed. The probe's error is
// already the block's total (n^Q_i queries), so dividing by the cost n^Q_i n^K_j gives the
// error removed per exactly computed pair.
class ErrorAwarePolicy final : public SelectionPolicy {
 public:
  bool needs_error_probe() const override { return true; }
  std::vector<double> block_priority(const BlockStatistics& stats) const override {
    const BlockGrid& grid = stats.grid;
    std::vector<double> error_per_cost(stats.compensation_error.size(), 0.0);
    for (int i = 0; i < grid.query_clusters(); ++i) {
      for (int j = 0; j < grid.key_clusters(); ++j) {
        const std::int64_t cost = grid.cost(i, j);
        if (cost > 0) error_per_cost[grid.index(i, j)] = stats.compensation_error[grid.index(i, j)] / double(cost);
      }
    }
    return error_per_cost;
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
