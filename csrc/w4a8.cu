// SVDQuant W4A8 kernels: 4-bit weights x int8 activations on the INT8 tensor cores (sm_80+),
// with the 16-bit low-rank branch fused into both kernels.
//
// Two launches per linear layer:
//   1. svdq_w4a8_act   computes the low-rank activation (x . down^T) * rank_scale in fp32 on
//                      16-bit tensor cores and quantizes x * inv_smooth per token to int8
//                      (svdq/quant.py quantize_act, exactly); x is read from DRAM once and
//                      re-read from L2 once.
//   2. svdq_w4a8_gemm  y = float(acc) * (sx[t] * row_scale[n]) + act . up^T + bias, where acc is
//                      the exact int32 sum over k of q_x[t,k] * code[n,k] * mult[n,k/64].
//
// This file needs no torch headers; csrc/binding.cpp wraps the two host launchers below.
// docs/kernels.md draws the layouts; the comments here say what each piece of code relies on.
//
// ---------------------------------------------------------------------------------------------
// DATA LAYOUTS
// ---------------------------------------------------------------------------------------------
// Weights: the checkpoint's natural layout, consumed as is (no repacked copy exists):
//   qweight uint8 [N, K/2], row-major; byte j of a row holds code 2j in its low nibble and code
//   2j+1 in its high nibble, two's complement (-8..7).
//   One k64 group of one row is 32 bytes. Read as 32-bit words, word w of a group holds codes
//   8w..8w+7: its low nibbles are the even codes 8w+{0,2,4,6}, its high nibbles the odd ones.
//
// Scale fold (svdq/quant.py fold_group_scales): group scale s[n,g] = row_scale[n] * mult[n,g],
//   mult an integer in [0,16]. The kernel multiplies int8 values code*mult (in [-128,112]), so the
//   main loop has no per-group float work; dequantization is one multiply in the epilogue.
//   multT int8 [K/64, N] (transposed so that one k-tile's multipliers are contiguous).
//
// Widening (4 weights per IMAD): with W = word ^ 0x88888888, each nibble becomes u = code + 8
//   (offset binary, 0..15). U = W & 0x0F0F0F0F spreads 4 of them one per byte, and
//       U * m + (128 - 8m) * 0x01010101     = bytes (code*m + 128) in [0, 240]
//   with no carry between bytes (u*m <= 240, 128-8m >= 0). These are the *unsigned* A operand of
//   mma.m16n8k32.u8.s8; the GEMM therefore computes sum_k q_x*(w8+128), and the epilogue removes
//   128 * sum_k q_x[t,k] (sumq, written by the activation kernel). Exact in int32 for K <= 65536:
//   |acc| <= K * 240 * 127 < 2^31.
//
// Activation codes: int8 [M, K] with k PERMUTED inside every 64-wide group, so that the low and
//   high nibbles of one weight word meet their activations in the MMA without any byte shuffling.
//   The dot product does not care about the order of k, only that A and B agree. Natural index
//   j (0..63 inside a group) is stored at position
//       P(j) = 32*s + 16*h + 4*tq + i,   tq = j/16, s = (j/8)%2, i = (j%8)/2, h = j%2
//   i.e. step s (one k32 MMA), half h (low / high nibble), lane-in-quad tq, byte i. The per-token
//   scale sx fp32 [M] and sumq int32 [M] come with them.
//
// Low-rank activation: act [M, R16] 16-bit row-major, R16 = rank rounded up to 16 (the padding
//   columns are exact zeros, since down/rank_scale are zero-padded at prepare).
// Low-rank up: up [N, R16] 16-bit row-major.  Output y [M, N] 16-bit row-major.
//
// MMA orientation: weights are the M side of mma.m16n8k32 (A, widened in registers), tokens the
// N side (B, straight from shared memory through ldmatrix). Fragment ownership for lane
// (g = lane/4, tq = lane%4), PTX ISA "mma.m16n8k32" for 8-bit types:
//   A regs a0:(row g, k 4tq..4tq+3) a1:(row g+8, same k) a2:(row g, k 16+4tq..) a3:(row g+8, ..)
//   B regs b0:(k 4tq..4tq+3, col g)  b1:(k 16+4tq.., col g)
//   C regs c0,c1:(row g, col 2tq, 2tq+1)  c2,c3:(row g+8, same cols)
// With lane tq reading word s of row g's group (natural codes 16tq+8s .. +7): low nibbles feed
// a0 (positions 4tq+i <-> natural 16tq+8s+2i), high nibbles feed a2 (positions 16+4tq+i <->
// natural 16tq+8s+2i+1). That is P(j) above. m16n8k16 (16-bit) uses the same C layout, so the
// low-rank MMAs accumulate straight into the dequantized main result.
// ---------------------------------------------------------------------------------------------

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

// 16-bit MMA, fp32 accumulate: d = a*b + d.
template <typename T> __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4],
                                                               const uint32_t b[2]);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float d[4], const uint32_t a[4],
                                                                    const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float d[4], const uint32_t a[4],
                                                             const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// int8 MMA, unsigned A (widened weights + 128) x signed B (activation codes), int32 accumulate.
__device__ __forceinline__ void mma_u8s8(int d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* smem_ptr) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

// cp.async with zero fill: src_bytes = 0 writes zeros (used for the K tail of a k-tile).
__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gptr, int src_bytes) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gptr),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async4(void* smem_ptr, const void* gptr, int src_bytes) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
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

// =============================================================================================
// 1. Activation kernel
// =============================================================================================
// One block = TM (16, or 8 for small M) tokens x all of K, 8 warps. Phases:
//   B (branch + absmax): the block streams x[16 x K], down[64 ranks x K] and inv_smooth
//     through shared memory in k-chunks of 64 (4-stage cp.async pipeline, 16-byte copies, rows
//     beyond M or the rank zero-filled). Warp w owns the rank n8 tiles 2w, 2w+1 over the whole
//     K, so its fp32 sums need no cross-warp reduction (deterministic, no atomics); fragments
//     come from the swizzled tiles through ldmatrix. Meanwhile thread i keeps the running max
//     of |x * inv_smooth| over row i/16, columns 4*(i%16)..+3 of every chunk. Ranks beyond 64
//     take further passes over x (LoRA-extended branches only; the re-reads mostly hit L2).
//     Small blocks on purpose: ncu showed the 32-token version latency-bound at ~1 block and
//     9 warps per SM (65 us for 4608 x 3072, DRAM 10% busy). It is still issue-bound at ~2
//     blocks per SM (47 us against a 10 us memory floor): bench/NOTES.md has the next steps.
//   C (quantize): warp w quantizes rows w, w+8: 16-byte loads (the re-read of the block's rows
//     hits L2), code = rint(xs / scale) exactly as the IEEE quotient would round (see
//     quantize8), stored in the permuted order P(j); the code sum comes from a warp reduction.
// TM = tokens per block: 16 (one full m16 tile) or 8 (rows 8..15 of the m16 tile are zeros:
// the wasted MMA work is negligible, and twice the blocks hide more latency). Launcher variant
// 0 = 16, 1 = 8; bench/linear.py times both.
constexpr int ACT_WARPS = 8;
constexpr int ACT_THREADS = ACT_WARPS * 32;
constexpr int ACT_RCHUNK = 64;
constexpr int ACT_KC = 64;                     // k per chunk: 128-byte rows of 16-bit values
constexpr int ACT_STAGES = 4;
constexpr int ACT_XB = 16 * ACT_KC * 2;        // 2 KB of x per stage (16 rows, always)
constexpr int ACT_DB = ACT_RCHUNK * ACT_KC * 2;  // 8 KB of down per stage
constexpr int ACT_STAGE = ACT_XB + ACT_DB + ACT_KC * 4;  // + inv_smooth chunk

// rint(xs / scale) as IEEE division then round-half-even would give, without dividing in the
// common case: q0 = xs * (1/scale) is within 2^-22 |q| of the correctly rounded quotient, so
// rint(q0) is the same integer unless q0 lies within that distance of a half-integer. A group
// of 8 values with such a value anywhere (rare on real data) is redone with __fdiv_rn; one
// branch per 8 values keeps the common path short. The test is 4x wider than the error bound.
// scale == 0 (an all-zero token) gives rcp = 0, q0 = 0, codes 0, and never the slow path.
__device__ __forceinline__ void quantize8x8(const float xs[8], float scale, float rcp, int c[8]) {
  float r[8];
  bool hazard = false;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float q0 = __fmul_rn(xs[e], rcp);
    r[e] = rintf(q0);
    hazard |= fabsf(fabsf(q0 - r[e]) - 0.5f) <= fabsf(q0) * 9.5367431640625e-7f;  // 2^-20 |q0|
  }
  if (hazard) {
#pragma unroll
    for (int e = 0; e < 8; ++e) r[e] = rintf(__fdiv_rn(xs[e], scale));
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) c[e] = max(-127, min(127, (int)r[e]));
}

template <typename T, int TM>
__global__ void __launch_bounds__(ACT_THREADS)
act_kernel(const T* __restrict__ x, const float* __restrict__ inv_smooth, const T* __restrict__ down,
           const float* __restrict__ rank_scale, int M, int K, int R, int8_t* __restrict__ codes,
           float* __restrict__ sx, int* __restrict__ sumq, T* __restrict__ act) {
  __shared__ __align__(128) uint8_t sm[ACT_STAGES * ACT_STAGE];
  __shared__ float amax_s[16];
  static_assert(TM == 8 || TM == 16, "TM is 8 or 16");
  constexpr int EPT = TM / 4;        // absmax: elements per thread and chunk (TM*64 / 256)
  constexpr int LPR = ACT_KC / EPT;  // lanes per row

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int t0 = blockIdx.x * TM;
  const int KCH = K / ACT_KC;
  // The loop below is issue-bound at low occupancy (bench/NOTES.md, runs 5-7), so every copy's
  // source pointer, destination and size are computed once, outside it; a chunk adds kb.
  const int xrow = tid / 8, xch = tid % 8;
  const bool xok = t0 + xrow < M;
  const T* xsrc = x + (size_t)(xok ? t0 + xrow : 0) * K + xch * 8;
  const int xdst = xrow * 128 + ((xch ^ (xrow & 7)) * 16);
  const int ntp = warp;                        // this warp's pair of rank n8 tiles
  const int arow = tid / LPR, acol = (tid % LPR) * EPT;  // absmax: EPT consecutive k of a row
  float am = 0.f;
  if constexpr (TM < 16) {  // rows TM..15 of every stage's x tile stay zero (never copied to)
    const int row = TM + tid / 8 % (16 - TM), ch = tid % 8, st = tid / (8 * (16 - TM));
    if (st < ACT_STAGES)
      *reinterpret_cast<uint4*>(sm + st * ACT_STAGE + row * 128 + ch * 16) = make_uint4(0, 0, 0, 0);
  }

  const int nchunks = R == 0 ? 1 : (R + ACT_RCHUNK - 1) / ACT_RCHUNK;
  for (int rc = 0; rc < nchunks; ++rc) {
    const int r0 = rc * ACT_RCHUNK;
    const int rcount = min(ACT_RCHUNK, R - r0);  // ranks in this chunk (0 when R == 0)
    const bool do_mma = ntp * 16 < rcount;       // R is a multiple of 16: both n8 tiles valid
    // down: 64 rows x 8 chunks of 16 bytes, two copies per thread; only rows < rcount exist
    const T* dsrc[2];
    int ddst[2];
    bool dok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * ACT_THREADS, row = c / 8, ch = c % 8;
      dok[i] = row < rcount;
      dsrc[i] = down + (size_t)(dok[i] ? r0 + row : 0) * K + ch * 8;
      ddst[i] = ACT_XB + row * 128 + ((ch ^ (row & 7)) * 16);
    }
    auto load = [&](int stage, int kc) {
      uint8_t* s = sm + stage * ACT_STAGE;
      const int kb = kc * ACT_KC;
      if (tid < TM * 8) cp_async16(s + xdst, xsrc + kb, xok ? 16 : 0);  // x: TM rows
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (dok[i]) cp_async16(s + ddst[i], dsrc[i] + kb, 16);
      if (rc == 0 && tid < ACT_KC / 4)  // inv_smooth for the absmax: 16 copies
        cp_async16(s + ACT_XB + ACT_DB + tid * 16, inv_smooth + kb + tid * 4, 16);
    };
    float acc[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

#pragma unroll
    for (int st = 0; st < ACT_STAGES - 1; ++st) {
      if (st < KCH) load(st, st);
      cp_async_commit();
    }
    for (int kc = 0; kc < KCH; ++kc) {
      cp_async_wait<ACT_STAGES - 2>();
      __syncthreads();
      if (kc + ACT_STAGES - 1 < KCH) load((kc + ACT_STAGES - 1) % ACT_STAGES, kc + ACT_STAGES - 1);
      cp_async_commit();
      const uint8_t* s = sm + (kc % ACT_STAGES) * ACT_STAGE;
      if (rc == 0) {
        // xs = x * inv_smooth in fp32, as the reference; rows past M were zero-filled
        const T* pv = reinterpret_cast<const T*>(
            s + arow * 128 + (((acol / 8) ^ (arow & 7)) * 16) + (acol % 8) * 2);
        const float* ps = reinterpret_cast<const float*>(s + ACT_XB + ACT_DB) + acol;
#pragma unroll
        for (int e = 0; e < EPT; ++e) am = fmaxf(am, fabsf(__fmul_rn(F16<T>::to_f(pv[e]), ps[e])));
      }
      if (do_mma) {
#pragma unroll
        for (int k16 = 0; k16 < ACT_KC / 16; ++k16) {
          uint32_t a[4], b[4];
          {
            const int row = lane % 16, ch = 2 * k16 + lane / 16;
            ldmatrix_x4(a[0], a[1], a[2], a[3], s + row * 128 + ((ch ^ (row & 7)) * 16));
          }
          {
            const int row = ntp * 16 + (lane / 16) * 8 + (lane % 8), ch = 2 * k16 + ((lane / 8) & 1);
            ldmatrix_x4(b[0], b[1], b[2], b[3], s + ACT_XB + row * 128 + ((ch ^ (row & 7)) * 16));
          }
          mma16816<T>(acc[0], a, b);
          mma16816<T>(acc[1], a, b + 2);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next rank chunk refills the stages
    if (do_mma) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = r0 + ntp * 16 + j * 8 + 2 * tq;
        const float rs0 = rank_scale[r], rs1 = rank_scale[r + 1];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int t = t0 + g + 8 * hh;
          if (t < M && g + 8 * hh < TM) {
            T pr[2] = {F16<T>::from_f(__fmul_rn(acc[j][2 * hh], rs0)),
                       F16<T>::from_f(__fmul_rn(acc[j][2 * hh + 1], rs1))};
            *reinterpret_cast<uint32_t*>(act + (size_t)t * R + r) = *reinterpret_cast<uint32_t*>(pr);
          }
        }
      }
    }
  }

  // per-token absmax: LPR consecutive lanes share a row
#pragma unroll
  for (int o = 1; o < LPR; o <<= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
  if (tid % LPR == 0) {
    const float scale = __fdiv_rn(am, 127.f);
    amax_s[arow] = scale;
    if (t0 + arow < M) sx[t0 + arow] = scale;
  }
  __syncthreads();

  // phase C: quantize, one warp per row (rows warp, warp + 8)
  for (int row = warp; row < TM; row += ACT_WARPS) {
    const int t = t0 + row;
    if (t >= M) break;
    const float scale = amax_s[row];
    const float rcp = scale > 0.f ? 1.f / scale : 0.f;  // any rounding: see quantize8x8
    const T* xr = x + (size_t)t * K;
    int8_t* cr = codes + (size_t)t * K;
    int sum = 0;
#pragma unroll 8
    for (int q = lane; q < K / 8; q += 32) {
      const int j0 = q * 8;
      const uint4 v = *reinterpret_cast<const uint4*>(xr + j0);
      const float4 s0 = *reinterpret_cast<const float4*>(inv_smooth + j0);
      const float4 s1 = *reinterpret_cast<const float4*>(inv_smooth + j0 + 4);
      const T* pv = reinterpret_cast<const T*>(&v);
      const float smv[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
      float xs[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) xs[e] = __fmul_rn(F16<T>::to_f(pv[e]), smv[e]);
      int c[8];
      quantize8x8(xs, scale, rcp, c);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += c[e];
      // natural j0..j0+7 share (tq, s); even e -> half 0 at byte e/2, odd e -> half 1.
      const int jj = j0 & 63, base = j0 - jj;
      const int tqq = jj / 16, s = (jj / 8) & 1;
      const uint32_t lo = (uint32_t)(c[0] & 0xff) | ((uint32_t)(c[2] & 0xff) << 8) |
                          ((uint32_t)(c[4] & 0xff) << 16) | ((uint32_t)(c[6] & 0xff) << 24);
      const uint32_t hi = (uint32_t)(c[1] & 0xff) | ((uint32_t)(c[3] & 0xff) << 8) |
                          ((uint32_t)(c[5] & 0xff) << 16) | ((uint32_t)(c[7] & 0xff) << 24);
      *reinterpret_cast<uint32_t*>(cr + base + 32 * s + 4 * tqq) = lo;
      *reinterpret_cast<uint32_t*>(cr + base + 32 * s + 16 + 4 * tqq) = hi;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) sumq[t] = sum;
  }
}

// =============================================================================================
// 2. GEMM kernel
// =============================================================================================
// CTA tile: BN = 128 output channels x BT = 128 tokens, k-tile BK = 128 (two k64 groups),
// 8 warps as 4 (channels, 32 each) x 2 (tokens, 64 each); a warp owns 2 m16 x 8 n8 MMA tiles,
// 64 int32 accumulators per lane. STAGES-deep cp.async pipeline; shared memory per stage:
//
//   [0, 16384)      activation codes [BT tokens][BK bytes]. Each 128-byte row is 8 chunks of 16
//                   bytes; chunk c of token row r is stored at chunk (c ^ (r & 7)) so that the
//                   8 rows one ldmatrix phase reads fall in 8 different bank groups.
//   [16384, 24576)  packed weights [2 groups][BN rows][32 bytes]: one k64 group of a row is 32
//                   contiguous bytes, so the LDS.64 of a half-warp (rows g..g+3, 8 bytes at 8tq)
//                   covers 128 contiguous bytes: no bank conflict.
//   [24576, 24832)  multipliers [2 groups][BN rows] int8.
//
// Per k64 group a warp does, per m16 tile: 2 LDS.64 (rows g, g+8), 4 words -> 8 A registers by
// 4 LOP + 2 IMAD per word; per k32 step: 4 ldmatrix.x4 (8 n8 tiles) and 16 MMAs. About 1.6
// non-MMA instructions per MMA, against ~7 issue slots per int8 MMA at the measured rate.
constexpr int BN = 128, BT = 128, BK = 128, STAGES = 4, GEMM_THREADS = 256;
constexpr int SM_ACT = 0, SM_W = BT * BK, SM_MULT = SM_W + 2 * BN * 32;
constexpr int STAGE_BYTES = SM_MULT + 2 * BN;  // 24832
constexpr int GEMM_SMEM = STAGES * STAGE_BYTES;  // 99328, under the 99 KB of sm_86/sm_89
constexpr int OUT_STRIDE = BN + 8;  // epilogue staging row (16-bit elements), padded by 16 bytes
static_assert(BT * OUT_STRIDE * 2 <= GEMM_SMEM, "epilogue staging must fit the pipeline smem");

// Register budget: 2 CTAs per SM (128 registers, 16 warps). One CTA per SM with up to 255
// registers (the compiler then batches ldmatrix ahead of the MMAs) measured 10% slower on the
// H200 (bench/NOTES.md, run 3).
// STAGGER: CTAs start their k loop at different k-tiles (wrapping around), so that the CTAs in
// flight do not read the same activation / weight lines at the same moment. Integer
// accumulation is exact, so the result is bitwise the same either way. bench/linear.py times
// both (variants 0 and 1).
template <typename T, bool STAGGER>
__global__ void __launch_bounds__(GEMM_THREADS, 2)
gemm_kernel(const int8_t* __restrict__ codes, const float* __restrict__ sx,
            const int* __restrict__ sumq, const uint8_t* __restrict__ qweight,
            const int8_t* __restrict__ multT, const float* __restrict__ row_scale,
            const T* __restrict__ act, const T* __restrict__ up, int R,
            const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int wn = warp % 4, wt = warp / 4;
  const int n0 = blockIdx.x * BN, tk0 = blockIdx.y * BT;
  const int G = K / 64, KT = (K + BK - 1) / BK;

  // ---- producer: one k-tile into one stage (all threads) ----
  auto load_stage = [&](int stage, int kt) {
    uint8_t* s = smem + stage * STAGE_BYTES;
    if (STAGGER) kt = (kt + blockIdx.x + 3 * blockIdx.y) % KT;
    const int kbase = kt * BK;
#pragma unroll
    for (int i = 0; i < (BT * BK / 16) / GEMM_THREADS; ++i) {  // 4 chunks of activations
      const int c = tid + i * GEMM_THREADS, row = c / 8, ch = c % 8;
      const int kk = kbase + ch * 16;
      const bool ok = kk < K;
      // tokens past M read row M-1 (valid memory); their outputs are never stored
      const int8_t* src = codes + (size_t)min(tk0 + row, M - 1) * K + (ok ? kk : 0);
      cp_async16(s + SM_ACT + row * BK + ((ch ^ (row & 7)) * 16), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < (2 * BN * 2) / GEMM_THREADS; ++i) {  // 2 chunks of weights
      const int c = tid + i * GEMM_THREADS, grp = c / (2 * BN), rem = c % (2 * BN);
      const int row = rem / 2, h = rem % 2, kg = kt * 2 + grp;
      const bool ok = kg < G;  // K % 128 == 64: the second group of the last tile is zero-filled
      const uint8_t* src = qweight + (size_t)min(n0 + row, N - 1) * (K / 2) + (ok ? kg * 32 + h * 16 : 0);
      cp_async16(s + SM_W + grp * BN * 32 + row * 32 + h * 16, src, ok ? 16 : 0);
    }
    if (tid < 2 * BN / 4) {  // multipliers, 4 rows per thread (N % 8 == 0 keeps them aligned)
      const int grp = tid / (BN / 4), row = (tid % (BN / 4)) * 4, kg = kt * 2 + grp;
      const bool ok = kg < G && n0 + row < N;
      const int8_t* src = ok ? multT + (size_t)kg * N + n0 + row : multT;
      cp_async4(s + SM_MULT + grp * BN + row, src, ok ? 4 : 0);
    }
  };

  int acc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0;

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < KT) load_stage(st, st);
    cp_async_commit();  // always commit, so that group counting stays uniform
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // k-tile kt has landed for everyone, and stage (kt-1)%S is free again
    if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();

    const uint8_t* s = smem + (kt % STAGES) * STAGE_BYTES;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      // group multipliers of this lane's 4 rows, and the additive constant (128 - 8m) per byte
      uint32_t m[2][2], C[2][2];
      uint2 wv[2][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = wn * 32 + mt * 16 + g + 8 * hh;
          m[mt][hh] = (uint32_t)(uint8_t)s[SM_MULT + c * BN + row];
          C[mt][hh] = 0x80808080u - m[mt][hh] * 0x08080808u;
          wv[mt][hh] = *reinterpret_cast<const uint2*>(s + SM_W + c * BN * 32 + row * 32 + 8 * tq);
        }
#pragma unroll
      for (int st = 0; st < 2; ++st) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const uint32_t w0 = (st ? wv[mt][0].y : wv[mt][0].x) ^ 0x88888888u;
          const uint32_t w1 = (st ? wv[mt][1].y : wv[mt][1].x) ^ 0x88888888u;
          a[mt][0] = (w0 & 0x0F0F0F0Fu) * m[mt][0] + C[mt][0];
          a[mt][2] = ((w0 >> 4) & 0x0F0F0F0Fu) * m[mt][0] + C[mt][0];
          a[mt][1] = (w1 & 0x0F0F0F0Fu) * m[mt][1] + C[mt][1];
          a[mt][3] = ((w1 >> 4) & 0x0F0F0F0Fu) * m[mt][1] + C[mt][1];
        }
        uint32_t b[8][2];
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          const int row = wt * 64 + np * 16 + (lane / 16) * 8 + (lane % 8);
          const int ch = 4 * c + 2 * st + ((lane / 8) & 1);
          ldmatrix_x4(b[2 * np][0], b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1],
                      s + SM_ACT + row * BK + ((ch ^ (row & 7)) * 16));
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) mma_u8s8(acc[mt][nt], a[mt], b[nt]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline smem is reused below for the output tile

  // ---- epilogue: dequantize, + low-rank branch, + bias, one 16-bit store ----
  // y = float(acc - 128*sumq) * (sx * row_scale): the same two fp32 roundings as the reference
  // (explicit _rn intrinsics keep the compiler from contracting them into an FMA).
  float rs[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) rs[mt][hh] = row_scale[min(n0 + wn * 32 + mt * 16 + g + 8 * hh, N - 1)];
  float f[2][8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int t = min(tk0 + wt * 64 + nt * 8 + 2 * tq + e, M - 1);
      const float sxv = sx[t];
      const int off = sumq[t] * 128;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          f[mt][nt][hh * 2 + e] =
              __fmul_rn(__int2float_rn(acc[mt][nt][hh * 2 + e] - off), __fmul_rn(sxv, rs[mt][hh]));
    }
  // low-rank up: A = up [n, r] (row-major = m16n8k16 "row" A), B = act [t, r] ("col" B);
  // accumulates into the dequantized result (same C layout as the int8 MMA).
  for (int r = 0; r < R; r += 16) {
    uint32_t ua[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const T* pA = up + (size_t)min(n0 + wn * 32 + mt * 16 + g, N - 1) * R + r + 2 * tq;
      const T* pB = up + (size_t)min(n0 + wn * 32 + mt * 16 + g + 8, N - 1) * R + r + 2 * tq;
      ua[mt][0] = ld32(pA);
      ua[mt][1] = ld32(pB);
      ua[mt][2] = ld32(pA + 8);
      ua[mt][3] = ld32(pB + 8);
    }
    uint32_t ab[8][2];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const T* p = act + (size_t)min(tk0 + wt * 64 + nt * 8 + g, M - 1) * R + r + 2 * tq;
      ab[nt][0] = ld32(p);
      ab[nt][1] = ld32(p + 8);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mma16816<T>(f[mt][nt], ua[mt], ab[nt]);
  }
  T* so = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int nl = wn * 32 + mt * 16 + g + 8 * hh;
      const float bv = bias ? F16<T>::to_f(bias[min(n0 + nl, N - 1)]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tl = wt * 64 + nt * 8 + 2 * tq + e;
          float v = f[mt][nt][hh * 2 + e];
          if (bias) v = __fadd_rn(v, bv);
          so[tl * OUT_STRIDE + nl] = F16<T>::from_f(v);
        }
    }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < (BT * BN / 8) / GEMM_THREADS; ++i) {
    const int c = tid + i * GEMM_THREADS, row = c / (BN / 8), ch = c % (BN / 8);
    const int t = tk0 + row, n = n0 + ch * 8;
    if (t < M && n < N)  // N % 8 == 0: a chunk is all in or all out
      *reinterpret_cast<uint4*>(y + (size_t)t * N + n) =
          *reinterpret_cast<const uint4*>(so + row * OUT_STRIDE + ch * 8);
  }
}

}  // namespace svdq

// =============================================================================================
// Host launchers (no torch): the binding validates shapes; these return a cudaError_t.
// =============================================================================================
template <typename T, int TM>
static void launch_act(const void* x, int M, int K, const float* inv_smooth, const void* down,
                       const float* rank_scale, int R, int8_t* codes, float* sx, int* sumq,
                       void* act, cudaStream_t stream) {
  svdq::act_kernel<T, TM><<<(M + TM - 1) / TM, svdq::ACT_THREADS, 0, stream>>>(
      (const T*)x, inv_smooth, (const T*)down, rank_scale, M, K, R, codes, sx, sumq, (T*)act);
}

int svdq_w4a8_act(const void* x, bool fp16, int M, int K, const float* inv_smooth, const void* down,
                  const float* rank_scale, int R, int8_t* codes, float* sx, int* sumq, void* act,
                  int variant, cudaStream_t stream) {
  if (M == 0) return 0;
#define SVDQ_ACT(TT, TM) \
  launch_act<TT, TM>(x, M, K, inv_smooth, down, rank_scale, R, codes, sx, sumq, act, stream)
  if (fp16) {
    if (variant == 1) SVDQ_ACT(__half, 8); else SVDQ_ACT(__half, 16);
  } else {
    if (variant == 1) SVDQ_ACT(__nv_bfloat16, 8); else SVDQ_ACT(__nv_bfloat16, 16);
  }
#undef SVDQ_ACT
  return (int)cudaGetLastError();
}

template <typename T, bool STAGGER>
static int launch_gemm(const int8_t* codes, const float* sx, const int* sumq,
                       const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                       const void* act, const void* up, int R, const void* bias, void* y, int M,
                       int N, int K, cudaStream_t stream) {
  // the attribute is per function and device; setting it every call is cheap and avoids a
  // per-device cache
  cudaError_t e = cudaFuncSetAttribute(svdq::gemm_kernel<T, STAGGER>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, svdq::GEMM_SMEM);
  if (e != cudaSuccess) return (int)e;
  dim3 grid((N + svdq::BN - 1) / svdq::BN, (M + svdq::BT - 1) / svdq::BT);
  svdq::gemm_kernel<T, STAGGER><<<grid, svdq::GEMM_THREADS, svdq::GEMM_SMEM, stream>>>(
      codes, sx, sumq, qweight, multT, row_scale, (const T*)act, (const T*)up, R, (const T*)bias,
      (T*)y, M, N, K);
  return (int)cudaGetLastError();
}

int svdq_w4a8_gemm(const int8_t* codes, const float* sx, const int* sumq, const uint8_t* qweight,
                   const int8_t* multT, const float* row_scale, const void* act, const void* up,
                   int R, const void* bias, void* y, int M, int N, int K, bool fp16,
                   int variant, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
#define SVDQ_LAUNCH(TT, MB) \
  launch_gemm<TT, MB>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias, y, M, N, K, stream)
  if (fp16) return variant == 1 ? SVDQ_LAUNCH(__half, true) : SVDQ_LAUNCH(__half, false);
  return variant == 1 ? SVDQ_LAUNCH(__nv_bfloat16, true) : SVDQ_LAUNCH(__nv_bfloat16, false);
#undef SVDQ_LAUNCH
}
