#include "core/validation.hpp"

#include <array>
#include <cmath>
#include <sstream>
#include <vector>

#include "svgear/error.hpp"

namespace svgear {

namespace {

std::string shape_of(const TensorView& t) {
  return shape_string(std::vector<std::int64_t>(t.shape.begin(), t.shape.end()));
}

void check_view(const TensorView& t, const std::string& name) {
  for (int axis = 0; axis < 4; ++axis) {
    if (t.shape[std::size_t(axis)] <= 0) {
      throw Error("tensor '" + name + "' is empty (shape " + shape_of(t) +
                  " as [B, H, S, D]): every axis needs at least one element");
    }
    if (t.strides[std::size_t(axis)] < 0) {
      throw Error("tensor '" + name + "' has a negative stride: pass a tensor with non-negative strides");
    }
  }
  if (t.data == nullptr) throw Error("tensor '" + name + "' has no data pointer");
}

// The log-sum-exp output: one F32 value per query row, [B, H, Sq, 1], beside q.
void check_lse_view(const TensorView& lse, const TensorView& q) {
  if (lse.dtype != DType::f32) {
    throw Error("tensor 'lse' is " + dtype_name(lse.dtype) +
                    ": the log-sum-exp output must be F32 (one float per query row, shape [B, H, Sq, 1])",
                ErrorKind::type);
  }
  const std::array<std::int64_t, 4> expected{q.shape[0], q.shape[1], q.shape[2], 1};
  if (lse.shape != expected) {
    throw Error("tensor 'lse' has shape " + shape_of(lse) + " but must have shape [B, H, Sq, 1] = " +
                shape_string(std::vector<std::int64_t>(expected.begin(), expected.end())) +
                " (one value per query row of q)");
  }
  for (int axis = 0; axis < 4; ++axis) {
    if (lse.strides[std::size_t(axis)] < 0) {
      throw Error("tensor 'lse' has a negative stride: pass a tensor with non-negative strides");
    }
  }
  if (lse.device != q.device) {
    throw Error("q and lse are on different devices: put the lse output on q's device", ErrorKind::type);
  }
  if (lse.data == nullptr) throw Error("tensor 'lse' has no data pointer");
}

}  // namespace

void validate_attention_inputs(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const MethodConfig& config, const TensorView* lse) {
  validate(config);
  check_view(q, "q");
  check_view(k, "k");
  check_view(v, "v");
  check_view(out, "out");
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&out, "out"}}) {
    if (t->device != q.device) {
      throw Error(std::string("q and ") + name + " are on different devices: put q, k, v and out on one device",
                  ErrorKind::type);
    }
  }
  if (k.shape != v.shape) {
    throw Error("k has shape " + shape_of(k) + " but v has shape " + shape_of(v) +
                ": keys and values must match in [B, H, S, D]");
  }
  if (q.shape[0] != k.shape[0] || q.shape[1] != k.shape[1]) {
    throw Error("q has shape " + shape_of(q) + " but k has shape " + shape_of(k) +
                ": batch and heads must match");
  }
  if (q.shape[3] != k.shape[3]) {
    throw Error("q has head dim " + std::to_string(q.shape[3]) + " but k has " +
                std::to_string(k.shape[3]) + ": the last axis (D) of q, k and v must match");
  }
  if (out.shape != q.shape) {
    throw Error("out has shape " + shape_of(out) + " but q has shape " + shape_of(q) +
                ": the output must have the shape of q");
  }
  if (lse != nullptr) check_lse_view(*lse, q);
  if (config.policy == SelectionPolicyKind::all_blocks) return;  // dense: no clustering
  if (config.clusters_q > q.tokens()) {
    throw Error("clusters_q = " + std::to_string(config.clusters_q) + " exceeds the " +
                std::to_string(q.tokens()) + " query tokens: use at most that many query clusters");
  }
  if (config.clusters_k > k.tokens()) {
    throw Error("clusters_k = " + std::to_string(config.clusters_k) + " exceeds the " +
                std::to_string(k.tokens()) + " key tokens: use at most that many key clusters");
  }
}

void require_finite(const TensorView& t, const std::string& name) {
  for (std::int64_t b = 0; b < t.shape[0]; ++b) {
    for (std::int64_t h = 0; h < t.shape[1]; ++h) {
      for (std::int64_t s = 0; s < t.shape[2]; ++s) {
        for (std::int64_t d = 0; d < t.shape[3]; ++d) {
          const float value = load_as_float(t.data, t.dtype, t.offset(b, h, s, d));
          if (!std::isfinite(value)) {
            std::ostringstream message;
            message << "tensor '" << name << "' has a non-finite value (" << value << ") at [" << b
                    << ", " << h << ", " << s << ", " << d << "]: svgear needs finite inputs";
            throw Error(message.str());
          }
        }
      }
    }
  }
}

}  // namespace svgear
