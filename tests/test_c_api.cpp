// The C API at its boundary: status codes by error kind, messages, handles, layouts, NULLs.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "svgear/svgear.h"

namespace {

// A contiguous float32 tensor of `shape` with its DLTensor.
struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
  DLTensor dl{};

  explicit Tensor(std::vector<std::int64_t> s, float fill = 0) : shape(std::move(s)) {
    std::size_t n = 1;
    for (auto extent : shape) n *= std::size_t(extent);
    data.assign(n, fill);
    for (std::size_t i = 0; i < n; ++i) data[i] = fill + std::sin(0.37f * float(i));
    dl.data = data.data();
    dl.device = {kDLCPU, 0};
    dl.ndim = int(shape.size());
    dl.dtype = {kDLFloat, 32, 1};
    dl.shape = shape.data();
    dl.strides = nullptr;  // compact
  }
};

struct Config {
  svgear_config* handle = nullptr;
  explicit Config(const char* method) { EXPECT_EQ(svgear_config_create(method, &handle), SVGEAR_OK); }
  ~Config() { svgear_config_destroy(handle); }
};

svgear_status run(const Config& config, Tensor& q, Tensor& k, Tensor& v, Tensor& out,
                  svgear_layout layout = SVGEAR_LAYOUT_BHSD, svgear_state* state = nullptr) {
  return svgear_attention(config.handle, state, &q.dl, &k.dl, &v.dl, &out.dl, nullptr, layout, nullptr, nullptr);
}

TEST(CApi, VersionAndDescribe) {
  EXPECT_EQ(svgear_c_api_version(), SVGEAR_C_API_VERSION);
  Config config("svg2");
  ASSERT_EQ(svgear_config_set(config.handle, "density", "0.125"), SVGEAR_OK);
  const std::string json = svgear_config_describe(config.handle);
  EXPECT_NE(json.find("\"density\":0.125"), std::string::npos) << json;
  EXPECT_NE(json.find("\"policy\":\"criticality\""), std::string::npos) << json;
}

TEST(CApi, OptionErrorsAreValueErrorsWithMessages) {
  Config config("ear");
  EXPECT_EQ(svgear_config_set(config.handle, "clusterz", "4"), SVGEAR_ERROR_VALUE);
  EXPECT_NE(std::string(svgear_last_error()).find("unknown option 'clusterz'"), std::string::npos);
  EXPECT_EQ(svgear_config_set(config.handle, "density", "0.2x"), SVGEAR_ERROR_VALUE);
  EXPECT_NE(std::string(svgear_last_error()).find("not a finite number"), std::string::npos);
  EXPECT_EQ(svgear_config_set(config.handle, "clusters_q", "1.5"), SVGEAR_ERROR_VALUE);
  EXPECT_EQ(svgear_config_set(config.handle, "budget_scope", "all"), SVGEAR_ERROR_VALUE);
  EXPECT_EQ(svgear_config_set(config.handle, "clusters_q", "8"), SVGEAR_OK);
  EXPECT_STREQ(svgear_last_error(), "");  // a success clears the message
  svgear_config* none = nullptr;
  EXPECT_EQ(svgear_config_create("fastest", &none), SVGEAR_ERROR_VALUE);
  EXPECT_EQ(none, nullptr);
  EXPECT_EQ(svgear_config_create("ear", nullptr), SVGEAR_ERROR_VALUE);
}

TEST(CApi, LayoutsGiveTheSameResult) {
  Config config("dense");
  Tensor q({1, 2, 40, 8}), k({1, 2, 40, 8}, 0.5f), v({1, 2, 40, 8}, -0.25f), out({1, 2, 40, 8});
  ASSERT_EQ(run(config, q, k, v, out), SVGEAR_OK) << svgear_last_error();
  // The same data seen as (B, S, H, D) through strides.
  std::int64_t bshd_shape[4] = {1, 40, 2, 8}, bshd_strides[4] = {640, 8, 320, 1};
  Tensor out2({1, 2, 40, 8});
  for (Tensor* t : {&q, &k, &v, &out2}) {
    t->dl.shape = bshd_shape;
    t->dl.strides = bshd_strides;
  }
  ASSERT_EQ(run(config, q, k, v, out2, SVGEAR_LAYOUT_BSHD), SVGEAR_OK) << svgear_last_error();
  EXPECT_EQ(out.data, out2.data);
}

TEST(CApi, TensorErrorsMapToTypeOrValue) {
  Config config("dense");
  Tensor q({1, 2, 16, 8}), k({1, 2, 16, 8}), v({1, 2, 16, 8}), out({1, 2, 16, 8});
  Tensor rank3({2, 16, 8});
  EXPECT_EQ(run(config, rank3, k, v, out), SVGEAR_ERROR_TYPE);
  EXPECT_NE(std::string(svgear_last_error()).find("3 dimensions"), std::string::npos);
  Tensor f64({1, 2, 16, 8});
  f64.dl.dtype = {kDLFloat, 64, 1};
  EXPECT_EQ(run(config, q, f64, v, out), SVGEAR_ERROR_TYPE);
  Tensor short_v({1, 2, 15, 8});
  EXPECT_EQ(run(config, q, k, short_v, out), SVGEAR_ERROR_VALUE);
  Tensor opencl({1, 2, 16, 8});
  opencl.dl.device = {kDLOpenCL, 0};
  EXPECT_EQ(run(config, q, k, v, opencl), SVGEAR_ERROR_TYPE);
  EXPECT_EQ(svgear_attention(config.handle, nullptr, nullptr, &k.dl, &v.dl, &out.dl, nullptr,
                             SVGEAR_LAYOUT_BHSD, nullptr, nullptr),
            SVGEAR_ERROR_VALUE);
  EXPECT_EQ(svgear_attention(nullptr, nullptr, &q.dl, &k.dl, &v.dl, &out.dl, nullptr, SVGEAR_LAYOUT_BHSD,
                             nullptr, nullptr),
            SVGEAR_ERROR_VALUE);
  EXPECT_EQ(run(config, q, k, v, q), SVGEAR_ERROR_VALUE);  // out aliases q
  EXPECT_NE(std::string(svgear_last_error()).find("overlaps"), std::string::npos);
  q.data[3] = NAN;
  EXPECT_EQ(run(config, q, k, v, out), SVGEAR_ERROR_VALUE);
  EXPECT_NE(std::string(svgear_last_error()).find("non-finite"), std::string::npos);
}

TEST(CApi, StateWarmStartsAndResets) {
  Config config("ear");
  ASSERT_EQ(svgear_config_set(config.handle, "clusters_q", "4"), SVGEAR_OK);
  ASSERT_EQ(svgear_config_set(config.handle, "clusters_k", "4"), SVGEAR_OK);
  svgear_state* state = nullptr;
  ASSERT_EQ(svgear_state_create(&state), SVGEAR_OK);
  Tensor q({1, 1, 64, 8}), k({1, 1, 64, 8}, 1), v({1, 1, 64, 8}, 2), out({1, 1, 64, 8});
  svgear_report report{};
  for (int call = 0; call < 2; ++call) {
    ASSERT_EQ(svgear_attention(config.handle, state, &q.dl, &k.dl, &v.dl, &out.dl, nullptr, SVGEAR_LAYOUT_BHSD,
                               nullptr, &report),
              SVGEAR_OK)
        << svgear_last_error();
    EXPECT_EQ(report.warm_started, call);
  }
  EXPECT_EQ(svgear_state_steps(state), 2);
  EXPECT_EQ(svgear_state_reset(state), SVGEAR_OK);
  EXPECT_EQ(svgear_state_steps(state), 0);
  svgear_state_destroy(state);
  svgear_state_destroy(nullptr);  // like free(NULL)
}

TEST(CApi, SynchronizeOptionParsesAndIsDescribed) {
  Config config("ear");
  EXPECT_NE(std::string(svgear_config_describe(config.handle)).find("\"synchronize\":true"), std::string::npos);
  ASSERT_EQ(svgear_config_set(config.handle, "synchronize", "false"), SVGEAR_OK) << svgear_last_error();
  EXPECT_NE(std::string(svgear_config_describe(config.handle)).find("\"synchronize\":false"), std::string::npos);
  ASSERT_EQ(svgear_config_set(config.handle, "synchronize", "1"), SVGEAR_OK);
  EXPECT_NE(std::string(svgear_config_describe(config.handle)).find("\"synchronize\":true"), std::string::npos);
  EXPECT_EQ(svgear_config_set(config.handle, "synchronize", "maybe"), SVGEAR_ERROR_VALUE);
  EXPECT_NE(std::string(svgear_last_error()).find("choose true or false"), std::string::npos) << svgear_last_error();
  EXPECT_EQ(svgear_config_set(config.handle, "density", "true"), SVGEAR_ERROR_VALUE);  // not a boolean option
}

TEST(CApi, ProbeMeanOptionParsesAndIsDescribed) {
  Config config("ear");
  const std::string defaults = svgear_config_describe(config.handle);  // the mean query alone
  EXPECT_NE(defaults.find("\"probe_mean\":true"), std::string::npos) << defaults;
  EXPECT_NE(defaults.find("\"probe_queries\":0"), std::string::npos) << defaults;
  ASSERT_EQ(svgear_config_set(config.handle, "probe_mean", "false"), SVGEAR_OK) << svgear_last_error();
  ASSERT_EQ(svgear_config_set(config.handle, "probe_queries", "4"), SVGEAR_OK) << svgear_last_error();
  const std::string described = svgear_config_describe(config.handle);
  EXPECT_NE(described.find("\"probe_mean\":false"), std::string::npos) << described;
  EXPECT_NE(described.find("\"probe_queries\":4"), std::string::npos) << described;
  EXPECT_EQ(svgear_config_set(config.handle, "probe_mean", "often"), SVGEAR_ERROR_VALUE);
  EXPECT_NE(std::string(svgear_last_error()).find("choose true or false"), std::string::npos) << svgear_last_error();
}

TEST(CApi, QueryTailLimitOptionParsesAndIsDescribed) {
  Config config("ear");
  const std::string defaults = svgear_config_describe(config.handle);
  EXPECT_NE(defaults.find("\"query_tail_limit\":0"), std::string::npos) << defaults;
  ASSERT_EQ(svgear_config_set(config.handle, "query_tail_limit", "24"), SVGEAR_OK) << svgear_last_error();
  const std::string described = svgear_config_describe(config.handle);
  EXPECT_NE(described.find("\"query_tail_limit\":24"), std::string::npos) << described;
  EXPECT_EQ(svgear_config_set(config.handle, "query_tail_limit", "a few"), SVGEAR_ERROR_VALUE);
}

// On CPU tensors synchronize = false changes nothing: the same output, a complete report, NaN
// inputs raised by the call itself, with or without a state; svgear_state_synchronize is a no-op.
TEST(CApi, AsynchronousOptionHasNoEffectOnTheCpu) {
  Config sync_config("ear"), async_config("ear");
  for (const Config* config : {&sync_config, &async_config}) {
    ASSERT_EQ(svgear_config_set(config->handle, "clusters_q", "4"), SVGEAR_OK);
    ASSERT_EQ(svgear_config_set(config->handle, "clusters_k", "4"), SVGEAR_OK);
  }
  ASSERT_EQ(svgear_config_set(async_config.handle, "synchronize", "false"), SVGEAR_OK);
  svgear_state *sync_state = nullptr, *async_state = nullptr;
  ASSERT_EQ(svgear_state_create(&sync_state), SVGEAR_OK);
  ASSERT_EQ(svgear_state_create(&async_state), SVGEAR_OK);
  Tensor q({1, 2, 64, 8}), k({1, 2, 64, 8}, 1), v({1, 2, 64, 8}, 2), sync_out({1, 2, 64, 8}), async_out({1, 2, 64, 8});
  for (int call = 0; call < 2; ++call) {  // cold, then warm
    svgear_report sync_report{}, async_report{};
    ASSERT_EQ(svgear_attention(sync_config.handle, sync_state, &q.dl, &k.dl, &v.dl, &sync_out.dl, nullptr,
                               SVGEAR_LAYOUT_BHSD, nullptr, &sync_report),
              SVGEAR_OK)
        << svgear_last_error();
    ASSERT_EQ(svgear_attention(async_config.handle, async_state, &q.dl, &k.dl, &v.dl, &async_out.dl, nullptr,
                               SVGEAR_LAYOUT_BHSD, nullptr, &async_report),
              SVGEAR_OK)
        << svgear_last_error();
    EXPECT_EQ(async_out.data, sync_out.data) << "call " << call;
    EXPECT_EQ(async_report.complete, 1);
    EXPECT_EQ(async_report.density, sync_report.density);
    EXPECT_EQ(async_report.exact_pairs, sync_report.exact_pairs);
    EXPECT_EQ(async_report.warm_started, call);
    EXPECT_EQ(svgear_state_synchronize(async_state), SVGEAR_OK);
  }
  Tensor stateless_out({1, 2, 64, 8});
  EXPECT_EQ(run(async_config, q, k, v, stateless_out), SVGEAR_OK) << svgear_last_error();  // no state needed
  q.data[5] = NAN;
  EXPECT_EQ(svgear_attention(async_config.handle, async_state, &q.dl, &k.dl, &v.dl, &async_out.dl, nullptr,
                             SVGEAR_LAYOUT_BHSD, nullptr, nullptr),
            SVGEAR_ERROR_VALUE);
  EXPECT_NE(std::string(svgear_last_error()).find("non-finite"), std::string::npos) << svgear_last_error();
  EXPECT_EQ(std::string(svgear_last_error()).find("earlier"), std::string::npos) << svgear_last_error();
  EXPECT_EQ(svgear_state_synchronize(async_state), SVGEAR_OK);
  EXPECT_EQ(svgear_state_synchronize(nullptr), SVGEAR_ERROR_VALUE);
  svgear_state_destroy(sync_state);
  svgear_state_destroy(async_state);
}

TEST(CApi, LastErrorIsPerThread) {
  Config config("ear");
  EXPECT_EQ(svgear_config_set(config.handle, "nope", "1"), SVGEAR_ERROR_VALUE);
  std::string other;
  std::thread([&] { other = svgear_last_error(); }).join();
  EXPECT_EQ(other, "");
  EXPECT_NE(std::string(svgear_last_error()), "");
}

}  // namespace
