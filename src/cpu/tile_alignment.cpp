#include "cpu/tile_alignment.hpp"

#include <algorithm>

namespace svgear::cpu {

namespace {

std::vector<std::int64_t> cluster_sizes(const std::vector<std::int32_t>& labels, int clusters) {
  std::vector<std::int64_t> sizes(std::size_t(clusters), 0);
  for (std::int32_t label : labels) ++sizes[std::size_t(label)];
  return sizes;
}

}  // namespace

std::int64_t align_clusters_to_tiles(std::vector<std::int32_t>& labels, const RunnerUps& runner_ups, int clusters,
                                     const TileAlignment& alignment) {
  if (alignment.tail_limit <= 0) return 0;
  const std::vector<std::int64_t> sizes = cluster_sizes(labels, clusters);
  std::vector<std::int64_t> tail(sizes.size()), room(sizes.size());
  std::vector<char> donor(sizes.size());
  for (std::size_t c = 0; c < sizes.size(); ++c) {
    const ClusterRole role = cluster_role(sizes[c], alignment.tail_limit);
    tail[c] = role.tail;
    donor[c] = role.donor;
    room[c] = role.room;
  }

  // Every donor's candidates, cheapest first (rows ascend within a cluster, so a stable sort by
  // regret gives the (regret, row) order).
  std::vector<std::vector<std::int64_t>> candidates(sizes.size());
  for (std::int64_t i = 0; i < std::int64_t(labels.size()); ++i) {
    const std::int32_t c = labels[std::size_t(i)];
    if (donor[std::size_t(c)] && room[std::size_t(runner_ups.labels[std::size_t(i)])] > 0) {
      candidates[std::size_t(c)].push_back(i);
    }
  }
  std::vector<int> donors;
  for (int c = 0; c < clusters; ++c) {
    if (donor[std::size_t(c)]) donors.push_back(c);
  }
  std::stable_sort(donors.begin(), donors.end(), [&](int a, int b) { return tail[std::size_t(a)] < tail[std::size_t(b)]; });

  std::int64_t moved = 0;
  std::vector<std::int64_t> taken;
  for (int c : donors) {
    std::vector<std::int64_t>& list = candidates[std::size_t(c)];
    std::stable_sort(list.begin(), list.end(), [&](std::int64_t a, std::int64_t b) {
      return runner_ups.regrets[std::size_t(a)] < runner_ups.regrets[std::size_t(b)];
    });
    if (list.size() > std::size_t(kTailCandidates)) list.resize(std::size_t(kTailCandidates));
    taken.clear();
    for (std::int64_t i : list) {
      if (std::int64_t(taken.size()) == tail[std::size_t(c)]) break;
      std::int64_t& free_rows = room[std::size_t(runner_ups.labels[std::size_t(i)])];
      if (free_rows == 0) continue;
      --free_rows;
      taken.push_back(i);
    }
    if (std::int64_t(taken.size()) == tail[std::size_t(c)]) {
      for (std::int64_t i : taken) labels[std::size_t(i)] = runner_ups.labels[std::size_t(i)];
      moved += std::int64_t(taken.size());
    } else {
      for (std::int64_t i : taken) ++room[std::size_t(runner_ups.labels[std::size_t(i)])];
    }
  }
  return moved;
}

std::int64_t count_row_tiles(const std::vector<std::int32_t>& labels, int clusters, int tile_rows) {
  std::int64_t tiles = 0;
  for (std::int64_t size : cluster_sizes(labels, clusters)) tiles += (size + tile_rows - 1) / tile_rows;
  return tiles;
}

}  // namespace svgear::cpu
