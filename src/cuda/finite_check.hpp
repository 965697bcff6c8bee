// Non-finite inputs (NaN, Inf) would spread through the softmax into the output; the CUDA path
// counts them on the device and the pipeline reports them with its one end-of-call read back.
#pragma once

#include <cstdint>

#include "cuda/stages.hpp"

namespace svgear::cuda {

// Adds to *count (device) the number of non-finite elements of `tensor` (D a multiple of 8,
// 16-byte aligned rows, as the CUDA path requires). Asynchronous.
void count_non_finite(const DeviceHeads& tensor, std::int64_t* count, void* stream);

}  // namespace svgear::cuda
