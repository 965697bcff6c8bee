// Checks at the API boundary: every problem a caller can cause is reported here, before any
// work or any write to the output, as a svgear::Error saying what to change.
#pragma once

#include <string>

#include "svgear/config.hpp"
#include "svgear/tensor.hpp"

namespace svgear {

// Shapes, devices, strides and the config against the shapes (clusters vs tokens); with `lse`,
// also the optional log-sum-exp output: F32, [B, H, Sq, 1], on q's device.
void validate_attention_inputs(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const MethodConfig& config,
                               const TensorView* lse = nullptr);

// Throws if any element is NaN or infinite, naming the tensor and the [b, h, s, d] index.
void require_finite(const TensorView& tensor, const std::string& name);

}  // namespace svgear
