// DLPack tensors at the C API boundary, as the library's [B, H, S, D] views.
#pragma once

#include <dlpack/dlpack.h>

#include <string>

#include "svgear/svgear.h"
#include "svgear/tensor.hpp"

namespace svgear::capi {

// A q/k/v/out tensor of `layout` as a [B, H, S, D] view: the layout only permutes strides, so
// (B, S, H, D) tensors from diffusers pass without a copy. Throws svgear::Error (kind type) for
// a rank other than 4, an unsupported dtype or device; (kind value) for NULL pointers.
TensorView view_attention_tensor(const DLTensor* tensor, svgear_layout layout, const std::string& name);

// The optional log-sum-exp output: fp32 (B, H, Sq), viewed as [B, H, Sq, 1].
TensorView view_lse_tensor(const DLTensor* tensor);

// The CUDA device ordinal of a tensor's DLPack device (-1 for host memory).
int cuda_device_of(const DLTensor* tensor);

// The byte range [first, last] a view can touch: two views overlap only if their ranges do.
struct ByteRange {
  const unsigned char* first = nullptr;
  const unsigned char* last = nullptr;
  bool overlaps(const ByteRange& other) const { return first <= other.last && other.first <= last; }
};
ByteRange byte_range(const TensorView& view);

}  // namespace svgear::capi
