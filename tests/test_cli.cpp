// The CLI as a user runs it: bad inputs give one line on stderr and exit code 2; good ones
// produce the promised output.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "svgear/safetensors.hpp"
#include "test_support.hpp"

using namespace svgear;
namespace fs = std::filesystem;

namespace {

struct Result {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

Result run_cli(const std::string& arguments) {
  const std::string command = std::string(SVGEAR_CLI) + " " + arguments + " 2>&1";
  Result result;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return result;
  std::array<char, 4096> buffer{};
  while (std::size_t n = std::fread(buffer.data(), 1, buffer.size(), pipe)) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("svgear_cli_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A small valid q/k/v file with a consistent token grid (4 x 6 x 8 = 192 tokens).
  std::string valid_file(const std::string& name = "qkv.safetensors", std::vector<std::int64_t> shape = {1, 2, 192, 16}) {
    SafetensorsFile file;
    file.tensors["q"] = svgear::testing::random_tensor(shape, 1, 0.5);
    file.tensors["k"] = svgear::testing::random_tensor(shape, 2, 0.5);
    file.tensors["v"] = svgear::testing::random_tensor(shape, 3);
    file.metadata = {{"frames", "4"}, {"height", "6"}, {"width", "8"}};
    write_safetensors(path(name), file);
    return path(name);
  }

  void expect_usage_error(const std::string& arguments, const std::string& keyword) {
    const Result r = run_cli(arguments);
    EXPECT_EQ(r.exit_code, 2) << arguments << "\n" << r.output;
    EXPECT_NE(r.output.find(keyword), std::string::npos) << arguments << "\n" << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << "one line expected:\n" << r.output;
  }

  fs::path dir_;
};

std::string bytes_of(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& file, const std::string& bytes) {
  std::ofstream(file, std::ios::binary) << bytes;
}

}  // namespace

TEST_F(Cli, EvalPrintsJsonWithTheRequiredFields) {
  const std::string file = valid_file();
  const Result r = run_cli("eval --input " + file + " --method ear --density 0.3 --clusters-q 8 --clusters-k 12 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["method"], "ear");
  EXPECT_GE(j["density"].get<double>(), 0.3);
  EXPECT_LT(j["density"].get<double>(), 0.6);
  EXPECT_GE(j["rel_l2"].get<double>(), 0.0);
  EXPECT_LT(j["rel_l2"].get<double>(), 0.5);
  EXPECT_GT(j["cosine"].get<double>(), 0.8);
  EXPECT_GT(j["time_ms"].get<double>(), 0.0);
}

TEST_F(Cli, EvalWritesTheOutputTensor) {
  const std::string file = valid_file("qkv.safetensors", {2, 192, 16});  // [H, S, D]
  const Result r = run_cli("eval --input " + file + " --method dense --output " + path("out.safetensors"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const SafetensorsFile out = read_safetensors(path("out.safetensors"));
  const HostTensor& o = out.tensors.at("out");
  EXPECT_EQ(o.dtype, DType::f32);
  EXPECT_EQ(o.shape, (std::vector<std::int64_t>{2, 192, 16}));
}

TEST_F(Cli, SparseAtFullDensityMatchesDenseThroughFiles) {
  const std::string file = valid_file();
  ASSERT_EQ(run_cli("eval --input " + file + " --method dense --output " + path("dense.safetensors")).exit_code, 0);
  const Result r = run_cli("eval --input " + file + " --method svg2 --density 1 --clusters-q 8 --clusters-k 8 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_LE(nlohmann::json::parse(r.output)["rel_l2"].get<double>(), 1e-6);
}

TEST_F(Cli, TruncatedFile) {
  const std::string bytes = bytes_of(valid_file());
  write_bytes(path("cut.safetensors"), bytes.substr(0, bytes.size() / 2));
  expect_usage_error("eval --input " + path("cut.safetensors") + " --method ear --density 0.2", "offsets past the end");
  write_bytes(path("tiny.safetensors"), bytes.substr(0, 5));
  expect_usage_error("eval --input " + path("tiny.safetensors") + " --method ear --density 0.2", "truncated");
}

TEST_F(Cli, CorruptHeader) {
  std::string bytes = bytes_of(valid_file());
  bytes[9] = '#';  // inside the JSON header
  write_bytes(path("bad.safetensors"), bytes);
  expect_usage_error("eval --input " + path("bad.safetensors") + " --method ear --density 0.2", "JSON");
  std::string huge = bytes;
  for (int i = 0; i < 8; ++i) huge[std::size_t(i)] = char(0x7f);  // header length far past the end
  write_bytes(path("huge.safetensors"), huge);
  expect_usage_error("eval --input " + path("huge.safetensors") + " --method ear --density 0.2", "header length");
}

TEST_F(Cli, UnknownDtype) {
  std::string bytes = bytes_of(valid_file());
  const std::size_t at = bytes.find("\"F32\"");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at, 5, "\"I32\"");
  write_bytes(path("i32.safetensors"), bytes);
  expect_usage_error("eval --input " + path("i32.safetensors") + " --method ear --density 0.2", "unsupported dtype");
}

TEST_F(Cli, ShapeMismatchAndMissingTensor) {
  SafetensorsFile file;
  file.tensors["q"] = svgear::testing::random_tensor({1, 2, 192, 16}, 1);
  file.tensors["k"] = svgear::testing::random_tensor({1, 2, 192, 16}, 2);
  file.tensors["v"] = svgear::testing::random_tensor({1, 2, 100, 16}, 3);
  write_safetensors(path("mismatch.safetensors"), file);
  expect_usage_error("eval --input " + path("mismatch.safetensors") + " --method ear --density 0.2", "must match");
  file.tensors["k"] = svgear::testing::random_tensor({1, 2, 192, 32}, 2);
  file.tensors["v"] = svgear::testing::random_tensor({1, 2, 192, 32}, 3);
  write_safetensors(path("dim.safetensors"), file);
  expect_usage_error("eval --input " + path("dim.safetensors") + " --method ear --density 0.2", "head dim");
  file.tensors.erase("v");
  write_safetensors(path("nov.safetensors"), file);
  expect_usage_error("eval --input " + path("nov.safetensors") + " --method ear --density 0.2", "no tensor 'v'");
}

TEST_F(Cli, TokenGridDisagreesWithS) {
  SafetensorsFile file = read_safetensors(valid_file());
  file.metadata["width"] = "9";
  write_safetensors(path("grid.safetensors"), file);
  expect_usage_error("eval --input " + path("grid.safetensors") + " --method ear --density 0.2", "metadata grid");
  file.metadata["width"] = "eight";
  write_safetensors(path("grid2.safetensors"), file);
  expect_usage_error("eval --input " + path("grid2.safetensors") + " --method ear --density 0.2", "positive integer");
}

TEST_F(Cli, NonFiniteInput) {
  SafetensorsFile file = read_safetensors(valid_file());
  file.tensors["k"].set(17, INFINITY);
  write_safetensors(path("inf.safetensors"), file);
  expect_usage_error("eval --input " + path("inf.safetensors") + " --method svg2 --density 0.2", "non-finite");
}

TEST_F(Cli, BadDensityAndClusters) {
  const std::string file = valid_file();
  for (const char* density : {"0", "1.5", "-1", "nan"}) {
    expect_usage_error("eval --input " + file + " --method ear --density " + density, "density");
  }
  expect_usage_error("eval --input " + file + " --method ear", "--density is required");
  expect_usage_error("eval --input " + file + " --method ear --density 0.2 --clusters-k 500", "exceeds the 192 key tokens");
  expect_usage_error("eval --input " + file + " --method ear --top-p 0.9", "svg2 only");
  expect_usage_error("eval --input " + file + " --method ear --density 0.2 --probe-queries 0 --no-probe-mean",
                     "probe_mean");
}

TEST_F(Cli, EveryProbeRowChoiceRuns) {
  const std::string file = valid_file();
  for (const char* rows : {"", " --probe-queries 4 --no-probe-mean", " --probe-queries 2 --probe-mean"}) {
    const Result r = run_cli("eval --input " + file + " --method ear --density 0.3 --clusters-q 8 --clusters-k 12" +
                             rows + " --json");
    ASSERT_EQ(r.exit_code, 0) << rows << "\n" << r.output;
    const auto j = nlohmann::json::parse(r.output);
    EXPECT_GE(j["density"].get<double>(), 0.3) << rows;
    EXPECT_LT(j["rel_l2"].get<double>(), 0.5) << rows;
  }
}

TEST_F(Cli, EmptyTensor) {
  SafetensorsFile file;
  for (const char* name : {"q", "k", "v"}) file.tensors[name] = HostTensor(DType::f32, {1, 2, 0, 16});
  write_safetensors(path("empty.safetensors"), file);
  expect_usage_error("eval --input " + path("empty.safetensors") + " --method ear --density 0.2", "empty");
}

TEST_F(Cli, UnknownMethodFlagAndMissingFile) {
  const std::string file = valid_file();
  expect_usage_error("eval --input " + file + " --method svg3 --density 0.2", "unknown method");
  expect_usage_error("eval --input " + file + " --method ear --density 0.2 --turbo", "--turbo");
  expect_usage_error("frobnicate", "frobnicate");
  expect_usage_error("eval --input " + path("absent.safetensors") + " --method ear --density 0.2", "cannot open");
  expect_usage_error("eval --input " + file + " --method ear --density 0.2 --compensation mean", "drop or centroid");
}

TEST_F(Cli, HelpExitsZero) {
  const Result r = run_cli("--help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.output.find("demo"), std::string::npos);
}
