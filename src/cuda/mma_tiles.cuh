// Tiles for the stages' tensor-core kernels, on top of the sm80 primitives
// (cuda/sm80_primitives.cuh): padded shared-memory row tiles, the ldmatrix addresses of the
// m16n8k16 fragments in them, and gathered row loads.
//
// Fragment layout of m16n8k16 (g = lane / 4, q = lane % 4):
//   A (16 x 16, row-major): a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 2q+8..), a3 (g+8, 2q+8..)
//   B (16 x 8, k x n):      b0 (k 2q..2q+1, n g), b1 (k 2q+8.., n g)
//   C (16 x 8):             c0, c1 (row g, cols 2q, 2q+1); c2, c3 (row g+8, same cols)
// A tile holds rows of D elements at a stride of D + 8 elements: rows stay 16-byte aligned for
// cp.async, and the 8 rows of an ldmatrix phase start 16 bytes apart modulo 128, so they fall
// in distinct bank groups.
#pragma once

#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/sm80_primitives.cuh"

namespace svgear::cuda::detail {

template <int D>
inline constexpr int kTileStride = D + 8;

// ldmatrix_x4 address for the A fragment of rows [row0, row0 + 16) x k [k0, k0 + 16) of a
// row-major tile (matrices: rows 0-7 / 8-15 x k 0-7, then the same for k 8-15).
template <class E, int D>
__device__ __forceinline__ std::uint32_t a_fragment(const E* tile, int row0, int k0, int lane) {
  return sm80::shared_address(tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kTileStride<D> + k0 +
                              (lane >> 4) * 8);
}

// ldmatrix_x4 address for the B fragments of two n-tiles [n0, n0 + 16) x k [k0, k0 + 16) of a
// tile stored n-major (row n holds its k values): registers 0, 1 = n-tile n0; 2, 3 = n0 + 8.
template <class E, int D>
__device__ __forceinline__ std::uint32_t b_fragment(const E* tile, int n0, int k0, int lane) {
  return sm80::shared_address(tile + (n0 + (lane & 7) + (lane >> 4) * 8) * kTileStride<D> + k0 + ((lane >> 3) & 1) * 8);
}

// ldmatrix_x4_trans address for the B fragments of P.V: keys [k0, k0 + 16) (tile rows) x two
// d-tiles [d0, d0 + 16): registers 0, 1 = d-tile d0; 2, 3 = d-tile d0 + 8.
template <class E, int D>
__device__ __forceinline__ std::uint32_t bt_fragment(const E* tile, int k0, int d0, int lane) {
  return sm80::shared_address(tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kTileStride<D> + d0 + (lane >> 4) * 8);
}

// acc[n / 8] += A[row0 .. row0 + 16) . B[n]^T over the D columns, for the N rows of an n-major
// tile B (keys, centroids): one warp, A and B both [rows][D + 8] tiles.
template <class E, int D, int N>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[N / 8][4], const E* a_tile, int row0, const E* b_tile,
                                             int lane) {
#pragma unroll
  for (int k0 = 0; k0 < D; k0 += 16) {
    std::uint32_t a[4];
    sm80::ldmatrix_x4(a, a_fragment<E, D>(a_tile, row0, k0, lane));
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 16) {
      std::uint32_t b[4];
      sm80::ldmatrix_x4(b, b_fragment<E, D>(b_tile, n0, k0, lane));
      sm80::mma_m16n8k16<E>(acc[n0 / 8], a, b[0], b[1]);
      sm80::mma_m16n8k16<E>(acc[n0 / 8 + 1], a, b[2], b[3]);
    }
  }
}

// x = hi + lo + O(2^-16 |x|): two 16-bit terms carry an fp32 operand through the 16-bit tensor
// cores (bf16: 8 + 8 mantissa bits; f16: 11 + 11).
template <class E>
__device__ __forceinline__ void split_hi_lo(float x, float& hi, float& lo) {
  hi = Element<E>::to_float(Element<E>::from_float(x));
  lo = x - hi;
}

// Loads ROWS rows of D elements into a [ROWS][D + 8] tile; token_of(r) gives row r's token, or
// -1 for a zero row (tails). Aligned rows go by cp.async (the caller commits and waits), others
// by plain loads (the caller's __syncthreads publishes them).
template <class E, int D, int ROWS, int THREADS, class TokenOf>
__device__ __forceinline__ void load_rows(E* tile, const HeadRows<E>& rows, bool aligned16, TokenOf token_of) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks, chunk = idx % kChunks;
    const std::int64_t token = token_of(r);
    E* dst = tile + r * kTileStride<D> + chunk * 8;
    if (aligned16) {
      sm80::cp_async_16(sm80::shared_address(dst), token >= 0 ? rows.row(token) + chunk * 8 : rows.base, token >= 0);
    } else {
      const E* src = token >= 0 ? rows.row(token) + chunk * 8 : nullptr;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src != nullptr ? src[e] : Element<E>::from_float(0.0f);
    }
  }
}

}  // namespace svgear::cuda::detail
