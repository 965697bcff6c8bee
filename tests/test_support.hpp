// Inputs for tests: fresh seeded random tensors, and clustered ones whose structure the
// methods are meant to exploit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cpu/random.hpp"
#include "svgear/config.hpp"
#include "svgear/tensor.hpp"

namespace svgear::testing {

inline double normal(cpu::SplitMix64& rng) {
  const double u1 = 1.0 - rng.uniform(), u2 = rng.uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

inline HostTensor random_tensor(std::vector<std::int64_t> shape, std::uint64_t seed, double stddev = 1.0,
                                DType dtype = DType::f32) {
  HostTensor t(dtype, std::move(shape));
  cpu::SplitMix64 rng(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, float(stddev * normal(rng)));
  return t;
}

// [B, H, S, D] tokens drawn around `classes` random centres (spread `noise`), so clustering
// finds real structure; scale sets the logit range.
inline HostTensor clustered_tensor(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d, int classes,
                                   double noise, std::uint64_t seed, double scale = 1.0) {
  HostTensor t(DType::f32, {b, h, s, d});
  cpu::SplitMix64 rng(seed);
  std::vector<double> centres(std::size_t(classes * d));
  for (std::int64_t head = 0; head < b * h; ++head) {
    for (double& c : centres) c = normal(rng);
    for (std::int64_t token = 0; token < s; ++token) {
      const std::int64_t cls = std::int64_t(rng.next() % std::uint64_t(classes));
      for (std::int64_t j = 0; j < d; ++j) {
        t.set((head * s + token) * d + j, float(scale * (centres[std::size_t(cls * d + j)] + noise * normal(rng))));
      }
    }
  }
  return t;
}

// Clustered queries and keys (12 classes), random values: attention with structure to exploit.
struct Qkv {
  HostTensor q, k, v;
};

inline Qkv clustered_qkv(std::int64_t s, std::int64_t d, std::uint64_t seed, std::int64_t heads = 2) {
  return {clustered_tensor(1, heads, s, d, 12, 0.4, seed, 0.45), clustered_tensor(1, heads, s, d, 12, 0.4, seed + 1, 0.45),
          random_tensor({1, heads, s, d}, seed + 2)};
}

// Random q and v; keys taking only 6 distinct values per head (token t has value t * 7 mod 6).
// With 6 key clusters every cluster's keys equal its centroid, so centroid compensation of any
// skipped block is exact.
inline Qkv qkv_with_six_key_values(std::int64_t s, std::int64_t d) {
  Qkv in{random_tensor({1, 2, s, d}, 5), HostTensor(DType::f32, {1, 2, s, d}), random_tensor({1, 2, s, d}, 6)};
  const HostTensor distinct = random_tensor({2, 6, d}, 7);
  for (std::int64_t head = 0; head < 2; ++head)
    for (std::int64_t token = 0; token < s; ++token)
      for (std::int64_t j = 0; j < d; ++j)
        in.k.set((head * s + token) * d + j, distinct.at((head * 6 + (token * 7) % 6) * d + j));
  return in;
}

// A method's preset with `density` and few clusters (8 query, 16 key), for small inputs.
inline MethodConfig small_config(Method method, double density) {
  MethodConfig config = preset(method);
  config.density = density;
  config.clusters_q = 8;
  config.clusters_k = 16;
  return config;
}

// Sets an environment variable while it lives (e.g. SVGEAR_ATTENTION_KERNEL, which the library
// reads per call); the caller's value, or its absence, comes back after.
class ScopedEnvironment {
 public:
  ScopedEnvironment(const char* variable, const std::string& value) : variable_(variable) {
    if (const char* previous = std::getenv(variable)) previous_ = previous;
    setenv(variable, value.c_str(), 1);
  }
  ~ScopedEnvironment() {
    if (previous_) {
      setenv(variable_.c_str(), previous_->c_str(), 1);
    } else {
      unsetenv(variable_.c_str());
    }
  }
  ScopedEnvironment(const ScopedEnvironment&) = delete;
  ScopedEnvironment& operator=(const ScopedEnvironment&) = delete;

 private:
  std::string variable_;
  std::optional<std::string> previous_;
};

}  // namespace svgear::testing
