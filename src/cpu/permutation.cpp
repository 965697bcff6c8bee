#include "cpu/permutation.hpp"

#include <cstring>

namespace svgear::cpu {

ClusterLayout cluster_layout(const std::vector<std::int32_t>& labels, int clusters) {
  ClusterLayout layout;
  layout.offsets.assign(std::size_t(clusters) + 1, 0);
  for (std::int32_t label : labels) ++layout.offsets[std::size_t(label) + 1];
  for (int c = 0; c < clusters; ++c) layout.offsets[std::size_t(c) + 1] += layout.offsets[std::size_t(c)];
  std::vector<std::int64_t> next(layout.offsets.begin(), layout.offsets.end() - 1);
  layout.order.resize(labels.size());
  for (std::size_t token = 0; token < labels.size(); ++token) {
    layout.order[std::size_t(next[std::size_t(labels[token])]++)] = std::int64_t(token);
  }
  return layout;
}

void gather_rows(const float* src, std::int64_t d, const ClusterLayout& layout, float* dst) {
  const std::int64_t n = std::int64_t(layout.order.size());
#pragma omp parallel for schedule(static)
  for (std::int64_t p = 0; p < n; ++p) {
    std::memcpy(dst + p * d, src + layout.order[std::size_t(p)] * d, sizeof(float) * std::size_t(d));
  }
}

void scatter_rows(const float* src, std::int64_t d, const ClusterLayout& layout, float* dst) {
  const std::int64_t n = std::int64_t(layout.order.size());
#pragma omp parallel for schedule(static)
  for (std::int64_t p = 0; p < n; ++p) {
    std::memcpy(dst + layout.order[std::size_t(p)] * d, src + p * d, sizeof(float) * std::size_t(d));
  }
}

}  // namespace svgear::cpu
