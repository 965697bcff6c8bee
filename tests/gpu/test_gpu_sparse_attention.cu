// The GPU block-sparse attention kernel against the CPU reference on the same (bf16/f16-rounded)
// inputs: random and clustered data, both element types and head dims, drop and compensation,
// tails (S = 1, 127, 4097), sq != sk, clusters of one token, empty clusters, strided (B, S, H, D)
// tensors, and the dense (identity, one cluster) mode. Outputs are poisoned with NaN first.
// The optional lse output (each row's log-sum-exp) against the CPU kernel's on the same plan,
// and the output unchanged when it is requested (*Lse* tests).
// Every case runs on each kernel sparse_attention can pick (GpuSparseAttentionKernel/sm80 and
// /sm90; the wgmma one only on a compute capability 9.0 GPU, skipped elsewhere).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cpu/block_scores.hpp"
#include "cpu/block_sparse_attention.hpp"
#include "cpu/dense_attention.hpp"
#include "cpu/permutation.hpp"
#include "cpu/random.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/sparse_attention.hpp"
#include "svgear/dtype.hpp"
#include "svgear/error.hpp"
#include "test_support.hpp"

namespace svgear {
namespace {

using cuda::check_cuda;

constexpr double kTolerance = 1e-2;  // relative L2 error against the float64 CPU reference
constexpr double kLseTolerance = 2e-2;  // absolute, natural-log units, against the CPU kernel's lse

// Runs the test body with SVGEAR_ATTENTION_KERNEL set to the parameter (the caller's value is
// restored after); the wgmma kernel's instance is skipped where it cannot run.
class GpuSparseAttentionKernel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "sm90" && !cuda::sm90_attention_available()) {
      GTEST_SKIP() << "the wgmma kernel needs a compute capability 9.0 GPU and an sm_90a build";
    }
    kernel_.emplace("SVGEAR_ATTENTION_KERNEL", GetParam());
  }
  void TearDown() override { kernel_.reset(); }

 private:
  std::optional<testing::ScopedEnvironment> kernel_;
};

INSTANTIATE_TEST_SUITE_P(Kernels, GpuSparseAttentionKernel, ::testing::Values("sm80", "sm90"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    check_cuda(cudaMalloc(&data_, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    if (!host.empty()) {
      check_cuda(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    }
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(data_); }

  T* get() const { return data_; }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    if (count_ > 0) {
      check_cuda(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    }
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t count_;
};

double normal(cpu::SplitMix64& rng) {
  const double u1 = 1.0 - rng.uniform(), u2 = rng.uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

std::uint16_t to_bits(float value, DType dtype) {
  return dtype == DType::bf16 ? float_to_bf16(value) : float_to_half(value);
}
float from_bits(std::uint16_t bits, DType dtype) {
  return dtype == DType::bf16 ? bf16_to_float(bits) : half_to_float(bits);
}

// A [B, H, S, D] tensor: rounded values (the reference's input) and its device bits, laid out
// as [B, H, S, D] or, strided, as [B, S, H, D].
struct HostTensor4 {
  int b = 0, h = 0, d = 0;
  std::int64_t s = 0;
  bool bshd = false;
  std::vector<float> values;         // logical [B][H][S][D], already rounded
  std::vector<std::uint16_t> bits;   // physical layout

  std::int64_t logical(int bi, int hi, std::int64_t si) const { return ((std::int64_t(bi) * h + hi) * s + si) * d; }
  std::int64_t physical(int bi, int hi, std::int64_t si) const {
    return bshd ? ((std::int64_t(bi) * s + si) * h + hi) * d : logical(bi, hi, si);
  }
  cuda::DeviceTensor view(const void* data) const {
    cuda::DeviceTensor t;
    t.data = data;
    t.stride_b = s * h * d;
    t.stride_h = bshd ? d : s * d;
    t.stride_s = bshd ? std::int64_t(h) * d : d;
    return t;
  }
};

// Tokens around `classes` random centres per head (clustered) or i.i.d. normal, times `scale`.
HostTensor4 make_tensor(int b, int h, std::int64_t s, int d, DType dtype, bool bshd, double scale, int classes,
                        std::uint64_t seed) {
  HostTensor4 t;
  t.b = b, t.h = h, t.s = s, t.d = d, t.bshd = bshd;
  t.values.resize(std::size_t(b) * h * s * d);
  t.bits.resize(t.values.size());
  cpu::SplitMix64 rng(seed);
  std::vector<double> centres(std::size_t(std::max(classes, 1)) * d);
  for (int bi = 0; bi < b; ++bi) {
    for (int hi = 0; hi < h; ++hi) {
      for (double& c : centres) c = normal(rng);
      for (std::int64_t si = 0; si < s; ++si) {
        const int cls = classes > 0 ? int(rng.next() % std::uint64_t(classes)) : 0;
        for (int di = 0; di < d; ++di) {
          const double base = classes > 0 ? centres[std::size_t(cls) * d + di] + 0.4 * normal(rng) : normal(rng);
          const std::uint16_t bits = to_bits(float(scale * base), dtype);
          t.values[std::size_t(t.logical(bi, hi, si) + di)] = from_bits(bits, dtype);
          t.bits[std::size_t(t.physical(bi, hi, si) + di)] = bits;
        }
      }
    }
  }
  return t;
}

struct Case {
  std::string name;
  DType dtype = DType::bf16;
  int d = 128;
  int batch = 1, heads = 3;
  std::int64_t sq = 127, sk = 127;
  int cq = 8, ck = 16;
  bool singleton_q = false, singleton_k = false;  // every cluster one token (cq = sq / ck = sk)
  double density = 0.3;   // chance a (query cluster, non-empty key cluster) block is exact; >= 1: all
  bool compensate = false;
  bool bshd = false;      // q, k, v and out stored as [B, S, H, D]
  int classes = 0;        // > 0: clustered tokens
  bool reversed_tiles = false;  // work list entries in reverse order (no two of a cluster adjacent in order)
  bool lse = false;       // run again with the lse output: check it and that the output is unchanged
  std::uint64_t seed = 1;
};

// Labels with some clusters left empty: every 5th cluster (when there are at least 3) gets no token.
std::vector<std::int32_t> make_labels(std::int64_t n, int clusters, bool singleton, cpu::SplitMix64& rng) {
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  if (singleton) {
    for (std::int64_t i = 0; i < n; ++i) labels[std::size_t(i)] = std::int32_t(i);
    for (std::int64_t i = n - 1; i > 0; --i) {
      std::swap(labels[std::size_t(i)], labels[rng.next() % std::uint64_t(i + 1)]);
    }
    return labels;
  }
  std::vector<int> allowed;
  for (int c = 0; c < clusters; ++c) {
    if (clusters < 3 || c % 5 != 2) allowed.push_back(c);
  }
  for (auto& label : labels) label = allowed[rng.next() % allowed.size()];
  return labels;
}

struct Outcome {
  double rel_l2 = 0;
  std::int64_t non_finite = 0;
  std::int32_t flags = 0;
  // With Case::lse: the second run's lse against the CPU's, and whether its output differs.
  double lse_max_abs = 0;
  std::int64_t lse_non_finite = 0;
  bool output_changed = false;
};

// The lse output of a [B, H, S] problem as [B, H, S] or, with `bshd`, [B, S, H] floats.
cuda::DeviceRows lse_view(float* data, int heads, std::int64_t s, bool bshd) {
  cuda::DeviceRows rows;
  rows.data = data;
  rows.stride_b = s * heads;
  rows.stride_h = bshd ? 1 : s;
  rows.stride_s = bshd ? heads : 1;
  return rows;
}

// Runs `problem` again with the lse output (poisoned with NaN first) and compares it with
// `reference` ([B][H][S] logical), and the output with the first run's `bits`.
template <typename Array>
void check_lse_run(cuda::SparseAttentionProblem problem, const Array& out, const std::vector<std::uint16_t>& bits,
                   const std::vector<double>& reference, int batch, int heads, std::int64_t s, bool bshd,
                   Outcome& outcome) {
  const std::size_t rows = reference.size();
  float* lse = nullptr;
  check_cuda(cudaMalloc(&lse, rows * sizeof(float)), "cudaMalloc (lse)");
  check_cuda(cudaMemset(lse, 0xff, rows * sizeof(float)), "cudaMemset (lse NaN poison)");
  check_cuda(cudaMemset(out.get(), 0xff, bits.size() * sizeof(std::uint16_t)), "cudaMemset (NaN poison)");
  problem.lse = lse_view(lse, heads, s, bshd);
  cuda::sparse_attention(problem, nullptr);
  check_cuda(cudaDeviceSynchronize(), "sparse_attention (with lse)");
  std::vector<float> got(rows);
  check_cuda(cudaMemcpy(got.data(), lse, rows * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy D2H (lse)");
  cudaFree(lse);
  outcome.output_changed = out.download() != bits;
  for (int bi = 0; bi < batch; ++bi) {
    for (int hi = 0; hi < heads; ++hi) {
      for (std::int64_t si = 0; si < s; ++si) {
        const float value =
            got[std::size_t(bi * problem.lse.stride_b + hi * problem.lse.stride_h + si * problem.lse.stride_s)];
        const double want = reference[std::size_t((std::int64_t(bi) * heads + hi) * s + si)];
        if (!std::isfinite(value)) {
          ++outcome.lse_non_finite;
        } else {
          outcome.lse_max_abs = std::max(outcome.lse_max_abs, std::fabs(double(value) - want));
        }
      }
    }
  }
}

template <typename T>
std::vector<T> concat(std::vector<T> a, const std::vector<T>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Outcome run_case(const Case& c) {
  const int bh_count = c.batch * c.heads;
  const int cq = c.singleton_q ? int(c.sq) : c.cq;
  const int ck = c.singleton_k ? int(c.sk) : c.ck;
  const int d = c.d;
  const HostTensor4 q = make_tensor(c.batch, c.heads, c.sq, d, c.dtype, c.bshd, 1.5, c.classes, c.seed * 7 + 1);
  const HostTensor4 k = make_tensor(c.batch, c.heads, c.sk, d, c.dtype, c.bshd, 1.0, c.classes, c.seed * 7 + 2);
  const HostTensor4 v = make_tensor(c.batch, c.heads, c.sk, d, c.dtype, c.bshd, 1.0, 0, c.seed * 7 + 3);

  cpu::SplitMix64 rng(c.seed * 7 + 4);
  std::vector<std::int32_t> q_order, q_offsets, k_order, k_offsets, sel_offsets{0}, sel_clusters, comp_offsets{0},
      comp_clusters, key_counts;
  std::vector<float> key_means, value_means;
  std::vector<float> reference(q.values.size());
  std::vector<double> reference_lse(c.lse ? std::size_t(bh_count) * std::size_t(c.sq) : 0);

  for (int head = 0; head < bh_count; ++head) {
    const cpu::ClusterLayout ql = cpu::cluster_layout(make_labels(c.sq, cq, c.singleton_q, rng), cq);
    const cpu::ClusterLayout kl = cpu::cluster_layout(make_labels(c.sk, ck, c.singleton_k, rng), ck);
    for (auto x : ql.order) q_order.push_back(std::int32_t(x));
    for (auto x : ql.offsets) q_offsets.push_back(std::int32_t(x));
    for (auto x : kl.order) k_order.push_back(std::int32_t(x));
    for (auto x : kl.offsets) k_offsets.push_back(std::int32_t(x));

    // Selection: random blocks over non-empty key clusters; drop mode keeps >= 1 per non-empty
    // query cluster (the policies' guarantee); compensation mode leaves some rows with none.
    BlockSelection selection;
    selection.exact.assign(std::size_t(cq) * ck, 0);
    std::vector<int> non_empty_k;
    for (int j = 0; j < ck; ++j) {
      if (kl.size(j) > 0) non_empty_k.push_back(j);
    }
    for (int i = 0; i < cq; ++i) {
      std::vector<int> chosen;
      for (int j : non_empty_k) {
        if (c.density >= 1 || rng.uniform() < c.density) chosen.push_back(j);
      }
      if (c.compensate && c.density < 1 && i % 7 == 3) chosen.clear();
      if (!c.compensate && chosen.empty() && ql.size(i) > 0) {
        chosen.push_back(non_empty_k[rng.next() % non_empty_k.size()]);
      }
      // Any order in the list: shuffle.
      for (std::size_t x = chosen.size(); x > 1; --x) std::swap(chosen[x - 1], chosen[rng.next() % x]);
      for (int j : chosen) {
        selection.exact[std::size_t(i) * ck + j] = 1;
        sel_clusters.push_back(j);
      }
      sel_offsets.push_back(std::int32_t(sel_clusters.size()));
      for (int j : non_empty_k) {
        if (c.compensate && !selection.exact[std::size_t(i) * ck + j]) comp_clusters.push_back(j);
      }
      comp_offsets.push_back(std::int32_t(comp_clusters.size()));
    }

    // Reference on permuted float rows of the rounded inputs.
    const int bi = head / c.heads, hi = head % c.heads;
    const float* qh = &q.values[std::size_t(q.logical(bi, hi, 0))];
    const float* kh = &k.values[std::size_t(k.logical(bi, hi, 0))];
    const float* vh = &v.values[std::size_t(v.logical(bi, hi, 0))];
    std::vector<float> qp(std::size_t(c.sq) * d), kp(std::size_t(c.sk) * d), vp(std::size_t(c.sk) * d),
        op(std::size_t(c.sq) * d), lp(std::size_t(c.sq)), lse_head(std::size_t(c.sq));
    cpu::gather_rows(qh, d, ql, qp.data());
    cpu::gather_rows(kh, d, kl, kp.data());
    cpu::gather_rows(vh, d, kl, vp.data());
    const std::vector<float> km = cpu::cluster_means(kp.data(), kl.offsets, d);
    const std::vector<float> vm = cpu::cluster_means(vp.data(), kl.offsets, d);
    std::vector<std::int64_t> counts(static_cast<std::size_t>(ck));
    for (int j = 0; j < ck; ++j) counts[std::size_t(j)] = kl.size(j);
    const cpu::KeyClusterSummary summary{km.data(), vm.data(), counts.data()};
    cpu::block_sparse_attention(qp.data(), kp.data(), vp.data(), d, ql, kl, selection,
                                c.compensate ? &summary : nullptr, op.data(), c.lse ? lp.data() : nullptr);
    cpu::scatter_rows(op.data(), d, ql, &reference[std::size_t(q.logical(bi, hi, 0))]);
    if (c.lse) {
      cpu::scatter_rows(lp.data(), 1, ql, lse_head.data());
      std::copy(lse_head.begin(), lse_head.end(), reference_lse.begin() + std::ptrdiff_t(head) * c.sq);
    }
    key_means = concat(std::move(key_means), km);
    value_means = concat(std::move(value_means), vm);
    for (auto n : counts) key_counts.push_back(std::int32_t(n));
  }

  const DeviceArray<std::uint16_t> dq(q.bits), dk(k.bits), dv(v.bits);
  const DeviceArray<std::uint16_t> dout(q.bits.size());
  const DeviceArray<std::int32_t> d_q_order(q_order), d_q_offsets(q_offsets), d_k_order(k_order),
      d_k_offsets(k_offsets), d_sel_offsets(sel_offsets), d_sel_clusters(sel_clusters), d_comp_offsets(comp_offsets),
      d_comp_clusters(comp_clusters), d_key_counts(key_counts);
  const DeviceArray<float> d_key_means(key_means), d_value_means(value_means);
  const DeviceArray<std::int32_t> d_flags(std::vector<std::int32_t>{0});
  const std::int64_t capacity = cuda::query_tile_capacity(bh_count, c.sq, cq);
  const DeviceArray<std::int32_t> d_tiles(std::size_t(capacity) * 3);

  cuda::SparseAttentionProblem problem;
  problem.dtype = c.dtype;
  problem.batch = c.batch;
  problem.heads = c.heads;
  problem.sq = c.sq;
  problem.sk = c.sk;
  problem.head_dim = d;
  problem.q = q.view(dq.get());
  problem.k = k.view(dk.get());
  problem.v = v.view(dv.get());
  problem.out = q.view(dout.get());  // same shape and layout as q
  problem.query_clusters = cq;
  problem.key_clusters = ck;
  problem.q_order = d_q_order.get();
  problem.q_offsets = d_q_offsets.get();
  problem.k_order = d_k_order.get();
  problem.k_offsets = d_k_offsets.get();
  problem.selected_offsets = d_sel_offsets.get();
  problem.selected_clusters = d_sel_clusters.get();
  if (c.compensate) {
    problem.compensated_offsets = d_comp_offsets.get();
    problem.compensated_clusters = d_comp_clusters.get();
    problem.key_means = d_key_means.get();
    problem.value_means = d_value_means.get();
    problem.key_counts = d_key_counts.get();
  }
  problem.tiles = d_tiles.get();
  problem.tile_count = cuda::build_query_tiles(d_q_offsets.get(), bh_count, c.sq, cq, d_tiles.get(), capacity, nullptr);
  if (c.reversed_tiles) {
    std::vector<std::int32_t> tiles = d_tiles.download();
    for (std::size_t lo = 0, hi = tiles.size() / 3; lo + 1 < hi; ++lo, --hi) {
      std::swap_ranges(tiles.begin() + std::ptrdiff_t(3 * lo), tiles.begin() + std::ptrdiff_t(3 * lo + 3),
                       tiles.begin() + std::ptrdiff_t(3 * (hi - 1)));
    }
    check_cuda(cudaMemcpy(d_tiles.get(), tiles.data(), tiles.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice),
               "cudaMemcpy H2D (reversed work list)");
  }
  problem.error_flags = d_flags.get();

  check_cuda(cudaMemset(dout.get(), 0xff, q.bits.size() * sizeof(std::uint16_t)), "cudaMemset (NaN poison)");
  cuda::sparse_attention(problem, nullptr);
  check_cuda(cudaDeviceSynchronize(), "sparse_attention");

  Outcome outcome;
  outcome.flags = d_flags.download()[0];
  const std::vector<std::uint16_t> bits = dout.download();
  double diff = 0, norm = 0;
  for (int bi = 0; bi < c.batch; ++bi) {
    for (int hi = 0; hi < c.heads; ++hi) {
      for (std::int64_t si = 0; si < c.sq; ++si) {
        for (int di = 0; di < d; ++di) {
          const float got = from_bits(bits[std::size_t(q.physical(bi, hi, si) + di)], c.dtype);
          const double want = reference[std::size_t(q.logical(bi, hi, si) + di)];
          if (!std::isfinite(got)) ++outcome.non_finite;
          diff += (got - want) * (got - want);
          norm += want * want;
        }
      }
    }
  }
  outcome.rel_l2 = std::sqrt(diff / std::max(norm, 1e-30));
  if (c.lse) check_lse_run(problem, dout, bits, reference_lse, c.batch, c.heads, c.sq, c.bshd, outcome);
  return outcome;
}

void expect_matches(const Case& c) {
  SCOPED_TRACE(c.name + (c.dtype == DType::bf16 ? " bf16" : " f16") + " D=" + std::to_string(c.d) +
               (c.compensate ? " compensation" : " drop"));
  const Outcome outcome = run_case(c);
  EXPECT_EQ(outcome.non_finite, 0);
  EXPECT_EQ(outcome.flags, 0);
  EXPECT_LE(outcome.rel_l2, kTolerance);
  if (c.lse) {
    EXPECT_FALSE(outcome.output_changed) << "the output differs when lse is requested";
    EXPECT_EQ(outcome.lse_non_finite, 0);
    EXPECT_LE(outcome.lse_max_abs, kLseTolerance);
  }
}

// Every element type x head dim x mode on a case.
void expect_matches_all_variants(Case c) {
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (int d : {64, 128}) {
      for (bool compensate : {false, true}) {
        c.dtype = dtype;
        c.d = d;
        c.compensate = compensate;
        expect_matches(c);
        c.seed += 1;
      }
    }
  }
}

TEST_P(GpuSparseAttentionKernel, SmallTail127) {
  Case c;
  c.name = "S=127";
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, SmallSingleToken) {
  Case c;
  c.name = "S=1";
  c.sq = c.sk = 1;
  c.cq = c.ck = 1;
  c.density = 1;
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, SmallSqDiffersFromSkWithBatches) {
  Case c;
  c.name = "sq=100 sk=333 B=3 H=1";
  c.batch = 3;
  c.heads = 1;
  c.sq = 100;
  c.sk = 333;
  c.cq = 6;
  c.ck = 23;
  c.density = 0.2;
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, SmallClustersOfOneToken) {
  Case c;
  c.name = "singleton clusters";
  c.sq = 70;
  c.sk = 90;
  c.singleton_q = c.singleton_k = true;
  c.density = 0.3;
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, SmallStridedBshd) {
  Case c;
  c.name = "[B, S, H, D] layout";
  c.batch = 1;
  c.heads = 3;
  c.sq = 127;
  c.sk = 150;
  c.bshd = true;
  c.classes = 6;
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, SmallFullSelection) {
  Case c;
  c.name = "full selection";
  c.density = 1;
  c.sq = 200;
  c.sk = 130;
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, ManySmallClusters) {
  Case c;
  c.name = "many small clusters";
  c.sq = c.sk = 1000;
  c.cq = 400;
  c.ck = 700;
  c.density = 0.15;
  c.classes = 12;
  expect_matches_all_variants(c);
}

// Any order of the work list gives the same result; reversed, no entry is followed by the next
// 64 rows of its cluster, so a kernel that takes 128-row tiles must run every entry unpaired.
TEST_P(GpuSparseAttentionKernel, SmallWorkListInReverseOrder) {
  Case c;
  c.name = "reversed work list";
  c.batch = 2;
  c.heads = 1;
  c.sq = 300;
  c.sk = 260;
  c.cq = 3;
  c.ck = 9;
  c.density = 0.5;
  c.reversed_tiles = true;
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, LargeClusteredCompensation) {
  Case c;
  c.name = "S=4097 clustered";
  c.sq = c.sk = 4097;
  c.cq = 40;
  c.ck = 100;
  c.density = 0.15;
  c.classes = 20;
  c.compensate = true;
  c.d = 128;
  c.dtype = DType::bf16;
  expect_matches(c);
  c.dtype = DType::f16;
  c.d = 64;
  c.seed = 2;
  expect_matches(c);
}

TEST_P(GpuSparseAttentionKernel, LargeRandomDrop) {
  Case c;
  c.name = "S=4097 random";
  c.sq = c.sk = 4097;
  c.cq = 30;
  c.ck = 64;
  c.density = 0.4;
  c.compensate = false;
  c.d = 64;
  c.dtype = DType::bf16;
  expect_matches(c);
  c.dtype = DType::f16;
  c.d = 128;
  c.seed = 3;
  expect_matches(c);
}

// Dense mode: one cluster each side, identity orders, every key selected, implicit work list.
struct DenseCase {
  DType dtype;
  int d;
  int batch, heads;
  std::int64_t sq, sk;
  bool bshd;
  bool explicit_layout;  // offsets, selection and work list given instead of the null shortcuts
  double key_growth = 0;  // key row i scaled by 1 + key_growth * i / sk: logits that grow along the keys
};

// Scales row i of every head by 1 + growth * i / s and rounds it again to the element type.
void grow_rows(HostTensor4& t, double growth, DType dtype) {
  for (int bi = 0; bi < t.b; ++bi) {
    for (int hi = 0; hi < t.h; ++hi) {
      for (std::int64_t si = 0; si < t.s; ++si) {
        const double factor = 1.0 + growth * double(si) / double(t.s);
        for (int di = 0; di < t.d; ++di) {
          float& value = t.values[std::size_t(t.logical(bi, hi, si) + di)];
          const std::uint16_t bits = to_bits(float(factor * value), dtype);
          value = from_bits(bits, dtype);
          t.bits[std::size_t(t.physical(bi, hi, si) + di)] = bits;
        }
      }
    }
  }
}

// With `lse`, runs again with the lse output and checks it against the CPU's ordinary
// log-sum-exp, and that the output is unchanged.
void expect_dense_matches(const DenseCase& c, std::uint64_t seed, bool lse = false) {
  SCOPED_TRACE(std::string("dense ") + (c.dtype == DType::bf16 ? "bf16" : "f16") + " D=" + std::to_string(c.d) +
               " sq=" + std::to_string(c.sq) + " sk=" + std::to_string(c.sk) + (c.bshd ? " BSHD" : "") +
               (c.explicit_layout ? " explicit layout" : "") + (lse ? " lse" : "") +
               (c.key_growth != 0 ? " key growth " + std::to_string(c.key_growth) : ""));
  const int bh_count = c.batch * c.heads;
  const HostTensor4 q = make_tensor(c.batch, c.heads, c.sq, c.d, c.dtype, c.bshd, 1.5, 0, seed * 5 + 1);
  HostTensor4 k = make_tensor(c.batch, c.heads, c.sk, c.d, c.dtype, c.bshd, 1.0, 0, seed * 5 + 2);
  if (c.key_growth != 0) grow_rows(k, c.key_growth, c.dtype);
  const HostTensor4 v = make_tensor(c.batch, c.heads, c.sk, c.d, c.dtype, c.bshd, 1.0, 0, seed * 5 + 3);
  std::vector<float> reference(q.values.size()), reference_lse(std::size_t(bh_count) * std::size_t(c.sq));
  for (int bi = 0; bi < c.batch; ++bi) {
    for (int hi = 0; hi < c.heads; ++hi) {
      cpu::dense_attention_head(&q.values[std::size_t(q.logical(bi, hi, 0))],
                                &k.values[std::size_t(k.logical(bi, hi, 0))],
                                &v.values[std::size_t(v.logical(bi, hi, 0))], c.sq, c.sk, c.d,
                                &reference[std::size_t(q.logical(bi, hi, 0))],
                                &reference_lse[std::size_t((std::int64_t(bi) * c.heads + hi) * c.sq)]);
    }
  }
  const DeviceArray<std::uint16_t> dq(q.bits), dk(k.bits), dv(v.bits), dout(q.bits.size());
  std::vector<std::int32_t> q_offsets, k_offsets, sel_offsets{0}, sel_clusters;
  for (int head = 0; head < bh_count; ++head) {
    q_offsets.insert(q_offsets.end(), {0, std::int32_t(c.sq)});
    k_offsets.insert(k_offsets.end(), {0, std::int32_t(c.sk)});
    sel_clusters.push_back(0);
    sel_offsets.push_back(head + 1);
  }
  const DeviceArray<std::int32_t> d_q_offsets(q_offsets), d_k_offsets(k_offsets), d_sel_offsets(sel_offsets),
      d_sel_clusters(sel_clusters), d_flags(std::vector<std::int32_t>{0});
  const std::int64_t capacity = cuda::query_tile_capacity(bh_count, c.sq, 1);
  const DeviceArray<std::int32_t> d_tiles(std::size_t(capacity) * 3);

  cuda::SparseAttentionProblem problem;
  problem.dtype = c.dtype;
  problem.batch = c.batch;
  problem.heads = c.heads;
  problem.sq = c.sq;
  problem.sk = c.sk;
  problem.head_dim = c.d;
  problem.q = q.view(dq.get());
  problem.k = k.view(dk.get());
  problem.v = v.view(dv.get());
  problem.out = q.view(dout.get());
  problem.error_flags = d_flags.get();
  if (c.explicit_layout) {
    problem.q_offsets = d_q_offsets.get();
    problem.k_offsets = d_k_offsets.get();
    problem.selected_offsets = d_sel_offsets.get();
    problem.selected_clusters = d_sel_clusters.get();
    problem.tiles = d_tiles.get();
    problem.tile_count =
        cuda::build_query_tiles(d_q_offsets.get(), bh_count, c.sq, 1, d_tiles.get(), capacity, nullptr);
  }
  check_cuda(cudaMemset(dout.get(), 0xff, q.bits.size() * sizeof(std::uint16_t)), "cudaMemset (NaN poison)");
  cuda::sparse_attention(problem, nullptr);
  check_cuda(cudaDeviceSynchronize(), "sparse_attention (dense)");

  EXPECT_EQ(d_flags.download()[0], 0);
  const std::vector<std::uint16_t> bits = dout.download();
  double diff = 0, norm = 0;
  std::int64_t non_finite = 0;
  for (int bi = 0; bi < c.batch; ++bi) {
    for (int hi = 0; hi < c.heads; ++hi) {
      for (std::int64_t si = 0; si < c.sq; ++si) {
        for (int di = 0; di < c.d; ++di) {
          const float got = from_bits(bits[std::size_t(q.physical(bi, hi, si) + di)], c.dtype);
          const double want = reference[std::size_t(q.logical(bi, hi, si) + di)];
          if (!std::isfinite(got)) ++non_finite;
          diff += (got - want) * (got - want);
          norm += want * want;
        }
      }
    }
  }
  EXPECT_EQ(non_finite, 0);
  EXPECT_LE(std::sqrt(diff / std::max(norm, 1e-30)), kTolerance);
  if (lse) {
    Outcome outcome;
    check_lse_run(problem, dout, bits, std::vector<double>(reference_lse.begin(), reference_lse.end()), c.batch,
                  c.heads, c.sq, c.bshd, outcome);
    EXPECT_FALSE(outcome.output_changed) << "the output differs when lse is requested";
    EXPECT_EQ(outcome.lse_non_finite, 0);
    EXPECT_LE(outcome.lse_max_abs, kLseTolerance);
  }
}

TEST_P(GpuSparseAttentionKernel, SmallDense) {
  std::uint64_t seed = 10;
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (int d : {64, 128}) {
      for (bool explicit_layout : {false, true}) {
        expect_dense_matches({dtype, d, 1, 3, 1, 1, false, explicit_layout}, ++seed);
        expect_dense_matches({dtype, d, 3, 1, 127, 300, false, explicit_layout}, ++seed);
        expect_dense_matches({dtype, d, 1, 3, 65, 64, true, explicit_layout}, ++seed);
      }
    }
  }
}

// Logits that grow along the keys (key norms up to 7x), so the running max moves step after step,
// by more and by less than the sm90 kernel's lazy-rescale slack (2^8): both branches of the
// rescale. sq = 60 is one lone 64-row tile, whose two consumers take alternate steps and merge
// partial softmaxes of different maxima; sq = 130 is a paired tile and a lone one of 2 rows.
TEST_P(GpuSparseAttentionKernel, SmallDenseGrowingLogits) {
  std::uint64_t seed = 300;
  for (int d : {64, 128}) {
    for (std::int64_t sq : {60, 130}) {
      for (bool explicit_layout : {false, true}) {
        DenseCase c{DType::bf16, d, 1, 2, sq, 2000, false, explicit_layout};
        c.key_growth = 6;
        expect_dense_matches(c, ++seed, true);
      }
    }
  }
}

TEST_P(GpuSparseAttentionKernel, LargeDense) {
  expect_dense_matches({DType::bf16, 128, 1, 3, 4097, 4097, false, false}, 40);
  expect_dense_matches({DType::f16, 64, 1, 3, 4097, 4097, true, true}, 41);
}

// The lse output: each row's ln of its softmax denominator (natural log, scaled scores),
// against the CPU kernel's on the same plan: S = 127 and 4097, D = 64 and 128, dense, drop
// (SVG2's terms) and compensation (EAR's: log n_j added to each pseudo-key), written to the
// rows' original positions through [B, H, S] and [B, S, H] views; the output is the same bytes
// with and without it.
TEST_P(GpuSparseAttentionKernel, SmallDenseLse) {
  std::uint64_t seed = 200;
  for (int d : {64, 128}) {
    for (bool explicit_layout : {false, true}) {
      expect_dense_matches({DType::bf16, d, 1, 3, 127, 127, false, explicit_layout}, ++seed, true);
      expect_dense_matches({DType::bf16, d, 2, 2, 127, 300, true, explicit_layout}, ++seed, true);
    }
    expect_dense_matches({DType::f16, d, 1, 2, 65, 64, false, false}, ++seed, true);
  }
}

TEST_P(GpuSparseAttentionKernel, LargeDenseLse) {
  expect_dense_matches({DType::bf16, 128, 1, 2, 4097, 4097, false, false}, 210, true);
  expect_dense_matches({DType::bf16, 64, 1, 2, 4097, 4097, true, true}, 211, true);
}

TEST_P(GpuSparseAttentionKernel, SmallLseMatchesCpu) {
  Case c;
  c.name = "lse S=127";
  c.lse = true;
  c.seed = 101;
  expect_matches_all_variants(c);
  c.name = "lse [B, S, H, D] sq=100 sk=333 B=2";
  c.batch = 2;
  c.heads = 2;
  c.sq = 100;
  c.sk = 333;
  c.cq = 6;
  c.ck = 23;
  c.density = 0.2;
  c.bshd = true;
  c.classes = 6;
  expect_matches_all_variants(c);
}

TEST_P(GpuSparseAttentionKernel, LargeLseMatchesCpu) {
  Case c;
  c.name = "lse S=4097 clustered";
  c.sq = c.sk = 4097;
  c.cq = 40;
  c.ck = 100;
  c.density = 0.15;
  c.classes = 20;
  c.lse = true;
  c.dtype = DType::bf16;
  for (int d : {64, 128}) {
    for (bool compensate : {true, false}) {
      c.d = d;
      c.compensate = compensate;
      c.seed += 1;
      expect_matches(c);
    }
  }
}

// Drop mode with a query cluster that selects nothing: its rows come out as zeros (not NaN)
// and the kernel raises kErrorRowWithoutKeys.
TEST_P(GpuSparseAttentionKernel, SmallRowWithoutKeysIsFlagged) {
  const int sq = 130, sk = 64, d = 64;
  const HostTensor4 q = make_tensor(1, 1, sq, d, DType::bf16, false, 1.0, 0, 91);
  const HostTensor4 k = make_tensor(1, 1, sk, d, DType::bf16, false, 1.0, 0, 92);
  const DeviceArray<std::uint16_t> dq(q.bits), dk(k.bits), dout(q.bits.size());
  // Two query clusters: rows [0, 70) select key cluster 0, rows [70, 130) select nothing.
  const DeviceArray<std::int32_t> d_q_offsets(std::vector<std::int32_t>{0, 70, sq}),
      d_sel_offsets(std::vector<std::int32_t>{0, 1, 1}), d_sel_clusters(std::vector<std::int32_t>{0}),
      d_flags(std::vector<std::int32_t>{0});
  const std::int64_t capacity = cuda::query_tile_capacity(1, sq, 2);
  const DeviceArray<std::int32_t> d_tiles(std::size_t(capacity) * 3);
  cuda::SparseAttentionProblem problem;
  problem.dtype = DType::bf16;
  problem.batch = problem.heads = 1;
  problem.sq = sq;
  problem.sk = sk;
  problem.head_dim = d;
  problem.q = q.view(dq.get());
  problem.k = k.view(dk.get());
  problem.v = k.view(dk.get());
  problem.out = q.view(dout.get());
  problem.query_clusters = 2;
  problem.q_offsets = d_q_offsets.get();
  problem.selected_offsets = d_sel_offsets.get();
  problem.selected_clusters = d_sel_clusters.get();
  problem.tiles = d_tiles.get();
  problem.tile_count = cuda::build_query_tiles(d_q_offsets.get(), 1, sq, 2, d_tiles.get(), capacity, nullptr);
  problem.error_flags = d_flags.get();
  check_cuda(cudaMemset(dout.get(), 0xff, q.bits.size() * sizeof(std::uint16_t)), "cudaMemset (NaN poison)");
  cuda::sparse_attention(problem, nullptr);
  check_cuda(cudaDeviceSynchronize(), "sparse_attention (no keys)");
  EXPECT_EQ(d_flags.download()[0], cuda::kErrorRowWithoutKeys);
  const std::vector<std::uint16_t> bits = dout.download();
  for (int row = 0; row < sq; ++row) {
    for (int di = 0; di < d; ++di) {
      const float got = bf16_to_float(bits[std::size_t(row) * d + di]);
      ASSERT_TRUE(std::isfinite(got)) << "row " << row;
      if (row >= 70) ASSERT_EQ(got, 0.0f) << "row " << row;
    }
  }
  // With the lse output: the same bytes, a finite lse where there are keys and -inf where not.
  const DeviceArray<float> d_lse(static_cast<std::size_t>(sq));
  problem.lse = lse_view(d_lse.get(), 1, sq, false);
  check_cuda(cudaMemset(dout.get(), 0xff, q.bits.size() * sizeof(std::uint16_t)), "cudaMemset (NaN poison)");
  cuda::sparse_attention(problem, nullptr);
  check_cuda(cudaDeviceSynchronize(), "sparse_attention (no keys, lse)");
  EXPECT_EQ(dout.download(), bits);
  const std::vector<float> lse = d_lse.download();
  for (int row = 0; row < sq; ++row) {
    if (row < 70) {
      EXPECT_TRUE(std::isfinite(lse[std::size_t(row)])) << "row " << row;
    } else {
      EXPECT_EQ(lse[std::size_t(row)], -INFINITY) << "row " << row;
    }
  }
}

TEST(GpuSparseAttention, SmallWorkListPadsWithEmptyTiles) {
  // Cluster sizes 0, 1, 64, 65, 0, 200 (sq = 330): tiles 0 + 1 + 1 + 2 + 0 + 4 = 8, capacity 6 + 6 = 12.
  const std::vector<std::int32_t> offsets{0, 0, 1, 65, 130, 130, 330};
  const DeviceArray<std::int32_t> d_offsets(offsets);
  const std::int64_t capacity = cuda::query_tile_capacity(1, 330, 6);
  ASSERT_EQ(capacity, 12);
  const DeviceArray<std::int32_t> d_tiles(std::size_t(capacity) * 3);
  ASSERT_EQ(cuda::build_query_tiles(d_offsets.get(), 1, 330, 6, d_tiles.get(), capacity, nullptr), capacity);
  const std::vector<std::int32_t> tiles = d_tiles.download();
  const std::vector<std::int32_t> expected{0, 1, 0,   0, 2, 1,   0, 3, 65,  0, 3, 129, 0, 5, 130, 0, 5, 194,
                                           0, 5, 258, 0, 5, 322, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1};
  EXPECT_EQ(tiles, expected);
}

TEST(GpuSparseAttention, RejectsUnknownKernelChoice) {
  const HostTensor4 q = make_tensor(1, 1, 8, 64, DType::bf16, false, 1.0, 0, 95);
  const DeviceArray<std::uint16_t> dq(q.bits), dout(q.bits.size());
  cuda::SparseAttentionProblem problem;
  problem.batch = problem.heads = 1;
  problem.sq = problem.sk = 8;
  problem.head_dim = 64;
  problem.q = problem.k = problem.v = q.view(dq.get());
  problem.out = q.view(dout.get());
  const testing::ScopedEnvironment kernel("SVGEAR_ATTENTION_KERNEL", "sm70");
  EXPECT_THROW(cuda::sparse_attention(problem, nullptr), Error);
}

TEST(GpuSparseAttention, RejectsUnsupportedProblems) {
  cuda::SparseAttentionProblem problem;
  problem.batch = problem.heads = 1;
  problem.sq = problem.sk = 8;
  problem.head_dim = 96;
  EXPECT_THROW(cuda::sparse_attention(problem, nullptr), Error);
  problem.head_dim = 64;
  problem.dtype = DType::f32;
  EXPECT_THROW(cuda::sparse_attention(problem, nullptr), Error);
}

}  // namespace
}  // namespace svgear
