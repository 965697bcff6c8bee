// The sm90a building blocks the Hopper kernels are written in: warpgroup MMAs (wgmma) with
// shared-memory matrix descriptors, the 128-byte swizzle those descriptors read, mbarriers, the
// async-proxy fence and register reallocation. Only the sm_90a compilation may call these
// (guard callers with SVGEAR_SM90A_ENABLED); the sm80 primitives sit in sm80_primitives.cuh.
//
// Layouts relied on (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//
// * Accumulator of m64nNk16 (fp32), thread t of the warpgroup, w = t / 32, g = (t % 32) / 4,
//   q = t % 4: d[4j + 2h + e] is (row 16w + g + 8h, column 8j + 2q + e), j < N / 8, h, e < 2.
//   Per warp this is the m16n8 mma.sync C layout repeated over N / 8 column tiles.
// * A from registers (16-bit, m64k16): per warp the m16n8k16 mma.sync A layout:
//   a0 (row g, k 2q..2q+1), a1 (row g+8, same k), a2 (row g, k 2q+8..), a3 (row g+8, k 2q+8..).
//   So accumulators d[8k + 0..7] of an S = Q K^T tile, packed in pairs, are exactly the A
//   fragment of P for k16 step k of P V: a_i = pack(d[8k + 2i], d[8k + 2i + 1]).
// * Shared-memory operands, 128-byte swizzle: rows of 64 16-bit elements (128 bytes), 8 rows
//   form a 1024-byte atom, and 16-byte chunk c of row r sits at chunk c ^ (r % 8). The hardware
//   applies the XOR to address bits [4, 7) from bits [7, 10), so atoms must be 1024-byte aligned
//   (descriptor base offset 0). Longer rows are split into column blocks of 64 elements, each
//   block a run of whole atoms (swizzled_offset below).
//   - K-major operand (Q as A, K as B of Q K^T: the reduced dimension d is contiguous): stride
//     byte offset = 1024 (next 8 rows), leading byte offset unused (1). The k16 step k of a block
//     starts 32 k bytes into the atom: the swizzle then lands on the chunks the copies wrote.
//   - MN-major operand (V as B of P V with imm-trans-b = 1: d, the N dimension, is contiguous):
//     stride byte offset = 1024 (next 8 keys along K), leading byte offset = the distance
//     between column blocks of 64 d values; the k16 step k starts at 2 atoms * k.
// * Descriptor: bits [0, 14) start address >> 4, [16, 30) leading byte offset >> 4, [32, 46)
//   stride byte offset >> 4, [49, 52) base offset, [62, 64) swizzle mode (1 = 128 bytes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SVGEAR_SM90A_ENABLED 1
#endif

namespace svgear::cuda::sm90 {

inline constexpr int kSwizzleRowBytes = 128;  // one row of a swizzle atom: 64 16-bit elements
inline constexpr int kSwizzleAtomBytes = 1024;

// Byte offset of 16-byte chunk `chunk` (8 elements) of row `row` in a tile of kRows rows of
// 16-bit elements, stored as column blocks of 64 elements, each block kRows 128-byte rows.
template <int kRows>
__device__ __forceinline__ std::uint32_t swizzled_offset(int row, int chunk) {
  static_assert(kRows % 8 == 0, "column blocks are whole 1024-byte atoms");
  return std::uint32_t((chunk >> 3) * (kRows * kSwizzleRowBytes) + row * kSwizzleRowBytes +
                       (((chunk & 7) ^ (row & 7)) << 4));
}

// Shared-memory matrix descriptor for the 128-byte swizzle (see the layout notes above).
__device__ __forceinline__ std::uint64_t make_descriptor(std::uint32_t address, std::uint32_t leading_bytes,
                                                         std::uint32_t stride_bytes) {
  return std::uint64_t((address >> 4) & 0x3FFF) | (std::uint64_t((leading_bytes >> 4) & 0x3FFF) << 16) |
         (std::uint64_t((stride_bytes >> 4) & 0x3FFF) << 32) | (std::uint64_t(1) << 62);
}

// --- warpgroup MMA ----------------------------------------------------------------------------

// Orders this warpgroup's earlier register writes (accumulators, A fragments) before the
// wgmma that follows; every warp of the warpgroup executes it.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most kPending of this warpgroup's committed wgmma groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pins a register in program order relative to the volatile wgmma asm around it, so the
// compiler neither reads an accumulator before its wait nor moves a write past the issue.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_operand(std::uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
template <typename T, int kN>
__device__ __forceinline__ void fence_operands(T (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) fence_operand(r[i]);
}
template <typename T, int kM, int kN>
__device__ __forceinline__ void fence_operands(T (&r)[kM][kN]) {
#pragma unroll
  for (int i = 0; i < kM; ++i) fence_operands(r[i]);
}

#define SVGEAR_WGMMA_D32                                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define SVGEAR_WGMMA_D32_OPERANDS(d)                                                                         \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),            \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SVGEAR_WGMMA_D64                                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "   \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SVGEAR_WGMMA_D64_OPERANDS(d)                                                                         \
  SVGEAR_WGMMA_D32_OPERANDS(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]),  \
      "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), \
      "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), \
      "+f"(d[62]), "+f"(d[63])

// ".bf16.bf16" or ".f16.f16": the operand types of a 16-bit wgmma with fp32 accumulators.
template <typename Element>
struct WgmmaTypes;
template <>
struct WgmmaTypes<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};
template <>
struct WgmmaTypes<__half> {
  static constexpr bool kBf16 = false;
};

// d (64 x 128, fp32) {=, +=} A B for A (64 x 16) and B (16 x 128) both K-major in shared
// memory; scale_d == 0 overwrites d (the first k16 step of a product).
template <typename Element>
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[64], std::uint64_t a, std::uint64_t b, int scale_d) {
#define SVGEAR_WGMMA_SS_N128(TYPES)                                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                    \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32" TYPES " " SVGEAR_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n" \
               "}\n"                                                                                           \
               : SVGEAR_WGMMA_D64_OPERANDS(d)                                                                  \
               : "l"(a), "l"(b), "r"(scale_d))
  if constexpr (WgmmaTypes<Element>::kBf16) {
    SVGEAR_WGMMA_SS_N128(".bf16.bf16");
  } else {
    SVGEAR_WGMMA_SS_N128(".f16.f16");
  }
#undef SVGEAR_WGMMA_SS_N128
}

// d (64 x N, fp32) += A B for A (64 x 16) from registers (layout above) and B (16 x N)
// MN-major in shared memory (imm-trans-b = 1). N = 64 or 128.
template <typename Element, int kN>
__device__ __forceinline__ void wgmma_rs_trans_b(float (&d)[kN / 2], const std::uint32_t (&a)[4], std::uint64_t b) {
  static_assert(kN == 64 || kN == 128, "wgmma_rs_trans_b: n64 or n128");
  constexpr int kScaleD = 1;
#define SVGEAR_WGMMA_RS(SHAPE, TYPES, DREGS, DOPERANDS, AREGS, BREG, SCALEREG)                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALEREG ", 0;\n"                                            \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32" TYPES " " DREGS ", " AREGS ", " BREG ", p, 1, 1, 1;\n" \
               "}\n"                                                                                            \
               : DOPERANDS                                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(kScaleD))
  if constexpr (kN == 128) {
    if constexpr (WgmmaTypes<Element>::kBf16) {
      SVGEAR_WGMMA_RS("m64n128k16", ".bf16.bf16", SVGEAR_WGMMA_D64, SVGEAR_WGMMA_D64_OPERANDS(d),
                      "{%64, %65, %66, %67}", "%68", "%69");
    } else {
      SVGEAR_WGMMA_RS("m64n128k16", ".f16.f16", SVGEAR_WGMMA_D64, SVGEAR_WGMMA_D64_OPERANDS(d),
                      "{%64, %65, %66, %67}", "%68", "%69");
    }
  } else {
    if constexpr (WgmmaTypes<Element>::kBf16) {
      SVGEAR_WGMMA_RS("m64n64k16", ".bf16.bf16", SVGEAR_WGMMA_D32, SVGEAR_WGMMA_D32_OPERANDS(d),
                      "{%32, %33, %34, %35}", "%36", "%37");
    } else {
      SVGEAR_WGMMA_RS("m64n64k16", ".f16.f16", SVGEAR_WGMMA_D32, SVGEAR_WGMMA_D32_OPERANDS(d),
                      "{%32, %33, %34, %35}", "%36", "%37");
    }
  }
#undef SVGEAR_WGMMA_RS
}

// d (64 x 64, fp32) {=, +=} A B for A (64 x 16) from registers (layout above) and B (16 x 64)
// K-major in shared memory (imm-trans-b = 0: rows of B^T, e.g. centroids, hold their k values);
// scale_d == 0 overwrites d.
template <typename Element>
__device__ __forceinline__ void wgmma_rs_m64n64k16(float (&d)[32], const std::uint32_t (&a)[4], std::uint64_t b,
                                                   int scale_d) {
#define SVGEAR_WGMMA_RS_N64(TYPES)                                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32" TYPES " " SVGEAR_WGMMA_D32                       \
               ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"                                                  \
               "}\n"                                                                                         \
               : SVGEAR_WGMMA_D32_OPERANDS(d)                                                                \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d))
  if constexpr (WgmmaTypes<Element>::kBf16) {
    SVGEAR_WGMMA_RS_N64(".bf16.bf16");
  } else {
    SVGEAR_WGMMA_RS_N64(".f16.f16");
  }
#undef SVGEAR_WGMMA_RS_N64
}

// --- mbarriers ----------------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(std::uint32_t barrier, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the other threads' (and the copy units') arrivals.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrival with release semantics: this thread's earlier writes are visible to whoever waits.
__device__ __forceinline__ void mbarrier_arrive(std::uint32_t barrier) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(barrier) : "memory");
}

// One arrival that fires when all of this thread's earlier cp.async copies have landed; the
// barrier's expected count includes it (.noinc).
__device__ __forceinline__ void cp_async_mbarrier_arrive(std::uint32_t barrier) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(barrier) : "memory");
}

// Blocks until the phase with the given parity has completed (acquire semantics).
__device__ __forceinline__ void mbarrier_wait(std::uint32_t barrier, std::uint32_t parity) {
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(barrier), "r"(parity)
        : "memory");
  } while (done == 0);
}

// Orders shared memory written through the generic proxy (st.shared, cp.async) before later
// reads by the async proxy (wgmma operands).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// --- register reallocation between warpgroups ---------------------------------------------------

template <int kRegisters>
__device__ __forceinline__ void increase_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void decrease_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace svgear::cuda::sm90
