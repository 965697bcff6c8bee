// Query clusters trimmed to the attention kernel's row tiles. The CUDA kernel computes a query
// cluster of n rows as ceil(n / 64) tiles of 64 rows (wgmma's M), so a cluster of 64 t + r rows
// with a small tail r pays a whole tile for r rows: at Wan2.1-1.3B's 256 query clusters that
// padding is 23 % of the rows the kernel computes (docs/PERF_NOTES.md). This step, between
// k-means' last assignment and its last update, hands such a tail to the rows' second-nearest
// clusters where their last tile has room, cheapest rows first, so both the donor and the
// receivers end with no more tiles than before and the donor with one tile fewer. The rows moved
// are those nearly equidistant from two centroids (the regret d2 - d1 is smallest), so the
// clustering objective grows by a fraction of a percent (measured on the built-in workload).
//
// The rule, which the CUDA twin (src/cuda/tile_alignment.cu) follows decision for decision:
//  - n_c = size of cluster c, r_c = n_c mod kQueryTileRows.
//  - c is a donor when n_c > kQueryTileRows and 1 <= r_c <= tail_limit (a donor keeps >= 1 tile).
//  - c receives when it is not a donor and r_c > 0, with room kQueryTileRows - r_c (fixed roles:
//    a receiver never donates, so filling it never costs a tile).
//  - A donor's candidates are its rows whose runner-up cluster receives, in ascending (regret,
//    row); it considers the first kTailCandidates of them.
//  - Donors go in ascending (r_c, c). Each walks its candidates, taking a row when its runner-up
//    still has room (one unit of room per row), until it has r_c rows; if it gets r_c, the rows
//    move to their runner-ups, else nothing moves and the room is given back.
#pragma once

#include <cstdint>
#include <vector>

#include "core/host_device.hpp"

namespace svgear::cpu {

// The attention kernels' query tile (the CUDA kernel's wgmma M): the unit the alignment counts.
inline constexpr int kQueryTileRows = 64;
// Candidates a donor considers (the CUDA twin holds two per lane of a warp).
inline constexpr int kTailCandidates = 64;
// The largest tail limit (MethodConfig::query_tail_limit), and the most clusters the CUDA walk
// takes (it keeps two ints per cluster in shared memory).
inline constexpr int kMaxTailLimit = 32;
inline constexpr int kMaxAlignedClusters = 16384;

struct TileAlignment {
  int tail_limit = 0;  // largest tail a cluster hands on, at most kMaxTailLimit; 0: off
};

// A cluster's part in the alignment, from its size alone: the rule's first two points above.
struct ClusterRole {
  int tail = 0;        // size mod kQueryTileRows
  bool donor = false;  // hands its tail on
  int room = 0;        // rows it can take without a new tile (receivers only)
};

SVGEAR_HOST_DEVICE inline ClusterRole cluster_role(std::int64_t size, int tail_limit) {
  ClusterRole role;
  role.tail = int(size % kQueryTileRows);
  role.donor = size > kQueryTileRows && role.tail >= 1 && role.tail <= tail_limit;
  role.room = !role.donor && role.tail > 0 ? kQueryTileRows - role.tail : 0;
  return role;
}

// What the last assignment knew besides the nearest centroid: for every point, the nearest
// other centroid and how much farther it is (squared distances, >= 0).
struct RunnerUps {
  std::vector<std::int32_t> labels;
  std::vector<float> regrets;
};

// Moves tails as the rule above says; labels change in place. Returns the rows moved.
std::int64_t align_clusters_to_tiles(std::vector<std::int32_t>& labels, const RunnerUps& runner_ups, int clusters,
                                     const TileAlignment& alignment);

// Tiles of tile_rows rows the clusters of `labels` take: sum over c of ceil(n_c / tile_rows).
std::int64_t count_row_tiles(const std::vector<std::int32_t>& labels, int clusters, int tile_rows);

}  // namespace svgear::cpu
