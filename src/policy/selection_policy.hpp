// Selection policies: which blocks a method computes exactly. One interface for every method
// (SVG2, SVG-EAR now; SVOO, Sparge, SVG1 later): block statistics and a budget in, a block
// selection out. Compensation of the rest is a separate switch, so no policy touches the kernel.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "core/blocks.hpp"
#include "svgear/config.hpp"

namespace svgear {

struct SelectionBudget {
  double density = 1.0;  // fraction of pairs to compute exactly
  // With drop compensation a query cluster without a selected block would have no keys at
  // all, so each one first gets its highest-priority block.
  bool every_query_cluster_needs_a_block = false;
};

// A policy orders blocks: the budget is then spent in that order, over one head or over all
// heads of a call at once (so routing can give a hard head more exact blocks than an easy one).
class SelectionPolicy {
 public:
  virtual ~SelectionPolicy() = default;
  // Whether block_priority() reads BlockStatistics::compensation_error (the EAR probe).
  virtual bool needs_error_probe() const { return false; }
  // [C_q * C_k]: higher is computed first. Comparable across heads.
  virtual std::vector<double> block_priority(const BlockStatistics& stats) const = 0;
};

std::unique_ptr<SelectionPolicy> make_selection_policy(SelectionPolicyKind kind);

// Blocks of all the given heads in descending priority (ties: lower head, then lower block
// index first) until the exactly computed pairs reach budget.density of all their pairs, so the
// total overshoots by less than one block. Empty blocks are never selected. Returns one
// selection per head.
std::vector<BlockSelection> take_blocks_by_priority(std::span<const BlockGrid> grids,
                                                    std::span<const std::vector<double>> priorities,
                                                    const SelectionBudget& budget);

// The same for one head.
BlockSelection take_blocks_by_priority(const BlockGrid& grid, std::span<const double> priority,
                                       const SelectionBudget& budget);

// SVG2's top-p rule: per query cluster, key clusters in descending criticality until the
// cumulative mass reaches top_p, and at least ceil(min_key_fraction * C_k) of them.
BlockSelection take_blocks_by_top_p(const BlockGrid& grid, std::span<const double> criticality,
                                    double top_p, double min_key_fraction);

}  // namespace svgear
