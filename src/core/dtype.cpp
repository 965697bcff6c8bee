#include "svgear/dtype.hpp"

#include <cmath>
#include <cstring>

#include "svgear/error.hpp"

namespace svgear {

std::size_t dtype_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
  }
  return "unknown";
}

DType parse_dtype(std::string_view name) {
  if (name == "F32") return DType::f32;
  if (name == "F16") return DType::f16;
  if (name == "BF16") return DType::bf16;
  throw Error("unsupported dtype '" + std::string(name) + "': svgear reads F32, F16 and BF16");
}

namespace {
std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
}  // namespace

float bf16_to_float(std::uint16_t bits) { return bits_float(std::uint32_t(bits) << 16); }

std::uint16_t float_to_bf16(float value) {
  std::uint32_t bits = float_bits(value);
  if (std::isnan(value)) return std::uint16_t((bits >> 16) | 0x40);  // keep it a (quiet) NaN
  bits += 0x7fff + ((bits >> 16) & 1);                                // round to nearest even
  return std::uint16_t(bits >> 16);
}

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1f;
  const std::uint32_t mantissa = h & 0x3ff;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000 | (mantissa << 13));  // inf / NaN
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

std::uint16_t float_to_half(float value) {
  const std::uint32_t bits = float_bits(value);
  const std::uint16_t sign = std::uint16_t((bits >> 16) & 0x8000);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return sign | 0x7e00;
  if (magnitude >= 65520.0f) return sign | 0x7c00;  // rounds past the largest half: infinity
  if (magnitude < 6.103515625e-05f) {               // subnormal half: round mantissa * 2^24
    return sign | std::uint16_t(std::nearbyint(magnitude * 16777216.0f));
  }
  std::uint32_t exponent = ((bits >> 23) & 0xff) - 112;
  std::uint32_t mantissa = bits & 0x7fffff;
  std::uint32_t result = (exponent << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (result & 1))) ++result;  // nearest even; may carry
  return sign | std::uint16_t(result);
}

float round_to_dtype(float value, DType dtype) {
  switch (dtype) {
    case DType::f32: return value;
    case DType::f16: return half_to_float(float_to_half(value));
    case DType::bf16: return bf16_to_float(float_to_bf16(value));
  }
  return value;
}

float load_as_float(const void* data, DType dtype, std::int64_t index) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(data)[index];
    case DType::f16: return half_to_float(static_cast<const std::uint16_t*>(data)[index]);
    case DType::bf16: return bf16_to_float(static_cast<const std::uint16_t*>(data)[index]);
  }
  return 0.0f;
}

void store_from_float(void* data, DType dtype, std::int64_t index, float value) {
  switch (dtype) {
    case DType::f32: static_cast<float*>(data)[index] = value; break;
    case DType::f16: static_cast<std::uint16_t*>(data)[index] = float_to_half(value); break;
    case DType::bf16: static_cast<std::uint16_t*>(data)[index] = float_to_bf16(value); break;
  }
}

}  // namespace svgear
