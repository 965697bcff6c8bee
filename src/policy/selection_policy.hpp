// Selection policies: which blocks a method computes exactly. One interface for every method
// (SVG2, SVG-EAR now; SVOO, Sparge, SVG1 later): block statistics and a budget in, a block
// selection out. Compensation of the rest is a separate switch, so no policy touches the kernel.
#pragma once

#include <memory>
#include <optional>
#include <span>

#include "core/blocks.hpp"
#include "svgear/config.hpp"

namespace svgear {

struct SelectionBudget {
  double density = 1.0;               // fraction of pairs to compute exactly
  std::optional<double> top_p;        // SVG2's per-row cumulative-mass mode instead of density
  double min_key_fraction = 0.0;      // top-p mode: floor of key clusters per query cluster
  // With drop compensation a query cluster without a selected block would have no keys at
  // all, so each one first gets its highest-priority block.
  bool every_query_cluster_needs_a_block = false;
};

class SelectionPolicy {
 public:
  virtual ~SelectionPolicy() = default;
  // Whether select() reads BlockStatistics::compensation_error (the EAR probe).
  virtual bool needs_error_probe() const { return false; }
  virtual BlockSelection select(const BlockStatistics& stats, const SelectionBudget& budget) const = 0;
};

std::unique_ptr<SelectionPolicy> make_selection_policy(SelectionPolicyKind kind);

// Blocks in descending `priority` (ties: lower index first) until the exactly computed pairs
// reach budget.density of all pairs, so the result overshoots by less than one block. Empty
// blocks are never selected.
BlockSelection take_blocks_by_priority(const BlockGrid& grid, std::span<const double> priority,
                                       const SelectionBudget& budget);

// SVG2's top-p rule: per query cluster, key clusters in descending criticality until the
// cumulative mass reaches top_p, and at least ceil(min_key_fraction * C_k) of them.
BlockSelection take_blocks_by_top_p(const BlockGrid& grid, std::span<const double> criticality,
                                    double top_p, double min_key_fraction);

}  // namespace svgear
