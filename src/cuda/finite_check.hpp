// Non-finite inputs (NaN, Inf) would spread through the softmax into the output; the CUDA path
// counts them on the device and the pipeline reports them with its one end-of-call read back.
#pragma once

#include <cstdint>

#include "cuda/stages.hpp"

namespace svgear::cuda {

// Adds to *count (device) the number of non-finite elements of q, k and v (one launch; same
// dtype, head_dim and heads; D a multiple of 8, 16-byte aligned rows, as the CUDA path
// requires). With v_abs_max (device, [BH], zeroed) it also leaves there the bits of each head's
// max |v| over its non-NaN elements, what the EAR probe needs (DeviceKeySummary), so the probe
// does not read v again. Asynchronous.
void count_non_finite(const DeviceHeads& q, const DeviceHeads& k, const DeviceHeads& v, std::int64_t* count,
                      unsigned* v_abs_max, void* stream);

// The same for one tensor (abs_max: its per-head max |x|). The sparse pipeline checks v this way:
// k-means counts q's and k's non-finite elements in its first assignment (KmeansSettings::non_finite),
// which reads them anyway.
void count_non_finite(const DeviceHeads& x, std::int64_t* count, unsigned* abs_max, void* stream);

}  // namespace svgear::cuda
