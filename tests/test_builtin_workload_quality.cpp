// What the methods promise on the built-in video workload (a smaller grid than the demo's, so
// the suite stays fast): centroid compensation never does worse than dropping the same blocks,
// and SVG-EAR at least halves SVG2's error at equal density.
#include <gtest/gtest.h>

#include "svgear/attention.hpp"
#include "svgear/metrics.hpp"
#include "svgear/workload.hpp"

using namespace svgear;

namespace {

class BuiltinWorkload : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    WorkloadShape shape;
    shape.frames = 6;
    shape.height = 16;
    shape.width = 16;
    shape.heads = 4;
    shape.head_dim = 64;
    shape.seed = 7;
    workload_ = new SafetensorsFile(generate_video_workload(shape));
    reference_ = new HostTensor(DType::f32, workload_->tensors.at("q").shape);
    dense_attention(view("q"), view("k"), view("v"), reference_->view_bhsd("reference"));
  }
  static void TearDownTestSuite() {
    delete workload_;
    delete reference_;
  }
  static TensorView view(const char* name) { return workload_->tensors.at(name).view_bhsd(name); }

  static double error_of(const MethodConfig& config, double* density = nullptr) {
    HostTensor out(DType::f32, reference_->shape);
    const AttentionReport report = attention(view("q"), view("k"), view("v"), out.view_bhsd("out"), config);
    if (density) *density = report.density;
    return compare(out.view_bhsd("out"), reference_->view_bhsd("reference")).rel_l2;
  }

  static MethodConfig config(Method method, double density) {
    MethodConfig c = preset(method);
    c.density = density;
    c.clusters_q = 24;
    c.clusters_k = 48;
    return c;
  }

  static SafetensorsFile* workload_;
  static HostTensor* reference_;
};

SafetensorsFile* BuiltinWorkload::workload_ = nullptr;
HostTensor* BuiltinWorkload::reference_ = nullptr;

}  // namespace

TEST_F(BuiltinWorkload, CompensationNeverWorseThanDroppingTheSameBlocks) {
  for (SelectionPolicyKind policy : {SelectionPolicyKind::criticality, SelectionPolicyKind::error_aware}) {
    for (double density : {0.05, 0.1, 0.2, 0.3, 0.5}) {
      MethodConfig drop = config(Method::svg2, density), centroid = config(Method::svg2, density);
      drop.policy = centroid.policy = policy;
      // Same policy and budget for both. The drop run first gives every query cluster its
      // top block (without it some rows would have no keys at all), then fills the budget in
      // the same order, so the two selections differ at most by those floor blocks.
      drop.compensation = Compensation::drop;
      centroid.compensation = Compensation::centroid;
      double drop_density = 0, centroid_density = 0;
      const double drop_error = error_of(drop, &drop_density);
      const double centroid_error = error_of(centroid, &centroid_density);
      EXPECT_LE(centroid_error, drop_error) << policy_name(policy) << " density " << density;
      EXPECT_NEAR(centroid_density, drop_density, 0.05) << policy_name(policy) << " density " << density;
    }
  }
}

TEST_F(BuiltinWorkload, EarHalvesSvg2ErrorAtEqualDensity) {
  for (double density : {0.1, 0.2, 0.3}) {
    double ear_density = 0, svg2_density = 0;
    const double ear = error_of(config(Method::ear, density), &ear_density);
    const double svg2 = error_of(config(Method::svg2, density), &svg2_density);
    EXPECT_LE(ear, 0.5 * svg2) << "density " << density << ": ear " << ear << " svg2 " << svg2;
    // Equal density: both within one block of the budget.
    EXPECT_NEAR(ear_density, svg2_density, 0.02);
  }
}

// The probe with 4 sampled queries per query cluster instead of the mean query (the default
// before 2026-12-06) also halves SVG2's error.
TEST_F(BuiltinWorkload, EarWithFourSampledProbeQueriesHalvesSvg2Error) {
  for (double density : {0.1, 0.2, 0.3}) {
    MethodConfig ear = config(Method::ear, density);
    ear.probe_queries = 4;
    ear.probe_mean = false;
    const double ear_error = error_of(ear);
    const double svg2 = error_of(config(Method::svg2, density));
    EXPECT_LE(ear_error, 0.5 * svg2) << "density " << density << ": ear " << ear_error << " svg2 " << svg2;
  }
}

// Query clusters trimmed to 64-row tiles (query_tail_limit) move a few boundary queries to their
// second-nearest cluster: the error may grow, but by little (at Wan2.1-1.3B's shape, 256 query
// clusters, by 0.1 % for 12.5 % fewer tiles: docs/PERF_NOTES.md), and EAR still halves SVG2's.
TEST_F(BuiltinWorkload, TileAlignedQueryClustersKeepTheError) {
  for (double density : {0.1, 0.2, 0.3}) {
    MethodConfig plain = config(Method::ear, density), aligned = plain;
    plain.clusters_q = aligned.clusters_q = 10;  // ~154 queries per cluster: most have a tail
    aligned.query_tail_limit = 24;
    const double plain_error = error_of(plain), aligned_error = error_of(aligned);
    EXPECT_NE(aligned_error, plain_error) << "density " << density << ": the alignment moved no query";
    EXPECT_LE(aligned_error, 1.05 * plain_error) << "density " << density;
    MethodConfig svg2 = config(Method::svg2, density);
    svg2.clusters_q = 10;
    EXPECT_LE(aligned_error, 0.5 * error_of(svg2)) << "density " << density;
  }
}

// The sketched probe (probe_value_dims = D/4) ranks blocks about as well as the exact one at the
// sparse densities it is meant for: here +0.2 % and +0.8 % error at 0.1 and 0.2. Not at 0.3
// (+9.4 %: the blocks left to choose from have similar errors, and the sketch's noise reorders
// them), so the claim, and this test, stop at 0.2 (docs/ALGORITHMS.md, "A sketched probe").
TEST_F(BuiltinWorkload, SketchedProbeKeepsTheErrorAtSparseDensities) {
  for (double density : {0.1, 0.2}) {
    MethodConfig exact = config(Method::ear, density), sketched = exact;
    sketched.probe_value_dims = 16;  // of head_dim 64
    const double exact_error = error_of(exact), sketched_error = error_of(sketched);
    EXPECT_NE(sketched_error, exact_error) << "density " << density << ": the sketch changed nothing";
    EXPECT_LE(sketched_error, 1.05 * exact_error) << "density " << density;
    EXPECT_LE(sketched_error, 0.5 * error_of(config(Method::svg2, density))) << "density " << density;
  }
}
