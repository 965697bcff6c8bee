#include "cpu/block_sparse_attention.hpp"

#include <cmath>
#include <vector>

#include "cpu/online_softmax.hpp"
#include "cpu/vector_ops.hpp"
#include "svgear/error.hpp"

namespace svgear::cpu {

void block_sparse_attention(const float* qp, const float* kp, const float* vp, std::int64_t d,
                            const ClusterLayout& queries, const ClusterLayout& keys,
                            const BlockSelection& selection,
                            const KeyClusterSummary* compensation, float* out, float* lse) {
  const int cq = queries.clusters();
  const int ck = keys.clusters();
  const double scale_factor = 1.0 / std::sqrt(double(d));
  std::int64_t largest_key_cluster = 0;
  for (int j = 0; j < ck; ++j) largest_key_cluster = std::max(largest_key_cluster, keys.size(j));
  bool missing_keys = false;

#pragma omp parallel
  {
    std::vector<double> logits(std::size_t(std::max<std::int64_t>(largest_key_cluster, ck)));
    std::vector<int> skipped;
    OnlineSoftmaxRow row(d);
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < cq; ++i) {
      const std::uint8_t* exact = &selection.exact[std::size_t(i) * std::size_t(ck)];
      skipped.clear();
      if (compensation != nullptr) {
        for (int j = 0; j < ck; ++j) {
          if (!exact[j] && compensation->counts[j] > 0) skipped.push_back(j);
        }
      }
      for (std::int64_t r = queries.offsets[std::size_t(i)]; r < queries.offsets[std::size_t(i) + 1]; ++r) {
        const float* query = qp + r * d;
        row.reset();
        for (int j = 0; j < ck; ++j) {
          if (!exact[j]) continue;
          const std::int64_t begin = keys.offsets[std::size_t(j)];
          const std::int64_t count = keys.size(j);
          for (std::int64_t t = 0; t < count; ++t) {
            logits[std::size_t(t)] = double(dot(query, kp + (begin + t) * d, d)) * scale_factor;
          }
          row.add(logits.data(), count, [&](std::int64_t t) { return vp + (begin + t) * d; });
        }
        if (!skipped.empty()) {
          for (std::size_t s = 0; s < skipped.size(); ++s) {
            const int j = skipped[s];
            logits[s] = double(dot(query, compensation->key_means + std::int64_t(j) * d, d)) * scale_factor +
                        std::log(double(compensation->counts[j]));
          }
          row.add(logits.data(), std::int64_t(skipped.size()), [&](std::int64_t s) {
            return compensation->value_means + std::int64_t(skipped[std::size_t(s)]) * d;
          });
        }
        if (row.denominator() > 0) {
          row.write(out + r * d);
          if (lse != nullptr) lse[r] = float(row.log_sum_exp());
        } else {
#pragma omp atomic write
          missing_keys = true;
        }
      }
    }
  }
  // A guard, not a user error: the policies always give each query cluster a block.
  if (missing_keys) throw Error("internal error: a query cluster had no exact or compensated keys");
}

}  // namespace svgear::cpu
