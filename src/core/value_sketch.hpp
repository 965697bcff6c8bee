// The EAR probe's value sketch (MethodConfig::probe_value_dims): the sign of entry (r, c) of the
// fixed k x D matrix R = S / sqrt(k), S in {+1, -1}, from a hash of (r, c), so the CPU reference
// and the CUDA kernels sketch with the same matrix on every platform.
#pragma once

#include <cstdint>

#include "core/host_device.hpp"

namespace svgear {

SVGEAR_HOST_DEVICE inline bool value_sketch_positive(std::int64_t r, std::int64_t c) {
  std::uint64_t z = std::uint64_t(r) * 0x9E3779B97F4A7C15ull + std::uint64_t(c) + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return ((z ^ (z >> 31)) & 1u) != 0;
}

// Whether a probe_value_dims of `dims` sketches values of width `head_dim` (0, or at least the
// width, measures every dimension).
inline bool value_sketch_on(std::int64_t dims, std::int64_t head_dim) { return dims > 0 && dims < head_dim; }

// The sketch width the CUDA probe supports (any multiple of 16 below D on the CPU).
inline constexpr int kCudaValueSketchDims = 32;

}  // namespace svgear
