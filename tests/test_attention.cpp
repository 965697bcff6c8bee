// The pipeline end to end on the CPU: the properties the methods promise.
#include <gtest/gtest.h>
#include <omp.h>

#include "svgear/attention.hpp"
#include "svgear/error.hpp"
#include "svgear/metrics.hpp"
#include "test_support.hpp"

using namespace svgear;
using svgear::testing::clustered_qkv;
using svgear::testing::clustered_tensor;
using svgear::testing::Qkv;
using svgear::testing::qkv_with_six_key_values;
using svgear::testing::small_config;
using svgear::testing::random_tensor;

namespace {

HostTensor run(const Qkv& in, const MethodConfig& config, AttentionReport* report = nullptr,
               LayerState* state = nullptr) {
  HostTensor out(DType::f32, in.q.shape);
  for (std::int64_t i = 0; i < out.numel(); ++i) out.set(i, std::nanf(""));  // poison
  const AttentionReport r = attention(in.q.view_bhsd("q"), in.k.view_bhsd("k"), in.v.view_bhsd("v"),
                                      out.view_bhsd("out"), config, state);
  if (report) *report = r;
  return out;
}

double error_vs(const HostTensor& out, const HostTensor& ref) {
  return compare(out.view_bhsd("out"), ref.view_bhsd("ref")).rel_l2;
}

}  // namespace

TEST(Attention, SparseAtFullDensityEqualsDense) {
  const Qkv in = clustered_qkv(300, 32, 11);
  const HostTensor dense = run(in, preset(Method::dense));
  for (Method method : {Method::svg2, Method::ear}) {
    AttentionReport report;
    const HostTensor sparse = run(in, small_config(method, 1.0), &report);
    EXPECT_DOUBLE_EQ(report.density, 1.0);
    EXPECT_LE(error_vs(sparse, dense), 1e-6) << method_name(method);
  }
}

TEST(Attention, DenseMatchesNaiveFloat64Softmax) {
  const HostTensor q = random_tensor({1, 1, 37, 8}, 1), k = random_tensor({1, 1, 53, 8}, 2),
                   v = random_tensor({1, 1, 53, 8}, 3);
  HostTensor out(DType::f32, {1, 1, 37, 8});
  dense_attention(q.view_bhsd("q"), k.view_bhsd("k"), v.view_bhsd("v"), out.view_bhsd("out"));
  for (int i = 0; i < 37; ++i) {
    std::vector<double> logits(53);
    double mx = -1e300, den = 0;
    for (int j = 0; j < 53; ++j) {
      double s = 0;
      for (int t = 0; t < 8; ++t) s += double(q.at(i * 8 + t)) * k.at(j * 8 + t);
      logits[std::size_t(j)] = s / std::sqrt(8.0);
      mx = std::max(mx, logits[std::size_t(j)]);
    }
    for (double& l : logits) den += (l = std::exp(l - mx));
    for (int t = 0; t < 8; ++t) {
      double o = 0;
      for (int j = 0; j < 53; ++j) o += logits[std::size_t(j)] * v.at(j * 8 + t);
      EXPECT_NEAR(out.at(i * 8 + t), o / den, 1e-6);
    }
  }
}

TEST(Attention, CentroidCompensationIsExactWhenClusterKeysAreIdentical) {
  // Keys take only 6 distinct values, so with 6 key clusters every cluster's keys coincide
  // with its centroid and compensation reproduces the skipped blocks exactly.
  const std::int64_t s = 240, d = 16;
  const Qkv in = qkv_with_six_key_values(s, d);
  const HostTensor dense = run(in, preset(Method::dense));
  for (double density : {0.05, 0.2, 0.5, 0.9}) {
    MethodConfig config = small_config(Method::ear, density);
    config.clusters_k = 6;
    EXPECT_LE(error_vs(run(in, config), dense), 1e-6) << "density " << density;
  }
}

TEST(Attention, DensityWithinOneBlockOfTheBudget) {
  const Qkv in = clustered_qkv(400, 16, 21);
  for (Method method : {Method::svg2, Method::ear}) {
    for (double density : {0.1, 0.3, 0.6}) {
      AttentionReport report;
      run(in, small_config(method, density), &report);
      EXPECT_GE(report.density, density - 1e-12);
      // One block is at most the largest query cluster times the largest key cluster; per head.
      EXPECT_LE(report.density, density + 0.25) << method_name(method);
      EXPECT_GT(report.selected_blocks, 0);
    }
  }
}

TEST(Attention, DeterministicForAFixedSeed) {
  const Qkv in = clustered_qkv(256, 16, 31);
  const HostTensor a = run(in, small_config(Method::ear, 0.2)), b = run(in, small_config(Method::ear, 0.2));
  EXPECT_EQ(a.bytes, b.bytes);
  MethodConfig other = small_config(Method::ear, 0.2);
  other.seed = 99;
  EXPECT_NE(run(in, other).bytes, a.bytes);  // the seed does reach k-means++
}

TEST(Attention, WarmStartUsesAndUpdatesTheState) {
  const Qkv in = clustered_qkv(256, 16, 41);
  LayerState state;
  AttentionReport first, second;
  run(in, small_config(Method::ear, 0.2), &first, &state);
  EXPECT_FALSE(first.warm_started);
  EXPECT_EQ(state.steps, 1);
  EXPECT_EQ(state.k_centroids.size(), std::size_t(2 * 16 * 16));
  const HostTensor dense = run(in, preset(Method::dense));
  const HostTensor warm = run(in, small_config(Method::ear, 0.2), &second, &state);
  EXPECT_TRUE(second.warm_started);
  EXPECT_EQ(state.steps, 2);
  EXPECT_LT(error_vs(warm, dense), 0.2);
  // Another cluster count does not fit the cache: cold start, cache replaced.
  MethodConfig other = small_config(Method::ear, 0.2);
  other.clusters_k = 8;
  AttentionReport third;
  run(in, other, &third, &state);
  EXPECT_FALSE(third.warm_started);
  EXPECT_EQ(state.k_centroids.size(), std::size_t(2 * 8 * 16));
}

TEST(Attention, StridedAndReducedPrecisionTensors) {
  // q, k, v stored as (B, S, H, D) in bf16 and viewed as [B, H, S, D] by strides.
  const std::int64_t s = 128, h = 2, d = 16;
  const Qkv in = clustered_qkv(s, d, 51, h);
  auto to_bshd = [&](const HostTensor& t, DType dtype) {
    HostTensor r(dtype, {1, s, h, d});
    for (std::int64_t hh = 0; hh < h; ++hh)
      for (std::int64_t ss = 0; ss < s; ++ss)
        for (std::int64_t dd = 0; dd < d; ++dd) r.set((ss * h + hh) * d + dd, t.at((hh * s + ss) * d + dd));
    return r;
  };
  auto view = [&](const HostTensor& t) {
    TensorView v = t.view_bhsd("t");
    v.shape = {1, h, s, d};
    v.strides = {s * h * d, d, h * d, 1};
    return v;
  };
  const HostTensor q = to_bshd(in.q, DType::bf16), k = to_bshd(in.k, DType::bf16), v = to_bshd(in.v, DType::bf16);
  HostTensor out(DType::bf16, {1, s, h, d}), ref(DType::f32, {1, s, h, d});
  attention(view(q), view(k), view(v), view(out), small_config(Method::ear, 1.0));
  dense_attention(view(q), view(k), view(v), view(ref));
  EXPECT_LE(compare(view(out), view(ref)).rel_l2, 1e-2);  // bf16 output rounding only
}

TEST(Attention, SameBytesWhateverTheThreadCount) {
  const Qkv in = clustered_qkv(256, 16, 61);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const HostTensor one = run(in, small_config(Method::ear, 0.2));
  omp_set_num_threads(std::max(threads, 2));
  const HostTensor many = run(in, small_config(Method::ear, 0.2));
  omp_set_num_threads(threads);
  EXPECT_EQ(one.bytes, many.bytes);
}
