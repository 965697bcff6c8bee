#include "method_options.hpp"

#include "probe_mean_flag.hpp"
#include "svgear/error.hpp"

namespace svgear::cli {

void add_method_options(CLI::App& command, MethodOptions& options, bool with_budget) {
  MethodConfig& d = options.defaults;
  if (with_budget) {
    auto* density = command.add_option("--density", options.density,
                                       "Fraction of query-key pairs computed exactly, in (0, 1]; blocks are "
                                       "taken in the policy's order until it is reached");
    auto* top_p = command.add_option("--top-p", options.top_p,
                                     "SVG2 only: per query cluster, key clusters until this cumulative "
                                     "estimated mass (replaces --density)");
    density->excludes(top_p);
  }
  command.add_option("--budget-scope", options.budget_scope,
                     "call: one budget shared by all heads (blocks compete across heads); head: the same "
                     "density in every head (default: the method's own, ear call, svg2 head)");
  command.add_option("--clusters-q", d.clusters_q, "k-means clusters of the queries, per head")->capture_default_str();
  command.add_option("--clusters-k", d.clusters_k, "k-means clusters of the keys, per head")->capture_default_str();
  command.add_option("--kmeans-iters", d.kmeans_iterations, "k-means iterations from a cold start")
      ->capture_default_str();
  command.add_option("--warm-iters", d.kmeans_warm_iterations,
                     "k-means iterations when warm-started from the previous step's centroids")
      ->capture_default_str();
  command.add_option("--query-tail-limit", d.query_tail_limit,
                     "Query clusters with at most this many rows past whole 64-row tiles hand them to their "
                     "members' second-nearest clusters (fewer padding rows in the CUDA kernel; 0: off)")
      ->capture_default_str();
  command.add_option("--probe-queries", d.probe_queries,
                     "EAR probe: sampled queries per query cluster (0: only the mean query, with --probe-mean)")
      ->capture_default_str();
  add_probe_mean_flag(command, d.probe_mean);
  command.add_option("--probe-value-dims", d.probe_value_dims,
                     "EAR probe: measure errors on values sketched to this many dimensions (0: all)")
      ->capture_default_str();
  command.add_option("--min-key-fraction", d.min_key_fraction,
                     "SVG2 top-p mode: at least this fraction of key clusters per query cluster")
      ->capture_default_str();
  command.add_option("--seed", d.seed, "Seed of the k-means++ initialisation")->capture_default_str();
  command.add_option("--init", options.init, "k-means initialisation: kmeans++ or strided")->capture_default_str();
  command.add_option("--policy", options.policy,
                     "Override the method's selection policy: all, criticality or error-aware");
  command.add_option("--compensation", options.compensation,
                     "Override the method's compensation of skipped blocks: drop or centroid");
}

MethodConfig make_config(Method method, const MethodOptions& options) {
  MethodConfig config = options.defaults;
  const MethodConfig published = preset(method);
  config.method = method;
  config.policy = options.policy.empty() ? published.policy : parse_policy(options.policy);
  config.compensation =
      options.compensation.empty() ? published.compensation : parse_compensation(options.compensation);
  if (options.init == "kmeans++") {
    config.kmeans_init = KmeansInit::kmeans_plus_plus;
  } else if (options.init == "strided") {
    config.kmeans_init = KmeansInit::strided;
  } else {
    throw Error("unknown --init '" + options.init + "': choose kmeans++ or strided");
  }
  config.top_p = options.top_p;
  config.budget_scope = options.budget_scope.empty() ? published.budget_scope : parse_budget_scope(options.budget_scope);
  if (method == Method::dense) {
    config.density = 1.0;
  } else if (options.density) {
    config.density = *options.density;
  } else if (!options.top_p) {
    throw Error("--density is required for method " + method_name(method) +
                " (or --top-p for svg2's own top-p selection)");
  }
  if (options.top_p && method != Method::svg2) throw Error("--top-p applies to method svg2 only");
  validate(config);
  return config;
}

}  // namespace svgear::cli
