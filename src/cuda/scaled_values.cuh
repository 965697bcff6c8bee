// The EAR probe's fp16 copy of v (probe_common.cuh, cluster_means.cu's value_summary): each head's
// values times a power of two 2^e that puts the head's largest |v| in [2^14, 2^15), so the probe's
// P V products run on fp16 operands, exact for 16-bit values in range.
#pragma once

#include <cuda_fp16.h>

#include <cmath>

namespace svgear::cuda::detail {

// e with max |v| 2^e in [2^14, 2^15): v 2^e fits fp16 (largest finite 65504), and only values
// under 2^-24 (2^-38 of the scaled maximum) lose bits to fp16's subnormals. 0 for an all-zero
// or non-finite head; clamped so 2^e and 2^-2e stay finite floats.
__device__ __forceinline__ int value_exponent(unsigned max_bits) {
  const float m = __uint_as_float(max_bits);
  if (!(m > 0.0f) || !isfinite(m)) return 0;
  int x = 0;
  frexpf(m, &x);  // m = f 2^x, f in [0.5, 1)
  return min(max(15 - x, -60), 60);
}

// One element of the copy: fp16(x 2^e), rounded to nearest.
__device__ __forceinline__ __half scaled_value(float x, float scale) { return __float2half_rn(x * scale); }

}  // namespace svgear::cuda::detail
