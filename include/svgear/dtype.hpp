// Element types svgear reads and writes, and conversions between them and float.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace svgear {

enum class DType { f32, f16, bf16 };

std::size_t dtype_size(DType dtype);

// "F32", "F16", "BF16": the safetensors spelling, also used in messages.
std::string dtype_name(DType dtype);

// Parses the safetensors spelling; throws svgear::Error naming the supported types otherwise.
DType parse_dtype(std::string_view name);

// IEEE binary16 and bfloat16 bit patterns; float -> 16 bit rounds to nearest even.
float half_to_float(std::uint16_t bits);
std::uint16_t float_to_half(float value);
float bf16_to_float(std::uint16_t bits);
std::uint16_t float_to_bf16(float value);

// `value` rounded to `dtype` (nearest even), as float: what storing it in that dtype keeps.
float round_to_dtype(float value, DType dtype);

// Reads element `index` of a buffer of `dtype` as float.
float load_as_float(const void* data, DType dtype, std::int64_t index);
// Writes `value` (rounded to `dtype`) into element `index`.
void store_from_float(void* data, DType dtype, std::int64_t index, float value);

}  // namespace svgear
