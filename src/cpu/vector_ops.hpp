// Small vector kernels shared by every CPU stage, so dense and sparse paths compute a score
// with exactly the same arithmetic (the density-1 test compares them to 1e-6).
#pragma once

#include <cstdint>

namespace svgear::cpu {

inline float dot(const float* a, const float* b, std::int64_t n) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (std::int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline double squared_distance(const float* a, const float* b, std::int64_t n) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (std::int64_t i = 0; i < n; ++i) {
    const double diff = double(a[i]) - double(b[i]);
    sum += diff * diff;
  }
  return sum;
}

// acc += weight * v
inline void axpy(double* acc, double weight, const float* v, std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) acc[i] += weight * double(v[i]);
}

inline void scale(double* acc, double factor, std::int64_t n) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) acc[i] *= factor;
}

}  // namespace svgear::cpu
