// The tile alignment of query clusters (cpu::align_clusters_to_tiles, whose comment states the
// rule) for every head at once, decision for decision as the CPU takes them:
//  1. every position of the cluster layout gets a sort key, its row's regret where the row is a
//     candidate (its cluster donates, its runner-up receives) and ~0 otherwise, and a value
//     (runner-up << 32 | row);
//  2. a stable segmented sort orders each donor's rows by (regret, row) (the layout keeps rows
//     ascending within a cluster), the non-candidates last; other clusters are empty segments;
//  3. one CTA per head orders its donors by (tail, cluster), stages the first kTailCandidates
//     sorted entries of 32 donors at a time in shared memory, and one warp walks the donors in
//     order, each lane holding a candidate: a lane takes its row when its rank among the earlier
//     lanes with the same runner-up is below that cluster's room, and the first `tail` such rows
//     move if there are that many (else the donor's room is handed back).
// The sort and the walk touch only donors' rows (a few percent of a head's rows move).
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>
#include <algorithm>
#include <cstdint>
#include <string>

#include "cpu/tile_alignment.hpp"
#include "cuda/device_buffer.hpp"
#include "cuda/device_common.cuh"
#include "cuda/stages.hpp"

namespace svgear::cuda {

namespace {

using detail::as_stream;
using detail::for_each_index;
using detail::grid_for;

constexpr int kTileRows = cpu::kQueryTileRows;
constexpr int kCandidates = cpu::kTailCandidates;
using cpu::kMaxAlignedClusters;
static_assert(kCandidates == 64, "the walk holds two candidates per lane");
constexpr int kDonorBatch = 32;  // donors staged in shared memory at a time
constexpr int kWalkThreads = 256;
constexpr std::uint32_t kNotACandidate = 0xFFFFFFFFu;
constexpr std::uint64_t kNoEntry = ~std::uint64_t(0);

using cpu::cluster_role;
using cpu::ClusterRole;

__device__ __forceinline__ std::int32_t cluster_size(const std::int32_t* offsets, int c) {
  return offsets[c + 1] - offsets[c];
}

// Step 1: keys and values of every layout position; segments of the donors' positions.
__global__ void tail_candidate_keys(std::int64_t heads_total, std::int64_t tokens, int clusters, int tail_limit,
                                    const std::int32_t* labels, const std::int32_t* order,
                                    const std::int32_t* offsets, const std::int32_t* runner_up,
                                    const float* regret, std::uint32_t* keys, std::uint64_t* values) {
  for_each_index(heads_total * tokens, [&](std::int64_t i) {
    const std::int64_t bh = i / tokens;
    const std::int32_t* head_offsets = offsets + bh * (clusters + 1);
    const std::int64_t row = bh * tokens + order[i];
    const std::int32_t own = labels[row], next = runner_up[row];
    const bool candidate = cluster_role(cluster_size(head_offsets, own), tail_limit).donor &&
                           cluster_role(cluster_size(head_offsets, next), tail_limit).room > 0;
    const float r = regret[row];
    // Non-negative floats order as their bits; +0 for -0 (equal regrets keep row order).
    keys[i] = candidate ? (r > 0.0f ? __float_as_uint(r) : 0u) : kNotACandidate;
    values[i] = candidate ? (std::uint64_t(std::uint32_t(next)) << 32) | std::uint32_t(order[i]) : kNoEntry;
  });
}

__global__ void donor_segments(std::int64_t heads_total, std::int64_t tokens, int clusters, int tail_limit,
                               const std::int32_t* offsets, std::int64_t* begins, std::int64_t* ends) {
  for_each_index(heads_total * clusters, [&](std::int64_t i) {
    const std::int64_t bh = i / clusters;
    const int c = int(i % clusters);
    const std::int32_t* head_offsets = offsets + bh * (clusters + 1);
    const std::int64_t begin = bh * tokens + head_offsets[c];
    begins[i] = begin;
    ends[i] = cluster_role(cluster_size(head_offsets, c), tail_limit).donor ? bh * tokens + head_offsets[c + 1] : begin;
  });
}

// Step 3. Dynamic shared memory: room[C] and donors[C] (ints), then the staged candidates.
__global__ void __launch_bounds__(kWalkThreads)
    move_tails(std::int64_t tokens, int clusters, int tail_limit, const std::int32_t* offsets,
               const std::uint64_t* sorted_values, std::int32_t* labels, std::int32_t* moved) {
  using Scan = cub::BlockScan<int, kWalkThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ std::uint64_t staged[kDonorBatch][kCandidates];
  extern __shared__ int dynamic_ints[];
  int* room = dynamic_ints;              // [C]
  int* donors = dynamic_ints + clusters;  // [C], in (tail, cluster) order

  const std::int64_t bh = blockIdx.x;
  const std::int32_t* head_offsets = offsets + bh * (clusters + 1);
  std::int32_t* head_labels = labels + bh * tokens;
  for (int c = threadIdx.x; c < clusters; c += kWalkThreads) {
    room[c] = cluster_role(cluster_size(head_offsets, c), tail_limit).room;
  }
  // Donors by ascending tail, then cluster: one stable compaction per tail value.
  int count = 0;  // uniform
  for (int tail = 1; tail <= tail_limit; ++tail) {
    for (int first = 0; first < clusters; first += kWalkThreads) {
      const int c = first + int(threadIdx.x);
      int flag = 0;
      if (c < clusters) {
        const ClusterRole role = cluster_role(cluster_size(head_offsets, c), tail_limit);
        flag = role.donor && role.tail == tail;
      }
      int position = 0, found = 0;
      Scan(scan_storage).ExclusiveSum(flag, position, found);
      if (flag) donors[count + position] = c;
      count += found;
      __syncthreads();  // scan_storage is reused
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned earlier = (1u << lane) - 1u;
  int moved_rows = 0;
  for (int batch = 0; batch < count; batch += kDonorBatch) {
    __syncthreads();  // donors written; the previous batch walked
    const int in_batch = min(kDonorBatch, count - batch);
    for (int idx = threadIdx.x; idx < in_batch * kCandidates; idx += kWalkThreads) {
      const int k = idx / kCandidates, j = idx % kCandidates, c = donors[batch + k];
      // A donor has more than kTileRows >= kCandidates rows, so all j are inside its segment.
      staged[k][j] = sorted_values[bh * tokens + head_offsets[c] + j];
    }
    __syncthreads();
    if (warp != 0) continue;
    for (int k = 0; k < in_batch; ++k) {
      const int c = donors[batch + k];
      const int tail = cluster_role(cluster_size(head_offsets, c), tail_limit).tail;
      int taken = 0;
      bool took[2] = {false, false};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (taken == tail) break;  // uniform
        const std::uint64_t entry = staged[k][32 * half + lane];
        const bool valid = entry != kNoEntry;
        const int next = valid ? int(entry >> 32) : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, next);
        const bool accepted = valid && __popc(peers & earlier) < room[next >= 0 ? next : 0];
        const unsigned accepted_lanes = __ballot_sync(0xffffffffu, accepted);
        took[half] = accepted && taken + __popc(accepted_lanes & earlier) < tail;
        taken += __popc(__ballot_sync(0xffffffffu, took[half]));
        __syncwarp();  // every lane read room before any takes a unit of it
        if (took[half]) atomicSub(&room[next], 1);
        __syncwarp();
      }
      const bool complete = taken == tail;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (!took[half]) continue;
        const std::uint64_t entry = staged[k][32 * half + lane];
        const int next = int(entry >> 32);
        if (complete) {
          head_labels[std::uint32_t(entry)] = next;
        } else {
          atomicAdd(&room[next], 1);
        }
      }
      if (complete) moved_rows += tail;
      __syncwarp();
    }
  }
  if (moved != nullptr && threadIdx.x == 0) moved[bh] = moved_rows;
}

}  // namespace

void align_clusters_to_tiles(std::int64_t heads_total, std::int64_t tokens, int clusters, int tail_limit,
                             std::int32_t* labels, const DeviceLayout& layout, const DeviceRunnerUps& runner_ups,
                             std::int32_t* moved, void* stream) {
  if (tail_limit < 0 || tail_limit >= kTileRows) {
    throw Error("align_clusters_to_tiles: tail limit " + std::to_string(tail_limit) + " is outside [0, " +
                std::to_string(kTileRows - 1) + "]");
  }
  if (labels == nullptr || layout.order == nullptr || layout.offsets == nullptr || runner_ups.labels == nullptr ||
      runner_ups.regrets == nullptr) {
    throw Error("align_clusters_to_tiles: labels, the layout and the runner-ups must be device pointers, got a null one");
  }
  if (layout.clusters != clusters || clusters < 1 || clusters > kMaxAlignedClusters || heads_total < 1 || tokens < 1 ||
      tokens > INT32_MAX) {
    throw Error("align_clusters_to_tiles: needs 1 to " + std::to_string(kMaxAlignedClusters) +
                " clusters, as many as the layout's (got " + std::to_string(clusters) + " and " +
                std::to_string(layout.clusters) + "), at least one head and 1 to 2^31 - 1 tokens (got " +
                std::to_string(heads_total) + " and " + std::to_string(tokens) + ")");
  }
  const cudaStream_t s = as_stream(stream);
  if (tail_limit == 0) {
    if (moved != nullptr) {
      check_cuda(cudaMemsetAsync(moved, 0, sizeof(std::int32_t) * std::size_t(heads_total), s), "cudaMemsetAsync");
    }
    return;
  }
  const std::int64_t items = heads_total * tokens, segments = heads_total * clusters;
  DeviceBuffer<std::uint32_t> keys(std::size_t(items), s), sorted_keys(std::size_t(items), s);
  DeviceBuffer<std::uint64_t> values(std::size_t(items), s), sorted_values(std::size_t(items), s);
  DeviceBuffer<std::int64_t> begins(std::size_t(segments), s), ends(std::size_t(segments), s);
  tail_candidate_keys<<<grid_for(items, 256), 256, 0, s>>>(heads_total, tokens, clusters, tail_limit, labels,
                                                          layout.order, layout.offsets, runner_ups.labels,
                                                          runner_ups.regrets, keys.get(), values.get());
  check_launch("tail_candidate_keys");
  donor_segments<<<grid_for(segments, 256), 256, 0, s>>>(heads_total, tokens, clusters, tail_limit, layout.offsets,
                                                        begins.get(), ends.get());
  check_launch("donor_segments");

  std::size_t bytes = 0;
  check_cuda(cub::DeviceSegmentedSort::StableSortPairs(nullptr, bytes, keys.get(), sorted_keys.get(), values.get(),
                                                       sorted_values.get(), items, segments, begins.get(), ends.get(),
                                                       s),
             "cub::DeviceSegmentedSort::StableSortPairs (size query)");
  DeviceBuffer<unsigned char> temp(std::max<std::size_t>(bytes, 1), s);  // null would mean a size query
  check_cuda(cub::DeviceSegmentedSort::StableSortPairs(temp.get(), bytes, keys.get(), sorted_keys.get(), values.get(),
                                                       sorted_values.get(), items, segments, begins.get(), ends.get(),
                                                       s),
             "cub::DeviceSegmentedSort::StableSortPairs (tail candidates)");

  const int smem = int(2 * sizeof(int) * std::size_t(clusters));
  check_cuda(cudaFuncSetAttribute(move_tails, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute (move_tails shared memory)");
  move_tails<<<unsigned(heads_total), kWalkThreads, smem, s>>>(tokens, clusters, tail_limit, layout.offsets,
                                                               sorted_values.get(), labels, moved);
  check_launch("move_tails");
}

}  // namespace svgear::cuda
