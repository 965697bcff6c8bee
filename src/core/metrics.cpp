#include "svgear/metrics.hpp"

#include <cmath>
#include <vector>

#include "svgear/error.hpp"

namespace svgear {

Comparison compare(const TensorView& out, const TensorView& ref) {
  if (out.shape != ref.shape) {
    throw Error("cannot compare tensors of shapes " +
                shape_string(std::vector<std::int64_t>(out.shape.begin(), out.shape.end())) + " and " +
                shape_string(std::vector<std::int64_t>(ref.shape.begin(), ref.shape.end())));
  }
  double diff2 = 0, ref2 = 0, out2 = 0, inner = 0, max_abs = 0;
  for (std::int64_t b = 0; b < out.shape[0]; ++b)
    for (std::int64_t h = 0; h < out.shape[1]; ++h)
      for (std::int64_t s = 0; s < out.shape[2]; ++s)
        for (std::int64_t d = 0; d < out.shape[3]; ++d) {
          const double o = load_as_float(out.data, out.dtype, out.offset(b, h, s, d));
          const double r = load_as_float(ref.data, ref.dtype, ref.offset(b, h, s, d));
          diff2 += (o - r) * (o - r);
          ref2 += r * r;
          out2 += o * o;
          inner += o * r;
          if (!(std::fabs(o - r) <= max_abs)) max_abs = std::fabs(o - r);  // NaN propagates
        }
  Comparison result;
  result.rel_l2 = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
  result.cosine = (ref2 > 0 && out2 > 0) ? inner / std::sqrt(ref2 * out2) : (diff2 == 0 ? 1.0 : 0.0);
  result.max_abs = max_abs;
  return result;
}

}  // namespace svgear
