// How a method chooses the blocks it computes exactly, and what it does with the rest.
// Every method is a selection policy plus a compensation mode; presets name the published
// combinations (SVG2 = criticality + drop, SVG-EAR = error-aware routing + centroid), and the
// two parts can be mixed for ablations.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace svgear {

enum class Method { dense, svg2, ear };

enum class SelectionPolicyKind {
  all_blocks,   // dense: every block computed exactly
  criticality,  // SVG2: blocks in descending estimated attention mass P_ij
  error_aware,  // SVG-EAR: blocks in descending probed compensation error per unit of cost
};

enum class Compensation {
  drop,      // skipped blocks contribute nothing (SVG2)
  centroid,  // skipped key clusters enter the softmax as n_j copies of (centroid, mean value)
};

enum class BudgetScope {
  call,  // one budget for all heads of the call: blocks compete across heads (EAR's preset)
  head,  // every (batch, head) gets the same density (SVG2's preset)
};

enum class KmeansInit {
  kmeans_plus_plus,  // D^2 sampling from a seeded generator
  strided,           // every (S / C)-th token: deterministic without a seed
};

struct MethodConfig {
  Method method = Method::ear;
  SelectionPolicyKind policy = SelectionPolicyKind::error_aware;
  Compensation compensation = Compensation::centroid;

  // Budget: fraction of query x key pairs computed exactly, in (0, 1]. Blocks are taken in the
  // policy's order until the computed fraction reaches it (so it overshoots by < one block).
  double density = 0.2;
  // SVG2's own mode: per query cluster, key clusters in descending P_ij until their cumulative
  // mass reaches top_p, but at least min_key_fraction of the key clusters. Replaces `density`.
  BudgetScope budget_scope = BudgetScope::call;
  std::optional<double> top_p;
  double min_key_fraction = 0.1;

  int clusters_q = 32;
  int clusters_k = 64;
  int kmeans_iterations = 20;       // cold start (no cached centroids)
  // Warm start from the centroids of the previous step. One iteration, not two: on the quality
  // model it cost EAR 0.09-0.17 dB of PSNR and saved 1.0-1.1 ms of the 10 ms op at Wan2.1-1.3B
  // (docs/QUALITY.md, "Warm k-means iterations"), more than that PSNR is worth in density.
  int kmeans_warm_iterations = 1;
  KmeansInit kmeans_init = KmeansInit::kmeans_plus_plus;
  // Query clusters of 64 t + r rows (t >= 1) with 1 <= r <= query_tail_limit hand those r rows
  // to their second-nearest clusters, where those have room in their last 64-row tile, so the
  // CUDA kernel (whose query tiles are 64 rows) computes fewer padding rows; 0 turns it off.
  // The rows moved are the ones nearly equidistant from two centroids (src/cpu/tile_alignment.hpp).
  int query_tail_limit = 0;
  int probe_queries = 0;            // EAR probe: sampled queries per query cluster (0: only the mean)
  // EAR probe: one more probe row per query cluster, the cluster's mean query (rounded to the
  // input's dtype). On the quality model's captures the mean row alone ranks blocks much better
  // than 4 sampled queries, with a quarter of the probe rows; on the built-in workload it is
  // about even (docs/ALGORITHMS.md, "Which probe rows"). So the default probes with the mean
  // query alone; probe_queries = 4 with probe_mean = false was the default before.
  bool probe_mean = true;
  // EAR probe: measure the compensation errors on values sketched to this many dimensions (a
  // fixed +-1/sqrt(k) projection, unbiased for squared norms: a quarter of the probe's value work
  // at k = D/4); 0, or k >= D: every dimension (the default). A multiple of 16; the CUDA path
  // takes 32 only (docs/ALGORITHMS.md, "A sketched probe").
  int probe_value_dims = 0;
  std::uint64_t seed = 0;

  // How the CUDA path returns (no effect on the CPU path). true: it synchronizes the stream once
  // at the end, raises a non-finite input at once and fills the whole report. false: nothing
  // blocks the host, so it can queue the next layer while this one runs; needs a LayerState,
  // which keeps the input check until the state's next call or svgear::synchronize(state)
  // raises it, and the report is partial (AttentionReport::complete).
  bool synchronize = true;
};

// The published configuration of a method, with svgear's default hyperparameters.
MethodConfig preset(Method method);

Method parse_method(std::string_view name);  // "dense", "svg2", "ear"; throws svgear::Error
std::string method_name(Method method);
std::string policy_name(SelectionPolicyKind policy);
std::string compensation_name(Compensation compensation);
SelectionPolicyKind parse_policy(std::string_view name);  // "all", "criticality", "error-aware"
Compensation parse_compensation(std::string_view name);   // "drop", "centroid"
BudgetScope parse_budget_scope(std::string_view name);    // "call", "head"
std::string budget_scope_name(BudgetScope scope);

// Throws svgear::Error naming the first invalid field and its valid range.
void validate(const MethodConfig& config);

}  // namespace svgear
