// SVG-EAR's probe on the CPU (cpu::probe_compensation_error) against a brute-force reading of
// its definition: for each probe row q, the output with one key cluster swapped for its centroid
// stand-in, computed as a plain softmax over a rebuilt key set, minus the exact output.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cpu/block_scores.hpp"
#include "cpu/error_probe.hpp"
#include "cpu/random.hpp"
#include "test_support.hpp"

using namespace svgear;

namespace {

constexpr std::int64_t kD = 16;

// Softmax attention of one query over weighted keys: key r counts weight[r] times.
std::vector<double> attend(const float* query, const std::vector<std::vector<double>>& keys,
                           const std::vector<std::vector<double>>& values, const std::vector<double>& weight) {
  std::vector<double> logits(keys.size());
  double top = -INFINITY;
  for (std::size_t r = 0; r < keys.size(); ++r) {
    double dot = 0;
    for (std::int64_t t = 0; t < kD; ++t) dot += double(query[t]) * keys[r][std::size_t(t)];
    logits[r] = dot / std::sqrt(double(kD)) + std::log(weight[r]);
    top = std::max(top, logits[r]);
  }
  std::vector<double> out(kD, 0.0);
  double mass = 0;
  for (std::size_t r = 0; r < keys.size(); ++r) {
    const double w = std::exp(logits[r] - top);
    mass += w;
    for (std::int64_t t = 0; t < kD; ++t) out[std::size_t(t)] += w * values[r][std::size_t(t)];
  }
  for (double& x : out) x /= mass;
  return out;
}

// ||o_j'(q) - o(q)||^2 for every key cluster j, by rebuilding the key set.
std::vector<double> brute_force_errors(const float* query, const std::vector<float>& kp, const std::vector<float>& vp,
                                       const cpu::ClusterLayout& keys, const std::vector<float>& key_means,
                                       const std::vector<float>& value_means) {
  const auto row = [&](const std::vector<float>& rows, std::int64_t r) {
    return std::vector<double>(rows.begin() + r * kD, rows.begin() + (r + 1) * kD);
  };
  std::vector<std::vector<double>> all_k, all_v;
  for (std::int64_t r = 0; r < std::int64_t(keys.order.size()); ++r) {
    all_k.push_back(row(kp, r));
    all_v.push_back(row(vp, r));
  }
  const std::vector<double> exact = attend(query, all_k, all_v, std::vector<double>(all_k.size(), 1.0));
  std::vector<double> errors;
  for (int j = 0; j < keys.clusters(); ++j) {
    std::vector<std::vector<double>> k_swapped, v_swapped;
    std::vector<double> weight;
    for (int other = 0; other < keys.clusters(); ++other) {
      if (other == j) {
        k_swapped.push_back(row(key_means, j));
        v_swapped.push_back(row(value_means, j));
        weight.push_back(double(keys.size(j)));
        continue;
      }
      for (std::int64_t r = keys.offsets[std::size_t(other)]; r < keys.offsets[std::size_t(other) + 1]; ++r) {
        k_swapped.push_back(row(kp, r));
        v_swapped.push_back(row(vp, r));
        weight.push_back(1.0);
      }
    }
    const std::vector<double> swapped = attend(query, k_swapped, v_swapped, weight);
    double squared = 0;
    for (std::int64_t t = 0; t < kD; ++t) squared += std::pow(swapped[std::size_t(t)] - exact[std::size_t(t)], 2);
    errors.push_back(squared);
  }
  return errors;
}

struct Problem {
  std::vector<float> qp, kp, vp;
  cpu::ClusterLayout queries, keys;
  std::vector<float> key_means, value_means;
  std::vector<std::int64_t> key_counts;
};

// Random rows in cluster order; query clusters of 1, 2, 5 and 9 rows (so 4 sampled probes take
// all of the small ones and a spread of the large one), key clusters of 1, 3, 4 and 8.
Problem make_problem(std::uint64_t seed) {
  Problem p;
  cpu::SplitMix64 rng(seed);
  const auto layout = [](std::vector<std::int64_t> sizes) {
    cpu::ClusterLayout l;
    l.offsets.push_back(0);
    for (std::int64_t s : sizes) l.offsets.push_back(l.offsets.back() + s);
    for (std::int64_t r = 0; r < l.offsets.back(); ++r) l.order.push_back(r);
    return l;
  };
  p.queries = layout({1, 2, 5, 9});
  p.keys = layout({1, 3, 4, 8});
  const auto fill = [&](std::vector<float>& rows, std::int64_t n, double scale) {
    for (std::int64_t i = 0; i < n * kD; ++i) rows.push_back(float(scale * svgear::testing::normal(rng)));
  };
  fill(p.qp, p.queries.offsets.back(), 1.5);
  fill(p.kp, p.keys.offsets.back(), 1.5);
  fill(p.vp, p.keys.offsets.back(), 1.0);
  p.key_means = cpu::cluster_means(p.kp.data(), p.keys.offsets, kD);
  p.value_means = cpu::cluster_means(p.vp.data(), p.keys.offsets, kD);
  for (int j = 0; j < p.keys.clusters(); ++j) p.key_counts.push_back(p.keys.size(j));
  return p;
}

// The sampled probe rows of each query cluster: `sampled` members at positions
// (2p + 1) size / (2 probes), or all rows of a smaller cluster.
std::vector<std::vector<const float*>> sampled_rows(const Problem& p, int sampled) {
  std::vector<std::vector<const float*>> rows(std::size_t(p.queries.clusters()));
  for (int i = 0; i < p.queries.clusters(); ++i) {
    const std::int64_t size = p.queries.size(i), probes = std::min<std::int64_t>(sampled, size);
    for (std::int64_t k = 0; k < probes; ++k) {
      rows[std::size_t(i)].push_back(p.qp.data() +
                                     (p.queries.offsets[std::size_t(i)] + (2 * k + 1) * size / (2 * probes)) * kD);
    }
  }
  return rows;
}

// The expected [C_q * C_k] errors: n^Q_i times the mean over the listed probe rows of cluster i.
void expect_matches(const Problem& p, const std::vector<double>& got,
                    const std::vector<std::vector<const float*>>& probe_rows) {
  const int ck = p.keys.clusters();
  ASSERT_EQ(got.size(), std::size_t(p.queries.clusters() * ck));
  for (int i = 0; i < p.queries.clusters(); ++i) {
    std::vector<double> want(std::size_t(ck), 0.0);
    for (const float* query : probe_rows[std::size_t(i)]) {
      const std::vector<double> e = brute_force_errors(query, p.kp, p.vp, p.keys, p.key_means, p.value_means);
      for (int j = 0; j < ck; ++j) want[std::size_t(j)] += e[std::size_t(j)];
    }
    for (int j = 0; j < ck; ++j) {
      const double weight = double(p.queries.size(i)) / double(probe_rows[std::size_t(i)].size());
      const double expected = want[std::size_t(j)] * weight;
      // The probe takes q.k in float (rounding ~1e-7 of each logit); a wrong row or weight is off by O(1).
      EXPECT_NEAR(got[std::size_t(i * ck + j)], expected, 1e-9 + 1e-5 * expected) << "block " << i << ", " << j;
    }
  }
}

}  // namespace

TEST(ErrorProbe, SampledQueriesMatchTheDefinition) {
  const Problem p = make_problem(3);
  const cpu::KeyClusterSummary summary{p.key_means.data(), p.value_means.data(), p.key_counts.data()};
  const std::vector<double> got =
      cpu::probe_compensation_error(p.qp.data(), p.kp.data(), p.vp.data(), kD, p.queries, p.keys, summary,
                                    cpu::ProbeRows{4, nullptr});
  expect_matches(p, got, sampled_rows(p, 4));
  // A one-row key cluster is its own centroid: no error to compensate.
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(got[std::size_t(i * 4)], 0.0, 1e-12);
}

TEST(ErrorProbe, MeanQueryRowIsOneMoreProbe) {
  const Problem p = make_problem(11);
  const cpu::KeyClusterSummary summary{p.key_means.data(), p.value_means.data(), p.key_counts.data()};
  const std::vector<float> means = cpu::cluster_means(p.qp.data(), p.queries.offsets, kD);
  for (int sampled : {0, 2}) {
    const std::vector<double> got = cpu::probe_compensation_error(
        p.qp.data(), p.kp.data(), p.vp.data(), kD, p.queries, p.keys, summary, cpu::ProbeRows{sampled, means.data()});
    std::vector<std::vector<const float*>> rows = sampled_rows(p, sampled);
    for (int i = 0; i < 4; ++i) rows[std::size_t(i)].push_back(means.data() + i * kD);
    SCOPED_TRACE("sampled " + std::to_string(sampled));
    expect_matches(p, got, rows);
  }
}

// The sketched probe (value_sketch_dims) is the exact probe of values projected by the fixed
// +-1/sqrt(k) matrix; at k >= d it is the exact probe itself.
TEST(ErrorProbe, SketchedProbeIsTheProbeOfProjectedValues) {
  const Problem p = make_problem(5);
  const cpu::KeyClusterSummary summary{p.key_means.data(), p.value_means.data(), p.key_counts.data()};
  const cpu::ProbeRows rows{2, nullptr};
  const std::vector<double> exact = cpu::probe_compensation_error(p.qp.data(), p.kp.data(), p.vp.data(), kD, p.queries,
                                                                  p.keys, summary, rows);
  EXPECT_EQ(cpu::probe_compensation_error(p.qp.data(), p.kp.data(), p.vp.data(), kD, p.queries, p.keys, summary, rows,
                                          int(kD)),
            exact);
  const int k = 8;
  auto project = [&](const std::vector<float>& in) {
    const std::int64_t n = std::int64_t(in.size()) / kD;
    std::vector<float> out(std::size_t(n * k));
    for (std::int64_t i = 0; i < n; ++i)
      for (int r = 0; r < k; ++r) {
        double sum = 0;
        for (std::int64_t c = 0; c < kD; ++c) sum += (value_sketch_positive(r, c) ? 1.0 : -1.0) * in[std::size_t(i * kD + c)];
        out[std::size_t(i * k + r)] = float(sum / std::sqrt(double(k)));
      }
    return out;
  };
  // The probe with projected values, computed the long way: values of width k, keys of width d.
  const std::vector<float> vp_k = project(p.vp), means_k = project(p.value_means);
  std::vector<float> vp_wide(p.vp.size(), 0.0f), means_wide(p.value_means.size(), 0.0f);
  for (std::size_t i = 0; i < vp_k.size() / k; ++i)
    for (int r = 0; r < k; ++r) vp_wide[i * kD + std::size_t(r)] = vp_k[i * k + std::size_t(r)];
  for (std::size_t i = 0; i < means_k.size() / k; ++i)
    for (int r = 0; r < k; ++r) means_wide[i * kD + std::size_t(r)] = means_k[i * k + std::size_t(r)];
  const cpu::KeyClusterSummary wide{p.key_means.data(), means_wide.data(), p.key_counts.data()};
  const std::vector<double> want = cpu::probe_compensation_error(p.qp.data(), p.kp.data(), vp_wide.data(), kD, p.queries,
                                                                 p.keys, wide, rows);
  const std::vector<double> got = cpu::probe_compensation_error(p.qp.data(), p.kp.data(), p.vp.data(), kD, p.queries,
                                                                p.keys, summary, rows, k);
  ASSERT_EQ(got.size(), want.size());
  double total = 0, total_exact = 0;
  for (std::size_t b = 0; b < got.size(); ++b) {
    EXPECT_NEAR(got[b], want[b], 1e-9 + 1e-4 * want[b]) << "block " << b;
    total += got[b];
    total_exact += exact[b];
  }
  EXPECT_NE(got, exact);  // the sketch did something
  EXPECT_NEAR(total, total_exact, 0.5 * total_exact);  // and estimates the same squared norms
}
