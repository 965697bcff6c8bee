// Exact attention of one (batch, head): the reference of every method.
#pragma once

#include <cstdint>

namespace svgear::cpu {

// q: [sq, d], k and v: [sk, d], out: [sq, d], all row-major float. Float64 softmax
// accumulation with max subtraction (two passes: max, then sums). Parallel over query rows.
// lse (optional, [sq]): each row's ln sum_key exp(q.k / sqrt(d)).
void dense_attention_head(const float* q, const float* k, const float* v, std::int64_t sq,
                          std::int64_t sk, std::int64_t d, float* out, float* lse = nullptr);

}  // namespace svgear::cpu
