// Budgeted block selection (src/policy/budget_selection.cpp) on the device, and the CSR lists
// of selected and compensated key clusters the attention kernel reads.
//
// Density mode: the CPU walks each budget segment's blocks (all heads for BudgetScope::call, one
// head for BudgetScope::head) in descending float64 priority, ties to the lower global flat
// index (bh * Cq * Ck + block), as its std::stable_sort over (head, block)-ordered candidates
// does, and takes block p iff its cost is non-zero and the pairs taken before it, floor blocks
// included, are still below the target. Costs are non-negative, so that takes exactly the
// blocks with a non-zero cost up to and including the first one whose running total (floor
// included) reaches the target. No sort is needed to find that block: a radix select over the
// 96-bit key (descending priority, ascending index) with cost-weighted histograms, 12 bits per
// pass, narrows each segment to it (digit_histogram, choose_digit): two passes over the scores,
// then the few blocks left in range are copied out and one CTA finds the other 6 digits among
// them (collect_candidates, choose_among_candidates; too many left: 6 more passes over all);
// then every block decides by comparing its key with the segment's (take_blocks_up_to).
// Top-p mode: a stable segmented sort per row, then one thread walks each row exactly like the
// CPU loop (sequential float64 mass, so the comparisons with top_p are identical).
#include <algorithm>
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

// --- density mode: the radix select -----------------------------------------------------------

// A block's place in its segment's walk as one unsigned 96-bit number, smaller = earlier: the
// priority's bits turned so they sort as unsigned integers (CUB's radix-sort twiddle: positive
// values get the sign bit set, negative ones every bit flipped), inverted for descending order,
// then the flat index for ties.
using WalkKey = unsigned __int128;

__device__ __forceinline__ WalkKey walk_key(double priority, std::int64_t flat) {
  const auto bits = static_cast<unsigned long long>(__double_as_longlong(priority));
  const unsigned long long ordered = (bits >> 63) != 0 ? ~bits : bits | (1ull << 63);
  return (WalkKey(~ordered) << 32) | WalkKey(static_cast<std::uint32_t>(flat));
}

constexpr int kDigitBits = 12;
constexpr int kBins = 1 << kDigitBits;
constexpr int kKeyBits = 96;
constexpr int kPasses = kKeyBits / kDigitBits;
static_assert(kPasses * kDigitBits == kKeyBits, "whole digits");

// Per segment: what the passes so far know of the last block the walk takes.
struct SelectState {
  WalkKey prefix;        // its key's leading digits found so far (the rest zero)
  std::int64_t before;   // pairs of the non-floor blocks whose keys are below the prefix's range
  int mode;              // kSearching, kTakeAll (the budget outlasts the segment), kTakeNone
  int passes_done;       // digits found; a pass over all blocks runs only as the next one
};
constexpr int kSearching = 0, kTakeAll = 1, kTakeNone = 2;

// The block's key and cost in the walk (0 for floor and empty blocks: they add no pairs).
struct WalkEntry {
  WalkKey key;
  std::int64_t cost;
};

__device__ __forceinline__ WalkEntry walk_entry(const Grid& grid, std::int64_t flat, const float* scores,
                                                BlockScore kind, const std::uint8_t* exact) {
  const std::int64_t per_head = grid.blocks_per_head();
  const std::int64_t bh = flat / per_head;
  const int block = int(flat % per_head);
  const std::int64_t pairs = grid.q_size(bh, block / grid.key_clusters) * grid.k_size(bh, block % grid.key_clusters);
  return {walk_key(block_priority(scores[flat], pairs, kind), flat), exact[flat] != 0 ? 0 : pairs};
}

// Whether `key` has the leading digits the passes before `pass` found (every key does at pass 0).
__device__ __forceinline__ bool in_prefix_range(WalkKey key, WalkKey prefix, int pass) {
  const int unknown_bits = kKeyBits - kDigitBits * pass;
  return pass == 0 || (key >> unknown_bits) == (prefix >> unknown_bits);
}

// Pass `pass`: per segment, the pairs of the blocks inside the prefix's range, by their next digit.
__global__ void __launch_bounds__(kThreads)
    digit_histogram(Grid grid, std::int64_t segment_length, const float* scores, BlockScore kind,
                    const std::uint8_t* exact, const SelectState* states, int pass, unsigned long long* histograms) {
  __shared__ unsigned long long bins[kBins];
  const std::int64_t segment = blockIdx.y;
  const SelectState state = states[segment];
  if (state.mode != kSearching || state.passes_done != pass) return;
  for (int b = threadIdx.x; b < kBins; b += kThreads) bins[b] = 0;
  __syncthreads();
  const int shift = kKeyBits - kDigitBits * (pass + 1);
  const std::int64_t first = segment * segment_length;
  for (std::int64_t i = blockIdx.x * std::int64_t(kThreads) + threadIdx.x; i < segment_length;
       i += std::int64_t(gridDim.x) * kThreads) {
    const WalkEntry e = walk_entry(grid, first + i, scores, kind, exact);
    if (e.cost == 0) continue;
    if (!in_prefix_range(e.key, state.prefix, pass)) continue;
    atomicAdd(&bins[int(e.key >> shift) & (kBins - 1)], static_cast<unsigned long long>(e.cost));
  }
  __syncthreads();
  unsigned long long* out = histograms + segment * kBins;
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    if (bins[b] != 0) atomicAdd(&out[b], bins[b]);
  }
}

// The digit whose bin holds the block where the running total reaches the target, for a CTA of
// kCtaThreads: updates `state` (a kTakeNone or kTakeAll verdict at pass 0) and clears the bins.
// Every thread returns the same verdict; the caller writes the state back.
template <int kCtaThreads>
__device__ void choose_digit_in_cta(unsigned long long* bins, std::int64_t floor_pairs, std::int64_t target, int pass,
                                    SelectState& state) {
  using Scan = cub::BlockScan<unsigned long long, kCtaThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ int chosen;
  __shared__ unsigned long long chosen_before;
  // Pairs the walk may still take before the wanted block's own: the target less the floor and
  // everything below the prefix's range.
  const std::int64_t wanted = target - floor_pairs - state.before;
  if (wanted <= 0) {  // only at pass 0: the floor alone spends the budget
    state.mode = kTakeNone;
    return;
  }
  if (threadIdx.x == 0) chosen = -1;
  constexpr int kPerThread = kBins / kCtaThreads;
  unsigned long long local[kPerThread], sum = 0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    local[k] = bins[threadIdx.x * kPerThread + k];
    sum += local[k];
  }
  unsigned long long before = 0;
  Scan(storage).ExclusiveSum(sum, before);
  __syncthreads();  // `chosen` is initialised
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    // Exactly one bin crosses: its exclusive total is below `wanted`, its inclusive one is not.
    if (before < static_cast<unsigned long long>(wanted) && before + local[k] >= static_cast<unsigned long long>(wanted)) {
      chosen = threadIdx.x * kPerThread + k;
      chosen_before = before;
    }
    before += local[k];
  }
  __syncthreads();
  for (int k = threadIdx.x; k < kBins; k += kCtaThreads) bins[k] = 0;
  if (chosen < 0) {  // the segment's blocks do not reach the target (pass 0 only)
    state.mode = kTakeAll;
    return;
  }
  state.prefix |= WalkKey(chosen) << (kKeyBits - kDigitBits * (pass + 1));
  state.before += std::int64_t(chosen_before);
  state.passes_done = pass + 1;
}

// One CTA per segment: choose_digit_in_cta on the pass's global histogram.
__global__ void __launch_bounds__(kThreads)
    choose_digit(unsigned long long* histograms, const unsigned long long* floor_pairs, std::int64_t target, int pass,
                 SelectState* states) {
  const std::int64_t segment = blockIdx.x;
  SelectState state = states[segment];
  if (state.mode != kSearching || state.passes_done != pass) return;
  choose_digit_in_cta<kThreads>(histograms + segment * kBins, std::int64_t(floor_pairs[segment]), target, pass, state);
  if (threadIdx.x == 0) states[segment] = state;
}

// --- density mode: the last digits among few candidates ---------------------------------------
//
// After kWidePasses passes the prefix's range usually holds few blocks (those sharing the
// priority's sign, exponent and leading mantissa bits): they are copied out once, and one CTA
// per segment finds the remaining digits among them in shared memory, instead of more passes over
// every block. A range with more than kCandidateCapacity blocks (e.g. a budget that ends among
// many equal priorities) is left to the passes over all blocks, which then run as before.

constexpr int kWidePasses = 2;
constexpr int kCandidateCapacity = 1 << 15;
constexpr int kCandidateThreads = 1024;

struct Candidate {
  unsigned long long high;  // key bits 95..32
  unsigned low;             // key bits 31..0
  long long cost;
};

__global__ void __launch_bounds__(kThreads)
    collect_candidates(Grid grid, std::int64_t segment_length, const float* scores, BlockScore kind,
                       const std::uint8_t* exact, const SelectState* states, Candidate* candidates, int* counts) {
  const std::int64_t segment = blockIdx.y;
  const SelectState state = states[segment];
  if (state.mode != kSearching || state.passes_done != kWidePasses) return;
  const std::int64_t first = segment * segment_length;
  const int lane = threadIdx.x % 32;
  // Whole warps iterate together (the append is warp-aggregated).
  for (std::int64_t base = (blockIdx.x * std::int64_t(kThreads) + threadIdx.x) - lane; base < segment_length;
       base += std::int64_t(gridDim.x) * kThreads) {
    const std::int64_t i = base + lane;
    bool keep = false;
    WalkEntry e{};
    if (i < segment_length) {
      e = walk_entry(grid, first + i, scores, kind, exact);
      keep = e.cost > 0 && in_prefix_range(e.key, state.prefix, kWidePasses);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (ballot == 0) continue;
    int slot = 0;
    if (lane == __ffs(ballot) - 1) slot = atomicAdd(&counts[segment], __popc(ballot));
    slot = __shfl_sync(0xffffffffu, slot, __ffs(ballot) - 1) + __popc(ballot & ((1u << lane) - 1));
    if (keep && slot < kCandidateCapacity) {
      candidates[segment * kCandidateCapacity + slot] =
          Candidate{static_cast<unsigned long long>(e.key >> 32), static_cast<unsigned>(e.key), e.cost};
    }
  }
}

// One CTA per segment: the remaining passes over the segment's candidates.
__global__ void __launch_bounds__(kCandidateThreads)
    choose_among_candidates(const Candidate* candidates, const int* counts, const unsigned long long* floor_pairs,
                            std::int64_t target, SelectState* states) {
  __shared__ unsigned long long bins[kBins];
  const std::int64_t segment = blockIdx.x;
  SelectState state = states[segment];
  const int count = counts[segment];
  if (state.mode != kSearching || state.passes_done != kWidePasses || count > kCandidateCapacity) return;
  const Candidate* mine = candidates + segment * kCandidateCapacity;
  for (int b = threadIdx.x; b < kBins; b += kCandidateThreads) bins[b] = 0;
  for (int pass = kWidePasses; pass < kPasses; ++pass) {
    __syncthreads();  // the bins are clear
    const int shift = kKeyBits - kDigitBits * (pass + 1);
    for (int i = threadIdx.x; i < count; i += kCandidateThreads) {
      const Candidate c = mine[i];
      const WalkKey key = (WalkKey(c.high) << 32) | WalkKey(c.low);
      if (!in_prefix_range(key, state.prefix, pass)) continue;
      atomicAdd(&bins[int(key >> shift) & (kBins - 1)], static_cast<unsigned long long>(c.cost));
    }
    __syncthreads();
    choose_digit_in_cta<kCandidateThreads>(bins, std::int64_t(floor_pairs[segment]), target, pass, state);
    if (state.mode != kSearching) break;  // not after pass 0; kept for safety
  }
  if (threadIdx.x == 0) states[segment] = state;
}

// Every non-floor block with a non-zero cost at or before its segment's last block is taken.
__global__ void take_blocks_up_to(Grid grid, std::int64_t total, std::int64_t segment_length, const float* scores,
                                  BlockScore kind, const SelectState* states, std::uint8_t* exact) {
  for_each_index(total, [&](std::int64_t flat) {
    const SelectState& state = states[flat / segment_length];
    if (state.mode == kTakeNone) return;
    const WalkEntry e = walk_entry(grid, flat, scores, kind, exact);
    if (e.cost > 0 && (state.mode == kTakeAll || e.key <= state.prefix)) exact[flat] = 1;
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

// What both modes share: the validated grid as kernels see it and the flags (the caller's array
// or scratch, zeroed); top-p mode adds a sort space.
class SelectionWork {
 public:
  SelectionWork(const DeviceBlockGrid& grid, const void* scores, const DeviceBlockSelection& out, void* stream)
      : grid_((validate_selection(grid, scores, out), grid)),
        stream_(as_stream(stream)),
        kernel_grid_{grid.query_clusters, grid.key_clusters, grid.q_offsets, grid.k_offsets},
        total_(grid.heads_total * std::int64_t(grid.query_clusters) * grid.key_clusters),
        rows_(grid.heads_total * grid.query_clusters),
        exact_scratch_(out.exact != nullptr ? 0 : std::size_t(total_), stream_),
        exact_(out.exact != nullptr ? out.exact : exact_scratch_.get()) {
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

  // The (key, value) sort space, double-buffered: one entry per block (top-p mode only).
  void allocate_sort_space() {
    keys_ = DeviceBuffer<double>(2 * std::size_t(total_), stream_);
    values_ = DeviceBuffer<std::int32_t>(2 * std::size_t(total_), stream_);
  }
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
  const std::int64_t heads_per_segment = budget.call_wide ? grid.heads_total : 1;
  const std::int64_t segments = grid.heads_total / heads_per_segment, segment_length = total / segments;

  DeviceBuffer<unsigned long long> floor_pairs(std::size_t(segments), s);
  zero_async(floor_pairs.get(), std::size_t(segments), s, "cudaMemsetAsync (floor pairs)");
  if (budget.every_query_cluster_needs_a_block) {
    take_floor_blocks<<<grid_for(rows * 32, kThreads), kThreads, 0, s>>>(g, rows, scores, kind, heads_per_segment,
                                                                         work.exact(), floor_pairs.get());
    check_launch("take_floor_blocks");
  }
  // The CPU's integer target over the segment's heads, computed with the same expression.
  const std::int64_t segment_pairs = heads_per_segment * grid.query_tokens * grid.key_tokens;
  const auto target = std::int64_t(std::ceil(budget.density * double(segment_pairs)));

  DeviceBuffer<SelectState> states(std::size_t(segments), s);
  DeviceBuffer<unsigned long long> histograms(std::size_t(segments) * kBins, s);
  zero_async(states.get(), std::size_t(segments), s, "cudaMemsetAsync (select states)");  // prefix 0, searching
  zero_async(histograms.get(), std::size_t(segments) * kBins, s, "cudaMemsetAsync (histograms)");
  // About 8 CTAs per SM in all, each walking >= 4096 blocks.
  const std::int64_t all_ctas = 8 * std::int64_t(device_sm_count());
  const auto ctas_per_segment = unsigned(
      std::clamp<std::int64_t>((segment_length + 4095) / 4096, 1, std::max<std::int64_t>(1, all_ctas / segments)));
  // The passes over all blocks after the candidates' turn exit at once unless it overflowed.
  DeviceBuffer<Candidate> candidates(std::size_t(segments) * kCandidateCapacity, s);
  DeviceBuffer<int> candidate_counts(std::size_t(segments), s);
  zero_async(candidate_counts.get(), std::size_t(segments), s, "cudaMemsetAsync (candidate counts)");
  for (int pass = 0; pass < kPasses; ++pass) {
    if (pass == kWidePasses) {
      collect_candidates<<<dim3(ctas_per_segment, unsigned(segments)), kThreads, 0, s>>>(
          g, segment_length, scores, kind, work.exact(), states.get(), candidates.get(), candidate_counts.get());
      check_launch("collect_candidates");
      choose_among_candidates<<<unsigned(segments), kCandidateThreads, 0, s>>>(
          candidates.get(), candidate_counts.get(), floor_pairs.get(), target, states.get());
      check_launch("choose_among_candidates");
    }
    digit_histogram<<<dim3(ctas_per_segment, unsigned(segments)), kThreads, 0, s>>>(
        g, segment_length, scores, kind, work.exact(), states.get(), pass, histograms.get());
    check_launch("digit_histogram");
    choose_digit<<<unsigned(segments), kThreads, 0, s>>>(histograms.get(), floor_pairs.get(), target, pass,
                                                         states.get());
    check_launch("choose_digit");
  }
  take_blocks_up_to<<<grid_for(total, kThreads), kThreads, 0, s>>>(g, total, segment_length, scores, kind,
                                                                   states.get(), work.exact());
  check_launch("take_blocks_up_to");
  work.build_lists(out);
}

void take_blocks_by_top_p(const DeviceBlockGrid& grid, const float* criticality, double top_p, double min_key_fraction,
                          const DeviceBlockSelection& out, void* stream) {
  SelectionWork work(grid, criticality, out, stream);
  work.allocate_sort_space();
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
