// Tokens sorted by cluster label so each cluster is one contiguous block. Attention is
// permutation-equivariant, so permuting Q (and K with V) and un-permuting the output is exact.
#pragma once

#include <cstdint>
#include <vector>

namespace svgear::cpu {

struct ClusterLayout {
  std::vector<std::int64_t> order;    // [n]: permuted position -> original token index
  std::vector<std::int64_t> offsets;  // [clusters + 1]: cluster c occupies [offsets[c], offsets[c+1])

  int clusters() const { return int(offsets.size()) - 1; }
  std::int64_t size(int cluster) const { return offsets[std::size_t(cluster) + 1] - offsets[std::size_t(cluster)]; }
};

// Stable counting sort of the labels (tokens of a cluster keep their original order).
ClusterLayout cluster_layout(const std::vector<std::int32_t>& labels, int clusters);

// dst[p] = src[order[p]] for rows of `d` floats.
void gather_rows(const float* src, std::int64_t d, const ClusterLayout& layout, float* dst);

// dst[order[p]] = src[p]: the inverse of gather_rows.
void scatter_rows(const float* src, std::int64_t d, const ClusterLayout& layout, float* dst);

}  // namespace svgear::cpu
