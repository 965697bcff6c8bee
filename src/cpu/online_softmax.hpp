// FlashAttention's online softmax for one query row in float64: keys arrive in groups (an
// exact block, or the compensation pseudo-keys), each group rescales what came before to the
// new running max. Exact blocks and centroid compensation feed the same accumulator, so the
// compensated terms enter both numerator and denominator of one softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/vector_ops.hpp"

namespace svgear::cpu {

class OnlineSoftmaxRow {
 public:
  explicit OnlineSoftmaxRow(std::int64_t dim) : acc_(std::size_t(dim), 0.0), dim_(dim) {}

  void reset() {
    max_ = -std::numeric_limits<double>::infinity();
    denominator_ = 0;
    std::fill(acc_.begin(), acc_.end(), 0.0);
  }

  // Adds keys with the given logits and value rows: value(i) returns a float* of length dim.
  template <typename ValueRow>
  void add(const double* logits, std::int64_t count, ValueRow value) {
    if (count == 0) return;
    double group_max = -std::numeric_limits<double>::infinity();
    for (std::int64_t i = 0; i < count; ++i) group_max = std::max(group_max, logits[i]);
    if (group_max > max_) {
      if (denominator_ > 0) {
        const double factor = std::exp(max_ - group_max);
        denominator_ *= factor;
        scale(acc_.data(), factor, dim_);
      }
      max_ = group_max;
    }
    for (std::int64_t i = 0; i < count; ++i) {
      const double p = std::exp(logits[i] - max_);
      denominator_ += p;
      axpy(acc_.data(), p, value(i), dim_);
    }
  }

  double denominator() const { return denominator_; }

  // ln of the sum of exp(logit) over every key added so far (-inf before any): the row's
  // log-sum-exp in the logits' units.
  double log_sum_exp() const { return max_ + std::log(denominator_); }

  // Writes acc / denominator; the caller guarantees at least one key was added.
  void write(float* out) const {
    const double inverse = 1.0 / denominator_;
    for (std::int64_t i = 0; i < dim_; ++i) out[i] = float(acc_[std::size_t(i)] * inverse);
  }

 private:
  std::vector<double> acc_;
  std::int64_t dim_;
  double max_ = -std::numeric_limits<double>::infinity();
  double denominator_ = 0;
};

}  // namespace svgear::cpu
