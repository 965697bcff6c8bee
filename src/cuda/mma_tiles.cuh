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
#include <type_traits>

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

// acc[m][n / 8] += A[row0 + 16 m .. + 16) . B[n]^T for kBlocks row blocks of 16 (one warp):
// every B fragment read from shared memory feeds kBlocks MMAs. With one block a warp reads
// (16 + N) x 32 bytes per 16 x N x 16 step, about 320 bytes per MMA at N = 64, which is more than
// the 128 bytes per clock shared memory delivers per tensor-core MMA slot; two blocks halve it.
// kUnrollK k16 steps are unrolled (fewer: fewer fragments prefetched, fewer registers).
template <class E, int D, int N, int kBlocks, int kUnrollK = D / 16>
__device__ __forceinline__ void warp_mma_abt_rows(float (&acc)[kBlocks][N / 8][4], const E* a_tile, int row0,
                                                  const E* b_tile, int lane) {
#pragma unroll(kUnrollK)
  for (int k0 = 0; k0 < D; k0 += 16) {
    std::uint32_t a[kBlocks][4];
#pragma unroll
    for (int m = 0; m < kBlocks; ++m) sm80::ldmatrix_x4(a[m], a_fragment<E, D>(a_tile, row0 + 16 * m, k0, lane));
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 16) {
      std::uint32_t b[4];
      sm80::ldmatrix_x4(b, b_fragment<E, D>(b_tile, n0, k0, lane));
#pragma unroll
      for (int m = 0; m < kBlocks; ++m) {
        sm80::mma_m16n8k16<E>(acc[m][n0 / 8], a[m], b[0], b[1]);
        sm80::mma_m16n8k16<E>(acc[m][n0 / 8 + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// The A fragments of rows [row0, row0 + 16) x all D columns of a row tile, for operands a warp
// reuses against many B tiles (held in registers instead of re-read from shared memory).
template <class E, int D>
__device__ __forceinline__ void load_a_fragments(std::uint32_t (&a)[D / 16][4], const E* a_tile, int row0, int lane) {
#pragma unroll
  for (int k = 0; k < D / 16; ++k) sm80::ldmatrix_x4(a[k], a_fragment<E, D>(a_tile, row0, k * 16, lane));
}

// acc[n / 8] += A . B[n]^T as warp_mma_abt, with A's fragments already in registers.
template <class E, int D, int N>
__device__ __forceinline__ void warp_mma_abt_held(float (&acc)[N / 8][4], const std::uint32_t (&a)[D / 16][4],
                                                  const E* b_tile, int lane) {
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 16) {
      std::uint32_t b[4];
      sm80::ldmatrix_x4(b, b_fragment<E, D>(b_tile, n0, k * 16, lane));
      sm80::mma_m16n8k16<E>(acc[n0 / 8], a[k], b[0], b[1]);
      sm80::mma_m16n8k16<E>(acc[n0 / 8 + 1], a[k], b[2], b[3]);
    }
  }
}

// d = a * b for one m16n8k16 tile (no accumulator input): starts a sum without first zeroing
// the accumulator registers.
template <typename Element>
__device__ __forceinline__ void mma_m16n8k16_overwrite(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                       std::uint32_t b1) {
  const float zero = 0.0f;
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(zero));
  } else {
    static_assert(std::is_same_v<Element, __half>, "mma_m16n8k16_overwrite: bf16 or f16 operands");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(zero));
  }
}

// 4-byte global -> shared copy (.ca); valid == false zero-fills without reading the source.
__device__ __forceinline__ void cp_async_4(std::uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// x = hi + lo + O(2^-16 |x|): two 16-bit terms carry an fp32 operand through the 16-bit tensor
// cores (bf16: 8 + 8 mantissa bits; f16: 11 + 11).
template <class E>
__device__ __forceinline__ void split_hi_lo(float x, float& hi, float& lo) {
  hi = Element<E>::to_float(Element<E>::from_float(x));
  lo = x - hi;
}

// 16-byte cp.async (.cg) as sm80::cp_async_16, without the "memory" clobber (as CUTLASS's
// copy atoms): the compiler may then hoist the loads that compute the next source addresses
// (gathered row indices) above earlier copies instead of paying one memory latency per row.
// Safe because nothing reads a destination before cp_async_wait (which keeps its clobber) and
// a barrier, and nothing writes one with plain stores while copies are in flight.
__device__ __forceinline__ void cp_async_16_unordered(std::uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

// Loads ROWS rows of D elements into a [ROWS][D + 8] tile; token_of(r) gives row r's token, or
// -1 for a zero row (tails). Aligned rows go by cp.async (the caller commits and waits), others
// by plain loads (the caller's __syncthreads publishes them). token_of is called by every lane
// of a warp alike (it may shuffle). A gathered token should not be a global load here: each
// would wait for memory before its row's copy (see probe::TileTokens).
template <class E, int D, int ROWS, int THREADS, class TokenOf>
__device__ __forceinline__ void load_rows(E* tile, const HeadRows<E>& rows, bool aligned16, TokenOf token_of) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(ROWS * kChunks % THREADS == 0, "every lane runs the same iterations");
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks, chunk = idx % kChunks;
    const std::int64_t token = token_of(r);
    E* dst = tile + r * kTileStride<D> + chunk * 8;
    if (aligned16) {
      cp_async_16_unordered(sm80::shared_address(dst), token >= 0 ? rows.row(token) + chunk * 8 : rows.base,
                            token >= 0);
    } else {
      const E* src = token >= 0 ? rows.row(token) + chunk * 8 : nullptr;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src != nullptr ? src[e] : Element<E>::from_float(0.0f);
    }
  }
}

}  // namespace svgear::cuda::detail
