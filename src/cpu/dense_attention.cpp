#include "cpu/dense_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vector_ops.hpp"

namespace svgear::cpu {

void dense_attention_head(const float* q, const float* k, const float* v, std::int64_t sq,
                          std::int64_t sk, std::int64_t d, float* out, float* lse) {
  const double scale_factor = 1.0 / std::sqrt(double(d));
#pragma omp parallel
  {
    std::vector<double> logits(std::size_t(sk), 0.0);
    std::vector<double> acc(std::size_t(d), 0.0);
#pragma omp for schedule(static)
    for (std::int64_t row = 0; row < sq; ++row) {
      const float* query = q + row * d;
      double row_max = -std::numeric_limits<double>::infinity();
      for (std::int64_t key = 0; key < sk; ++key) {
        logits[std::size_t(key)] = double(dot(query, k + key * d, d)) * scale_factor;
        row_max = std::max(row_max, logits[std::size_t(key)]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double denominator = 0;
      for (std::int64_t key = 0; key < sk; ++key) {
        const double p = std::exp(logits[std::size_t(key)] - row_max);
        denominator += p;
        axpy(acc.data(), p, v + key * d, d);
      }
      for (std::int64_t i = 0; i < d; ++i) out[row * d + i] = float(acc[std::size_t(i)] / denominator);
      if (lse != nullptr) lse[row] = float(row_max + std::log(denominator));
    }
  }
}

}  // namespace svgear::cpu
