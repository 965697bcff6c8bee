#include "capi/dlpack_view.hpp"

#include "svgear/error.hpp"

namespace svgear::capi {

namespace {

DType dtype_of(const DLDataType& type, const std::string& name) {
  if (type.lanes == 1 && type.bits == 32 && type.code == kDLFloat) return DType::f32;
  if (type.lanes == 1 && type.bits == 16 && type.code == kDLFloat) return DType::f16;
  if (type.lanes == 1 && type.bits == 16 && type.code == kDLBfloat) return DType::bf16;
  throw Error("tensor '" + name + "' has DLPack dtype (code " + std::to_string(type.code) + ", " +
                  std::to_string(type.bits) + " bits, " + std::to_string(type.lanes) +
                  " lanes): svgear takes float32, float16 or bfloat16",
              ErrorKind::type);
}

Device device_of(const DLDevice& device, const std::string& name) {
  switch (device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:  // pinned host memory: the CPU path reads it directly
      return Device::cpu;
    case kDLCUDA:
    case kDLCUDAManaged:
      return Device::cuda;
    default:
      throw Error("tensor '" + name + "' lives on DLPack device type " +
                      std::to_string(device.device_type) + ": svgear runs on CPU and CUDA tensors",
                  ErrorKind::type);
  }
}

// DLPack strides are in elements; NULL means compact row-major.
std::array<std::int64_t, 4> strides_of(const DLTensor& t) {
  std::array<std::int64_t, 4> strides{};
  if (t.strides != nullptr) {
    for (int axis = 0; axis < 4; ++axis) strides[std::size_t(axis)] = t.strides[axis];
  } else {
    std::int64_t stride = 1;
    for (int axis = 3; axis >= 0; --axis) {
      strides[std::size_t(axis)] = stride;
      stride *= t.shape[axis];
    }
  }
  return strides;
}

void require_tensor(const DLTensor* tensor, const std::string& name) {
  if (tensor == nullptr) throw Error("tensor '" + name + "' is NULL: pass a DLTensor");
  if (tensor->shape == nullptr) throw Error("tensor '" + name + "' has a NULL shape");
  for (int axis = 0; axis < tensor->ndim; ++axis) {
    // Empty tensors often carry no data pointer: name the real problem.
    if (tensor->shape[axis] <= 0) {
      throw Error("tensor '" + name + "' is empty (axis " + std::to_string(axis) + " has size " +
                  std::to_string(tensor->shape[axis]) + "): every axis needs at least one element");
    }
  }
  if (tensor->data == nullptr) throw Error("tensor '" + name + "' has a NULL data pointer");
}

}  // namespace

TensorView view_attention_tensor(const DLTensor* tensor, svgear_layout layout, const std::string& name) {
  require_tensor(tensor, name);
  const char* layout_text = layout == SVGEAR_LAYOUT_BSHD ? "(B, S, H, D)" : "(B, H, S, D)";
  if (tensor->ndim != 4) {
    throw Error("tensor '" + name + "' has " + std::to_string(tensor->ndim) + " dimensions: svgear takes 4-D " +
                    layout_text + " tensors (add a batch axis, e.g. x.unsqueeze(0))",
                ErrorKind::type);
  }
  if (layout != SVGEAR_LAYOUT_BHSD && layout != SVGEAR_LAYOUT_BSHD) {
    throw Error("unknown layout " + std::to_string(int(layout)) + ": use BHSD (0) or BSHD (1)");
  }
  TensorView view;
  view.dtype = dtype_of(tensor->dtype, name);
  view.device = device_of(tensor->device, name);
  view.data = static_cast<unsigned char*>(tensor->data) + tensor->byte_offset;
  const std::array<std::int64_t, 4> strides = strides_of(*tensor);
  // [B, H, S, D] axis -> the tensor's axis.
  const std::array<int, 4> axis_of = layout == SVGEAR_LAYOUT_BSHD ? std::array<int, 4>{0, 2, 1, 3}
                                                                   : std::array<int, 4>{0, 1, 2, 3};
  for (std::size_t axis = 0; axis < 4; ++axis) {
    view.shape[axis] = tensor->shape[axis_of[axis]];
    view.strides[axis] = strides[std::size_t(axis_of[axis])];
  }
  return view;
}

TensorView view_lse_tensor(const DLTensor* tensor) {
  require_tensor(tensor, "lse");
  if (tensor->ndim != 3) {
    throw Error("tensor 'lse' has " + std::to_string(tensor->ndim) +
                    " dimensions: it must be float32 (B, H, Sq), whatever the layout of q",
                ErrorKind::type);
  }
  if (dtype_of(tensor->dtype, "lse") != DType::f32) {
    throw Error("tensor 'lse' must be float32", ErrorKind::type);
  }
  TensorView view;
  view.dtype = DType::f32;
  view.device = device_of(tensor->device, "lse");
  view.data = static_cast<unsigned char*>(tensor->data) + tensor->byte_offset;
  std::int64_t stride = 1;
  for (int axis = 2; axis >= 0; --axis) {
    view.shape[std::size_t(axis)] = tensor->shape[axis];
    view.strides[std::size_t(axis)] = tensor->strides != nullptr ? tensor->strides[axis] : stride;
    stride *= tensor->shape[axis];
  }
  view.shape[3] = 1;
  view.strides[3] = 1;
  return view;
}

int cuda_device_of(const DLTensor* tensor) {
  const auto type = tensor->device.device_type;
  return type == kDLCUDA || type == kDLCUDAManaged ? tensor->device.device_id : -1;
}

ByteRange byte_range(const TensorView& view) {
  std::int64_t last = 0;
  for (std::size_t axis = 0; axis < 4; ++axis) {
    if (view.shape[axis] > 0) last += (view.shape[axis] - 1) * view.strides[axis];
  }
  const auto* first = static_cast<const unsigned char*>(view.data);
  return {first, first + (last + 1) * std::int64_t(dtype_size(view.dtype)) - 1};
}

}  // namespace svgear::capi
