#include "svgear/safetensors.hpp"

#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "svgear/error.hpp"

namespace svgear {

// Tensor bytes are copied between the file and HostTensor::bytes unchanged, and safetensors
// stores them little-endian; a big-endian host would need a byte swap per element.
static_assert(std::endian::native == std::endian::little,
              "svgear's safetensors I/O assumes a little-endian host");

namespace {

using nlohmann::json;

constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();
constexpr std::string_view kMetadataKey = "__metadata__";

// Error messages must stay on one line even when a tensor name, a dtype string or the path
// carries control characters, so those are escaped.
std::string printable(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xf];
    } else {
      out += c;
    }
  }
  return out;
}

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw Error(printable("safetensors file '" + path + "': " + problem));
}

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name,
                              const std::string& problem) {
  fail(path, "tensor '" + name + "': " + problem);
}

std::string json_type(const json& value) { return std::string("a JSON ") + value.type_name(); }

// A JSON integer in [0, INT64_MAX]; `what` names the value in the message.
std::int64_t non_negative_int(const json& value, const std::string& path, const std::string& name,
                              const std::string& what) {
  if (value.is_number_unsigned()) {
    const auto number = value.get<std::uint64_t>();
    if (number > std::uint64_t(kInt64Max)) {
      fail_tensor(path, name, what + " is " + std::to_string(number) + ", larger than int64");
    }
    return std::int64_t(number);
  }
  if (value.is_number_integer()) {
    const auto number = value.get<std::int64_t>();
    if (number < 0) fail_tensor(path, name, what + " is negative (" + std::to_string(number) + ")");
    return number;
  }
  fail_tensor(path, name, what + " is " + json_type(value) + ", expected a non-negative integer");
}

const json& required_member(const json& entry, const char* key, const std::string& path,
                            const std::string& name) {
  const auto it = entry.find(key);
  if (it == entry.end()) {
    fail_tensor(path, name,
                std::string("missing \"") + key + "\"; each tensor needs dtype, shape and " +
                    "data_offsets");
  }
  return *it;
}

// Element count of `shape`, multiplied in the same order as HostTensor::numel() so that a
// shape accepted here can never overflow there.
std::int64_t checked_numel(const std::vector<std::int64_t>& shape, const std::string& path,
                           const std::string& name) {
  std::int64_t count = 1;
  for (std::int64_t extent : shape) {
    if (extent != 0 && count > kInt64Max / extent) {
      fail_tensor(path, name, "element count of shape " + shape_string(shape) + " overflows int64");
    }
    count *= extent;
  }
  return count;
}

struct TensorEntry {
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::int64_t begin = 0;  // byte range in the data buffer
  std::int64_t end = 0;
};

TensorEntry parse_tensor_entry(const std::string& path, const std::string& name,
                               const json& entry, std::int64_t data_size) {
  if (!entry.is_object()) {
    fail_tensor(path, name,
                "entry is " + json_type(entry) +
                    ", expected an object with dtype, shape and data_offsets");
  }
  TensorEntry tensor;
  tensor.name = name;

  const json& dtype = required_member(entry, "dtype", path, name);
  if (!dtype.is_string()) {
    fail_tensor(path, name, "\"dtype\" is " + json_type(dtype) + ", expected a string");
  }
  try {
    tensor.dtype = parse_dtype(dtype.get_ref<const std::string&>());
  } catch (const Error& error) {
    fail_tensor(path, name, error.what());
  }

  const json& shape = required_member(entry, "shape", path, name);
  if (!shape.is_array()) {
    fail_tensor(path, name, "\"shape\" is " + json_type(shape) + ", expected an array of integers");
  }
  for (std::size_t axis = 0; axis < shape.size(); ++axis) {
    const std::string what = "extent shape[" + std::to_string(axis) + "]";
    tensor.shape.push_back(non_negative_int(shape[axis], path, name, what));
  }
  const std::int64_t numel = checked_numel(tensor.shape, path, name);
  const auto element_size = std::int64_t(dtype_size(tensor.dtype));
  if (numel > data_size / element_size) {
    fail_tensor(path, name,
                "shape " + shape_string(tensor.shape) + " (" + std::to_string(numel) + " " +
                    dtype_name(tensor.dtype) + " elements) needs more bytes than the " +
                    std::to_string(data_size) + "-byte data buffer holds");
  }
  const std::int64_t byte_count = numel * element_size;

  const json& offsets = required_member(entry, "data_offsets", path, name);
  if (!offsets.is_array() || offsets.size() != 2) {
    fail_tensor(path, name,
                "\"data_offsets\" is " + json_type(offsets) +
                    (offsets.is_array() ? " of " + std::to_string(offsets.size()) + " values" : "") +
                    ", expected [begin, end] with two non-negative integers");
  }
  tensor.begin = non_negative_int(offsets[0], path, name, "data_offsets begin");
  tensor.end = non_negative_int(offsets[1], path, name, "data_offsets end");
  if (tensor.begin > tensor.end) {
    fail_tensor(path, name,
                "data_offsets begin " + std::to_string(tensor.begin) + " is after end " +
                    std::to_string(tensor.end));
  }
  if (tensor.end > data_size) {
    fail_tensor(path, name,
                "header offsets past the end of the file (" + std::to_string(data_size) +
                    " bytes of data): data_offsets end is " + std::to_string(tensor.end) +
                    "; the file is truncated or its header is wrong");
  }
  if (tensor.end - tensor.begin != byte_count) {
    fail_tensor(path, name,
                "data_offsets [" + std::to_string(tensor.begin) + ", " +
                    std::to_string(tensor.end) + "] span " +
                    std::to_string(tensor.end - tensor.begin) + " bytes but shape " +
                    shape_string(tensor.shape) + " of " + dtype_name(tensor.dtype) + " needs " +
                    std::to_string(byte_count));
  }
  return tensor;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const json& metadata) {
  if (!metadata.is_object()) {
    fail(path, "\"__metadata__\" is " + json_type(metadata) + ", expected an object of strings");
  }
  std::map<std::string, std::string> result;
  for (const auto& [key, value] : metadata.items()) {
    if (!value.is_string()) {
      fail(path, "\"__metadata__\" value for key '" + key + "' is " + json_type(value) +
                     ", expected a string");
    }
    result.emplace(key, value.get<std::string>());
  }
  return result;
}

// Reads exactly `count` bytes at `offset`; the caller has checked the range against the file
// size, so a short read means the file changed underneath us.
void read_exactly(std::ifstream& in, const std::string& path, std::int64_t offset, void* out,
                  std::int64_t count) {
  if (count == 0) return;
  in.seekg(std::streamoff(offset));
  in.read(static_cast<char*>(out), std::streamsize(count));
  if (!in || in.gcount() != std::streamsize(count)) {
    fail(path, "could only read " + std::to_string(in.gcount()) + " of " + std::to_string(count) +
                   " bytes at offset " + std::to_string(offset) +
                   "; was the file modified while it was being read?");
  }
}

}  // namespace

SafetensorsFile read_safetensors(const std::string& path) {
  // The size comes first so that no header length or offset is trusted before it is checked
  // against it; file_size also refuses directories and other non-regular files.
  std::error_code size_error;
  const std::uintmax_t file_size = std::filesystem::file_size(path, size_error);
  if (size_error) fail(path, "cannot open: " + size_error.message());
  if (file_size > std::uintmax_t(kInt64Max)) fail(path, "cannot open: file too large");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open: " + std::string(std::strerror(errno)));

  const auto size = std::int64_t(file_size);
  if (size < 8) {
    fail(path, "only " + std::to_string(size) +
                   " bytes, shorter than the 8-byte header length: truncated or not a "
                   "safetensors file");
  }
  unsigned char length_bytes[8];
  read_exactly(in, path, 0, length_bytes, 8);
  std::uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | length_bytes[i];
  if (header_length > std::uint64_t(size - 8)) {
    fail(path, "header length " + std::to_string(header_length) + " is larger than the " +
                   std::to_string(size - 8) +
                   " bytes after it: truncated or not a safetensors file");
  }
  const std::int64_t data_start = 8 + std::int64_t(header_length);
  const std::int64_t data_size = size - data_start;

  std::string header_text(header_length, '\0');
  read_exactly(in, path, 8, header_text.data(), std::int64_t(header_length));
  json header;
  try {
    header = json::parse(header_text);
  } catch (const json::exception& error) {
    // nlohmann quotes the offending token, which may be most of the header.
    constexpr std::size_t kMaxDetail = 200;
    std::string detail = error.what();
    if (detail.size() > kMaxDetail) detail = detail.substr(0, kMaxDetail) + "...";
    fail(path, "header is not valid JSON: " + detail);
  }
  if (!header.is_object()) {
    fail(path, "header is " + json_type(header) +
                   ", expected a JSON object mapping tensor names to {dtype, shape, "
                   "data_offsets}");
  }

  SafetensorsFile file;
  std::vector<TensorEntry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      file.metadata = parse_metadata(path, value);
    } else {
      entries.push_back(parse_tensor_entry(path, key, value, data_size));
    }
  }
  // Every entry is validated before any tensor memory is allocated.
  for (const TensorEntry& entry : entries) {
    HostTensor tensor;
    tensor.dtype = entry.dtype;
    tensor.shape = entry.shape;
    tensor.bytes.resize(std::size_t(entry.end - entry.begin));
    read_exactly(in, path, data_start + entry.begin, tensor.bytes.data(), entry.end - entry.begin);
    file.tensors.emplace(entry.name, std::move(tensor));
  }
  return file;
}

void write_safetensors(const std::string& path, const SafetensorsFile& file) {
  json header = json::object();
  std::int64_t offset = 0;
  for (const auto& [name, tensor] : file.tensors) {
    if (name == kMetadataKey) {
      fail_tensor(path, name, "the name is reserved for the metadata; rename the tensor");
    }
    for (std::int64_t extent : tensor.shape) {
      if (extent < 0) {
        fail_tensor(path, name, "negative extent in shape " + shape_string(tensor.shape));
      }
    }
    const std::int64_t numel = checked_numel(tensor.shape, path, name);
    const auto element_size = std::int64_t(dtype_size(tensor.dtype));
    if (numel > kInt64Max / element_size ||
        std::uint64_t(numel * element_size) != std::uint64_t(tensor.bytes.size())) {
      fail_tensor(path, name,
                  "holds " + std::to_string(tensor.bytes.size()) + " bytes but shape " +
                      shape_string(tensor.shape) + " of " + dtype_name(tensor.dtype) +
                      " needs " + std::to_string(numel) + " x " + std::to_string(element_size));
    }
    const auto byte_count = std::int64_t(tensor.bytes.size());
    header[name] = {{"dtype", dtype_name(tensor.dtype)},
                    {"shape", tensor.shape},
                    {"data_offsets", {offset, offset + byte_count}}};
    offset += byte_count;
  }
  if (!file.metadata.empty()) header[std::string(kMetadataKey)] = file.metadata;

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const json::exception& error) {
    fail(path, std::string("tensor names and metadata must be valid UTF-8: ") + error.what());
  }
  // Padding keeps the data buffer 8-byte aligned relative to the file start.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  unsigned char length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = (std::uint64_t(header_text.size()) >> (8 * i)) & 0xff;

  errno = 0;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) {
    fail(path, "cannot open for writing: " +
                   std::string(errno ? std::strerror(errno) : "unknown error") +
                   "; check that the directory exists and is writable");
  }
  out.write(reinterpret_cast<const char*>(length_bytes), 8);
  out.write(header_text.data(), std::streamsize(header_text.size()));
  for (const auto& [name, tensor] : file.tensors) {
    out.write(reinterpret_cast<const char*>(tensor.bytes.data()),
              std::streamsize(tensor.bytes.size()));
  }
  errno = 0;
  out.close();
  if (!out) {
    fail(path, "write failed: " + std::string(errno ? std::strerror(errno) : "unknown error") +
                   "; is the disk full?");
  }
}

}  // namespace svgear
