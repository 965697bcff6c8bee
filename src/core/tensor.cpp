#include "svgear/tensor.hpp"

#include <sstream>

#include "svgear/error.hpp"

namespace svgear {

std::array<std::int64_t, 4> contiguous_strides(const std::array<std::int64_t, 4>& shape) {
  return {shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1};
}

HostTensor::HostTensor(DType dtype_, std::vector<std::int64_t> shape_)
    : dtype(dtype_), shape(std::move(shape_)) {
  for (std::int64_t extent : shape) {
    if (extent < 0) throw Error("negative extent in tensor shape " + shape_string(shape));
  }
  bytes.assign(std::size_t(numel()) * dtype_size(dtype), 0);
}

std::int64_t HostTensor::numel() const {
  std::int64_t count = 1;
  for (std::int64_t extent : shape) count *= extent;
  return count;
}

TensorView HostTensor::view_bhsd(const std::string& what) const {
  std::array<std::int64_t, 4> bhsd{};
  if (shape.size() == 4) {
    bhsd = {shape[0], shape[1], shape[2], shape[3]};
  } else if (shape.size() == 3) {
    bhsd = {1, shape[0], shape[1], shape[2]};
  } else {
    throw Error(what + " has shape " + shape_string(shape) +
                ": expected [B, H, S, D] or [H, S, D]");
  }
  TensorView view;
  view.data = const_cast<unsigned char*>(bytes.data());
  view.dtype = dtype;
  view.device = Device::cpu;
  view.shape = bhsd;
  view.strides = contiguous_strides(bhsd);
  return view;
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

}  // namespace svgear
