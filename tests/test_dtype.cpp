#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "svgear/dtype.hpp"
#include "svgear/error.hpp"

using namespace svgear;

TEST(DType, HalfRoundTripsEveryFiniteValue) {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float value = half_to_float(std::uint16_t(bits));
    if (std::isnan(value)) continue;
    EXPECT_EQ(float_to_half(value), bits) << "half bits " << bits;
  }
}

TEST(DType, Bf16RoundTripsEveryFiniteValue) {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float value = bf16_to_float(std::uint16_t(bits));
    if (std::isnan(value)) continue;
    EXPECT_EQ(float_to_bf16(value), bits) << "bf16 bits " << bits;
  }
}

TEST(DType, RoundsToNearestEven) {
  EXPECT_EQ(half_to_float(float_to_half(1.0f + 1.0f / 2048)), 1.0f);  // tie -> even (1.0)
  EXPECT_EQ(half_to_float(float_to_half(1.0f + 3.0f / 2048)), 1.0f + 2.0f / 1024);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_TRUE(std::isinf(half_to_float(float_to_half(70000.0f))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(DType, ParsesSafetensorsNames) {
  EXPECT_EQ(parse_dtype("BF16"), DType::bf16);
  EXPECT_EQ(parse_dtype("F16"), DType::f16);
  EXPECT_EQ(parse_dtype("F32"), DType::f32);
  EXPECT_THROW(parse_dtype("I64"), Error);
}
