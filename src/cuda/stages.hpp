// The pipeline's stages before attention, on the GPU and batched over BH = batch * heads:
// cluster (k-means), permute (cluster layout), score (cluster means, centroid criticality, the
// EAR error probe) and select (budgeted block selection into the CSR lists the attention kernel
// reads). Each function mirrors a CPU reference (named at each declaration) so a test can run
// both on the same input.
//
// Plain C++17 header: no CUDA types. Streams are passed as void* (null = the legacy default
// stream); every pointer argument is a device pointer unless said otherwise. All work is
// enqueued on the stream with no host synchronisation; scratch memory comes from the stream-
// ordered allocator (cudaMallocAsync) and is released on the same stream. Every CUDA call and
// launch is checked and a failure throws svgear::Error with the CUDA error string.
//
// Indexing: bh = b * heads + h. Per-head arrays are stored head after head: labels and order
// [BH][S], offsets [BH][C + 1], centroids and means [BH][C][D], block arrays [BH][Cq][Ck].
#pragma once

#include <cstdint>

#include "cpu/tile_alignment.hpp"
#include "cuda/sparse_attention.hpp"
#include "svgear/dtype.hpp"

namespace svgear::cuda {

// A [B, H, S, D] bf16 or f16 device tensor with arbitrary b/h/s strides (in elements) and a
// contiguous last axis; D is 64 or 128 and S >= 1. Rows whose addresses are 16-byte aligned
// take a vectorised path; any other alignment works, more slowly.
struct DeviceHeads {
  DType dtype = DType::bf16;
  int batch = 0, heads = 0;
  std::int64_t tokens = 0;  // S
  int head_dim = 0;         // D
  DeviceTensor tensor;

  std::int64_t count() const { return std::int64_t(batch) * std::int64_t(heads); }  // BH
};

// One clustering of every head: cluster c of head bh holds the rows
// order[bh][offsets[bh][c] .. offsets[bh][c + 1]) (offsets[bh][0] == 0, offsets[bh][C] == S).
struct DeviceLayout {
  const std::int32_t* order = nullptr;    // [BH][S]: permuted position -> original token
  const std::int32_t* offsets = nullptr;  // [BH][C + 1]
  int clusters = 0;                       // C
};

// Per key cluster: mean key, mean value and size (cpu::KeyClusterSummary).
struct DeviceKeySummary {
  const float* key_means = nullptr;      // [BH][Ck][D]
  const float* value_means = nullptr;    // [BH][Ck][D]
  const std::int32_t* counts = nullptr;  // [BH][Ck]
  // Optional, for the EAR probe: the bits of max |v| per head [BH] (non-negative floats order
  // as unsigned), as count_non_finite leaves them; null: the probe reads v once more for them.
  const unsigned* value_abs_max = nullptr;
  // Optional, for the EAR probe: v in key-cluster order times 2^e as fp16 bits [BH][Sk][D], as
  // value_summary leaves it (e from value_abs_max, which must then be given too); null: the probe
  // writes this copy itself, reading v once more.
  const std::uint16_t* scaled_values = nullptr;
  // Optional, for the EAR probe's mean rows: each query cluster's mean query [BH][Cq][D] (the
  // pipeline passes Q's final k-means centroids, the means of exactly the final clusters); null:
  // the probe sums each cluster's members itself (double sums, divided by the size).
  const float* query_means = nullptr;
};

// ---------------------------------------------------------------------------------------------
// 1. Clustering: Lloyd's k-means per head (cpu::kmeans with KmeansInit::strided, or warm-
//    started from initial_centroids). Assignment: nearest centroid by ||c||^2 - 2 x.c on tensor
//    cores with the fp32 centroid rounded to the input's 16-bit type (ties -> lowest index):
//    labels differ from the CPU's float64 distances only where two centroids are within about
//    2^-8 |x||c| / sqrt(D) (bf16; 2^-11 for f16) of each other, which moves the objective by far
//    less than the iterations do. (A strided or token-valued start is exact in 16 bits.)
//    Update: stable sort by label (the cluster layout) and a per-cluster float64 mean; an empty
//    cluster keeps its previous centroid.

struct KmeansSettings {
  int clusters = 1;    // C >= 1 (C > S is allowed: the extra clusters stay empty)
  int iterations = 1;  // >= 1: assignment + update each
  // [BH][C][D]: warm start from these (e.g. the previous step's centroids, or a k-means++
  // seeding computed elsewhere). Null: strided init, centroid c = token floor(c * S / C).
  // May alias KmeansOutputs::centroids.
  const float* initial_centroids = nullptr;
  // Optional (device): the first assignment also adds the points' non-finite (NaN/Inf) element
  // count here, from the rows it loads anyway (the pipeline's input check of q and k).
  std::int64_t* non_finite = nullptr;
  // > 0: between the last assignment and the last update, align_clusters_to_tiles with this
  // tail limit (MethodConfig::query_tail_limit), so the final centroids are the means of the
  // aligned clusters. At most cpu::kMaxTailLimit, and clusters <= kMaxAlignedClusters.
  int tail_limit = 0;
};

// Each point's nearest other centroid in the assignment that labelled it (cpu::RunnerUps):
// runner-up labels and regrets d(runner-up) - d(nearest) >= 0, [BH][S] each.
struct DeviceRunnerUps {
  std::int32_t* labels = nullptr;
  float* regrets = nullptr;
};

struct KmeansOutputs {
  float* centroids = nullptr;      // [BH][C][D]: after the last update (required)
  std::int32_t* labels = nullptr;  // [BH][S]: the last assignment (required)
  std::int32_t* counts = nullptr;  // [BH][C]: sizes under `labels` (required)
  // The cluster layout of `labels` (what cluster_layout would return), a by-product of the
  // last update; optional.
  std::int32_t* order = nullptr;    // [BH][S]
  std::int32_t* offsets = nullptr;  // [BH][C + 1]
  // [BH][iterations]: sum of squared distances of each assignment to the centroids it used
  // (cpu::KmeansResult::objective; with the tile alignment the last one counts the moved rows at
  // their runner-up's distance); optional.
  double* objective = nullptr;
  // Optional: the last assignment's runner-ups (before any alignment moved rows), and [BH] the
  // rows the alignment moved (cpu::KmeansResult::aligned_rows; zeros without it).
  DeviceRunnerUps runner_ups;
  std::int32_t* aligned_rows = nullptr;
};

void kmeans(const DeviceHeads& points, const KmeansSettings& settings, const KmeansOutputs& out, void* stream);

// One assignment step alone (cpu::assign_to_nearest_centroid without the objective):
// labels[bh][s] = argmin_c ||x - centroids[bh][c]||^2, the centroids split into two 16-bit
// terms (hi + lo, ~16 mantissa bits of x.c), so labels differ from float64 only at near-ties.
void assign_to_nearest_centroid(const DeviceHeads& points, const float* centroids, int clusters, std::int32_t* labels,
                                void* stream);

// Query clusters trimmed to the attention kernel's 64-row tiles (cpu::align_clusters_to_tiles,
// the same decisions given the same labels and runner-ups): labels [BH][S] change in place;
// layout is the cluster layout of those labels (cluster_layout), which the caller rebuilds
// afterwards. moved (optional) [BH]: rows moved per head. tail_limit in [0, 63] (0: nothing
// moves), clusters <= kMaxAlignedClusters (the walk holds two ints per cluster in shared memory).
using cpu::kMaxAlignedClusters;
void align_clusters_to_tiles(std::int64_t heads_total, std::int64_t tokens, int clusters, int tail_limit,
                             std::int32_t* labels, const DeviceLayout& layout, const DeviceRunnerUps& runner_ups,
                             std::int32_t* moved, void* stream);

// ---------------------------------------------------------------------------------------------
// 2. Permutation (cpu::cluster_layout): stable sort of each head's tokens by label. Labels
//    must lie in [0, clusters); out-of-range labels give an unspecified (but in-bounds) layout.
void cluster_layout(const std::int32_t* labels, std::int64_t heads_total, std::int64_t tokens, int clusters,
                    std::int32_t* order, std::int32_t* offsets, void* stream);

// ---------------------------------------------------------------------------------------------
// 3. Cluster means through a layout (cpu::cluster_means): means[bh][c] = mean of the rows of
//    cluster c (float64 sums; zeros for an empty cluster), counts[bh][c] its size (optional).
//    Call it on K and on V with the key layout for key_means/value_means/key_counts.
void cluster_means(const DeviceHeads& rows, const DeviceLayout& layout, float* means, std::int32_t* counts,
                   void* stream);

// The value side of the key summary in one gathered read of v: value_means as cluster_means
// gives them, and the EAR probe's copy of v in key-cluster order times 2^e as fp16 bits
// (scaled_values [BH][Sk][D]), e per head putting max |v| (value_abs_max: count_non_finite's
// bits) in [2^14, 2^15). Pass both to probe_compensation_error through DeviceKeySummary.
void value_summary(const DeviceHeads& v, const DeviceLayout& keys, const unsigned* value_abs_max, float* value_means,
                   std::uint16_t* scaled_values, void* stream);

// ---------------------------------------------------------------------------------------------
// 4. Centroid criticality (cpu::centroid_criticality): P[bh][i][j] = softmax over j of
//    mu^Q_i . mu^K_j / sqrt(D) + ln n_j, and 0 for empty key clusters (n_j = 0).
void centroid_criticality(const float* q_centroids, const float* key_means, const std::int32_t* key_counts,
                          std::int64_t heads_total, int query_clusters, int key_clusters, int head_dim,
                          float* criticality, void* stream);

// ---------------------------------------------------------------------------------------------
// 5. The EAR probe (cpu::probe_compensation_error): error[bh][i][j] = (n^Q_i / probes_i) *
//    sum over probe queries q of cluster i of ||o_j'(q) - o(q)||^2; 0 for empty clusters.
//    Probe p of cluster i is the query at permuted position offsets[i] + (2p+1) size / (2
//    sampled_i), sampled_i = min(probes_per_cluster, size); with mean_row one more, the
//    cluster's mean query rounded to q's dtype (summary.query_means, else a double sum over the
//    members divided by the size, as cpu::mean_probe_queries builds it), so
//    probes_i = sampled_i + 1. Two sweeps over each head's keys on
//    tensor cores, both split across CTAs by key chunks: the exact row max, denominator and
//    output first, then per key cluster its mass and sum of exp * v against its centroid
//    stand-in. P V runs on fp16 operands (P to 11 bits; v scaled per head by a power of two into
//    fp16's range), so errors carry relative noise of ~1e-4 of a head's largest. Deterministic
//    for probes_i <= 128 (larger values add partial sums of one block with float
//    atomics). q and k/v may have different token counts; k and v share the key layout;
//    summary.value_means must be 16-byte aligned. value_sketch_dims: 0 (or >= D) measures the
//    errors on all of v's dimensions; kCudaValueSketchDims (32, below D) on v sketched to 32
//    (cpu::probe_compensation_error's value_sketch_dims: the same signs), a quarter of the value
//    work at D = 128.
void probe_compensation_error(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v,
                              const DeviceLayout& queries, const DeviceLayout& keys, const DeviceKeySummary& summary,
                              int probes_per_cluster, bool mean_row, float* error, void* stream,
                              int value_sketch_dims = 0);

// Throws svgear::Error unless the CUDA probe takes this value_sketch_dims for head_dim (0, at
// least head_dim, or kCudaValueSketchDims): the pipeline asks before any work is queued.
void require_cuda_value_sketch(int value_sketch_dims, int head_dim);

// ---------------------------------------------------------------------------------------------
// 6. Selection (src/policy/budget_selection.cpp), per call or per head, into the attention
//    kernel's CSR lists over rows r = bh * Cq + i. Priorities go through a float64 stable sort,
//    so given the same float scores the flags equal the CPU policy's.

// The block grid of every head: cluster sizes come from the layouts' offsets.
struct DeviceBlockGrid {
  std::int64_t heads_total = 0;  // BH
  int query_clusters = 0, key_clusters = 0;
  std::int64_t query_tokens = 0, key_tokens = 0;  // Sq, Sk (for the density target)
  const std::int32_t* q_offsets = nullptr;        // [BH][Cq + 1]
  const std::int32_t* k_offsets = nullptr;        // [BH][Ck + 1]
};

struct DeviceBlockSelection {
  // Selected (exactly computed) key clusters of row r, ascending:
  // selected_clusters[selected_offsets[r] .. selected_offsets[r + 1]).
  std::int32_t* selected_offsets = nullptr;   // [BH * Cq + 1] (required)
  std::int32_t* selected_clusters = nullptr;  // capacity BH * Cq * Ck (required)
  // Compensated key clusters of row r: non-empty and not selected, ascending (rows of empty
  // query clusters get none). Null offsets: not built (drop mode).
  std::int32_t* compensated_offsets = nullptr;   // [BH * Cq + 1]
  std::int32_t* compensated_clusters = nullptr;  // capacity BH * Cq * Ck
  std::int64_t* exact_pairs = nullptr;           // [BH]: sum of n^Q_i n^K_j over selected blocks; optional
  std::uint8_t* exact = nullptr;                 // [BH][Cq][Ck] 0/1 flags (BlockSelection::exact); optional
};
// Selected blocks per head = selected_offsets[(bh + 1) * Cq] - selected_offsets[bh * Cq].

// How take_blocks_by_priority ranks blocks.
enum class BlockScore {
  priority,        // the scores as given (SVG2: criticality)
  error_per_pair,  // score / (n^Q_i n^K_j), as ErrorAwarePolicy::block_priority (SVG-EAR)
};

// Mirrors svgear::SelectionBudget, plus which CPU overload of take_blocks_by_priority to follow
// (MethodConfig::budget_scope).
struct DensityBudget {
  double density = 1.0;                            // in (0, 1]
  bool every_query_cluster_needs_a_block = false;  // drop mode's floor
  // true (BudgetScope::call): one budget of ceil(density * BH * Sq * Sk) pairs for which the
  // blocks of all heads compete (ties: lower head, then lower block); false (BudgetScope::head):
  // every head spends ceil(density * Sq * Sk) on its own.
  bool call_wide = true;
};

// take_blocks_by_priority (with ErrorAwarePolicy's division for BlockScore::error_per_pair):
// blocks in descending priority (stable sort: ties -> lower flat index) until the exact pairs
// reach the target; empty blocks never; with the floor, each non-empty query cluster first gets
// its highest-priority non-empty block.
void take_blocks_by_priority(const DeviceBlockGrid& grid, const float* scores, BlockScore kind,
                             const DensityBudget& budget, const DeviceBlockSelection& out, void* stream);

// take_blocks_by_top_p (SVG2's top-p mode): per non-empty query cluster, non-empty key clusters
// in descending criticality until the mass reaches top_p and at least
// ceil(min_key_fraction * Ck) are taken (always at least one).
void take_blocks_by_top_p(const DeviceBlockGrid& grid, const float* criticality, double top_p, double min_key_fraction,
                          const DeviceBlockSelection& out, void* stream);

}  // namespace svgear::cuda
