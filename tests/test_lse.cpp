// The optional log-sum-exp output of attention: ln of each row's softmax denominator over
// exactly the terms the method sums (exact keys; with centroid compensation n_j e^{q.mu_j/sqrt D}
// per skipped key cluster). Checked against direct float64 sums, through the merge identity a
// caller relies on (two attentions over disjoint key sets combine into one), and for an
// unchanged output.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu/block_scores.hpp"
#include "cpu/block_sparse_attention.hpp"
#include "cpu/permutation.hpp"
#include "cpu/random.hpp"
#include "svgear/attention.hpp"
#include "svgear/error.hpp"
#include "test_support.hpp"

using namespace svgear;
using svgear::testing::clustered_qkv;
using svgear::testing::clustered_tensor;
using svgear::testing::Qkv;
using svgear::testing::qkv_with_six_key_values;
using svgear::testing::small_config;
using svgear::testing::random_tensor;

namespace {

// An lse tensor [B, H, Sq, 1] for q, poisoned with NaN.
HostTensor lse_for(const HostTensor& q) {
  HostTensor lse(DType::f32, {q.shape[0], q.shape[1], q.shape[2], 1});
  for (std::int64_t i = 0; i < lse.numel(); ++i) lse.set(i, std::nanf(""));
  return lse;
}

struct Result {
  HostTensor out, lse;
};

// attention() with an lse output (or without, lse left empty).
Result run(const Qkv& in, const MethodConfig& config, bool with_lse = true) {
  Result r{HostTensor(DType::f32, in.q.shape), lse_for(in.q)};
  for (std::int64_t i = 0; i < r.out.numel(); ++i) r.out.set(i, std::nanf(""));
  const TensorView lse_view = r.lse.view_bhsd("lse");
  attention(in.q.view_bhsd("q"), in.k.view_bhsd("k"), in.v.view_bhsd("v"), r.out.view_bhsd("out"), config, nullptr,
            nullptr, with_lse ? &lse_view : nullptr);
  return r;
}

// Direct float64 log-sum-exp of q.k / sqrt(D) over all keys, per row [B][H][Sq].
std::vector<double> naive_dense_lse(const HostTensor& q, const HostTensor& k) {
  const std::int64_t bh = q.shape[0] * q.shape[1], sq = q.shape[2], sk = k.shape[2], d = q.shape[3];
  std::vector<double> result;
  for (std::int64_t head = 0; head < bh; ++head) {
    for (std::int64_t i = 0; i < sq; ++i) {
      std::vector<double> logits(static_cast<std::size_t>(sk));
      double mx = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < sk; ++j) {
        double s = 0;
        for (std::int64_t t = 0; t < d; ++t) s += double(q.at((head * sq + i) * d + t)) * k.at((head * sk + j) * d + t);
        logits[std::size_t(j)] = s / std::sqrt(double(d));
        mx = std::max(mx, logits[std::size_t(j)]);
      }
      double sum = 0;
      for (double l : logits) sum += std::exp(l - mx);
      result.push_back(mx + std::log(sum));
    }
  }
  return result;
}

double max_abs_difference(const HostTensor& a, const HostTensor& b) {
  double worst = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double diff = std::fabs(double(a.at(i)) - b.at(i));
    if (!(diff <= worst)) worst = diff;  // NaN propagates
  }
  return worst;
}

}  // namespace

TEST(Lse, DenseMatchesNaiveFloat64LogSumExp) {
  const HostTensor q = random_tensor({2, 2, 37, 8}, 1, 1.5), k = random_tensor({2, 2, 53, 8}, 2),
                   v = random_tensor({2, 2, 53, 8}, 3);
  const std::vector<double> want = naive_dense_lse(q, k);
  HostTensor out(DType::f32, q.shape), lse = lse_for(q);
  const TensorView lse_view = lse.view_bhsd("lse");
  dense_attention(q.view_bhsd("q"), k.view_bhsd("k"), v.view_bhsd("v"), out.view_bhsd("out"), &lse_view);
  ASSERT_EQ(std::size_t(lse.numel()), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(lse.at(std::int64_t(i)), want[i], 1e-6 * std::max(1.0, std::fabs(want[i]))) << "row " << i;
  }
  // The same through attention() with the dense preset.
  const Result r = run({q, k, v}, preset(Method::dense));
  EXPECT_EQ(r.lse.bytes, lse.bytes);
  EXPECT_EQ(r.out.bytes, out.bytes);
}

TEST(Lse, EveryMethodAtFullDensityGivesTheDenseLse) {
  const Qkv in = clustered_qkv(300, 32, 11);
  const Result dense = run(in, preset(Method::dense));
  for (Method method : {Method::svg2, Method::ear}) {
    const Result sparse = run(in, small_config(method, 1.0));
    EXPECT_LE(max_abs_difference(sparse.lse, dense.lse), 1e-5) << method_name(method);
  }
}

TEST(Lse, OutputIsTheSameBytesWithOrWithoutLse) {
  const Qkv in = clustered_qkv(256, 16, 21);
  for (const MethodConfig& config : {preset(Method::dense), small_config(Method::svg2, 0.2), small_config(Method::ear, 0.2)}) {
    const Result with = run(in, config, true), without = run(in, config, false);
    EXPECT_EQ(with.out.bytes, without.out.bytes) << method_name(config.method);
    for (std::int64_t i = 0; i < with.lse.numel(); ++i) {
      ASSERT_TRUE(std::isfinite(with.lse.at(i))) << method_name(config.method) << " row " << i;
    }
  }
}

// Drop mode sums a subset of the dense terms, so its lse cannot exceed the dense one; centroid
// compensation puts every skipped cluster back as n_j copies of its centroid, so it stays close.
TEST(Lse, DropModeIsBelowDenseAndCompensationStaysClose) {
  const Qkv in = clustered_qkv(320, 16, 31);
  const Result dense = run(in, preset(Method::dense));
  for (double density : {0.05, 0.2, 0.5}) {
    const Result svg2 = run(in, small_config(Method::svg2, density));
    const Result ear = run(in, small_config(Method::ear, density));
    double ear_gap = 0;
    for (std::int64_t i = 0; i < dense.lse.numel(); ++i) {
      ASSERT_TRUE(std::isfinite(svg2.lse.at(i)) && std::isfinite(ear.lse.at(i))) << "row " << i;
      EXPECT_LE(svg2.lse.at(i), dense.lse.at(i) + 1e-5) << "density " << density << " row " << i;
      ear_gap = std::max(ear_gap, std::fabs(double(ear.lse.at(i)) - dense.lse.at(i)));
    }
    EXPECT_LT(ear_gap, 0.5) << "density " << density;
  }
}

TEST(Lse, CompensationIsExactWhenClusterKeysAreIdentical) {
  // Keys take 6 distinct values and there are 6 key clusters: each skipped cluster's n_j
  // e^{q.mu_j / sqrt D} is exactly its keys' sum, so the lse is the dense one at every density.
  const std::int64_t s = 240, d = 16;
  const Qkv in = qkv_with_six_key_values(s, d);
  const Result dense = run(in, preset(Method::dense));
  for (double density : {0.05, 0.2, 0.5}) {
    MethodConfig config = small_config(Method::ear, density);
    config.clusters_k = 6;
    EXPECT_LE(max_abs_difference(run(in, config).lse, dense.lse), 1e-5) << "density " << density;
  }
}

// The use the output exists for: attention over two disjoint key sets, merged by their lse,
// equals attention over all keys; and the merged lse is ln(e^lse1 + e^lse2).
TEST(Lse, MergingTwoKeySetsByLseGivesAttentionOverAll) {
  const std::int64_t sq = 45, sk = 70, split = 23, d = 16;
  const HostTensor q = random_tensor({1, 2, sq, d}, 41, 1.5), k = random_tensor({1, 2, sk, d}, 42),
                   v = random_tensor({1, 2, sk, d}, 43);
  // Key subsets as strided views into k and v (no copies): tokens [0, split) and [split, sk).
  auto part = [&](const HostTensor& t, std::int64_t begin, std::int64_t end) {
    TensorView view = t.view_bhsd("t");
    view.data = const_cast<unsigned char*>(t.bytes.data()) + begin * d * std::int64_t(sizeof(float));
    view.shape[2] = end - begin;
    return view;
  };
  HostTensor full_out(DType::f32, q.shape), full_lse = lse_for(q);
  HostTensor out1(DType::f32, q.shape), out2(DType::f32, q.shape), lse1 = lse_for(q), lse2 = lse_for(q);
  const TensorView full_lse_view = full_lse.view_bhsd("lse"), lse1_view = lse1.view_bhsd("lse"),
                   lse2_view = lse2.view_bhsd("lse");
  const TensorView qv = q.view_bhsd("q");
  dense_attention(qv, k.view_bhsd("k"), v.view_bhsd("v"), full_out.view_bhsd("out"), &full_lse_view);
  dense_attention(qv, part(k, 0, split), part(v, 0, split), out1.view_bhsd("out"), &lse1_view);
  dense_attention(qv, part(k, split, sk), part(v, split, sk), out2.view_bhsd("out"), &lse2_view);
  for (std::int64_t row = 0; row < 2 * sq; ++row) {
    const double l1 = lse1.at(row), l2 = lse2.at(row), m = std::max(l1, l2);
    const double w1 = std::exp(l1 - m), w2 = std::exp(l2 - m);
    EXPECT_NEAR(m + std::log(w1 + w2), full_lse.at(row), 1e-5) << "row " << row;
    for (std::int64_t t = 0; t < d; ++t) {
      const double merged = (out1.at(row * d + t) * w1 + out2.at(row * d + t) * w2) / (w1 + w2);
      EXPECT_NEAR(merged, full_out.at(row * d + t), 1e-5) << "row " << row << " dim " << t;
    }
  }
}

// The CPU kernel on a hand-made plan: the lse is ln of the direct float64 sum of the terms,
// exact keys of selected blocks plus n_j e^{q.mu_j / sqrt D} per skipped non-empty cluster.
TEST(Lse, BlockSparseKernelSumsExactlyTheSelectedAndCompensatedTerms) {
  const std::int64_t sq = 60, sk = 90, d = 8;
  const int cq = 4, ck = 7;
  const HostTensor q = random_tensor({sq, d}, 51, 1.5), k = random_tensor({sk, d}, 52), v = random_tensor({sk, d}, 53);
  cpu::SplitMix64 rng(54);
  std::vector<std::int32_t> q_labels(static_cast<std::size_t>(sq)), k_labels(static_cast<std::size_t>(sk));
  for (auto& label : q_labels) label = std::int32_t(rng.next() % cq);
  for (auto& label : k_labels) label = std::int32_t(rng.next() % (ck - 1));  // cluster ck - 1 stays empty
  const cpu::ClusterLayout ql = cpu::cluster_layout(q_labels, cq), kl = cpu::cluster_layout(k_labels, ck);
  std::vector<float> qp(std::size_t(sq * d)), kp(std::size_t(sk * d)), vp(std::size_t(sk * d));
  std::vector<float> qf(qp.size()), kf(kp.size()), vf(vp.size());
  for (std::size_t i = 0; i < qf.size(); ++i) qf[i] = q.at(std::int64_t(i));
  for (std::size_t i = 0; i < kf.size(); ++i) kf[i] = k.at(std::int64_t(i)), vf[i] = v.at(std::int64_t(i));
  cpu::gather_rows(qf.data(), d, ql, qp.data());
  cpu::gather_rows(kf.data(), d, kl, kp.data());
  cpu::gather_rows(vf.data(), d, kl, vp.data());
  const std::vector<float> key_means = cpu::cluster_means(kp.data(), kl.offsets, d);
  const std::vector<float> value_means = cpu::cluster_means(vp.data(), kl.offsets, d);
  std::vector<std::int64_t> counts(static_cast<std::size_t>(ck));
  for (int j = 0; j < ck; ++j) counts[std::size_t(j)] = kl.size(j);
  const cpu::KeyClusterSummary summary{key_means.data(), value_means.data(), counts.data()};

  BlockSelection selection;
  selection.exact.assign(std::size_t(cq * ck), 0);
  for (int i = 0; i < cq; ++i) {
    selection.exact[std::size_t(i * ck + i)] = 1;  // every query cluster keeps one non-empty block
    for (int j = 0; j < ck; ++j) {
      if (rng.uniform() < 0.3) selection.exact[std::size_t(i * ck + j)] = 1;
    }
  }
  const double scale = 1.0 / std::sqrt(double(d));
  auto dot = [&](const float* a, const float* b) {
    double s = 0;
    for (std::int64_t t = 0; t < d; ++t) s += double(a[t]) * b[t];
    return s;
  };
  for (bool compensate : {false, true}) {
    std::vector<float> out(qp.size()), lse(static_cast<std::size_t>(sq), std::nanf(""));
    cpu::block_sparse_attention(qp.data(), kp.data(), vp.data(), d, ql, kl, selection,
                                compensate ? &summary : nullptr, out.data(), lse.data());
    for (int i = 0; i < cq; ++i) {
      for (std::int64_t r = ql.offsets[std::size_t(i)]; r < ql.offsets[std::size_t(i) + 1]; ++r) {
        const float* query = &qp[std::size_t(r * d)];
        double sum = 0;
        for (int j = 0; j < ck; ++j) {
          if (selection.exact[std::size_t(i * ck + j)]) {
            for (std::int64_t t = kl.offsets[std::size_t(j)]; t < kl.offsets[std::size_t(j) + 1]; ++t) {
              sum += std::exp(dot(query, &kp[std::size_t(t * d)]) * scale);
            }
          } else if (compensate && counts[std::size_t(j)] > 0) {
            sum += double(counts[std::size_t(j)]) * std::exp(dot(query, &key_means[std::size_t(j * d)]) * scale);
          }
        }
        EXPECT_NEAR(lse[std::size_t(r)], std::log(sum), 1e-5)
            << (compensate ? "compensation" : "drop") << " row " << r;
      }
    }
  }
}

TEST(Lse, StridedViewIsWrittenInPlaceOnly) {
  // lse as every third float of a [B, Sq, H, 3] buffer: strides {Sq*H*3, 3, H*3, 1}.
  const Qkv in = clustered_qkv(96, 16, 61);
  const std::int64_t h = 2, s = 96;
  HostTensor buffer(DType::f32, {1, s, h, 3});
  for (std::int64_t i = 0; i < buffer.numel(); ++i) buffer.set(i, 7.0f);
  TensorView lse = buffer.view_bhsd("lse");
  lse.shape = {1, h, s, 1};
  lse.strides = {s * h * 3, 3, h * 3, 1};
  HostTensor out(DType::f32, in.q.shape);
  const MethodConfig config = small_config(Method::ear, 0.3);
  attention(in.q.view_bhsd("q"), in.k.view_bhsd("k"), in.v.view_bhsd("v"), out.view_bhsd("out"), config, nullptr,
            nullptr, &lse);
  const Result contiguous = run(in, config);
  for (std::int64_t hh = 0; hh < h; ++hh) {
    for (std::int64_t ss = 0; ss < s; ++ss) {
      const std::int64_t base = (ss * h + hh) * 3;
      EXPECT_EQ(buffer.at(base), contiguous.lse.at(hh * s + ss)) << "head " << hh << " row " << ss;
      EXPECT_EQ(buffer.at(base + 1), 7.0f);
      EXPECT_EQ(buffer.at(base + 2), 7.0f);
    }
  }
}

TEST(Lse, BadLseViewIsRejectedBeforeAnyWrite) {
  const Qkv in = clustered_qkv(64, 8, 71);
  auto expect_rejected = [&](const HostTensor& lse_tensor, const std::string& keyword, Device device = Device::cpu) {
    HostTensor out(DType::f32, in.q.shape);
    for (std::int64_t i = 0; i < out.numel(); ++i) out.set(i, 7.0f);
    TensorView lse = lse_tensor.view_bhsd("lse");
    lse.device = device;
    for (const MethodConfig& config : {small_config(Method::ear, 0.2), preset(Method::dense)}) {
      try {
        attention(in.q.view_bhsd("q"), in.k.view_bhsd("k"), in.v.view_bhsd("v"), out.view_bhsd("out"), config,
                  nullptr, nullptr, &lse);
        ADD_FAILURE() << "no error; expected one mentioning '" << keyword << "'";
      } catch (const Error& e) {
        const std::string message = e.what();
        EXPECT_NE(message.find(keyword), std::string::npos) << message;
        EXPECT_EQ(message.find('\n'), std::string::npos) << message;
      }
    }
    for (std::int64_t i = 0; i < out.numel(); ++i) ASSERT_EQ(out.at(i), 7.0f) << "output written at " << i;
  };
  expect_rejected(HostTensor(DType::bf16, {1, 2, 64, 1}), "must be F32");
  expect_rejected(HostTensor(DType::f32, {1, 2, 64, 8}), "[B, H, Sq, 1] = [1, 2, 64, 1]");
  expect_rejected(HostTensor(DType::f32, {1, 2, 63, 1}), "[B, H, Sq, 1]");
  expect_rejected(HostTensor(DType::f32, {1, 2, 64, 1}), "different devices", Device::cuda);

  HostTensor out(DType::f32, in.q.shape), lse(DType::f32, {2, 64, 1});  // [H, S, 1]: B = 1, still fine
  const TensorView lse_view = lse.view_bhsd("lse");
  EXPECT_NO_THROW(dense_attention(in.q.view_bhsd("q"), in.k.view_bhsd("k"), in.v.view_bhsd("v"),
                                  out.view_bhsd("out"), &lse_view));
  const HostTensor wrong(DType::f16, {1, 2, 64, 1});
  const TensorView wrong_view = wrong.view_bhsd("lse");
  EXPECT_THROW(dense_attention(in.q.view_bhsd("q"), in.k.view_bhsd("k"), in.v.view_bhsd("v"), out.view_bhsd("out"),
                               &wrong_view),
               Error);
}
