// The CLI runs attention through the stable C API (include/svgear/svgear.h), the same path the
// Python package takes, so both are tested by every CLI run and there is no second path.
#pragma once

#include "svgear/attention.hpp"
#include "svgear/config.hpp"
#include "svgear/tensor.hpp"

namespace svgear::cli {

// svgear_attention on [B, H, S, D] views with `config`; throws svgear::Error carrying the C
// API's message (and kind) on failure.
AttentionReport attention_through_c_api(const TensorView& q, const TensorView& k, const TensorView& v,
                                        const TensorView& out, const MethodConfig& config);

}  // namespace svgear::cli
