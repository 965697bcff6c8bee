#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "svgear/error.hpp"
#include "svgear/safetensors.hpp"

using namespace svgear;
namespace fs = std::filesystem;

namespace {

// Bytes of a safetensors file built by hand, independent of the writer under test.
std::string le64(std::uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = char((value >> (8 * i)) & 0xff);
  return out;
}

std::string raw_file(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(out) << path;
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out) << path;
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A tensor whose bytes are an arbitrary pattern (NaNs and subnormals included), so a round
// trip must preserve bit patterns, not just values.
HostTensor patterned(DType dtype, std::vector<std::int64_t> shape, unsigned seed) {
  HostTensor tensor(dtype, std::move(shape));
  for (std::size_t i = 0; i < tensor.bytes.size(); ++i) {
    tensor.bytes[i] = static_cast<unsigned char>((i * 37 + seed * 101 + 11) & 0xff);
  }
  return tensor;
}

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("svgear_safetensors_" + std::string(info->name()) + "_" +
            std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes `bytes` to a file and checks that reading it throws svgear::Error with a one-line
  // message naming the file and containing every keyword.
  ::testing::AssertionResult rejects(const std::string& bytes,
                                     std::initializer_list<std::string> keywords) {
    const std::string file = path("bad.safetensors");
    write_bytes(file, bytes);
    return rejects_path(file, keywords);
  }

  static ::testing::AssertionResult rejects_path(const std::string& file,
                                                 std::initializer_list<std::string> keywords) {
    try {
      read_safetensors(file);
    } catch (const Error& error) {
      return message_has(error.what(), file, keywords);
    } catch (const std::exception& error) {
      return ::testing::AssertionFailure() << "threw a non-svgear exception: " << error.what();
    }
    return ::testing::AssertionFailure() << "read_safetensors did not throw";
  }

  static ::testing::AssertionResult message_has(const std::string& message,
                                                const std::string& file,
                                                std::initializer_list<std::string> keywords) {
    if (message.find(file) == std::string::npos) {
      return ::testing::AssertionFailure() << "message does not name the file: " << message;
    }
    if (message.find('\n') != std::string::npos || message.find('\r') != std::string::npos) {
      return ::testing::AssertionFailure() << "message spans several lines: " << message;
    }
    for (const std::string& keyword : keywords) {
      if (message.find(keyword) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks '" << keyword << "': " << message;
      }
    }
    return ::testing::AssertionSuccess() << message;
  }

  fs::path dir_;
};

// A valid one-tensor header around `entry` (the JSON object for tensor "q"), with 16 data
// bytes: room for a [4] F32 tensor.
std::string file_with_entry(const std::string& entry) {
  return raw_file("{\"q\":" + entry + "}", std::string(16, '\x01'));
}

void expect_same_tensor(const HostTensor& expected, const HostTensor& actual,
                        const std::string& name) {
  EXPECT_EQ(actual.dtype, expected.dtype) << name;
  EXPECT_EQ(actual.shape, expected.shape) << name;
  EXPECT_EQ(actual.bytes, expected.bytes) << name;
}

}  // namespace

TEST_F(Safetensors, RoundTripsEveryDtypeAtRanks3And4WithMetadata) {
  SafetensorsFile file;
  file.tensors["q"] = patterned(DType::f32, {2, 3, 5, 4}, 1);
  file.tensors["k"] = patterned(DType::f16, {3, 5, 4}, 2);
  file.tensors["v"] = patterned(DType::bf16, {1, 2, 7, 8}, 3);
  file.tensors["k_bf16"] = patterned(DType::bf16, {2, 3, 6}, 4);
  file.tensors["q_f16"] = patterned(DType::f16, {2, 1, 3, 5}, 5);
  file.tensors["v_f32"] = patterned(DType::f32, {4, 3, 2}, 6);
  file.metadata = {{"frames", "4"}, {"height", "3"}, {"width", "5"}};
  const std::string file_path = path("qkv.safetensors");
  write_safetensors(file_path, file);

  const SafetensorsFile read = read_safetensors(file_path);
  ASSERT_EQ(read.tensors.size(), file.tensors.size());
  for (const auto& [name, tensor] : file.tensors) {
    ASSERT_EQ(read.tensors.count(name), 1u) << name;
    expect_same_tensor(tensor, read.tensors.at(name), name);
  }
  EXPECT_EQ(read.metadata, file.metadata);
}

TEST_F(Safetensors, RoundTripsEmptyAndScalarTensors) {
  SafetensorsFile file;
  file.tensors["empty"] = HostTensor(DType::f32, {0, 4});
  file.tensors["empty_middle"] = HostTensor(DType::bf16, {2, 0, 3});
  file.tensors["scalar"] = patterned(DType::f16, {}, 7);  // rank 0: one element
  file.tensors["x"] = patterned(DType::f32, {3}, 8);
  const std::string file_path = path("edge.safetensors");
  write_safetensors(file_path, file);

  const SafetensorsFile read = read_safetensors(file_path);
  ASSERT_EQ(read.tensors.size(), 4u);
  for (const auto& [name, tensor] : file.tensors) {
    ASSERT_EQ(read.tensors.count(name), 1u) << name;
    expect_same_tensor(tensor, read.tensors.at(name), name);
  }
  EXPECT_EQ(read.tensors.at("scalar").bytes.size(), 2u);
  EXPECT_TRUE(read.metadata.empty());
}

TEST_F(Safetensors, RoundTripsAFileWithNoTensors) {
  const std::string file_path = path("nothing.safetensors");
  write_safetensors(file_path, SafetensorsFile{});
  const SafetensorsFile read = read_safetensors(file_path);
  EXPECT_TRUE(read.tensors.empty());
  EXPECT_TRUE(read.metadata.empty());
}

TEST_F(Safetensors, WriterPadsHeaderSortsNamesAndPacksData) {
  SafetensorsFile file;
  file.tensors["b"] = patterned(DType::f16, {3}, 1);  // 6 bytes
  file.tensors["a"] = patterned(DType::f32, {2}, 2);  // 8 bytes
  const std::string file_path = path("layout.safetensors");
  write_safetensors(file_path, file);

  const std::string bytes = read_bytes(file_path);
  ASSERT_GE(bytes.size(), 8u);
  std::uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | std::uint8_t(bytes[std::size_t(i)]);
  EXPECT_EQ(header_length % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + header_length + 14);
  const std::string header = bytes.substr(8, header_length);
  EXPECT_EQ(header.find("__metadata__"), std::string::npos) << header;
  EXPECT_LT(header.find("\"a\""), header.find("\"b\"")) << header;
  EXPECT_NE(header.find("[0,8]"), std::string::npos) << header;
  EXPECT_NE(header.find("[8,14]"), std::string::npos) << header;
  const std::string expected_data(file.tensors["a"].bytes.begin(), file.tensors["a"].bytes.end());
  const std::string expected_b(file.tensors["b"].bytes.begin(), file.tensors["b"].bytes.end());
  EXPECT_EQ(bytes.substr(8 + header_length), expected_data + expected_b);
}

TEST_F(Safetensors, ReadsAHandWrittenFile) {
  // Metadata first, tensors out of name order and out of buffer order, header padded with
  // spaces: all allowed by the format.
  const std::string header =
      "{\"__metadata__\":{\"frames\":\"2\",\"width\":\"1\"},"
      "\"z\":{\"dtype\":\"F32\",\"shape\":[1,2,1],\"data_offsets\":[4,12]},"
      "\"a\":{\"dtype\":\"BF16\",\"shape\":[1,1,1,2],\"data_offsets\":[12,16]},"
      "\"m\":{\"dtype\":\"F16\",\"shape\":[1,1,1,1],\"data_offsets\":[0,2]}}    ";
  const std::string data = std::string("\x00\x3c", 2) +               // F16 1.0
                           std::string("\xff\xff", 2) +               // unused gap
                           std::string("\x00\x00\x80\x3f", 4) +       // F32 1.0
                           std::string("\x00\x00\x20\xc0", 4) +       // F32 -2.5
                           std::string("\x40\x40\x80\xbf", 4);        // BF16 3.0, -1.0
  const std::string file_path = path("hand.safetensors");
  write_bytes(file_path, raw_file(header, data));

  const SafetensorsFile file = read_safetensors(file_path);
  ASSERT_EQ(file.tensors.size(), 3u);
  const HostTensor& z = file.tensors.at("z");
  EXPECT_EQ(z.dtype, DType::f32);
  EXPECT_EQ(z.shape, (std::vector<std::int64_t>{1, 2, 1}));
  EXPECT_EQ(z.at(0), 1.0f);
  EXPECT_EQ(z.at(1), -2.5f);
  const HostTensor& a = file.tensors.at("a");
  EXPECT_EQ(a.dtype, DType::bf16);
  EXPECT_EQ(a.shape, (std::vector<std::int64_t>{1, 1, 1, 2}));
  EXPECT_EQ(a.at(0), 3.0f);
  EXPECT_EQ(a.at(1), -1.0f);
  const HostTensor& m = file.tensors.at("m");
  EXPECT_EQ(m.dtype, DType::f16);
  EXPECT_EQ(m.at(0), 1.0f);
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"frames", "2"}, {"width", "1"}}));
}

// ---- files that are not safetensors at all ----

TEST_F(Safetensors, RejectsMissingFile) {
  EXPECT_TRUE(rejects_path(path("does_not_exist.safetensors"), {"cannot open"}));
}

TEST_F(Safetensors, RejectsDirectory) {
  fs::create_directories(path("a_directory"));
  EXPECT_TRUE(rejects_path(path("a_directory"), {"cannot open"}));
}

TEST_F(Safetensors, RejectsEmptyFile) { EXPECT_TRUE(rejects("", {"truncated", "0 bytes"})); }

TEST_F(Safetensors, RejectsFileShorterThanTheLengthField) {
  EXPECT_TRUE(rejects(std::string("\x02\x00\x00\x00\x00", 5), {"truncated", "5 bytes"}));
}

TEST_F(Safetensors, RejectsHeaderLengthPastTheEnd) {
  EXPECT_TRUE(rejects(le64(100) + "{\"q\":1}", {"truncated", "header length 100", "7 bytes"}));
}

TEST_F(Safetensors, RejectsAbsurdHeaderLengthWithoutAllocating) {
  // Allocating this much would abort (or trip ASan) long before any parse error.
  EXPECT_TRUE(rejects(le64(~std::uint64_t(0)) + "{}", {"truncated", "header length"}));
  EXPECT_TRUE(rejects(le64(std::uint64_t(1) << 62) + "{}", {"truncated"}));
}

// ---- the JSON header ----

TEST_F(Safetensors, RejectsInvalidJson) {
  EXPECT_TRUE(rejects(raw_file("{\"q\": "), {"JSON"}));
  EXPECT_TRUE(rejects(raw_file("{\"q\":{}} trailing"), {"JSON"}));
}

TEST_F(Safetensors, RejectsEmptyHeader) { EXPECT_TRUE(rejects(raw_file(""), {"JSON"})); }

TEST_F(Safetensors, RejectsHeaderThatIsNotUtf8) {
  EXPECT_TRUE(rejects(raw_file("{\"q\xff\":{}}"), {"JSON"}));
}

TEST_F(Safetensors, RejectsHeaderThatIsNotAnObject) {
  EXPECT_TRUE(rejects(raw_file("[1, 2]"), {"JSON array", "object"}));
  EXPECT_TRUE(rejects(raw_file("\"q\""), {"JSON string", "object"}));
}

TEST_F(Safetensors, SurvivesDeeplyNestedHeader) {
  const std::size_t depth = 100000;
  const std::string nested = std::string(depth, '[') + std::string(depth, ']');
  EXPECT_TRUE(rejects(raw_file("{\"q\":" + nested + "}"), {"tensor 'q'", "expected an object"}));
}

TEST_F(Safetensors, TruncatesHugeJsonErrorDetails) {
  const std::string long_token = "\"" + std::string(100000, 'x');  // unterminated string
  const std::string bytes = raw_file("{" + long_token);
  EXPECT_TRUE(rejects(bytes, {"JSON"}));
  try {
    read_safetensors(path("bad.safetensors"));
  } catch (const Error& error) {
    EXPECT_LT(std::string(error.what()).size(), 1000u);
  }
}

// ---- tensor entries ----

TEST_F(Safetensors, RejectsEntryThatIsNotAnObject) {
  EXPECT_TRUE(rejects(file_with_entry("3"), {"tensor 'q'", "JSON number", "expected an object"}));
  EXPECT_TRUE(rejects(file_with_entry("[\"F32\"]"), {"tensor 'q'", "expected an object"}));
}

TEST_F(Safetensors, RejectsEntryMissingDtype) {
  EXPECT_TRUE(rejects(file_with_entry("{\"shape\":[4],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "missing \"dtype\""}));
}

TEST_F(Safetensors, RejectsEntryMissingShape) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "missing \"shape\""}));
}

TEST_F(Safetensors, RejectsEntryMissingDataOffsets) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4]}"),
                      {"tensor 'q'", "missing \"data_offsets\""}));
}

TEST_F(Safetensors, RejectsDtypeThatIsNotAString) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":32,\"shape\":[4],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "\"dtype\" is a JSON number", "string"}));
}

TEST_F(Safetensors, RejectsUnknownDtype) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "dtype", "I64", "F32, F16 and BF16"}));
}

TEST_F(Safetensors, RejectsShapeThatIsNotAnArray) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "\"shape\" is a JSON number", "array"}));
}

TEST_F(Safetensors, RejectsShapeEntriesThatAreNotIntegers) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4.0],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "shape[0]", "non-negative integer"}));
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[2,\"2\"],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "shape[1]", "JSON string"}));
}

TEST_F(Safetensors, RejectsNegativeExtent) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[-2,-2],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "shape[0]", "negative"}));
}

TEST_F(Safetensors, RejectsExtentLargerThanInt64) {
  EXPECT_TRUE(rejects(
      file_with_entry("{\"dtype\":\"F32\",\"shape\":[18446744073709551615],\"data_offsets\":[0,16]}"),
      {"tensor 'q'", "larger than int64"}));
}

TEST_F(Safetensors, RejectsElementCountOverflow) {
  // 2^32 * 2^32 wraps to 0 in 64 bits, which would otherwise match empty offsets.
  EXPECT_TRUE(rejects(
      file_with_entry(
          "{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}"),
      {"tensor 'q'", "overflows int64"}));
}

TEST_F(Safetensors, RejectsShapeLargerThanTheDataBuffer) {
  // 2^62 F32 elements: the byte count itself would overflow int64.
  EXPECT_TRUE(rejects(
      file_with_entry("{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,16]}"),
      {"tensor 'q'", "16-byte data buffer"}));
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[5],\"data_offsets\":[0,20]}"),
                      {"tensor 'q'", "[5]", "16-byte data buffer"}));
}

TEST_F(Safetensors, RejectsDataOffsetsThatAreNotTwoIntegers) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":16}"),
                      {"tensor 'q'", "data_offsets", "[begin, end]"}));
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,8,16]}"),
                      {"tensor 'q'", "data_offsets", "3 values"}));
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0.0,16]}"),
                      {"tensor 'q'", "data_offsets begin", "integer"}));
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,\"16\"]}"),
                      {"tensor 'q'", "data_offsets end", "integer"}));
}

TEST_F(Safetensors, RejectsNegativeDataOffsets) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[-16,0]}"),
                      {"tensor 'q'", "data_offsets begin", "negative"}));
}

TEST_F(Safetensors, RejectsDataOffsetsBeginAfterEnd) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,0]}"),
                      {"tensor 'q'", "data_offsets", "after end"}));
}

TEST_F(Safetensors, RejectsDataOffsetsPastTheEnd) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}"),
                      {"tensor 'q'", "header offsets past the end of the file (16 bytes of data)"}));
  EXPECT_TRUE(rejects(
      file_with_entry("{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[9223372036854775807,"
                      "9223372036854775807]}"),
      {"tensor 'q'", "past the end"}));
}

TEST_F(Safetensors, RejectsDataOffsetsThatDoNotMatchTheShape) {
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "span 16 bytes", "needs 12"}));
  EXPECT_TRUE(rejects(file_with_entry("{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,16]}"),
                      {"tensor 'q'", "span 16 bytes", "needs 8"}));
}

TEST_F(Safetensors, RejectsMetadataThatIsNotAnObject) {
  EXPECT_TRUE(rejects(raw_file("{\"__metadata__\":[\"frames\",\"2\"]}"),
                      {"__metadata__", "JSON array", "object of strings"}));
}

TEST_F(Safetensors, RejectsMetadataWithNonStringValues) {
  EXPECT_TRUE(rejects(raw_file("{\"__metadata__\":{\"frames\":\"2\",\"height\":3}}"),
                      {"__metadata__", "'height'", "JSON number", "string"}));
}

TEST_F(Safetensors, KeepsMessagesOnOneLineForHostileNames) {
  // A tensor name with a newline and an unknown dtype with a carriage return.
  EXPECT_TRUE(rejects(
      raw_file("{\"a\\nb\":{\"dtype\":\"X\\r\",\"shape\":[],\"data_offsets\":[0,0]}}"),
      {"tensor 'a\\x0ab'", "dtype"}));
}

TEST_F(Safetensors, RejectsEveryTruncationOfAValidFile) {
  SafetensorsFile file;
  file.tensors["q"] = patterned(DType::bf16, {2, 3, 4}, 9);
  file.metadata = {{"frames", "2"}};
  const std::string good = path("good.safetensors");
  write_safetensors(good, file);
  const std::string bytes = read_bytes(good);
  for (std::size_t length = 0; length < bytes.size(); ++length) {
    EXPECT_TRUE(rejects(bytes.substr(0, length), {})) << "length " << length;
  }
}

// ---- the writer ----

TEST_F(Safetensors, WriterRejectsMissingDirectory) {
  const std::string file_path = path("no/such/dir/out.safetensors");
  try {
    write_safetensors(file_path, SafetensorsFile{});
    FAIL() << "write_safetensors did not throw";
  } catch (const Error& error) {
    EXPECT_TRUE(message_has(error.what(), file_path, {"cannot open for writing", "directory"}));
  }
}

TEST_F(Safetensors, WriterReportsFailedWrites) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  SafetensorsFile file;
  file.tensors["q"] = patterned(DType::f32, {64, 1024}, 1);
  try {
    write_safetensors("/dev/full", file);
    FAIL() << "write_safetensors did not throw";
  } catch (const Error& error) {
    EXPECT_TRUE(message_has(error.what(), "/dev/full", {"write failed"}));
  }
}

TEST_F(Safetensors, WriterRejectsBytesThatDoNotMatchTheShape) {
  SafetensorsFile file;
  file.tensors["q"] = HostTensor(DType::f32, {2, 3});
  file.tensors["q"].bytes.pop_back();
  const std::string file_path = path("out.safetensors");
  try {
    write_safetensors(file_path, file);
    FAIL() << "write_safetensors did not throw";
  } catch (const Error& error) {
    EXPECT_TRUE(message_has(error.what(), file_path, {"tensor 'q'", "holds 23 bytes", "needs"}));
  }
  EXPECT_FALSE(fs::exists(file_path));
}

TEST_F(Safetensors, WriterRejectsTheReservedMetadataName) {
  SafetensorsFile file;
  file.tensors["__metadata__"] = HostTensor(DType::f32, {1});
  const std::string file_path = path("out.safetensors");
  try {
    write_safetensors(file_path, file);
    FAIL() << "write_safetensors did not throw";
  } catch (const Error& error) {
    EXPECT_TRUE(message_has(error.what(), file_path, {"reserved"}));
  }
}

TEST_F(Safetensors, WriterRejectsNamesThatAreNotUtf8) {
  SafetensorsFile file;
  file.tensors["q\xff"] = HostTensor(DType::f32, {1});
  const std::string file_path = path("out.safetensors");
  try {
    write_safetensors(file_path, file);
    FAIL() << "write_safetensors did not throw";
  } catch (const Error& error) {
    EXPECT_TRUE(message_has(error.what(), file_path, {"UTF-8"}));
  }
}
