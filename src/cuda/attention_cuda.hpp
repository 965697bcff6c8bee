// The CUDA path of svgear::attention: the same pipeline as the CPU reference (cluster, score,
// select, attend with compensation) as kernels on the caller's stream.
#pragma once

#include <cstdint>
#include <vector>

#include "svgear/attention.hpp"

namespace svgear::cuda {

// What a benchmark or test needs beyond the report: the plan, copied to the host.
struct PlanExport {
  int query_clusters = 0, key_clusters = 0;
  std::vector<std::int32_t> q_order, k_order;      // [BH][S]
  std::vector<std::int32_t> q_offsets, k_offsets;  // [BH][C + 1]
  std::vector<std::uint8_t> exact;                 // [BH][Cq][Ck]
};

// q, k, v, out: CUDA tensors, bf16 or f16 (all the same), D = 64 or 128, contiguous last axis,
// 16-byte aligned rows. Stage times come from CUDA events. Synchronizes `stream` once at the
// end, to read the exact-pair counts (the report's density) and the non-finite-input count;
// with config.synchronize = false (and a state) nothing blocks the host: no event timing, no
// read back, the non-finite count is copied into the state's pinned memory (DeferredCheck) and
// the report is partial. A `plan` export reads the plan back, so it always synchronizes.
// Cold-start k-means uses the strided initialisation (k-means++ is sequential; on the GPU a
// cold start happens once per layer and warm starts follow). `lse`: the optional log-sum-exp
// output of svgear::attention (F32 [B, H, Sq, 1] in device memory, 4-byte aligned), written by
// the attention kernel's epilogue.
AttentionReport attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                          const MethodConfig& config, LayerState* state, void* stream,
                          PlanExport* plan = nullptr, const TensorView* lse = nullptr);

// svgear::synchronize for the CUDA path: waits for the state's last asynchronous call and raises
// its deferred error (then drops the state's centroids).
void synchronize(LayerState& state);

}  // namespace svgear::cuda
