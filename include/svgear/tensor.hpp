// Tensors at the API boundary: a non-owning view of a strided [B, H, S, D] array (what the
// attention entry point takes, so (B, S, H, D) layouts from diffusers pass by strides without a
// copy), and a small owning host tensor for files and the built-in workload.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "svgear/dtype.hpp"

namespace svgear {

enum class Device { cpu, cuda };

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  std::array<std::int64_t, 4> shape{};    // B, H, S, D
  std::array<std::int64_t, 4> strides{};  // in elements, per axis of `shape`

  std::int64_t batch() const { return shape[0]; }
  std::int64_t heads() const { return shape[1]; }
  std::int64_t tokens() const { return shape[2]; }
  std::int64_t head_dim() const { return shape[3]; }
  std::int64_t numel() const { return shape[0] * shape[1] * shape[2] * shape[3]; }
  std::int64_t offset(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) const {
    return b * strides[0] + h * strides[1] + s * strides[2] + d * strides[3];
  }
};

// Row-major strides for `shape`.
std::array<std::int64_t, 4> contiguous_strides(const std::array<std::int64_t, 4>& shape);

// A contiguous host tensor of any rank, owning its bytes.
struct HostTensor {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;

  HostTensor() = default;
  HostTensor(DType dtype, std::vector<std::int64_t> shape);  // zero-filled

  std::int64_t numel() const;
  float at(std::int64_t index) const { return load_as_float(bytes.data(), dtype, index); }
  void set(std::int64_t index, float value) { store_from_float(bytes.data(), dtype, index, value); }

  // A [B, H, S, D] view; rank-3 [H, S, D] tensors get B = 1. Throws svgear::Error for other
  // ranks, naming `what` (e.g. "tensor 'q'").
  TensorView view_bhsd(const std::string& what) const;
};

// "[2, 12, 32760, 128]" for messages.
std::string shape_string(const std::vector<std::int64_t>& shape);

}  // namespace svgear
