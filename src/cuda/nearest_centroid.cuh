// The running argmin of k-means' assignment kernels (kmeans.cu on mma.sync, kmeans_assign_sm90.cu
// on wgmma): both hold x . c for 64 centroids at a time in the m16n8 accumulator layout, per
// warp kBlocks blocks of 16 rows (g = lane / 4, q = lane % 4: acc[m][n][2h + e] is row
// 16m + g + 8h, column 8n + 2q + e), which is also what a warp holds of a wgmma m64n64 result.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/packed_centroids.cuh"

namespace svgear::cuda::detail {

// Each thread's running argmin for its 2 kBlocks rows. Columns arrive in increasing order and
// strict < keeps the lowest index among ties. With kRunnerUp it also keeps the nearest other
// centroid (the tile alignment's second choice, cpu::RunnerUps), ordered the same way.
template <int kBlocks, bool kRunnerUp = false>
struct NearestCentroid {
  float best[kBlocks][2];
  int index[kBlocks][2];
  float second[kBlocks][kRunnerUp ? 2 : 1];
  int second_index[kBlocks][kRunnerUp ? 2 : 1];

  __device__ NearestCentroid() {
#pragma unroll
    for (int m = 0; m < kBlocks; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        best[m][h] = INFINITY;
        index[m][h] = 0;
        if constexpr (kRunnerUp) {
          second[m][h] = INFINITY;
          second_index[m][h] = 0;
        }
      }
    }
  }

  // acc = x.c for the warp's rows and the 64 centroids of `tile`; norms = their ||c||^2.
  __device__ __forceinline__ void take(const float (&acc)[kBlocks][kCentroidTile / 8][4], int tile, int clusters,
                                       const float* norms, int q) {
#pragma unroll
    for (int nt = 0; nt < kCentroidTile / 8; ++nt) {
      const float2 norm = *reinterpret_cast<const float2*>(norms + nt * 8 + 2 * q);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = tile * kCentroidTile + nt * 8 + 2 * q + e;
        if (c >= clusters) continue;
        const float n = e == 0 ? norm.x : norm.y;
#pragma unroll
        for (int m = 0; m < kBlocks; ++m) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // ||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c
            const float distance = fmaf(-2.0f, acc[m][nt][2 * h + e], n);
            if (distance < best[m][h]) {
              if constexpr (kRunnerUp) {
                second[m][h] = best[m][h];
                second_index[m][h] = index[m][h];
              }
              best[m][h] = distance;
              index[m][h] = c;
            } else if constexpr (kRunnerUp) {
              if (distance < second[m][h]) {
                second[m][h] = distance;
                second_index[m][h] = c;
              }
            }
          }
        }
      }
    }
  }

  // Quad reduction (the 4 lanes of a row hold different columns) and the label store; the
  // warp's rows start at first_row. With kRunnerUp, also the runner-up's label and the regret
  // d(runner-up) - d(nearest) (a row with a single cluster: its own label and 0).
  __device__ __forceinline__ void store(std::int32_t* labels, std::int64_t first_row, std::int64_t tokens, int lane,
                                        std::int32_t* runner_up = nullptr, float* regret = nullptr) {
    auto before = [](float a, int a_index, float b, int b_index) {
      return a < b || (a == b && a_index < b_index);
    };
#pragma unroll
    for (int m = 0; m < kBlocks; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int offset = 1; offset <= 2; offset <<= 1) {
          const float other = __shfl_xor_sync(0xffffffffu, best[m][h], offset);
          const int other_index = __shfl_xor_sync(0xffffffffu, index[m][h], offset);
          if constexpr (kRunnerUp) {
            // Merge two top-2 lists over disjoint columns, (distance, index) ascending.
            const float other_second = __shfl_xor_sync(0xffffffffu, second[m][h], offset);
            const int other_second_index = __shfl_xor_sync(0xffffffffu, second_index[m][h], offset);
            if (before(other, other_index, best[m][h], index[m][h])) {
              if (before(best[m][h], index[m][h], other_second, other_second_index)) {
                second[m][h] = best[m][h];
                second_index[m][h] = index[m][h];
              } else {
                second[m][h] = other_second;
                second_index[m][h] = other_second_index;
              }
              best[m][h] = other;
              index[m][h] = other_index;
            } else if (before(other, other_index, second[m][h], second_index[m][h])) {
              second[m][h] = other;
              second_index[m][h] = other_index;
            }
          } else if (before(other, other_index, best[m][h], index[m][h])) {
            best[m][h] = other;
            index[m][h] = other_index;
          }
        }
        const std::int64_t row = first_row + 16 * m + lane / 4 + 8 * h;
        if (lane % 4 == 0 && row < tokens) {
          labels[row] = index[m][h];
          if constexpr (kRunnerUp) {
            const bool alone = second[m][h] == INFINITY;
            runner_up[row] = alone ? index[m][h] : second_index[m][h];
            regret[row] = alone ? 0.0f : second[m][h] - best[m][h];
          }
        }
      }
    }
  }
};

}  // namespace svgear::cuda::detail
