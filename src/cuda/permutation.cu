// The cluster layout (cpu::cluster_layout) of every head at once: one LSD radix sort of the
// keys bh * C + label, which is stable, so each cluster's tokens keep their original order and
// head bh's tokens land in positions [bh * S, (bh + 1) * S).
#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <string>

#include "cuda/device_common.cuh"
#include "cuda/stage_internals.cuh"

namespace svgear::cuda {

namespace detail {

namespace {

__global__ void make_sort_keys(const std::int32_t* labels, std::int64_t total, std::int64_t tokens, int clusters,
                               std::uint32_t* keys, std::int32_t* token_ids) {
  for_each_index(total, [&](std::int64_t i) {
    const std::int64_t bh = i / tokens;
    keys[i] = std::uint32_t(bh * clusters + labels[i]);
    token_ids[i] = std::int32_t(i - bh * tokens);
  });
}

// offsets[bh][c] = first sorted position of a label >= c. Sorted position p (0 <= p <= S) owns
// the labels in (label[p - 1], label[p]] (with label[-1] = -1 and label[S] = C), so every entry
// is written exactly once. Clamping keeps out-of-range labels in bounds.
__global__ void offsets_from_sorted_keys(const std::uint32_t* sorted_keys, std::int64_t heads_total,
                                         std::int64_t tokens, int clusters, std::int32_t* offsets) {
  const std::int64_t total = heads_total * (tokens + 1);
  for_each_index(total, [&](std::int64_t i) {
    const std::int64_t bh = i / (tokens + 1), p = i % (tokens + 1);
    const std::int64_t first_key = bh * clusters;
    std::int64_t previous = p == 0 ? -1 : std::int64_t(sorted_keys[bh * tokens + p - 1]) - first_key;
    std::int64_t current = p == tokens ? clusters : std::int64_t(sorted_keys[bh * tokens + p]) - first_key;
    previous = previous < -1 ? -1 : (previous > clusters ? clusters : previous);
    current = current < -1 ? -1 : (current > clusters ? clusters : current);
    for (std::int64_t c = previous + 1; c <= current; ++c) offsets[bh * (clusters + 1) + c] = std::int32_t(p);
  });
}

int bits_for(std::uint64_t distinct_values) {
  int bits = 1;
  while (bits < 32 && (std::uint64_t(1) << bits) < distinct_values) ++bits;
  return bits;
}

std::size_t radix_sort_bytes(std::int64_t items, int key_bits, cudaStream_t stream) {
  std::size_t bytes = 0;
  check_cuda(
      cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const std::uint32_t*>(nullptr),
                                      static_cast<std::uint32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
                                      static_cast<std::int32_t*>(nullptr), items, 0, key_bits, stream),
      "cub::DeviceRadixSort::SortPairs (size query)");
  return bytes;
}

void validate_layout_shape(std::int64_t heads_total, std::int64_t tokens, int clusters) {
  if (heads_total < 1 || tokens < 1 || clusters < 1) {
    throw Error("cluster layout needs at least one head, token and cluster (got " + std::to_string(heads_total) + ", " +
                std::to_string(tokens) + ", " + std::to_string(clusters) + ")");
  }
  if (heads_total * clusters > std::numeric_limits<std::uint32_t>::max()) {
    throw Error("cluster layout: batch * heads * clusters = " + std::to_string(heads_total * clusters) +
                " exceeds 2^32: sort fewer heads per call");
  }
  if (tokens > std::numeric_limits<std::int32_t>::max()) {
    throw Error("cluster layout: " + std::to_string(tokens) + " tokens exceed the int32 order range");
  }
}

}  // namespace

ClusterLayoutBuilder::ClusterLayoutBuilder(std::int64_t heads_total, std::int64_t tokens, int clusters,
                                           cudaStream_t stream)
    : heads_total_((validate_layout_shape(heads_total, tokens, clusters), heads_total)),
      tokens_(tokens),
      clusters_(clusters),
      key_bits_(bits_for(std::uint64_t(heads_total) * std::uint64_t(clusters))),
      stream_(stream),
      sort_bytes_(radix_sort_bytes(heads_total * tokens, key_bits_, stream)),
      keys_in_(std::size_t(heads_total * tokens), stream),
      keys_out_(std::size_t(heads_total * tokens), stream),
      tokens_in_(std::size_t(heads_total * tokens), stream),
      sort_temp_(sort_bytes_, stream) {}

void ClusterLayoutBuilder::build(const std::int32_t* labels, std::int32_t* order, std::int32_t* offsets) {
  const std::int64_t total = heads_total_ * tokens_;
  make_sort_keys<<<grid_for(total, 256), 256, 0, stream_>>>(labels, total, tokens_, clusters_, keys_in_.get(),
                                                            tokens_in_.get());
  check_launch("make_sort_keys");
  std::size_t bytes = sort_bytes_;
  check_cuda(cub::DeviceRadixSort::SortPairs(sort_temp_.get(), bytes, keys_in_.get(), keys_out_.get(), tokens_in_.get(),
                                             order, total, 0, key_bits_, stream_),
             "cub::DeviceRadixSort::SortPairs (cluster layout)");
  const std::int64_t positions = heads_total_ * (tokens_ + 1);
  offsets_from_sorted_keys<<<grid_for(positions, 256), 256, 0, stream_>>>(keys_out_.get(), heads_total_, tokens_,
                                                                          clusters_, offsets);
  check_launch("offsets_from_sorted_keys");
}

}  // namespace detail

void cluster_layout(const std::int32_t* labels, std::int64_t heads_total, std::int64_t tokens, int clusters,
                    std::int32_t* order, std::int32_t* offsets, void* stream) {
  if (labels == nullptr || order == nullptr || offsets == nullptr) {
    throw Error("cluster_layout: labels, order and offsets must be device pointers, got a null one");
  }
  detail::ClusterLayoutBuilder builder(heads_total, tokens, clusters, detail::as_stream(stream));
  builder.build(labels, order, offsets);
}

}  // namespace svgear::cuda
