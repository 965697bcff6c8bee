// The block grid of one (batch, head) after clustering: block (i, j) pairs query cluster i
// with key cluster j and costs n^Q_i * n^K_j query-key pairs when computed exactly.
#pragma once

#include <cstdint>
#include <vector>

namespace svgear {

struct BlockGrid {
  std::vector<std::int64_t> q_sizes;  // [C_q]
  std::vector<std::int64_t> k_sizes;  // [C_k]

  int query_clusters() const { return int(q_sizes.size()); }
  int key_clusters() const { return int(k_sizes.size()); }
  std::size_t index(int i, int j) const { return std::size_t(i) * k_sizes.size() + std::size_t(j); }
  std::int64_t cost(int i, int j) const { return q_sizes[std::size_t(i)] * k_sizes[std::size_t(j)]; }
  std::int64_t total_pairs() const {
    std::int64_t sq = 0, sk = 0;
    for (auto n : q_sizes) sq += n;
    for (auto n : k_sizes) sk += n;
    return sq * sk;
  }
};

// What a selection policy sees.
struct BlockStatistics {
  BlockGrid grid;
  // P_ij: estimated share of a cluster-i query's attention mass on key cluster j (rows sum
  // to 1 over non-empty key clusters). ALGORITHMS.md "Common stages" 3.
  std::vector<double> criticality;
  // Probed compensation error of block (i, j): the squared output error its n^Q_i queries
  // would suffer if the block were compensated instead of computed (empty unless the policy
  // asked for the probe).
  std::vector<double> compensation_error;
};

// Which blocks are computed exactly; every other block is dropped or compensated.
struct BlockSelection {
  std::vector<std::uint8_t> exact;  // [C_q * C_k], row-major like BlockGrid::index
  std::int64_t exact_pairs = 0;
  std::int64_t selected_blocks = 0;
};

}  // namespace svgear
