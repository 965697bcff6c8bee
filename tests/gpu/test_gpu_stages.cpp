// The CUDA stages (src/cuda/stages.hpp) against their CPU references on the same 16-bit-rounded
// inputs: k-means, cluster layout, cluster means, centroid criticality, the EAR probe and the
// budgeted selection. Odd sizes (S = 1, 127, 4097), empty and one-token clusters, strided and
// unaligned layouts; every output is poisoned (0xFF bytes) before each run.
//
// Host C++ only (the CUDA runtime API and stages.hpp): it needs the C++20 policy header.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/block_scores.hpp"
#include "cpu/error_probe.hpp"
#include "cpu/kmeans.hpp"
#include "cpu/permutation.hpp"
#include "cpu/vector_ops.hpp"
#include "cuda/finite_check.hpp"
#include "cuda/sparse_attention.hpp"
#include "cuda/stages.hpp"
#include "policy/selection_policy.hpp"
#include "svgear/error.hpp"
#include "test_support.hpp"

using namespace svgear;

namespace {

void cuda_ok(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// A device array; poison() fills it with 0xFF bytes (int -1, float NaN) so unwritten outputs show.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    cuda_ok(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
    poison();
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  void poison() { cuda_ok(cudaMemset(ptr_, 0xFF, std::max<std::size_t>(count_, 1) * sizeof(T)), "cudaMemset"); }
  void upload(const std::vector<T>& host) {
    cuda_ok(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> download() const {
    cuda_ok(cudaDeviceSynchronize(), "stage execution");
    std::vector<T> host(count_);
    cuda_ok(cudaMemcpy(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return host;
  }

 private:
  T* ptr_ = nullptr;
  std::size_t count_;
};

enum class Layout {
  bhsd,              // contiguous [B, H, S, D]
  bshd,              // diffusers' [B, S, H, D] through strides
  padded_unaligned,  // odd strides and an odd base offset: the non-vectorised load path
};

// [B, H, S, D] 16-bit values on the device, and the same values as float rows [BH][S][D].
struct TestHeads {
  std::vector<float> rows;
  std::unique_ptr<DeviceArray<std::uint16_t>> storage;
  cuda::DeviceHeads view;

  const float* head(std::int64_t bh) const { return rows.data() + bh * view.tokens * view.head_dim; }
};

TestHeads upload_heads(const HostTensor& values, Layout layout, DType dtype = DType::bf16) {
  const std::int64_t b = values.shape[0], h = values.shape[1], s = values.shape[2], d = values.shape[3];
  std::int64_t stride_b = 0, stride_h = 0, stride_s = 0, offset = 0;
  switch (layout) {
    case Layout::bhsd:
      stride_s = d, stride_h = s * d, stride_b = h * s * d;
      break;
    case Layout::bshd:
      stride_h = d, stride_s = h * d, stride_b = s * h * d;
      break;
    case Layout::padded_unaligned:
      stride_s = d + 3, stride_h = s * stride_s + 1, stride_b = h * stride_h + 5, offset = 1;
      break;
  }
  const std::int64_t extent = offset + (b - 1) * stride_b + (h - 1) * stride_h + (s - 1) * stride_s + d;
  std::vector<std::uint16_t> bits(std::size_t(extent), 0);
  TestHeads heads;
  heads.rows.resize(std::size_t(b * h * s * d));
  for (std::int64_t bi = 0; bi < b; ++bi)
    for (std::int64_t hi = 0; hi < h; ++hi)
      for (std::int64_t si = 0; si < s; ++si)
        for (std::int64_t di = 0; di < d; ++di) {
          const std::int64_t flat = ((bi * h + hi) * s + si) * d + di;
          const float x = values.at(flat);
          const std::uint16_t v = dtype == DType::bf16 ? float_to_bf16(x) : float_to_half(x);
          bits[std::size_t(offset + bi * stride_b + hi * stride_h + si * stride_s + di)] = v;
          heads.rows[std::size_t(flat)] = dtype == DType::bf16 ? bf16_to_float(v) : half_to_float(v);
        }
  heads.storage = std::make_unique<DeviceArray<std::uint16_t>>(bits);
  heads.view.dtype = dtype;
  heads.view.batch = int(b);
  heads.view.heads = int(h);
  heads.view.tokens = s;
  heads.view.head_dim = int(d);
  heads.view.tensor.data = heads.storage->get() + offset;
  heads.view.tensor.stride_b = stride_b;
  heads.view.tensor.stride_h = stride_h;
  heads.view.tensor.stride_s = stride_s;
  return heads;
}

// Labels in [0, clusters) that leave cluster 0 empty and give cluster 1 exactly one token
// (when there are enough clusters and tokens), so both edge cases are always present.
std::vector<std::int32_t> labels_with_edge_clusters(std::int64_t tokens, int clusters, std::uint64_t seed) {
  cpu::SplitMix64 rng(seed);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(tokens));
  const int reserved = clusters >= 4 && tokens >= 2 ? 2 : 0;
  for (auto& label : labels) label = std::int32_t(reserved + int(rng.next() % std::uint64_t(clusters - reserved)));
  if (reserved > 0) labels[std::size_t(tokens / 2)] = 1;
  return labels;
}

// Per-head CPU layouts of per-head labels, flattened as int32 the way the GPU stores them.
struct HostLayouts {
  std::vector<cpu::ClusterLayout> heads;
  std::vector<std::int32_t> order, offsets;
};

HostLayouts layouts_of(const std::vector<std::vector<std::int32_t>>& labels, int clusters) {
  HostLayouts out;
  for (const auto& head_labels : labels) {
    out.heads.push_back(cpu::cluster_layout(head_labels, clusters));
    for (auto p : out.heads.back().order) out.order.push_back(std::int32_t(p));
    for (auto o : out.heads.back().offsets) out.offsets.push_back(std::int32_t(o));
  }
  return out;
}

std::vector<float> gather(const float* rows, std::int64_t d, const cpu::ClusterLayout& layout) {
  std::vector<float> permuted(layout.order.size() * std::size_t(d));
  cpu::gather_rows(rows, d, layout, permuted.data());
  return permuted;
}

// ---------------------------------------------------------------------------------------------
// 0. The input check: the exact count of NaN and Inf elements over q, k and v, in both layouts
// and dtypes, with q's length differing from k's and sizes that end mid-block.

struct FiniteCase {
  std::int64_t q_tokens, k_tokens;
  int d;
  Layout layout;
  DType dtype;
};

std::ostream& operator<<(std::ostream& os, const FiniteCase& c) {
  return os << "Sq" << c.q_tokens << " Sk" << c.k_tokens << " D" << c.d << " " << dtype_name(c.dtype) << " layout "
            << int(c.layout);
}

class GpuFiniteCheck : public ::testing::TestWithParam<FiniteCase> {};

TEST_P(GpuFiniteCheck, CountsEveryNonFiniteElement) {
  const FiniteCase c = GetParam();
  using svgear::testing::random_tensor;
  HostTensor q = random_tensor({2, 3, c.q_tokens, c.d}, 11), k = random_tensor({2, 3, c.k_tokens, c.d}, 12),
             v = random_tensor({2, 3, c.k_tokens, c.d}, 13);
  // The largest finite value of each dtype must not count; NaN, +Inf and -Inf must, wherever they are.
  const float largest = c.dtype == DType::bf16 ? 3.3895314e38f : 65504.0f;
  q.set(0, largest);
  k.set(k.numel() - 1, -largest);
  int expected = 0;
  auto poison = [&](HostTensor& t, std::int64_t index, float value) {
    t.set(index, value);
    ++expected;
  };
  poison(q, 0 + 1, std::nanf(""));
  poison(q, q.numel() - 1, INFINITY);
  poison(k, 0, -INFINITY);
  poison(k, k.numel() / 2, std::nanf(""));
  for (std::int64_t i = 5; i < v.numel(); i += v.numel() / 7 + 1) poison(v, i, i % 2 ? INFINITY : std::nanf(""));
  const TestHeads qh = upload_heads(q, c.layout, c.dtype), kh = upload_heads(k, c.layout, c.dtype),
                  vh = upload_heads(v, c.layout, c.dtype);
  DeviceArray<std::int64_t> count(1);
  DeviceArray<unsigned> v_abs_max(6);
  cuda_ok(cudaMemset(count.get(), 0, sizeof(std::int64_t)), "cudaMemset");
  cuda_ok(cudaMemset(v_abs_max.get(), 0, 6 * sizeof(unsigned)), "cudaMemset");
  cuda::count_non_finite(qh.view, kh.view, vh.view, count.get(), nullptr, nullptr);
  EXPECT_EQ(count.download()[0], expected);

  // Max |v| per head is what fmaxf over |v| gives (NaN skipped,
  // Inf kept), here with one head's largest value negative and another head holding an Inf.
  HostTensor clean_v = random_tensor({2, 3, c.k_tokens, c.d}, 14);
  const std::int64_t per_head = c.k_tokens * c.d;
  clean_v.set(per_head + per_head / 3, -1000.0f);        // head 1
  clean_v.set(4 * per_head + per_head - 1, INFINITY);   // head 4
  clean_v.set(5 * per_head, std::nanf(""));             // head 5: skipped by the max, counted
  const TestHeads clean = upload_heads(clean_v, c.layout, c.dtype);
  const TestHeads clean_qk = upload_heads(random_tensor({2, 3, c.q_tokens, c.d}, 15), c.layout, c.dtype);
  count.poison();
  cuda_ok(cudaMemset(count.get(), 0, sizeof(std::int64_t)), "cudaMemset");
  cuda::count_non_finite(clean_qk.view, clean_qk.view, clean.view, count.get(), v_abs_max.get(), nullptr);
  EXPECT_EQ(count.download()[0], 2) << "the Inf and the NaN";
  const std::vector<unsigned> got = v_abs_max.download();
  for (int bh = 0; bh < 6; ++bh) {
    float want = 0.0f;
    for (std::int64_t i = 0; i < per_head; ++i) {
      want = std::fmax(want, std::fabs(clean.rows[std::size_t(bh * per_head + i)]));
    }
    float have = 0.0f;
    std::memcpy(&have, &got[std::size_t(bh)], sizeof have);
    EXPECT_EQ(have, want) << "head " << bh;
  }
  EXPECT_EQ(got[4], 0x7f800000u) << "an Inf in v is its head's max";

  // v alone (the sparse pipeline's check): the same count and maxima.
  count.poison();
  v_abs_max.poison();
  cuda_ok(cudaMemset(count.get(), 0, sizeof(std::int64_t)), "cudaMemset");
  cuda_ok(cudaMemset(v_abs_max.get(), 0, 6 * sizeof(unsigned)), "cudaMemset");
  cuda::count_non_finite(clean.view, count.get(), v_abs_max.get(), nullptr);
  EXPECT_EQ(count.download()[0], 2) << "v alone: the Inf and the NaN";
  EXPECT_EQ(v_abs_max.download(), got) << "v alone: the per-head maxima";

  // k-means' first assignment counts its points' NaN/Inf (the pipeline's check of q and k), on
  // the mma.sync kernel whichever assignment kernel is chosen.
  for (const TestHeads* points : {&qh, &kh}) {
    const int clusters = 5, bh_count = 6;
    const std::size_t n = std::size_t(points->view.tokens) * bh_count;
    DeviceArray<float> centroids(std::size_t(bh_count * clusters * c.d));
    DeviceArray<std::int32_t> labels(n), counts(std::size_t(bh_count * clusters));
    DeviceArray<std::int64_t> found(1);
    cuda_ok(cudaMemset(found.get(), 0, sizeof(std::int64_t)), "cudaMemset");
    cuda::KmeansSettings settings{clusters, 2, nullptr};
    settings.non_finite = found.get();
    cuda::kmeans(points->view, settings, {centroids.get(), labels.get(), counts.get(), nullptr, nullptr, nullptr, {}, nullptr},
                 nullptr);
    std::int64_t planted = 0;
    for (float x : points->rows) planted += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(found.download()[0], planted) << (points == &qh ? "q" : "k") << " through k-means";
  }
}

INSTANTIATE_TEST_SUITE_P(Small, GpuFiniteCheck,
                         ::testing::Values(FiniteCase{1, 1, 64, Layout::bhsd, DType::bf16},
                                           FiniteCase{127, 4097, 128, Layout::bshd, DType::bf16},
                                           FiniteCase{4097, 127, 64, Layout::bshd, DType::f16},
                                           FiniteCase{300, 300, 128, Layout::bhsd, DType::f16}));

// ---------------------------------------------------------------------------------------------
// 1. k-means

struct KmeansCase {
  int batch, heads;
  std::int64_t tokens;
  int d, clusters, iterations;
  Layout layout;
  DType dtype;
  bool clustered;
};

std::ostream& operator<<(std::ostream& os, const KmeansCase& c) {
  return os << "B" << c.batch << " H" << c.heads << " S" << c.tokens << " D" << c.d << " C" << c.clusters << " x"
            << c.iterations << " " << dtype_name(c.dtype) << " layout " << int(c.layout);
}

// Runs `body` once per assignment kernel this GPU has: mma.sync everywhere, wgmma on sm_90a.
template <class Body>
void for_each_assign_kernel(Body body) {
  std::vector<std::string> kernels{"sm80"};
  if (cuda::sm90_attention_available()) kernels.push_back("sm90");
  for (const std::string& kernel : kernels) {
    SCOPED_TRACE("SVGEAR_KMEANS_KERNEL=" + kernel);
    const svgear::testing::ScopedEnvironment scoped("SVGEAR_KMEANS_KERNEL", kernel);
    body();
  }
}

class GpuKmeans : public ::testing::TestWithParam<KmeansCase> {};

void expect_kmeans_matches_cpu(const KmeansCase& c);

TEST_P(GpuKmeans, MatchesCpuObjectiveFromStridedInit) {
  for_each_assign_kernel([&] { expect_kmeans_matches_cpu(GetParam()); });
}

void expect_kmeans_matches_cpu(const KmeansCase& c) {
  const HostTensor values = c.clustered
                                ? svgear::testing::clustered_tensor(c.batch, c.heads, c.tokens, c.d, 12, 0.4, 11)
                                : svgear::testing::random_tensor({c.batch, c.heads, c.tokens, c.d}, 12);
  const TestHeads x = upload_heads(values, c.layout, c.dtype);
  const std::int64_t bh_count = x.view.count();
  DeviceArray<float> centroids(std::size_t(bh_count * c.clusters * c.d));
  DeviceArray<std::int32_t> labels(std::size_t(bh_count * c.tokens)), counts(std::size_t(bh_count * c.clusters));
  DeviceArray<std::int32_t> order(std::size_t(bh_count * c.tokens)), offsets(std::size_t(bh_count * (c.clusters + 1)));
  DeviceArray<double> objective(std::size_t(bh_count * c.iterations));
  cuda::KmeansSettings settings;
  settings.clusters = c.clusters;
  settings.iterations = c.iterations;
  cuda::kmeans(x.view, settings,
               {centroids.get(), labels.get(), counts.get(), order.get(), offsets.get(), objective.get(), {}, nullptr}, nullptr);
  const auto g_centroids = centroids.download();
  const auto g_labels = labels.download();
  const auto g_counts = counts.download();
  const auto g_order = order.download();
  const auto g_offsets = offsets.download();
  const auto g_objective = objective.download();

  cpu::KmeansOptions options;
  options.clusters = c.clusters;
  options.iterations = c.iterations;
  options.init = KmeansInit::strided;
  for (std::int64_t bh = 0; bh < bh_count; ++bh) {
    SCOPED_TRACE("head " + std::to_string(bh));
    const cpu::KmeansResult cpu_result = cpu::kmeans(x.head(bh), c.tokens, c.d, options);
    for (int it = 0; it < c.iterations; ++it) {
      const double want = cpu_result.objective[std::size_t(it)];
      const double got = g_objective[std::size_t(bh * c.iterations + it)];
      // The first assignment starts from identical centroids: only near-ties can differ.
      const double tolerance = (it == 0 ? 1e-4 : 1e-2) * want + 1e-6;
      EXPECT_NEAR(got, want, tolerance) << "iteration " << it;
    }
    // The outputs agree with each other: counts, layout and centroids follow the labels.
    std::vector<std::int32_t> head_labels(g_labels.begin() + bh * c.tokens, g_labels.begin() + (bh + 1) * c.tokens);
    std::vector<double> sums(std::size_t(c.clusters * c.d), 0.0);
    std::vector<std::int32_t> histogram(std::size_t(c.clusters), 0);
    for (std::int64_t s = 0; s < c.tokens; ++s) {
      const std::int32_t label = head_labels[std::size_t(s)];
      ASSERT_GE(label, 0);
      ASSERT_LT(label, c.clusters);
      ++histogram[std::size_t(label)];
      for (int d = 0; d < c.d; ++d) sums[std::size_t(label * c.d + d)] += x.head(bh)[s * c.d + d];
    }
    const cpu::ClusterLayout layout = cpu::cluster_layout(head_labels, c.clusters);
    for (int k = 0; k < c.clusters; ++k) {
      EXPECT_EQ(g_counts[std::size_t(bh * c.clusters + k)], histogram[std::size_t(k)]);
      EXPECT_EQ(g_offsets[std::size_t(bh * (c.clusters + 1) + k)], layout.offsets[std::size_t(k)]);
      if (histogram[std::size_t(k)] == 0) continue;
      for (int d = 0; d < c.d; ++d) {
        const double mean = sums[std::size_t(k * c.d + d)] / histogram[std::size_t(k)];
        EXPECT_NEAR(g_centroids[std::size_t((bh * c.clusters + k) * c.d + d)], mean, 1e-5 * (1 + std::abs(mean)));
      }
    }
    for (std::int64_t p = 0; p < c.tokens; ++p) {
      EXPECT_EQ(g_order[std::size_t(bh * c.tokens + p)], layout.order[std::size_t(p)]);
    }
  }
}

// "Small" instances are what scripts/device-check runs under compute-sanitizer.
INSTANTIATE_TEST_SUITE_P(Small, GpuKmeans,
                         ::testing::Values(KmeansCase{1, 2, 1, 64, 1, 2, Layout::bhsd, DType::bf16, false},
                                           KmeansCase{1, 2, 127, 128, 8, 4, Layout::bshd, DType::bf16, true},
                                           KmeansCase{2, 1, 127, 64, 70, 2, Layout::padded_unaligned, DType::f16,
                                                      true}));
INSTANTIATE_TEST_SUITE_P(Large, GpuKmeans,
                         ::testing::Values(KmeansCase{2, 1, 4097, 64, 64, 4, Layout::padded_unaligned, DType::bf16,
                                                      true},
                                           KmeansCase{1, 2, 4097, 128, 100, 3, Layout::bhsd, DType::bf16, false},
                                           KmeansCase{1, 1, 1000, 128, 70, 3, Layout::bshd, DType::f16, true}));

// Labels of one assignment from arbitrary centroids: equal to the CPU's except at near-ties.
void expect_assignment_matches_cpu(std::int64_t tokens, int clusters) {
  for (const int d : {64, 128}) {
    const TestHeads x = upload_heads(svgear::testing::clustered_tensor(1, 2, tokens, d, 30, 0.5, 5), Layout::bshd);
    const HostTensor centres = svgear::testing::random_tensor({2, clusters, d}, 6);
    std::vector<float> host_centroids(std::size_t(2 * clusters * d));
    for (std::size_t i = 0; i < host_centroids.size(); ++i) host_centroids[i] = centres.at(std::int64_t(i));
    DeviceArray<float> centroids(host_centroids);
    DeviceArray<std::int32_t> labels(std::size_t(2 * tokens));
    cuda::assign_to_nearest_centroid(x.view, centroids.get(), clusters, labels.get(), nullptr);
    const auto got = labels.download();
    for (std::int64_t bh = 0; bh < 2; ++bh) {
      const float* head_centroids = host_centroids.data() + bh * clusters * d;
      std::vector<std::int32_t> want;
      cpu::assign_to_nearest_centroid(x.head(bh), tokens, d, head_centroids, clusters, want);
      int differences = 0;
      for (std::int64_t s = 0; s < tokens; ++s) {
        const std::int32_t g = got[std::size_t(bh * tokens + s)], w = want[std::size_t(s)];
        ASSERT_GE(g, 0);
        ASSERT_LT(g, clusters);
        if (g == w) continue;
        ++differences;
        const double dg = cpu::squared_distance(x.head(bh) + s * d, head_centroids + g * d, d);
        const double dw = cpu::squared_distance(x.head(bh) + s * d, head_centroids + w * d, d);
        EXPECT_LE(dg, dw + 1e-4 * (1 + dw)) << "token " << s << " is no near-tie";
      }
      EXPECT_LE(differences, tokens / 100);
    }
  }
}

TEST(GpuKmeansSmall, AssignmentMatchesCpuUpToNearTies) {
  for_each_assign_kernel([] { expect_assignment_matches_cpu(127, 70); });
}
TEST(GpuKmeans, AssignmentMatchesCpuUpToNearTiesOnSeveralTiles) {
  for_each_assign_kernel([] { expect_assignment_matches_cpu(4097, 200); });
}

// A warm-start centroid far from every point stays empty and keeps its value exactly.
TEST(GpuKmeansSmall, WarmStartKeepsEmptyClusters) {
  const std::int64_t tokens = 127;
  const int d = 64, clusters = 6, iterations = 3;
  const TestHeads x = upload_heads(svgear::testing::clustered_tensor(1, 2, tokens, d, 4, 0.3, 8), Layout::bhsd);
  std::vector<float> warm(std::size_t(2 * clusters * d));
  for (int bh = 0; bh < 2; ++bh)
    for (int c = 0; c < clusters; ++c)
      for (int j = 0; j < d; ++j) {
        const std::int64_t source = std::int64_t(c) * tokens / clusters;
        warm[std::size_t((bh * clusters + c) * d + j)] = c == 2 ? 1.0e4f : x.head(bh)[source * d + j];
      }
  DeviceArray<float> centroids(warm);  // in place: initial_centroids aliases the output
  DeviceArray<std::int32_t> labels(std::size_t(2 * tokens)), counts(std::size_t(2 * clusters));
  DeviceArray<double> objective(std::size_t(2 * iterations));
  cuda::KmeansSettings settings;
  settings.clusters = clusters;
  settings.iterations = iterations;
  settings.initial_centroids = centroids.get();
  cuda::kmeans(x.view, settings, {centroids.get(), labels.get(), counts.get(), nullptr, nullptr, objective.get(), {}, nullptr},
               nullptr);
  const auto g_centroids = centroids.download();
  const auto g_counts = counts.download();
  const auto g_objective = objective.download();
  cpu::KmeansOptions options;
  options.clusters = clusters;
  options.iterations = iterations;
  for (int bh = 0; bh < 2; ++bh) {
    EXPECT_EQ(g_counts[std::size_t(bh * clusters + 2)], 0);
    for (int j = 0; j < d; ++j) EXPECT_EQ(g_centroids[std::size_t((bh * clusters + 2) * d + j)], 1.0e4f);
    const cpu::KmeansResult want = cpu::kmeans(x.head(bh), tokens, d, options, warm.data() + bh * clusters * d);
    for (int it = 0; it < iterations; ++it) {
      EXPECT_NEAR(g_objective[std::size_t(bh * iterations + it)], want.objective[std::size_t(it)],
                  (it == 0 ? 1e-4 : 1e-2) * want.objective[std::size_t(it)] + 1e-6);
    }
  }
}

// The tile alignment stage alone: the same decisions as the CPU rule on the same labels and
// runner-ups. Random cluster sizes around (and under) multiples of 64, random runner-ups,
// regrets on a coarse grid so that many tie (the walk must then keep row order).
TEST(GpuStagesSmall, AlignClustersToTilesMatchesTheCpuRule) {
  struct Case {
    int clusters, limit;
  };
  const std::int64_t heads = 3, tokens = 3001;
  for (const Case c : {Case{1, 24}, Case{5, 1}, Case{5, 32}, Case{20, 24}, Case{40, 24}, Case{300, 32}}) {
    SCOPED_TRACE("clusters " + std::to_string(c.clusters) + " tail limit " + std::to_string(c.limit));
    cpu::SplitMix64 rng(std::uint64_t(c.clusters * 100 + c.limit));
    std::vector<std::vector<std::int32_t>> labels(heads);
    std::vector<std::int32_t> all_labels, all_runner_ups;
    std::vector<float> all_regrets;
    std::vector<cpu::RunnerUps> runner_ups(heads);
    for (std::int64_t bh = 0; bh < heads; ++bh) {
      // Skewed cluster weights, so sizes spread over several tiles and tails.
      std::vector<double> weights(std::size_t(c.clusters));
      double total = 0;
      for (double& w : weights) total += (w = 0.2 + double(rng.next() % 1000) / 1000.0);
      for (std::int64_t s = 0; s < tokens; ++s) {
        double pick = double(rng.next() % 1000000) / 1000000.0 * total;
        int label = 0;
        while (label + 1 < c.clusters && pick >= weights[std::size_t(label)]) pick -= weights[std::size_t(label++)];
        labels[std::size_t(bh)].push_back(label);
        runner_ups[std::size_t(bh)].labels.push_back(std::int32_t(rng.next() % std::uint64_t(c.clusters)));
        runner_ups[std::size_t(bh)].regrets.push_back(float(rng.next() % 8) * 0.5f);
      }
      all_labels.insert(all_labels.end(), labels[std::size_t(bh)].begin(), labels[std::size_t(bh)].end());
      all_runner_ups.insert(all_runner_ups.end(), runner_ups[std::size_t(bh)].labels.begin(),
                            runner_ups[std::size_t(bh)].labels.end());
      all_regrets.insert(all_regrets.end(), runner_ups[std::size_t(bh)].regrets.begin(),
                         runner_ups[std::size_t(bh)].regrets.end());
    }
    DeviceArray<std::int32_t> g_labels(all_labels), g_runner_ups(all_runner_ups), moved(static_cast<std::size_t>(heads));
    DeviceArray<float> g_regrets(all_regrets);
    DeviceArray<std::int32_t> order(std::size_t(heads * tokens)), offsets(std::size_t(heads * (c.clusters + 1)));
    cuda::cluster_layout(g_labels.get(), heads, tokens, c.clusters, order.get(), offsets.get(), nullptr);
    cuda::align_clusters_to_tiles(heads, tokens, c.clusters, c.limit, g_labels.get(),
                                  cuda::DeviceLayout{order.get(), offsets.get(), c.clusters},
                                  cuda::DeviceRunnerUps{g_runner_ups.get(), g_regrets.get()}, moved.get(), nullptr);
    const auto got = g_labels.download();
    const auto got_moved = moved.download();
    std::int64_t total_moved = 0;
    for (std::int64_t bh = 0; bh < heads; ++bh) {
      cpu::TileAlignment alignment;
      alignment.tail_limit = c.limit;
      std::vector<std::int32_t> want = labels[std::size_t(bh)];
      const std::int64_t want_moved =
          cpu::align_clusters_to_tiles(want, runner_ups[std::size_t(bh)], c.clusters, alignment);
      EXPECT_EQ(got_moved[std::size_t(bh)], want_moved) << "head " << bh;
      total_moved += want_moved;
      for (std::int64_t s = 0; s < tokens; ++s) {
        ASSERT_EQ(got[std::size_t(bh * tokens + s)], want[std::size_t(s)]) << "head " << bh << " row " << s;
      }
    }
    if (c.clusters == 20) {
      EXPECT_GT(total_moved, 0) << "the case exercises no move";
    }
  }
}

// k-means with a tail limit: the last assignment's runner-ups agree with the CPU's up to
// near-ties, and the alignment it ran is the CPU rule applied to the GPU's own labels and
// runner-ups (the same assignment without alignment gives those labels: it is deterministic).
TEST(GpuKmeansSmall, TileAlignmentFollowsTheCpuRuleOnItsOwnRunnerUps) {
  const std::int64_t tokens = 1000;
  const int clusters = 6, limit = 24;
  for (const int d : {64, 128}) {
    SCOPED_TRACE("D " + std::to_string(d));
    const TestHeads x = upload_heads(svgear::testing::clustered_tensor(1, 2, tokens, d, 8, 0.6, 3), Layout::bhsd);
    std::vector<float> start(std::size_t(2 * clusters * d));
    for (int bh = 0; bh < 2; ++bh)
      for (int c = 0; c < clusters; ++c)
        for (int j = 0; j < d; ++j)
          start[std::size_t((bh * clusters + c) * d + j)] = x.head(bh)[(std::int64_t(c) * tokens / clusters) * d + j];
    auto run = [&](int tail_limit, std::vector<std::int32_t>* runner_up_labels, std::vector<float>* regrets,
                   std::vector<std::int32_t>* aligned_rows) {
      DeviceArray<float> centroids(start);
      DeviceArray<std::int32_t> labels(std::size_t(2 * tokens)), counts(std::size_t(2 * clusters));
      DeviceArray<std::int32_t> g_runner_ups(std::size_t(2 * tokens)), aligned(2);
      DeviceArray<float> g_regrets(std::size_t(2 * tokens));
      cuda::KmeansSettings settings;
      settings.clusters = clusters;
      settings.iterations = 1;
      settings.initial_centroids = centroids.get();
      settings.tail_limit = tail_limit;
      cuda::KmeansOutputs out{centroids.get(), labels.get(), counts.get(), nullptr, nullptr, nullptr, {}, nullptr};
      out.runner_ups = cuda::DeviceRunnerUps{g_runner_ups.get(), g_regrets.get()};
      out.aligned_rows = aligned.get();
      cuda::kmeans(x.view, settings, out, nullptr);
      if (runner_up_labels != nullptr) *runner_up_labels = g_runner_ups.download();
      if (regrets != nullptr) *regrets = g_regrets.download();
      if (aligned_rows != nullptr) *aligned_rows = aligned.download();
      return labels.download();
    };
    std::vector<std::int32_t> runner_up_labels, aligned_rows, plain_aligned;
    std::vector<float> regrets;
    const std::vector<std::int32_t> nearest = run(0, nullptr, nullptr, &plain_aligned);
    const std::vector<std::int32_t> aligned = run(limit, &runner_up_labels, &regrets, &aligned_rows);
    EXPECT_GT(aligned_rows[0] + aligned_rows[1], 0) << "the case exercises no move";  // 43 / 53 rows on the CPU
    for (int bh = 0; bh < 2; ++bh) {
      SCOPED_TRACE("head " + std::to_string(bh));
      EXPECT_EQ(plain_aligned[std::size_t(bh)], 0);
      const auto slice = [&](const auto& v) {
        using T = typename std::decay_t<decltype(v)>::value_type;
        return std::vector<T>(v.begin() + bh * tokens, v.begin() + (bh + 1) * tokens);
      };
      cpu::RunnerUps gpu_runner_ups{slice(runner_up_labels), slice(regrets)};
      std::vector<std::int32_t> want = slice(nearest);
      cpu::TileAlignment alignment;
      alignment.tail_limit = limit;
      EXPECT_EQ(aligned_rows[std::size_t(bh)], cpu::align_clusters_to_tiles(want, gpu_runner_ups, clusters, alignment));
      EXPECT_EQ(slice(aligned), want);

      // The runner-ups against float64 distances from the same (16-bit exact) centroids.
      const float* head_centroids = start.data() + bh * clusters * d;
      std::vector<std::int32_t> cpu_labels;
      cpu::RunnerUps cpu_runner_ups;
      cpu::assign_to_nearest_centroid(x.head(bh), tokens, d, head_centroids, clusters, cpu_labels, &cpu_runner_ups);
      int differences = 0;
      for (std::int64_t s = 0; s < tokens; ++s) {
        const std::int32_t g = gpu_runner_ups.labels[std::size_t(s)], w = cpu_runner_ups.labels[std::size_t(s)];
        ASSERT_GE(g, 0);
        ASSERT_LT(g, clusters);
        const double own = cpu::squared_distance(x.head(bh) + s * d, head_centroids + cpu_labels[std::size_t(s)] * d, d);
        const double scale = 1e-2 * (1 + own);
        EXPECT_NEAR(gpu_runner_ups.regrets[std::size_t(s)], cpu_runner_ups.regrets[std::size_t(s)], scale)
            << "token " << s;
        if (g == w) continue;
        ++differences;
        const double dg = cpu::squared_distance(x.head(bh) + s * d, head_centroids + g * d, d);
        const double dw = cpu::squared_distance(x.head(bh) + s * d, head_centroids + w * d, d);
        EXPECT_NEAR(dg, dw, scale) << "token " << s << " is no near-tie";
      }
      EXPECT_LE(differences, tokens / 100);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2-3. Layout and cluster means

struct LayoutCase {
  std::int64_t tokens;
  int clusters, d;
  Layout layout;
};

std::ostream& operator<<(std::ostream& os, const LayoutCase& c) {
  return os << "S" << c.tokens << " C" << c.clusters << " D" << c.d << " layout " << int(c.layout);
}

class GpuLayout : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(GpuLayout, MatchesCpuStableCountingSortAndMeans) {
  const LayoutCase c = GetParam();
  SCOPED_TRACE("S = " + std::to_string(c.tokens) + ", C = " + std::to_string(c.clusters));
  const int batch = 1, heads = 3;
  std::vector<std::vector<std::int32_t>> labels;
  std::vector<std::int32_t> flat_labels;
  for (int bh = 0; bh < batch * heads; ++bh) {
    labels.push_back(labels_with_edge_clusters(c.tokens, c.clusters, 40 + bh));
    flat_labels.insert(flat_labels.end(), labels.back().begin(), labels.back().end());
  }
  const HostLayouts want = layouts_of(labels, c.clusters);
  DeviceArray<std::int32_t> device_labels(flat_labels);
  DeviceArray<std::int32_t> order(flat_labels.size()), offsets(std::size_t(batch * heads * (c.clusters + 1)));
  cuda::cluster_layout(device_labels.get(), batch * heads, c.tokens, c.clusters, order.get(), offsets.get(), nullptr);
  EXPECT_EQ(order.download(), want.order);
  EXPECT_EQ(offsets.download(), want.offsets);

  const TestHeads rows = upload_heads(svgear::testing::random_tensor({batch, heads, c.tokens, c.d}, 77), c.layout);
  DeviceArray<float> means(std::size_t(batch * heads * c.clusters * c.d));
  DeviceArray<std::int32_t> counts(std::size_t(batch * heads * c.clusters));
  cuda::cluster_means(rows.view, {order.get(), offsets.get(), c.clusters}, means.get(), counts.get(), nullptr);
  const auto got = means.download();
  const auto got_counts = counts.download();
  for (int bh = 0; bh < batch * heads; ++bh) {
    const cpu::ClusterLayout& layout = want.heads[std::size_t(bh)];
    const std::vector<float> permuted = gather(rows.head(bh), c.d, layout);
    const std::vector<float> expected = cpu::cluster_means(permuted.data(), layout.offsets, c.d);
    for (int k = 0; k < c.clusters; ++k) {
      EXPECT_EQ(got_counts[std::size_t(bh * c.clusters + k)], layout.size(k));
      for (int j = 0; j < c.d; ++j) {
        const float e = expected[std::size_t(k * c.d + j)];
        EXPECT_NEAR(got[std::size_t((bh * c.clusters + k) * c.d + j)], e, 1e-4 * std::abs(e) + 1e-7);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Small, GpuLayout,
                         ::testing::Values(LayoutCase{1, 1, 64, Layout::bhsd},
                                           LayoutCase{1, 5, 128, Layout::padded_unaligned},
                                           LayoutCase{127, 9, 64, Layout::bshd}));
INSTANTIATE_TEST_SUITE_P(Large, GpuLayout,
                         ::testing::Values(LayoutCase{4097, 50, 128, Layout::bhsd},
                                           LayoutCase{4097, 300, 64, Layout::padded_unaligned}));

// ---------------------------------------------------------------------------------------------
// 4. Centroid criticality

TEST(GpuScoresSmall, CriticalityMatchesCpu) {
  for (const int d : {64, 128}) {
    const int heads = 2, cq = 37, ck = 150;
    const HostTensor q = svgear::testing::random_tensor({heads, cq, d}, 3, 0.7);
    const HostTensor k = svgear::testing::random_tensor({heads, ck, d}, 4, 0.7);
    std::vector<float> qc(std::size_t(heads * cq * d)), kc(std::size_t(heads * ck * d));
    for (std::size_t i = 0; i < qc.size(); ++i) qc[i] = q.at(std::int64_t(i));
    for (std::size_t i = 0; i < kc.size(); ++i) kc[i] = k.at(std::int64_t(i));
    cpu::SplitMix64 rng(9);
    std::vector<std::int32_t> counts(std::size_t(heads * ck));
    for (auto& n : counts) n = rng.next() % 4 == 0 ? 0 : std::int32_t(1 + rng.next() % 300);
    DeviceArray<float> device_q(qc), device_k(kc), out(std::size_t(heads * cq * ck));
    DeviceArray<std::int32_t> device_counts(counts);
    cuda::centroid_criticality(device_q.get(), device_k.get(), device_counts.get(), heads, cq, ck, d, out.get(),
                               nullptr);
    const auto got = out.download();
    for (int bh = 0; bh < heads; ++bh) {
      BlockGrid grid;
      grid.q_sizes.assign(std::size_t(cq), 1);
      for (int j = 0; j < ck; ++j) grid.k_sizes.push_back(counts[std::size_t(bh * ck + j)]);
      const std::vector<double> want =
          cpu::centroid_criticality(qc.data() + bh * cq * d, kc.data() + bh * ck * d, grid, d);
      for (std::size_t i = 0; i < want.size(); ++i) {
        EXPECT_NEAR(got[std::size_t(bh * cq * ck) + i], want[i], 1e-4 * want[i] + 1e-6) << "block " << i;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 5. The EAR probe

struct ProbeCase {
  int batch, heads;
  std::int64_t sq, sk;
  int d, cq, ck, probes;
  double scale;  // logit range
  DType dtype;
  double value_scale = 1.0;  // standard deviation of v (fp16 overflow and underflow ranges)
  bool mean_row = false;     // one more probe row per query cluster: its mean query
  int sketch = 0;            // value_sketch_dims (0: all of v's dimensions)
};

std::ostream& operator<<(std::ostream& os, const ProbeCase& c) {
  return os << "B" << c.batch << " H" << c.heads << " Sq" << c.sq << " Sk" << c.sk << " D" << c.d << " Cq" << c.cq
            << " Ck" << c.ck << " probes " << c.probes << (c.mean_row ? " + mean" : "") << " "
            << dtype_name(c.dtype) << " |v| ~ " << c.value_scale << (c.sketch ? " sketch " : "")
            << (c.sketch ? std::to_string(c.sketch) : "");
}

class GpuProbe : public ::testing::TestWithParam<ProbeCase> {};

TEST_P(GpuProbe, MatchesCpuWithinOnePerMilleOfTheLargestError) {
  const ProbeCase c = GetParam();
  const int bh_count = c.batch * c.heads;
  const TestHeads q = upload_heads(svgear::testing::clustered_tensor(c.batch, c.heads, c.sq, c.d, 6, 0.6, 21, c.scale),
                                   Layout::bshd, c.dtype);
  const TestHeads k = upload_heads(svgear::testing::clustered_tensor(c.batch, c.heads, c.sk, c.d, 9, 0.6, 22, c.scale),
                                   Layout::padded_unaligned, c.dtype);
  const TestHeads v =
      upload_heads(svgear::testing::random_tensor({c.batch, c.heads, c.sk, c.d}, 23, c.value_scale), Layout::bhsd,
                   c.dtype);
  std::vector<std::vector<std::int32_t>> q_labels, k_labels;
  for (int bh = 0; bh < bh_count; ++bh) {
    q_labels.push_back(labels_with_edge_clusters(c.sq, c.cq, 100 + bh));
    k_labels.push_back(labels_with_edge_clusters(c.sk, c.ck, 200 + bh));
  }
  const HostLayouts ql = layouts_of(q_labels, c.cq), kl = layouts_of(k_labels, c.ck);
  std::vector<float> key_means, value_means;
  std::vector<std::int32_t> key_counts;
  std::vector<double> want;
  for (int bh = 0; bh < bh_count; ++bh) {
    const std::vector<float> qp = gather(q.head(bh), c.d, ql.heads[std::size_t(bh)]);
    const std::vector<float> kp = gather(k.head(bh), c.d, kl.heads[std::size_t(bh)]);
    const std::vector<float> vp = gather(v.head(bh), c.d, kl.heads[std::size_t(bh)]);
    const std::vector<float> km = cpu::cluster_means(kp.data(), kl.heads[std::size_t(bh)].offsets, c.d);
    const std::vector<float> vm = cpu::cluster_means(vp.data(), kl.heads[std::size_t(bh)].offsets, c.d);
    std::vector<std::int64_t> sizes;
    for (int j = 0; j < c.ck; ++j) sizes.push_back(kl.heads[std::size_t(bh)].size(j));
    const cpu::KeyClusterSummary summary{km.data(), vm.data(), sizes.data()};
    const std::vector<float> mean_queries = cpu::mean_probe_queries(qp.data(), ql.heads[std::size_t(bh)], c.d, c.dtype);
    const std::vector<double> head_error = cpu::probe_compensation_error(
        qp.data(), kp.data(), vp.data(), c.d, ql.heads[std::size_t(bh)], kl.heads[std::size_t(bh)], summary,
        cpu::ProbeRows{c.probes, c.mean_row ? mean_queries.data() : nullptr}, c.sketch);
    want.insert(want.end(), head_error.begin(), head_error.end());
    key_means.insert(key_means.end(), km.begin(), km.end());
    value_means.insert(value_means.end(), vm.begin(), vm.end());
    for (auto n : sizes) key_counts.push_back(std::int32_t(n));
  }
  DeviceArray<std::int32_t> q_order(ql.order), q_offsets(ql.offsets), k_order(kl.order), k_offsets(kl.offsets);
  DeviceArray<float> device_key_means(key_means), device_value_means(value_means);
  DeviceArray<std::int32_t> device_counts(key_counts);
  DeviceArray<float> error(want.size());
  cuda::probe_compensation_error(
      q.view, k.view, v.view, {q_order.get(), q_offsets.get(), c.cq}, {k_order.get(), k_offsets.get(), c.ck},
      {device_key_means.get(), device_value_means.get(), device_counts.get()}, c.probes, c.mean_row, error.get(),
      nullptr, c.sketch);
  const auto got = error.download();
  for (int bh = 0; bh < bh_count; ++bh) {
    const auto first = want.begin() + std::int64_t(bh) * c.cq * c.ck;
    // (One-token key clusters are compensated exactly: a head of them has no error at all.)
    const double largest = *std::max_element(first, first + std::int64_t(c.cq) * c.ck);
    for (std::int64_t b = 0; b < std::int64_t(c.cq) * c.ck; ++b) {
      const std::size_t at = std::size_t(std::int64_t(bh) * c.cq * c.ck + b);
      EXPECT_NEAR(got[at], want[at], 1e-3 * largest + 1e-7) << "head " << bh << " block " << b;
    }
  }

  // With the pipeline's inputs (value_summary's fp16 copy of v and value means, max |v| from the
  // caller, the mean rows from the caller's query means) the errors are the same bit for bit.
  std::vector<unsigned> max_bits(std::size_t(bh_count), 0u);
  std::vector<float> query_means;
  for (int bh = 0; bh < bh_count; ++bh) {
    float largest = 0.0f;
    for (std::int64_t i = 0; i < c.sk * c.d; ++i) largest = std::max(largest, std::fabs(v.head(bh)[i]));
    std::memcpy(&max_bits[std::size_t(bh)], &largest, sizeof(float));
    const std::vector<float> qp = gather(q.head(bh), c.d, ql.heads[std::size_t(bh)]);
    const std::vector<float> qm = cpu::cluster_means(qp.data(), ql.heads[std::size_t(bh)].offsets, c.d);
    query_means.insert(query_means.end(), qm.begin(), qm.end());
  }
  DeviceArray<unsigned> device_max(max_bits);
  DeviceArray<float> device_query_means(query_means), summary_value_means(value_means.size());
  DeviceArray<std::uint16_t> scaled_values(std::size_t(bh_count * c.sk * c.d));
  cuda::value_summary(v.view, {k_order.get(), k_offsets.get(), c.ck}, device_max.get(), summary_value_means.get(),
                      scaled_values.get(), nullptr);
  const auto got_value_means = summary_value_means.download();
  for (std::size_t i = 0; i < value_means.size(); ++i) {
    ASSERT_FLOAT_EQ(got_value_means[i], value_means[i]) << "value mean element " << i;
  }
  cuda::DeviceKeySummary summary{device_key_means.get(), device_value_means.get(), device_counts.get()};
  summary.value_abs_max = device_max.get();
  summary.scaled_values = scaled_values.get();
  summary.query_means = device_query_means.get();
  DeviceArray<float> error_with_inputs(want.size());
  cuda::probe_compensation_error(q.view, k.view, v.view, {q_order.get(), q_offsets.get(), c.cq},
                                 {k_order.get(), k_offsets.get(), c.ck}, summary, c.probes, c.mean_row,
                                 error_with_inputs.get(), nullptr, c.sketch);
  const auto got_with_inputs = error_with_inputs.download();
  for (std::size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got_with_inputs[i], got[i]) << "block " << i << " with the pipeline's inputs";
  }
}

TEST(GpuProbeSmall, RejectsScaledValuesWithoutTheirMax) {
  const TestHeads x = upload_heads(svgear::testing::random_tensor({1, 1, 8, 64}, 5, 1.0), Layout::bhsd);
  DeviceArray<std::int32_t> order(std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 7}), offsets(std::vector<std::int32_t>{0, 8});
  DeviceArray<float> means(64), error(1);
  DeviceArray<std::int32_t> counts(std::vector<std::int32_t>{8});
  DeviceArray<std::uint16_t> scaled(8 * 64);
  cuda::DeviceKeySummary summary{means.get(), means.get(), counts.get()};
  summary.scaled_values = scaled.get();
  try {
    cuda::probe_compensation_error(x.view, x.view, x.view, {order.get(), offsets.get(), 1}, {order.get(), offsets.get(), 1},
                                   summary, 1, false, error.get(), nullptr);
    FAIL() << "accepted scaled values without value_abs_max";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("value_abs_max"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cuda::value_summary(x.view, {order.get(), offsets.get(), 1}, nullptr, means.get(), scaled.get(), nullptr),
               Error);
}

INSTANTIATE_TEST_SUITE_P(Small, GpuProbe,
                         ::testing::Values(ProbeCase{1, 1, 1, 1, 128, 1, 1, 4, 1.0, DType::bf16},
                                           ProbeCase{1, 2, 127, 300, 64, 9, 23, 4, 1.0, DType::bf16},
                                           ProbeCase{1, 1, 400, 200, 64, 3, 10, 70, 1.0, DType::bf16},
                                           // |v| past fp16's range: the probe's value scaling.
                                           ProbeCase{1, 1, 300, 500, 128, 7, 20, 4, 1.0, DType::bf16, 1e6}));
INSTANTIATE_TEST_SUITE_P(Large, GpuProbe,
                         ::testing::Values(ProbeCase{1, 1, 500, 777, 128, 20, 40, 3, 2.0, DType::bf16},
                                           ProbeCase{2, 1, 4097, 4097, 128, 64, 200, 4, 1.5, DType::bf16},
                                           ProbeCase{1, 1, 333, 517, 128, 11, 30, 4, 1.5, DType::f16},
                                           // Many key chunks and 16-cluster batches per chunk.
                                           ProbeCase{1, 2, 3000, 5000, 128, 40, 300, 4, 1.5, DType::bf16},
                                           // Query clusters of 100 probe rows across 128-row blocks.
                                           ProbeCase{1, 1, 500, 800, 64, 9, 25, 100, 1.0, DType::f16}));
// The mean query row: alone (probes 0) or after sampled rows; with empty and one-token clusters.
INSTANTIATE_TEST_SUITE_P(SmallMeanRow, GpuProbe,
                         ::testing::Values(ProbeCase{1, 1, 1, 1, 128, 1, 1, 0, 1.0, DType::bf16, 1.0, true},
                                           ProbeCase{1, 2, 127, 300, 64, 9, 23, 0, 1.0, DType::bf16, 1.0, true}));
INSTANTIATE_TEST_SUITE_P(LargeMeanRow, GpuProbe,
                         ::testing::Values(ProbeCase{1, 1, 333, 517, 128, 11, 30, 4, 1.5, DType::f16, 1.0, true},
                                           ProbeCase{2, 1, 4097, 4097, 128, 64, 200, 0, 1.5, DType::bf16, 1.0, true},
                                           ProbeCase{1, 1, 500, 800, 64, 9, 25, 100, 1.0, DType::f16, 1.0, true}));
// Values sketched to 32 dimensions (cpu::probe_compensation_error's value_sketch_dims, the same
// signs): D 64 and 128, the mean row and sampled rows, many key chunks.
INSTANTIATE_TEST_SUITE_P(SmallSketch, GpuProbe,
                         ::testing::Values(ProbeCase{1, 2, 127, 300, 64, 9, 23, 0, 1.0, DType::bf16, 1.0, true, 32},
                                           ProbeCase{1, 1, 300, 500, 128, 7, 20, 4, 1.0, DType::bf16, 1.0, true, 32}));
INSTANTIATE_TEST_SUITE_P(LargeSketch, GpuProbe,
                         ::testing::Values(ProbeCase{1, 2, 3000, 5000, 128, 40, 300, 0, 1.5, DType::bf16, 1.0, true,
                                                     32},
                                           ProbeCase{1, 1, 333, 517, 128, 11, 30, 4, 1.5, DType::bf16, 1e6, false, 32}));

// ---------------------------------------------------------------------------------------------
// 6. Selection

struct SelectionInputs {
  int heads, cq, ck;
  std::int64_t sq, sk;
  std::vector<BlockGrid> grids;
  std::vector<std::int32_t> q_offsets, k_offsets;
  std::vector<float> scores;  // [BH][Cq][Ck], all distinct
};

SelectionInputs selection_inputs(int heads, int cq, int ck, std::int64_t sq, std::int64_t sk, bool row_softmax,
                                 std::uint64_t seed) {
  SelectionInputs in{heads, cq, ck, sq, sk, {}, {}, {}, {}};
  for (int bh = 0; bh < heads; ++bh) {
    const cpu::ClusterLayout ql = cpu::cluster_layout(labels_with_edge_clusters(sq, cq, seed + 2 * bh), cq);
    const cpu::ClusterLayout kl = cpu::cluster_layout(labels_with_edge_clusters(sk, ck, seed + 2 * bh + 1), ck);
    BlockGrid grid;
    for (int i = 0; i < cq; ++i) grid.q_sizes.push_back(ql.size(i));
    for (int j = 0; j < ck; ++j) grid.k_sizes.push_back(kl.size(j));
    in.grids.push_back(grid);
    for (auto o : ql.offsets) in.q_offsets.push_back(std::int32_t(o));
    for (auto o : kl.offsets) in.k_offsets.push_back(std::int32_t(o));
  }
  // Distinct values: a random permutation of evenly spaced ones, so no priority ties.
  const std::size_t total = std::size_t(heads) * std::size_t(cq) * std::size_t(ck);
  std::vector<std::size_t> rank(total);
  std::iota(rank.begin(), rank.end(), std::size_t(0));
  cpu::SplitMix64 rng(seed);
  for (std::size_t i = total; i > 1; --i) std::swap(rank[i - 1], rank[std::size_t(rng.next() % i)]);
  in.scores.resize(total);
  for (std::size_t i = 0; i < total; ++i) in.scores[i] = float(0.001 + double(rank[i]) / double(total));
  if (row_softmax) {  // criticality-like rows: non-negative, summing to 1 over non-empty key clusters
    for (int bh = 0; bh < heads; ++bh)
      for (int i = 0; i < cq; ++i) {
        float* row = in.scores.data() + (std::size_t(bh) * cq + std::size_t(i)) * ck;
        double sum = 0;
        for (int j = 0; j < ck; ++j) {
          row[j] = in.grids[std::size_t(bh)].k_sizes[std::size_t(j)] == 0 ? 0.0f : row[j] * row[j] * row[j];
          sum += row[j];
        }
        for (int j = 0; j < ck; ++j) row[j] = float(row[j] / sum);
      }
  }
  return in;
}

// Runs one GPU selection into poisoned outputs and checks it against the CPU's.
void expect_selection_matches(
    const SelectionInputs& in, const std::vector<BlockSelection>& want,
    const std::function<void(const cuda::DeviceBlockGrid&, const cuda::DeviceBlockSelection&)>& run) {
  const std::size_t total = in.scores.size(), rows = std::size_t(in.heads) * std::size_t(in.cq);
  DeviceArray<std::int32_t> q_offsets(in.q_offsets), k_offsets(in.k_offsets);
  DeviceArray<std::int32_t> selected_offsets(rows + 1), selected(total), compensated_offsets(rows + 1),
      compensated(total);
  DeviceArray<std::int64_t> pairs(std::size_t(in.heads));
  DeviceArray<std::uint8_t> exact(total);
  const cuda::DeviceBlockGrid grid{in.heads, in.cq, in.ck, in.sq, in.sk, q_offsets.get(), k_offsets.get()};
  run(grid,
      {selected_offsets.get(), selected.get(), compensated_offsets.get(), compensated.get(), pairs.get(), exact.get()});
  const auto g_exact = exact.download();
  const auto g_pairs = pairs.download();
  const auto g_selected_offsets = selected_offsets.download(), g_selected = selected.download();
  const auto g_compensated_offsets = compensated_offsets.download(), g_compensated = compensated.download();
  // Offsets must be a monotone CSR within the capacity before any list is read through them.
  for (const auto* offsets : {&g_selected_offsets, &g_compensated_offsets}) {
    ASSERT_EQ((*offsets)[0], 0);
    for (std::size_t r = 0; r < rows; ++r) {
      ASSERT_LE((*offsets)[r], (*offsets)[r + 1]) << "row " << r;
      ASSERT_LE(std::size_t((*offsets)[r + 1]), total) << "row " << r;
    }
  }
  for (int bh = 0; bh < in.heads; ++bh) {
    const BlockGrid& g = in.grids[std::size_t(bh)];
    const std::size_t first = std::size_t(bh) * std::size_t(in.cq) * std::size_t(in.ck);
    const std::vector<std::uint8_t> head_exact(g_exact.begin() + std::int64_t(first),
                                               g_exact.begin() + std::int64_t(first + std::size_t(in.cq * in.ck)));
    EXPECT_EQ(head_exact, want[std::size_t(bh)].exact) << "head " << bh;
    EXPECT_EQ(g_pairs[std::size_t(bh)], want[std::size_t(bh)].exact_pairs) << "head " << bh;
    for (int i = 0; i < in.cq; ++i) {
      const std::size_t r = std::size_t(bh) * std::size_t(in.cq) + std::size_t(i);
      std::vector<std::int32_t> sel, comp;
      for (int j = 0; j < in.ck; ++j) {
        if (head_exact[std::size_t(i * in.ck + j)]) {
          sel.push_back(j);
        } else if (g.q_sizes[std::size_t(i)] > 0 && g.k_sizes[std::size_t(j)] > 0) {
          comp.push_back(j);
        }
      }
      EXPECT_EQ(std::vector<std::int32_t>(g_selected.begin() + g_selected_offsets[r],
                                          g_selected.begin() + g_selected_offsets[r + 1]),
                sel)
          << "row " << r;
      EXPECT_EQ(std::vector<std::int32_t>(g_compensated.begin() + g_compensated_offsets[r],
                                          g_compensated.begin() + g_compensated_offsets[r + 1]),
                comp)
          << "row " << r;
    }
  }
}

struct SelectionShape {
  int heads, cq, ck;
  std::int64_t sq, sk;
};

std::ostream& operator<<(std::ostream& os, const SelectionShape& c) {
  return os << "BH" << c.heads << " Cq" << c.cq << " Ck" << c.ck << " Sq" << c.sq << " Sk" << c.sk;
}

class GpuSelection : public ::testing::TestWithParam<SelectionShape> {};

// Every budget scope, policy, floor and a range of densities against the CPU policies.
void expect_density_budgets_match_cpu(const SelectionInputs& in) {
  DeviceArray<float> scores(in.scores);
  for (const BudgetScope scope : {BudgetScope::call, BudgetScope::head}) {
    for (const bool error_aware : {false, true}) {
      for (const bool floor : {false, true}) {
        for (const double density : {0.02, 0.25, 0.6, 1.0}) {
          SCOPED_TRACE(std::string(error_aware ? "EAR" : "SVG2") + (floor ? " with floor" : "") + ", scope " +
                       budget_scope_name(scope) + ", density " + std::to_string(density));
          SelectionBudget budget;
          budget.density = density;
          budget.every_query_cluster_needs_a_block = floor;
          const auto policy =
              make_selection_policy(error_aware ? SelectionPolicyKind::error_aware : SelectionPolicyKind::criticality);
          std::vector<std::vector<double>> priorities;
          for (int bh = 0; bh < in.heads; ++bh) {
            BlockStatistics stats;
            stats.grid = in.grids[std::size_t(bh)];
            const auto first = in.scores.begin() + std::int64_t(bh) * in.cq * in.ck;
            const std::vector<double> head_scores(first, first + std::int64_t(in.cq) * in.ck);
            stats.criticality = head_scores;
            stats.compensation_error = head_scores;
            priorities.push_back(policy->block_priority(stats));
          }
          std::vector<BlockSelection> want;
          if (scope == BudgetScope::call) {
            want = take_blocks_by_priority(in.grids, priorities, budget);
          } else {
            for (int bh = 0; bh < in.heads; ++bh) {
              want.push_back(take_blocks_by_priority(in.grids[std::size_t(bh)], priorities[std::size_t(bh)], budget));
            }
          }
          const cuda::DensityBudget device_budget{density, floor, scope == BudgetScope::call};
          expect_selection_matches(
              in, want, [&](const cuda::DeviceBlockGrid& grid, const cuda::DeviceBlockSelection& out) {
                cuda::take_blocks_by_priority(
                    grid, scores.get(), error_aware ? cuda::BlockScore::error_per_pair : cuda::BlockScore::priority,
                    device_budget, out, nullptr);
              });
        }
      }
    }
  }
}

TEST_P(GpuSelection, DensityBudgetMatchesCpuPolicies) {
  const SelectionShape shape = GetParam();
  expect_density_budgets_match_cpu(selection_inputs(shape.heads, shape.cq, shape.ck, shape.sq, shape.sk, false, 31));
}

// Equal scores: the walk's order is the block index alone, so the select's last digits (the
// index bits) decide. At the Large shape one call-wide segment leaves more blocks in range after
// the first two passes than the candidate buffer holds (the passes over all blocks finish it);
// a head's segment leaves fewer (the candidates finish it).
TEST_P(GpuSelection, TiedPrioritiesMatchCpuPolicies) {
  const SelectionShape shape = GetParam();
  SelectionInputs in = selection_inputs(shape.heads, shape.cq, shape.ck, shape.sq, shape.sk, false, 37);
  std::fill(in.scores.begin(), in.scores.end(), 0.5f);
  expect_density_budgets_match_cpu(in);
}

TEST_P(GpuSelection, TopPMatchesCpuPolicy) {
  const SelectionShape shape = GetParam();
  const SelectionInputs in = selection_inputs(shape.heads, shape.cq, shape.ck, shape.sq, shape.sk, true, 57);
  DeviceArray<float> scores(in.scores);
  for (const double top_p : {0.3, 0.9}) {
    for (const double min_fraction : {0.0, 0.25}) {
      SCOPED_TRACE("top_p " + std::to_string(top_p) + ", floor " + std::to_string(min_fraction));
      std::vector<BlockSelection> want;
      for (int bh = 0; bh < in.heads; ++bh) {
        const auto first = in.scores.begin() + std::int64_t(bh) * in.cq * in.ck;
        const std::vector<double> criticality(first, first + std::int64_t(in.cq) * in.ck);
        want.push_back(take_blocks_by_top_p(in.grids[std::size_t(bh)], criticality, top_p, min_fraction));
      }
      expect_selection_matches(in, want, [&](const cuda::DeviceBlockGrid& grid, const cuda::DeviceBlockSelection& out) {
        cuda::take_blocks_by_top_p(grid, scores.get(), top_p, min_fraction, out, nullptr);
      });
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Small, GpuSelection,
                         ::testing::Values(SelectionShape{3, 13, 29, 127, 300}, SelectionShape{1, 1, 1, 1, 1}));
INSTANTIATE_TEST_SUITE_P(Large, GpuSelection, ::testing::Values(SelectionShape{2, 64, 300, 4097, 4097}));

// Bad inputs are refused with svgear::Error before any launch.
TEST(GpuStagesSmall, RejectUnsupportedInputs) {
  cuda::DeviceHeads heads;
  heads.dtype = DType::f32;
  heads.batch = heads.heads = 1;
  heads.tokens = 4;
  heads.head_dim = 64;
  int dummy = 0;
  heads.tensor.data = &dummy;
  cuda::KmeansSettings settings;
  EXPECT_THROW(cuda::kmeans(heads, settings, {}, nullptr), Error);
  heads.dtype = DType::bf16;
  heads.head_dim = 96;
  EXPECT_THROW(cuda::cluster_means(heads, {}, nullptr, nullptr, nullptr), Error);
}

}  // namespace
