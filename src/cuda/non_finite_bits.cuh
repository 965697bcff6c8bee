// Counting NaN/Inf among 16-bit floats by their bits, eight at a time from a 16-byte chunk: the
// input check's pass over v and k-means' first assignment (q and k, from its shared tile) share it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace svgear::cuda::detail {

// A 16-bit float is non-finite exactly when its exponent bits are all ones: 8 bits at 7 for
// bf16 (0x7f80), 5 bits at 10 for f16 (0x7c00).
template <class E>
inline constexpr unsigned kExponentBits = std::is_same_v<E, __nv_bfloat16> ? 0x7f80u : 0x7c00u;

// How many of the chunk's 8 elements are NaN or ±Inf. __vcmpeq2 sets a half-word to 0xffff where
// the element's exponent bits are all ones, so each such element adds 16 set bits.
__device__ __forceinline__ unsigned count_non_finite_in(uint4 chunk, unsigned exponent_bits) {
  const unsigned pair = exponent_bits | (exponent_bits << 16);
  const unsigned set = __popc(__vcmpeq2(chunk.x & pair, pair)) + __popc(__vcmpeq2(chunk.y & pair, pair)) +
                       __popc(__vcmpeq2(chunk.z & pair, pair)) + __popc(__vcmpeq2(chunk.w & pair, pair));
  return set / 16;
}

}  // namespace svgear::cuda::detail
