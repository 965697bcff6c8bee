// The one entry point: out = attention(q, k, v) under a method configuration.
#pragma once

#include "svgear/config.hpp"
#include "svgear/state.hpp"
#include "svgear/tensor.hpp"

namespace svgear {

// Wall time of each pipeline stage, summed over (batch, head), in milliseconds.
struct StageTimes {
  double check_ms = 0;    // input validation, including the scan for NaN/Inf
  double cluster_ms = 0;
  double permute_ms = 0;
  double score_ms = 0;    // centroid scores and, for EAR, the error probe
  double select_ms = 0;
  double attend_ms = 0;   // exact blocks plus compensation
  double total_ms = 0;
};

// After an asynchronous CUDA call (MethodConfig::synchronize = false) the GPU has not run yet
// when the call returns, so what only the GPU knows is unknown: `complete` is false, density and
// every time are NaN, exact_pairs and selected_blocks are -1. total_blocks and warm_started are
// decided on the host and stay valid.
struct AttentionReport {
  double density = 1.0;             // query x key pairs computed exactly / (Sq * Sk)
  std::int64_t exact_pairs = 0;
  std::int64_t selected_blocks = 0;
  std::int64_t total_blocks = 0;
  bool warm_started = false;        // k-means started from the state's centroids
  bool complete = true;             // false: an asynchronous call's partial report (above)
  StageTimes times;
};

// q: [B, H, Sq, D]; k, v: [B, H, Sk, D]; out: [B, H, Sq, D], all on one device.
// CPU: any strides, f32/f16/bf16. CUDA (builds with SVGEAR_CUDA): bf16 or f16, D = 64 or 128,
// contiguous last axis, 16-byte aligned rows; runs on `stream` (a cudaStream_t, null = the
// default stream) and synchronizes it once at the end for the report, unless
// config.synchronize is false: then it returns without waiting (the tensors are read and
// written in the stream's order, as by any kernel), the report is partial, and the check of
// the inputs for NaN/Inf is raised by the state's next call or svgear::synchronize(*state).
// `state` may be null (cold start every call), except for an asynchronous CUDA call. A call
// first raises a pending deferred error of the state's previous asynchronous call (and then
// does nothing). Throws svgear::Error for invalid tensors or config: mismatched shapes,
// non-finite inputs, more clusters than tokens, density outside (0, 1], CUDA tensors in a
// build without the CUDA path. No centroids computed from non-finite inputs stay in the state.
//
// `lse`, when not null, is an F32 view of shape [B, H, Sq, 1] (any non-negative strides, on
// q's device) that receives each query row's log-sum-exp: the natural log of the softmax
// denominator in units of the scaled scores, lse = ln sum_t exp(l_t), over exactly the terms
// the method's softmax sums: l_t = q.k_t / sqrt(D) for every exactly computed key and, with
// centroid compensation, l_j = q.mu_j / sqrt(D) + ln n_j for every skipped non-empty key
// cluster j (n_j copies of its mean key). Dense attention gives the ordinary LSE; drop mode
// only the exact keys. With it, outputs over disjoint key sets merge exactly:
// out = (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2). Every row has at least one term (drop
// mode gives each query cluster a block; with compensation every non-empty key cluster is
// exact or compensated), so lse is finite; the output is the same whether lse is requested.
AttentionReport attention(const TensorView& q, const TensorView& k, const TensorView& v,
                          const TensorView& out, const MethodConfig& config,
                          LayerState* state = nullptr, void* stream = nullptr,
                          const TensorView* lse = nullptr);

// Waits until the state's last asynchronous call (config.synchronize = false) has run and
// raises what it found: svgear::Error (ErrorKind::value) when its q, k or v held NaN or Inf, so
// its output is not valid; ErrorKind::runtime for a failure of the GPU. The error is raised
// once; the state's centroids are then dropped (its next call starts cold). Returns at once
// when nothing is pending, e.g. after CPU or synchronous calls.
void synchronize(LayerState& state);

// Exact softmax attention (float64 accumulation): the reference every method is measured by.
// CPU tensors only; `lse` as in attention() (the ordinary log-sum-exp of each row's scores).
void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView* lse = nullptr);

}  // namespace svgear
