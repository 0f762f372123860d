// Device helpers shared by the W4A8 GEMM kernels (csrc/w4a8.cu: mma.sync, every GPU from sm_80;
// csrc/w4a8_sm90.cu: wgmma, Hopper). Both kernels consume the same data: the layouts are drawn
// in w4a8.cu's header and docs/kernels.md. Keeping the weight widening and the epilogue here is
// what makes the two kernels compute the very same bits (tests/test_cuda_kernels.py checks it).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace svdq {

template <typename T> struct F16;
template <> struct F16<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float f) { return __float2bfloat16_rn(f); }
};
template <> struct F16<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float f) { return __float2half_rn(f); }
};

// a (low half) and b rounded as F16<T>::from_f, packed in one register (one cvt for both)
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 16-bit MMA, fp32 accumulate: d = a*b + d.
template <typename T> __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4],
                                                               const uint32_t b[2]);
#define SVDQ_MMA16816(TYPE, PTX)                                                            \
  template <>                                                                               \
  __device__ __forceinline__ void mma16816<TYPE>(float d[4], const uint32_t a[4],           \
                                                 const uint32_t b[2]) {                     \
    asm(/* no side effects: the compiler may schedule it like arithmetic */                 \
        "mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 {%0,%1,%2,%3}, "         \
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                           \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                    \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));                \
  }
SVDQ_MMA16816(__nv_bfloat16, "bf16")
SVDQ_MMA16816(__half, "f16")
#undef SVDQ_MMA16816

// int8 MMA, unsigned A (widened weights + 128) x signed B (activation codes), int32 accumulate.
__device__ __forceinline__ void mma_u8s8(int d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* smem_ptr) {
  const uint32_t a = smem_u32(smem_ptr);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

// cp.async with zero fill: src_bytes = 0 writes zeros (used for the K tail of a k-tile).
__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gptr, int src_bytes) {
  const uint32_t a = smem_u32(smem_ptr);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gptr),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async4(void* smem_ptr, const void* gptr, int src_bytes) {
  const uint32_t a = smem_u32(smem_ptr);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(a), "l"(gptr),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t ld32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// ---------------------------------------------------------------------------------------------
// Weight widening: one k64 group of one m16 tile into the int8 A fragments of its two k32 steps
// (widen_group), or one of the steps (widen_step: word st of each row).
// w_lo, w_hi: this lane's 8 bytes (codes 16tq .. 16tq+15 of the group) of rows g and g+8;
// m_lo, m_hi: their group multipliers. Word st of a row feeds step st: low nibbles the A
// registers of k 4tq.. (a0, a1), high nibbles those of k 16+4tq.. (a2, a3). With
// W = word ^ 0x88888888 every nibble is u = code + 8, and
//     (W & 0x0F0F0F0F) * m + (128 - 8m) * 0x01010101  = bytes code*m + 128, in [0, 240],
// with no carry between bytes: the unsigned A operand (u8), whose +128 the epilogue removes.
// The same fragment layout serves mma.m16n8k32 (per warp) and wgmma m64nNk32 (per warp of the
// warpgroup, rows 16w ..).
__device__ __forceinline__ void widen_step(uint32_t w_lo, uint32_t w_hi, uint32_t m_lo,
                                           uint32_t m_hi, uint32_t (&a)[4]) {
  const uint32_t c_lo = 0x80808080u - m_lo * 0x08080808u, c_hi = 0x80808080u - m_hi * 0x08080808u;
  const uint32_t x0 = w_lo ^ 0x88888888u, x1 = w_hi ^ 0x88888888u;
  a[0] = (x0 & 0x0F0F0F0Fu) * m_lo + c_lo;
  a[2] = ((x0 >> 4) & 0x0F0F0F0Fu) * m_lo + c_lo;
  a[1] = (x1 & 0x0F0F0F0Fu) * m_hi + c_hi;
  a[3] = ((x1 >> 4) & 0x0F0F0F0Fu) * m_hi + c_hi;
}
__device__ __forceinline__ void widen_group(uint2 w_lo, uint2 w_hi, uint32_t m_lo, uint32_t m_hi,
                                            uint32_t a[2][4]) {
  widen_step(w_lo.x, w_hi.x, m_lo, m_hi, a[0]);
  widen_step(w_lo.y, w_hi.y, m_lo, m_hi, a[1]);
}

// The m16n8k16 A fragment of up [N, R] (row-major) for ranks r .. r + 15 and a lane's channels
// n_lo (rows g) and n_hi (rows g + 8): both epilogues' low-rank up-projection reads up this way.
template <typename T>
__device__ __forceinline__ void up_fragment(uint32_t (&ua)[4], const T* __restrict__ up, int n_lo,
                                            int n_hi, int R, int r, int tq) {
  const T* pa = up + (size_t)n_lo * R + r + 2 * tq;
  const T* pb = up + (size_t)n_hi * R + r + 2 * tq;
  ua[0] = ld32(pa);
  ua[1] = ld32(pb);
  ua[2] = ld32(pa + 8);
  ua[3] = ld32(pb + 8);
}

// ---------------------------------------------------------------------------------------------
// Epilogue of one warp's m16 x (NT*8) tile: rows (output channels) g and g+8, tokens
// 8*nt + 2tq + {0, 1}; acc[nt] in the mma/wgmma C layout (c0, c1: row g; c2, c3: row g+8).
//   y = float(acc - 128*sumq[t]) * (sx[t] * row_scale[n])     the same two fp32 roundings as
//       + act[t] . up[n]   (m16n8k16, fp32, 16 ranks a step)  svdq/reference.py w4a8_main
//       + bias[n]                                              (explicit _rn: no FMA contraction)
// rounded once to T and written to the staging tile so[token][BN + 8] at (tl0 + token,
// nl + row); the caller copies the staged tile out with 16-byte stores. Tokens past M and rows
// past N are computed on clamped (valid) addresses and never stored by the caller.
// Up to 8 n8 tiles at a time keep the branch operands in few registers; every element still
// sees the rank steps in the same order, so the result does not depend on that blocking.
// Staging row of a BN-channel tile: + 16 bytes, so that the lanes' 2-byte stores (tokens 2tq, 2tq+1
// apart by rows) fall in different banks.
template <int BN> __host__ __device__ constexpr int out_stride() { return BN + 8; }

// One n8 tile's results (f: rows g, g+8 x tokens t, t+1, the C layout) plus the bias, rounded
// once to T into the staging tile so at token row t and channel column c (rows g: c, g+8: c+8).
template <typename T, int BN>
__device__ __forceinline__ void stage_n8(const float (&f)[4], const float (&bv)[2], bool has_bias,
                                         T* so, int t, int c) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = f[hh * 2 + e];
      if (has_bias) v = __fadd_rn(v, bv[hh]);
      so[(t + e) * out_stride<BN>() + c + 8 * hh] = F16<T>::from_f(v);
    }
}

// One n8 tile's int32 sums (acc: rows g, g+8 x tokens t, t+1, the C layout) to the fp32 main
// result: float(acc - 128*sumq[t]) * (sx[t] * rs[row]), the two roundings of svdq/reference.py
// w4a8_main (explicit _rn: no FMA contraction). Tokens past M read row M-1 (never stored).
__device__ __forceinline__ void dequant_n8(const int (&acc)[4], int t, int M,
                                           const float* __restrict__ sx,
                                           const int* __restrict__ sumq, const float (&rs)[2],
                                           float (&f)[4]) {
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int te = min(t + e, M - 1);
    const float sxv = sx[te];
    const int off = sumq[te] * 128;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      f[hh * 2 + e] = __fmul_rn(__int2float_rn(acc[hh * 2 + e] - off), __fmul_rn(sxv, rs[hh]));
  }
}

template <typename T, int NT, int BN>
__device__ __forceinline__ void epilogue_m16(int (&acc)[NT][4], int n_g, int nl, int t_0, int tl0,
                                             const float* __restrict__ sx,
                                             const int* __restrict__ sumq,
                                             const float* __restrict__ row_scale,
                                             const T* __restrict__ act, const T* __restrict__ up,
                                             int R, const T* __restrict__ bias, T* so, int M,
                                             int N, int lane) {
  const int g = lane / 4, tq = lane % 4;
  const int n_lo = min(n_g, N - 1), n_hi = min(n_g + 8, N - 1);
  const float rs[2] = {row_scale[n_lo], row_scale[n_hi]};
  const float bv[2] = {bias ? F16<T>::to_f(bias[n_lo]) : 0.f, bias ? F16<T>::to_f(bias[n_hi]) : 0.f};
  constexpr int CH = NT < 8 ? NT : 8;
#pragma unroll
  for (int c0 = 0; c0 < NT; c0 += CH) {
    float f[CH][4];
#pragma unroll
    for (int j = 0; j < CH; ++j)
      dequant_n8(acc[c0 + j], t_0 + (c0 + j) * 8 + 2 * tq, M, sx, sumq, rs, f[j]);
    // low-rank up: A = up [n, r] (row-major: the m16n8k16 "row" A), B = act [t, r] ("col" B)
    for (int r = 0; r < R; r += 16) {
      uint32_t ua[4];
      up_fragment(ua, up, n_lo, n_hi, R, r, tq);
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const T* p = act + (size_t)min(t_0 + (c0 + j) * 8 + g, M - 1) * R + r + 2 * tq;
        const uint32_t ab[2] = {ld32(p), ld32(p + 8)};
        mma16816<T>(f[j], ua, ab);
      }
    }
#pragma unroll
    for (int j = 0; j < CH; ++j)
      stage_n8<T, BN>(f[j], bv, bias != nullptr, so, tl0 + (c0 + j) * 8 + 2 * tq, nl);
  }
}

// The staged [ROWS tokens][BN channels] tile to y [M, N]: 16-byte stores, a row per BN/8
// threads. N % 8 == 0, so a 16-byte chunk is all inside N or all outside.
template <typename T, int ROWS, int BN, int THREADS>
__device__ __forceinline__ void store_tile(const T* so, T* __restrict__ y, int t0, int n0, int M,
                                           int N, int tid) {
  constexpr int CPR = BN / 8;  // 16-byte chunks per row
#pragma unroll
  for (int i = 0; i < (ROWS * CPR) / THREADS; ++i) {
    const int c = tid + i * THREADS, row = c / CPR, ch = c % CPR;
    const int t = t0 + row, n = n0 + ch * 8;
    if (t < M && n < N)
      *reinterpret_cast<uint4*>(y + (size_t)t * N + n) =
          *reinterpret_cast<const uint4*>(so + row * out_stride<BN>() + ch * 8);
  }
}

}  // namespace svdq
