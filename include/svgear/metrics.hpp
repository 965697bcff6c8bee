// How far an output is from a reference: the numbers every table and test reports.
#pragma once

#include "svgear/tensor.hpp"

namespace svgear {

struct Comparison {
  double rel_l2 = 0;   // ||out - ref|| / ||ref||
  double cosine = 1;   // <out, ref> / (||out|| ||ref||), over the whole tensor
  double max_abs = 0;  // max |out - ref|
};

// Both views must have the same shape; throws svgear::Error otherwise.
Comparison compare(const TensorView& out, const TensorView& ref);

}  // namespace svgear
