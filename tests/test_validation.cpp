// Every bad input at the library boundary: a svgear::Error whose one-line message names the
// problem, thrown before anything is written to the output.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "svgear/attention.hpp"
#include "svgear/error.hpp"
#include "test_support.hpp"

using namespace svgear;
using svgear::testing::random_tensor;

namespace {

struct Inputs {
  HostTensor q = random_tensor({1, 2, 40, 8}, 1);
  HostTensor k = random_tensor({1, 2, 50, 8}, 2);
  HostTensor v = random_tensor({1, 2, 50, 8}, 3);
  HostTensor out = HostTensor(DType::f32, {1, 2, 40, 8});
  MethodConfig config = [] {
    MethodConfig c = preset(Method::ear);
    c.clusters_q = 4;
    c.clusters_k = 5;
    return c;
  }();
};

// Runs attention on the inputs; expects a svgear::Error containing `keyword`, on one line,
// and the output untouched.
void expect_rejected(Inputs in, const std::string& keyword,
                     const std::function<void(TensorView&, TensorView&, TensorView&, TensorView&)>& edit = nullptr) {
  TensorView q = in.q.view_bhsd("q"), k = in.k.view_bhsd("k"), v = in.v.view_bhsd("v"), out = in.out.view_bhsd("out");
  if (edit) edit(q, k, v, out);
  for (std::int64_t i = 0; i < in.out.numel(); ++i) in.out.set(i, 7.0f);
  try {
    attention(q, k, v, out, in.config);
    ADD_FAILURE() << "no error; expected one mentioning '" << keyword << "'";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(keyword), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  for (std::int64_t i = 0; i < in.out.numel(); ++i) ASSERT_EQ(in.out.at(i), 7.0f) << "output written at " << i;
}

}  // namespace

TEST(Validation, ValidInputsPass) {
  Inputs in;
  EXPECT_NO_THROW(attention(in.q.view_bhsd("q"), in.k.view_bhsd("k"), in.v.view_bhsd("v"), in.out.view_bhsd("out"), in.config));
}

TEST(Validation, KeyValueShapeMismatch) {
  Inputs in;
  in.v = random_tensor({1, 2, 49, 8}, 3);
  expect_rejected(in, "keys and values must match");
}

TEST(Validation, BatchOrHeadsMismatch) {
  Inputs in;
  in.k = random_tensor({1, 3, 50, 8}, 2);
  in.v = random_tensor({1, 3, 50, 8}, 3);
  expect_rejected(in, "batch and heads must match");
}

TEST(Validation, HeadDimMismatch) {
  Inputs in;
  in.k = random_tensor({1, 2, 50, 16}, 2);
  in.v = random_tensor({1, 2, 50, 16}, 3);
  expect_rejected(in, "head dim");
}

TEST(Validation, OutputShapeMismatch) {
  Inputs in;
  in.out = HostTensor(DType::f32, {1, 2, 41, 8});
  expect_rejected(in, "output must have the shape of q");
}

TEST(Validation, NonFiniteInputs) {
  for (const char* name : {"q", "k", "v"}) {
    for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
      Inputs in;
      HostTensor& t = std::string(name) == "q" ? in.q : std::string(name) == "k" ? in.k : in.v;
      t.set(t.numel() - 3, bad);
      expect_rejected(in, "tensor '" + std::string(name) + "' has a non-finite value");
    }
  }
}

TEST(Validation, NonFiniteBf16Input) {
  Inputs in;
  HostTensor q(DType::bf16, in.q.shape);
  for (std::int64_t i = 0; i < q.numel(); ++i) q.set(i, in.q.at(i));
  q.set(5, std::nanf(""));
  in.q = q;
  expect_rejected(in, "non-finite");
}

TEST(Validation, DensityOutsideRange) {
  for (double density : {0.0, -0.5, 1.5, double(NAN)}) {
    Inputs in;
    in.config.density = density;
    expect_rejected(in, "outside (0, 1]");
  }
}

TEST(Validation, MoreClustersThanTokens) {
  Inputs in;
  in.config.clusters_q = 41;
  expect_rejected(in, "exceeds the 40 query tokens");
  in.config.clusters_q = 4;
  in.config.clusters_k = 51;
  expect_rejected(in, "exceeds the 50 key tokens");
}

TEST(Validation, EmptyTensors) {
  Inputs in;
  in.q = HostTensor(DType::f32, {1, 2, 0, 8});
  in.out = HostTensor(DType::f32, {1, 2, 0, 8});
  expect_rejected(in, "empty");
}

TEST(Validation, TensorsOnDifferentDevices) {
  expect_rejected(Inputs{}, "different devices",
                  [](TensorView&, TensorView& k, TensorView&, TensorView&) { k.device = Device::cuda; });
}

TEST(Validation, NullDataAndNegativeStrides) {
  expect_rejected(Inputs{}, "no data", [](TensorView&, TensorView& k, TensorView&, TensorView&) { k.data = nullptr; });
  expect_rejected(Inputs{}, "negative stride",
                  [](TensorView&, TensorView&, TensorView& v, TensorView&) { v.strides[2] = -8; });
}

TEST(Validation, BadConfigValues) {
  Inputs in;
  in.config.top_p = 0.9;  // EAR has no top-p mode
  expect_rejected(in, "criticality");
  in = Inputs{};
  in.config.clusters_k = 0;
  expect_rejected(in, "clusters_k");
  in = Inputs{};
  in.config.probe_queries = 0;  // no probe row at all
  in.config.probe_mean = false;
  expect_rejected(in, "probe_mean");
  in = Inputs{};
  in.config.probe_queries = -1;
  expect_rejected(in, "probe queries");
  in = Inputs{};
  in.config.query_tail_limit = 33;  // a tail limit beyond half a 64-row tile
  expect_rejected(in, "query tail limit");
  in = Inputs{};
  in.config.query_tail_limit = -1;
  expect_rejected(in, "query tail limit");
  in = Inputs{};
  in.config.probe_value_dims = 24;  // not a multiple of 16
  expect_rejected(in, "probe value dims");
  in = Inputs{};
  in.config.kmeans_iterations = 0;
  expect_rejected(in, "iterations");
}

TEST(Validation, ParsersNameTheChoices) {
  EXPECT_THROW(parse_method("svg3"), Error);
  EXPECT_THROW(parse_policy("random"), Error);
  EXPECT_THROW(parse_compensation("mean"), Error);
  try {
    parse_method("svg3");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dense, svg2 or ear"), std::string::npos);
  }
}
