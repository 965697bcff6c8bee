// Budgeted block selection (src/policy/budget_selection.cpp) on the device, and the CSR lists
// of selected and compensated key clusters the attention kernel reads.
//
// Density mode: a stable sort on descending float64 priority within each budget segment (all
// heads for BudgetScope::call, one head for BudgetScope::head), carrying the global flat index
// (bh * Cq * Ck + block), so ties keep the lower head, then the lower block, as the CPU's
// std::stable_sort over (head, block)-ordered candidates does. Then one inclusive scan of the
// costs in that order: the CPU loop takes block p iff its cost is non-zero and the pairs taken
// before it in its segment, floor blocks included, are still below the target; that running
// total is the floor's pairs plus the scan of the non-floor costs before p, so every block
// decides independently.
// Top-p mode: a stable segmented sort per row, then one thread walks each row exactly like the
// CPU loop (sequential float64 mass, so the comparisons with top_p are identical).
#include <cmath>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>
#include <limits>
#include <string>

#include "cuda/device_common.cuh"

namespace svgear::cuda {

namespace {

using namespace detail;

constexpr int kThreads = 256;

// The grid as kernels see it.
struct Grid {
  int query_clusters, key_clusters;
  const std::int32_t* q_offsets;
  const std::int32_t* k_offsets;

  __device__ std::int64_t q_size(std::int64_t bh, int i) const {
    const std::int32_t* o = q_offsets + bh * (query_clusters + 1);
    return o[i + 1] > o[i] ? o[i + 1] - o[i] : 0;
  }
  __device__ std::int64_t k_size(std::int64_t bh, int j) const {
    const std::int32_t* o = k_offsets + bh * (key_clusters + 1);
    return o[j + 1] > o[j] ? o[j + 1] - o[j] : 0;
  }
  __device__ std::int64_t blocks_per_head() const { return std::int64_t(query_clusters) * key_clusters; }
};

// ErrorAwarePolicy's division in float64, so a CPU run given the same float scores ranks alike.
__device__ __forceinline__ double block_priority(float score, std::int64_t cost, BlockScore kind) {
  if (kind == BlockScore::priority) return double(score);
  return cost > 0 ? double(score) / double(cost) : 0.0;
}

__global__ void priority_keys(Grid grid, std::int64_t total, const float* scores, BlockScore kind, double* keys,
                              std::int32_t* blocks) {
  const std::int64_t per_head = grid.blocks_per_head();
  for_each_index(total, [&](std::int64_t idx) {
    const std::int64_t bh = idx / per_head;
    const int block = int(idx % per_head);
    const int i = block / grid.key_clusters, j = block % grid.key_clusters;
    keys[idx] = block_priority(scores[idx], grid.q_size(bh, i) * grid.k_size(bh, j), kind);
    blocks[idx] = std::int32_t(idx);  // global, so ties across heads go to the lower head
  });
}

__global__ void segment_starts(std::int64_t segments, std::int64_t length, std::int64_t* starts) {
  for_each_index(segments + 1, [&](std::int64_t s) { starts[s] = s * length; });
}

// Drop mode's floor: per non-empty query cluster its highest-priority non-empty block (ties ->
// lower j, the first one the CPU meets in its stable order). One warp per row.
__global__ void take_floor_blocks(Grid grid, std::int64_t rows, const float* scores, BlockScore kind,
                                  std::int64_t heads_per_segment, std::uint8_t* exact,
                                  unsigned long long* floor_pairs) {
  const int lane = threadIdx.x % 32;
  const std::int64_t warps = std::int64_t(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t row = (blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x) / 32; row < rows; row += warps) {
    const std::int64_t bh = row / grid.query_clusters;
    const int i = int(row % grid.query_clusters);
    const std::int64_t nq = grid.q_size(bh, i);
    if (nq == 0) continue;
    double best = 0.0;
    int best_j = -1;
    for (int j = lane; j < grid.key_clusters; j += 32) {
      const std::int64_t nk = grid.k_size(bh, j);
      if (nk == 0) continue;
      const double key = block_priority(scores[row * grid.key_clusters + j], nq * nk, kind);
      if (best_j < 0 || key > best) {
        best = key;
        best_j = j;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const double other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_j = __shfl_xor_sync(0xffffffffu, best_j, offset);
      if (other_j >= 0 && (best_j < 0 || other > best || (other == best && other_j < best_j))) {
        best = other;
        best_j = other_j;
      }
    }
    if (lane == 0 && best_j >= 0) {
      exact[row * grid.key_clusters + best_j] = 1;
      atomicAdd(&floor_pairs[bh / heads_per_segment], static_cast<unsigned long long>(nq * grid.k_size(bh, best_j)));
    }
  }
}

// Cost of each block in sorted order; floor blocks (already taken) count 0 here.
__global__ void costs_in_order(Grid grid, std::int64_t total, const std::int32_t* sorted_blocks,
                               const std::uint8_t* exact, std::int64_t* costs) {
  const std::int64_t per_head = grid.blocks_per_head();
  for_each_index(total, [&](std::int64_t p) {
    const std::int64_t flat = sorted_blocks[p], bh = flat / per_head;
    const int block = int(flat % per_head);
    const int i = block / grid.key_clusters, j = block % grid.key_clusters;
    costs[p] = exact[flat] ? 0 : grid.q_size(bh, i) * grid.k_size(bh, j);
  });
}

__global__ void take_blocks_in_order(std::int64_t total, std::int64_t segment_length, const std::int32_t* sorted_blocks,
                                     const std::int64_t* costs, const std::int64_t* inclusive,
                                     const unsigned long long* floor_pairs, std::int64_t target, std::uint8_t* exact) {
  for_each_index(total, [&](std::int64_t p) {
    const std::int64_t segment = p / segment_length, segment_first = segment * segment_length;
    const std::int64_t before_segment = segment_first > 0 ? inclusive[segment_first - 1] : 0;
    const std::int64_t taken_before = std::int64_t(floor_pairs[segment]) + inclusive[p] - costs[p] - before_segment;
    if (costs[p] > 0 && taken_before < target) exact[sorted_blocks[p]] = 1;
  });
}

__global__ void row_keys(std::int64_t total, int key_clusters, const float* criticality, double* keys,
                         std::int32_t* columns) {
  for_each_index(total, [&](std::int64_t idx) {
    keys[idx] = double(criticality[idx]);
    columns[idx] = std::int32_t(idx % key_clusters);
  });
}

__global__ void take_top_p_rows(Grid grid, std::int64_t rows, const double* sorted_keys,
                                const std::int32_t* sorted_columns, double top_p, std::int64_t floor_count,
                                std::uint8_t* exact) {
  for_each_index(rows, [&](std::int64_t row) {
    const std::int64_t bh = row / grid.query_clusters;
    if (grid.q_size(bh, int(row % grid.query_clusters)) == 0) return;
    const std::int64_t first = row * grid.key_clusters;
    double mass = 0.0;
    std::int64_t taken = 0;
    for (int k = 0; k < grid.key_clusters; ++k) {
      const int j = sorted_columns[first + k];
      if (grid.k_size(bh, j) == 0) continue;
      if (taken > 0 && mass >= top_p && taken >= floor_count) break;
      exact[first + j] = 1;
      mass += sorted_keys[first + k];
      ++taken;
    }
  });
}

// Per row: selected count, compensated count, and the exact pairs added to its head.
__global__ void __launch_bounds__(kThreads)
    count_row_blocks(Grid grid, const std::uint8_t* exact, std::int32_t* selected_count,
                     std::int32_t* compensated_count, unsigned long long* exact_pairs) {
  using CountReduce = cub::BlockReduce<int, kThreads>;
  using PairReduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename CountReduce::TempStorage count_storage;
  __shared__ typename PairReduce::TempStorage pair_storage;
  const std::int64_t row = blockIdx.x;
  const std::int64_t bh = row / grid.query_clusters;
  const std::int64_t nq = grid.q_size(bh, int(row % grid.query_clusters));
  int selected = 0, compensated = 0;
  long long pairs = 0;
  for (int j = threadIdx.x; j < grid.key_clusters; j += kThreads) {
    const std::int64_t nk = grid.k_size(bh, j);
    const bool taken = exact[row * grid.key_clusters + j] != 0;
    selected += taken;
    compensated += !taken && nk > 0 && nq > 0;
    pairs += taken ? nq * nk : 0;
  }
  selected = CountReduce(count_storage).Sum(selected);
  __syncthreads();
  compensated = CountReduce(count_storage).Sum(compensated);
  pairs = PairReduce(pair_storage).Sum(pairs);
  if (threadIdx.x == 0) {
    selected_count[row] = selected;
    if (compensated_count != nullptr) compensated_count[row] = compensated;
    if (exact_pairs != nullptr) atomicAdd(&exact_pairs[bh], static_cast<unsigned long long>(pairs));
  }
}

// Writes each row's selected (and compensated) key clusters in ascending order.
__global__ void __launch_bounds__(kThreads)
    fill_row_lists(Grid grid, const std::uint8_t* exact, const std::int32_t* selected_offsets,
                   std::int32_t* selected_clusters, const std::int32_t* compensated_offsets,
                   std::int32_t* compensated_clusters) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  const std::int64_t row = blockIdx.x;
  const std::int64_t bh = row / grid.query_clusters;
  const std::int64_t nq = grid.q_size(bh, int(row % grid.query_clusters));
  int selected_base = selected_offsets[row];
  int compensated_base = compensated_offsets != nullptr ? compensated_offsets[row] : 0;
  for (int j0 = 0; j0 < grid.key_clusters; j0 += kThreads) {
    const int j = j0 + threadIdx.x;
    const bool in_row = j < grid.key_clusters;
    const bool taken = in_row && exact[row * grid.key_clusters + j] != 0;
    const bool compensated = in_row && !taken && nq > 0 && grid.k_size(bh, in_row ? j : 0) > 0;
    int position = 0, count = 0;
    Scan(storage).ExclusiveSum(int(taken), position, count);
    if (taken) selected_clusters[selected_base + position] = j;
    selected_base += count;
    __syncthreads();
    if (compensated_offsets != nullptr) {
      Scan(storage).ExclusiveSum(int(compensated), position, count);
      if (compensated) compensated_clusters[compensated_base + position] = j;
      compensated_base += count;
      __syncthreads();
    }
  }
}

void validate_selection(const DeviceBlockGrid& grid, const void* scores, const DeviceBlockSelection& out) {
  if (grid.heads_total < 1 || grid.query_clusters < 1 || grid.key_clusters < 1 || grid.query_tokens < 1 ||
      grid.key_tokens < 1) {
    throw Error("block selection: need at least one head, cluster and token of each kind");
  }
  if (grid.heads_total * grid.query_clusters * std::int64_t(grid.key_clusters) >
      std::numeric_limits<std::int32_t>::max()) {
    throw Error("block selection: batch * heads * Cq * Ck = " +
                std::to_string(grid.heads_total * grid.query_clusters * std::int64_t(grid.key_clusters)) +
                " exceeds the int32 CSR offsets: select fewer heads per call");
  }
  if (grid.q_offsets == nullptr || grid.k_offsets == nullptr || scores == nullptr || out.selected_offsets == nullptr ||
      out.selected_clusters == nullptr || (out.compensated_offsets != nullptr && out.compensated_clusters == nullptr)) {
    throw Error("block selection: offsets, scores and the selected lists must be device pointers, got a null one");
  }
}

// Flags in `exact`; lists, counts and pairs from them.
void build_row_lists(const DeviceBlockGrid& grid, const Grid& g, const std::uint8_t* exact,
                     const DeviceBlockSelection& out, cudaStream_t stream) {
  const std::int64_t rows = grid.heads_total * grid.query_clusters;
  const bool compensated = out.compensated_offsets != nullptr;
  DeviceBuffer<std::int32_t> counts(std::size_t(rows) * (compensated ? 2 : 1), stream);
  std::int32_t* selected_count = counts.get();
  std::int32_t* compensated_count = compensated ? selected_count + rows : nullptr;
  if (out.exact_pairs != nullptr) {
    zero_async(out.exact_pairs, std::size_t(grid.heads_total), stream, "cudaMemsetAsync (exact pairs)");
  }
  count_row_blocks<<<unsigned(rows), kThreads, 0, stream>>>(g, exact, selected_count, compensated_count,
                                                            reinterpret_cast<unsigned long long*>(out.exact_pairs));
  check_launch("count_row_blocks");

  auto offsets_from_counts = [&](const std::int32_t* count, std::int32_t* offsets) {
    zero_async(offsets, 1, stream, "cudaMemsetAsync (CSR offsets)");
    run_cub("cub::DeviceScan::InclusiveSum (CSR offsets)", stream, [&](void* storage, std::size_t& bytes) {
      return cub::DeviceScan::InclusiveSum(storage, bytes, count, offsets + 1, rows, stream);
    });
  };
  offsets_from_counts(selected_count, out.selected_offsets);
  if (compensated) offsets_from_counts(compensated_count, out.compensated_offsets);
  fill_row_lists<<<unsigned(rows), kThreads, 0, stream>>>(g, exact, out.selected_offsets, out.selected_clusters,
                                                          out.compensated_offsets, out.compensated_clusters);
  check_launch("fill_row_lists");
}

// Stable descending sort of `keys` within equal-length segments, carrying `values`: one segment
// takes the device-wide radix sort (stable), several the segmented one.
void stable_sort_descending(const double* keys_in, double* keys_out, const std::int32_t* values_in,
                            std::int32_t* values_out, std::int64_t segments, std::int64_t length, cudaStream_t stream) {
  if (segments == 1) {
    run_cub("cub::DeviceRadixSort::SortPairsDescending (block priorities)", stream,
            [&](void* storage, std::size_t& bytes) {
              return cub::DeviceRadixSort::SortPairsDescending(storage, bytes, keys_in, keys_out, values_in, values_out,
                                                               length, 0, 64, stream);
            });
    return;
  }
  DeviceBuffer<std::int64_t> starts(std::size_t(segments + 1), stream);
  segment_starts<<<grid_for(segments + 1, kThreads), kThreads, 0, stream>>>(segments, length, starts.get());
  check_launch("segment_starts");
  const std::int64_t* begin = starts.get();
  run_cub("cub::DeviceSegmentedSort::StableSortPairsDescending", stream, [&](void* storage, std::size_t& bytes) {
    return cub::DeviceSegmentedSort::StableSortPairsDescending(storage, bytes, keys_in, keys_out, values_in, values_out,
                                                               segments * length, segments, begin, begin + 1, stream);
  });
}

// What both modes share: the validated grid as kernels see it, the flags (the caller's array or
// scratch, zeroed) and a double-buffered (key, value) sort space of one entry per block.
class SelectionWork {
 public:
  SelectionWork(const DeviceBlockGrid& grid, const void* scores, const DeviceBlockSelection& out, void* stream)
      : grid_((validate_selection(grid, scores, out), grid)),
        stream_(as_stream(stream)),
        kernel_grid_{grid.query_clusters, grid.key_clusters, grid.q_offsets, grid.k_offsets},
        total_(grid.heads_total * std::int64_t(grid.query_clusters) * grid.key_clusters),
        rows_(grid.heads_total * grid.query_clusters),
        exact_scratch_(out.exact != nullptr ? 0 : std::size_t(total_), stream_),
        exact_(out.exact != nullptr ? out.exact : exact_scratch_.get()),
        keys_(2 * std::size_t(total_), stream_),
        values_(2 * std::size_t(total_), stream_) {
    zero_async(exact_, std::size_t(total_), stream_, "cudaMemsetAsync (exact flags)");
  }

  cudaStream_t stream() const { return stream_; }
  const Grid& kernel_grid() const { return kernel_grid_; }
  std::int64_t total() const { return total_; }  // blocks of all heads
  std::int64_t rows() const { return rows_; }    // BH * Cq
  std::uint8_t* exact() const { return exact_; }
  double* keys() const { return keys_.get(); }
  const double* sorted_keys() const { return keys_.get() + total_; }
  std::int32_t* values() const { return values_.get(); }
  const std::int32_t* sorted_values() const { return values_.get() + total_; }

  // Stable descending sort of (keys, values) within `segments` equal segments.
  void sort(std::int64_t segments) {
    stable_sort_descending(keys(), keys_.get() + total_, values(), values_.get() + total_, segments, total_ / segments,
                           stream_);
  }
  void build_lists(const DeviceBlockSelection& out) const {
    build_row_lists(grid_, kernel_grid_, exact_, out, stream_);
  }

 private:
  DeviceBlockGrid grid_;
  cudaStream_t stream_;
  Grid kernel_grid_;
  std::int64_t total_, rows_;
  DeviceBuffer<std::uint8_t> exact_scratch_;
  std::uint8_t* exact_;
  DeviceBuffer<double> keys_;
  DeviceBuffer<std::int32_t> values_;
};

}  // namespace

void take_blocks_by_priority(const DeviceBlockGrid& grid, const float* scores, BlockScore kind,
                             const DensityBudget& budget, const DeviceBlockSelection& out, void* stream) {
  SelectionWork work(grid, scores, out, stream);
  const cudaStream_t s = work.stream();
  const Grid& g = work.kernel_grid();
  const std::int64_t total = work.total(), rows = work.rows();
  priority_keys<<<grid_for(total, kThreads), kThreads, 0, s>>>(g, total, scores, kind, work.keys(), work.values());
  check_launch("priority_keys");
  const std::int64_t heads_per_segment = budget.call_wide ? grid.heads_total : 1;
  const std::int64_t segments = grid.heads_total / heads_per_segment, segment_length = total / segments;
  work.sort(segments);

  DeviceBuffer<unsigned long long> floor_pairs(std::size_t(segments), s);
  zero_async(floor_pairs.get(), std::size_t(segments), s, "cudaMemsetAsync (floor pairs)");
  if (budget.every_query_cluster_needs_a_block) {
    take_floor_blocks<<<grid_for(rows * 32, kThreads), kThreads, 0, s>>>(g, rows, scores, kind, heads_per_segment,
                                                                         work.exact(), floor_pairs.get());
    check_launch("take_floor_blocks");
  }
  DeviceBuffer<std::int64_t> costs(2 * std::size_t(total), s);
  std::int64_t* cost = costs.get();
  std::int64_t* inclusive = cost + total;
  costs_in_order<<<grid_for(total, kThreads), kThreads, 0, s>>>(g, total, work.sorted_values(), work.exact(), cost);
  check_launch("costs_in_order");
  run_cub("cub::DeviceScan::InclusiveSum (costs in priority order)", s, [&](void* storage, std::size_t& bytes) {
    return cub::DeviceScan::InclusiveSum(storage, bytes, cost, inclusive, total, s);
  });
  // The CPU's integer target over the segment's heads, computed with the same expression.
  const std::int64_t segment_pairs = heads_per_segment * grid.query_tokens * grid.key_tokens;
  const auto target = std::int64_t(std::ceil(budget.density * double(segment_pairs)));
  take_blocks_in_order<<<grid_for(total, kThreads), kThreads, 0, s>>>(
      total, segment_length, work.sorted_values(), cost, inclusive, floor_pairs.get(), target, work.exact());
  check_launch("take_blocks_in_order");
  work.build_lists(out);
}

void take_blocks_by_top_p(const DeviceBlockGrid& grid, const float* criticality, double top_p, double min_key_fraction,
                          const DeviceBlockSelection& out, void* stream) {
  SelectionWork work(grid, criticality, out, stream);
  const cudaStream_t s = work.stream();
  row_keys<<<grid_for(work.total(), kThreads), kThreads, 0, s>>>(work.total(), grid.key_clusters, criticality,
                                                                 work.keys(), work.values());
  check_launch("row_keys");
  work.sort(work.rows());
  const auto floor_count = std::int64_t(std::ceil(min_key_fraction * grid.key_clusters));
  take_top_p_rows<<<grid_for(work.rows(), 128), 128, 0, s>>>(work.kernel_grid(), work.rows(), work.sorted_keys(),
                                                             work.sorted_values(), top_p, floor_count, work.exact());
  check_launch("take_top_p_rows");
  work.build_lists(out);
}

}  // namespace svgear::cuda
