// Reading and writing the safetensors format (https://huggingface.co/docs/safetensors):
// 8-byte little-endian header length, a JSON header, then the raw little-endian tensor bytes.
// svgear's files hold `q`, `k`, `v` of shape [B, H, S, D] or [H, S, D] and may carry
// `__metadata__` keys `frames`, `height`, `width` (the token grid).
#pragma once

#include <map>
#include <string>

#include "svgear/tensor.hpp"

namespace svgear {

struct SafetensorsFile {
  std::map<std::string, HostTensor> tensors;
  std::map<std::string, std::string> metadata;  // the `__metadata__` object (string values)
};

// Throws svgear::Error with a one-line message naming the file and the problem for anything
// malformed: truncated file, header length past the end, invalid JSON, unknown dtype, offsets
// out of range, byte counts that do not match the shape. Never reads out of bounds.
SafetensorsFile read_safetensors(const std::string& path);

// Writes all tensors (sorted by name) and the metadata. Throws svgear::Error if the file
// cannot be written.
void write_safetensors(const std::string& path, const SafetensorsFile& file);

}  // namespace svgear
