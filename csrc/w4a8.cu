// SVDQuant W4A8 kernels: 4-bit weights x int8 activations on the INT8 tensor cores (sm_80+),
// with the 16-bit low-rank branch fused into both kernels.
//
// Two stages per linear layer:
//   1. svdq_w4a8_act   computes the low-rank activation (x . down^T) * rank_scale in fp32 on
//                      16-bit tensor cores and quantizes x * inv_smooth per token to int8
//                      (svdq/quant.py quantize_act, exactly): act_kernel (one launch; x read
//                      from DRAM once and re-read from L2), or act_stats_kernel +
//                      act_quant_kernel where act_kernel's blocks fill the GPU badly (1b).
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

#include <algorithm>
#include <cfloat>
#include <type_traits>

#include "common.cuh"
#include "launch.cuh"

namespace svdq {

// =============================================================================================
// 1. Activation kernel
// =============================================================================================
// One block = TM (16, or 8 for small M) tokens x all of K, 8 warps. Phases:
//   B (branch + absmax), straight from global memory into registers: no shared-memory
//     staging, no barrier in the loop. Warp w takes the k-slices [32j, 32j + 32) with j = w mod
//     8 and computes x . down^T for its slices on the 16-bit tensor cores (m16n8k16: ranks = M
//     side, tokens = N side, fp32; branch_loop says why and how `down`'s branch layout makes
//     every fragment one 16-byte load, with no shuffles and no register moves). The same x
//     values give the running max of |x * inv_smooth| for the two rows. Ranks go 64 (4 m16
//     tiles) per pass; more than 64 (LoRA-extended branches) take further passes, which re-read
//     x from L2. The eight warps' partial sums meet in shared memory and are added in warp order
//     (deterministic, no atomics), then scaled by rank_scale and rounded once to T.
//   C (quantize): warp w quantizes rows w and w+8 together, ACT_CB chunks of 8 values per row in
//     flight (the re-read of the block's rows hits L2 unless K is large), code = rint(xs * rcp)
//     with rcp = RN(1/scale) (quantize_chunk), stored in the permuted order P(j); the code sum
//     comes from a warp reduction.
// What bounds it (bench/NOTES.md, session 5, ncu): not bandwidth but the latency of each warp's
// chain of dependent loads and, at full occupancy, instruction issue (0.38 issued per scheduler
// and cycle); phase C was 65% of the instructions and 58% of the stall samples until it batched
// its loads and dropped the division-exact rounding (47 -> 35 us for 4608 x 3072, rank 32).
// TM = tokens per block: 16 (two n8 token tiles) or 8 (one: twice the blocks for small M).
// Launcher variant 0 = 16, 1 = 8.
constexpr int ACT_WARPS = 8;
constexpr int ACT_THREADS = ACT_WARPS * 32;
constexpr int ACT_RCHUNK = 64;   // ranks per pass: 4 m16 tiles x 2 token tiles, 32 fp32 per lane
constexpr int ACT_CB = 4;        // phase C: chunks of 8 values per lane and row in flight
// Two blocks per SM, which the backend's wave count assumes (act_variant_for). Unbounded, ptxas
// gives the fp16 16-token kernel 140 registers on sm_90a (one block per SM); bf16 takes 128
// unbounded and spills when bounded, so only fp16 carries the bound. 0 = no minimum, as if
// unbounded (an explicit 1 is not: ptxas then takes 168 registers for bf16).
template <typename T> constexpr int ACT_MIN_BLOCKS = std::is_same<T, __half>::value ? 2 : 0;

// Phase C's quantizer for one 8-value chunk: code = rint(xs * rcp), rcp = RN(1/scale), exactly
// as quant.quantize_act (svdq/quant.py). Adding 1.5 * 2^23 rounds to the nearest integer, ties to
// even (|q| < 2^22), and leaves that integer in the low mantissa bits, so its low byte is the
// int8 code: one FADD per value instead of rint, a convert and a clamp. |xs| <= amax, so
// |q| <= 127 (1 + 2^-23)^3 < 127.5 and no clamp is needed for finite input. __fmul_rn / __fadd_rn
// keep the compiler from fusing the two roundings into an FMA. Natural values j0..j0+7 share
// (tq, s) of P(j): the even ones go to the low-nibble word, the odd ones to the high-nibble word.
template <typename T>
__device__ __forceinline__ void quantize_chunk(uint4 v, float4 s0, float4 s1, float rcp,
                                               uint32_t& lo, uint32_t& hi, int& sum) {
  const T* p = reinterpret_cast<const T*>(&v);
  const float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
  uint32_t b[8];
#pragma unroll
  for (int e = 0; e < 8; ++e)
    b[e] = __float_as_uint(__fadd_rn(__fmul_rn(__fmul_rn(F16<T>::to_f(p[e]), s[e]), rcp), 12582912.f));
  lo = __byte_perm(__byte_perm(b[0], b[2], 0x0040), __byte_perm(b[4], b[6], 0x0040), 0x5410);
  hi = __byte_perm(__byte_perm(b[1], b[3], 0x0040), __byte_perm(b[5], b[7], 0x0040), 0x5410);
  sum = __dp4a((int)lo, 0x01010101, __dp4a((int)hi, 0x01010101, sum));
}

__device__ __forceinline__ uint4 ld128(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// The maximum that keeps a NaN (PTX max.NaN, sm_80+; fmaxf drops it), for every per-token
// absmax below: a token holding NaN or inf gets a NaN or inf scale, so its whole output row is
// non-finite, as in the reference (torch's amax) and the 16-bit layer, instead of finite values
// from codes of the finite rest. Same cost as fmaxf (one FMNMX).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// max |x_e * s_e| over the 8 values of v (x.dtype) and s (fp32), fp32 products as the reference
template <typename T>
__device__ __forceinline__ float absmax8(uint4 v, float4 s0, float4 s1, float am) {
  const T* p = reinterpret_cast<const T*>(&v);
  const float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
  for (int e = 0; e < 8; ++e) am = max_nan(am, fabsf(__fmul_rn(F16<T>::to_f(p[e]), s[e])));
  return am;
}

// Phase B over this warp's k-slices kb0, kb0 + step, ... < kend: x . down^T on m16n8k16 with
// the ranks as M and the tokens as N, so that neither operand is rebuilt in registers:
//   B (tokens): lane (g, tq) loads 16 bytes of its token row, k = kb + 8tq .. +7, and uses the
//     4 words as they arrive: {w0, w1} for k16 step 0, {w2, w3} for step 1 (k-column 2tq of a
//     step is word 2s, column 2tq + 8 word 2s + 1: the order of k inside an MMA is free as long
//     as A and B agree).
//   A (ranks): `down` comes in the branch layout (docs/kernels.md, svdq/backends/cuda.py
//     branch_down_layout): rank rows g and g + 8 of each 16-rank tile interleaved word by word,
//     so one 16-byte load at dp + 2kb is the A fragment of step 0 ({row g, row g+8} x words 0, 1
//     of the lane's 8 k) and the next 16 bytes that of step 1.
// With x as the A side, the fragments pairing token rows g and g + 8 cost ~800 K register moves
// per 4608 x 3072 call (a fifth of act_stats_kernel's instructions; run 106); without them the
// split pair is 5-7% faster at rank 32 (run 133). xr[j] is lane g's token row of n8
// token tile j (tiles past HI's are zeros, never loaded); am[j] its running max of
// |x * inv_smooth|; acc[NJ * rt + j] the sums of rank tile rt (ranks 16rt + g, + 8) x tile j
// (tokens 8j + 2tq, + 1). act_kernel (2 token tiles, through branch_slices) and
// act_stats_kernel (4) run it.
template <typename T, int RT, int NJ, bool HI, int NA>
__device__ __forceinline__ void branch_loop(const T* const* xr, const float* __restrict__ inv_smooth,
                                            const T* dp, int kb0, int kend, int step, int K,
                                            int tq, bool amax, float* am, float (*acc)[4]) {
  static_assert(RT * NJ <= NA, "accumulators for every rank tile x token tile");
#pragma unroll 2
  for (int kb = kb0; kb < kend; kb += step) {
    uint4 v[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) v[j] = (HI || j % 2 == 0) ? ld128(xr[j] + kb) : make_uint4(0, 0, 0, 0);
    uint4 d[RT > 0 ? RT : 1][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      d[rt][0] = ld128(dp + (size_t)rt * 16 * K + 2 * kb);
      d[rt][1] = ld128(dp + (size_t)rt * 16 * K + 2 * kb + 8);
    }
    if (amax) {
      const float4 s0 = *reinterpret_cast<const float4*>(inv_smooth + kb + 8 * tq);
      const float4 s1 = *reinterpret_cast<const float4*>(inv_smooth + kb + 8 * tq + 4);
#pragma unroll
      for (int j = 0; j < NJ; ++j)
        if (HI || j % 2 == 0) am[j] = absmax8<T>(v[j], s0, s1, am[j]);
    }
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const uint32_t a0[4] = {d[rt][0].x, d[rt][0].y, d[rt][0].z, d[rt][0].w};
      const uint32_t a1[4] = {d[rt][1].x, d[rt][1].y, d[rt][1].z, d[rt][1].w};
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        if (!HI && j % 2 == 1) continue;
        const uint32_t b0[2] = {v[j].x, v[j].y}, b1[2] = {v[j].z, v[j].w};
        mma16816<T>(acc[NJ * rt + j], a0, b0);
        mma16816<T>(acc[NJ * rt + j], a1, b1);
      }
    }
  }
}

// act_kernel's phase B: token rows g and g+8 (n8 token tiles 0 and 1; tile 1 zeros and never
// loaded when !HI), k-slices j = warp mod ACT_WARPS, RT rank tiles of 16
template <typename T, int RT, bool HI>
__device__ __forceinline__ void branch_slices(const T* xlo, const T* xhi,
                                              const float* __restrict__ inv_smooth, const T* dp,
                                              int K, int warp, int tq, bool amax, float& am_lo,
                                              float& am_hi, float (&acc)[8][4]) {
  const T* const xr[2] = {xlo, xhi};
  float am[2] = {am_lo, am_hi};
  branch_loop<T, RT, 2, HI, 8>(xr, inv_smooth, dp, warp * 32, K, ACT_WARPS * 32, K, tq, amax, am,
                               acc);
  am_lo = am[0];
  am_hi = am[1];
}

// Phase C for one warp: rows a and b (when HAS_B) of x quantized with their reciprocal scales
// into the permuted codes, lane q taking the 8-value chunks q, q + 32, ... Each lane issues
// ACT_CB chunks per row before using any; the loads are unconditional (indices past K/8 re-read
// the last chunk, a row b that is not stored re-reads a valid row) and no branch separates
// them, so they overlap instead of costing one L2 round trip per chunk. sum_a, sum_b: the rows'
// code sums, reduced over the warp. act_kernel and act_quant_kernel both quantize here.
template <typename T, bool HAS_B>
__device__ __forceinline__ void quantize_rows(const T* __restrict__ xa, const T* __restrict__ xb,
                                              int8_t* __restrict__ ca, int8_t* __restrict__ cb,
                                              bool store_b, const float* __restrict__ inv_smooth,
                                              float rcp_a, float rcp_b, int K, int lane,
                                              int& sum_a, int& sum_b) {
  sum_a = 0;
  sum_b = 0;
  const int nq = K / 8;
  for (int q0 = lane; q0 < nq; q0 += 32 * ACT_CB) {
    uint4 va[ACT_CB], vb[ACT_CB];
    float4 s0[ACT_CB], s1[ACT_CB];
#pragma unroll
    for (int c = 0; c < ACT_CB; ++c) {
      const int j0 = min(q0 + 32 * c, nq - 1) * 8;
      va[c] = ld128(xa + j0);
      if (HAS_B) vb[c] = ld128(xb + j0);
      s0[c] = *reinterpret_cast<const float4*>(inv_smooth + j0);
      s1[c] = *reinterpret_cast<const float4*>(inv_smooth + j0 + 4);
    }
#pragma unroll
    for (int c = 0; c < ACT_CB; ++c) {
      const int q = q0 + 32 * c;
      const bool valid = q < nq;
      const int j0 = min(q, nq - 1) * 8, jj = j0 & 63;
      const int off = j0 - jj + 32 * ((jj / 8) & 1) + 4 * (jj / 16);  // P(j0) of the low word
      uint32_t lo, hi;
      int part_sum = 0;
      quantize_chunk<T>(va[c], s0[c], s1[c], rcp_a, lo, hi, part_sum);
      if (valid) {
        *reinterpret_cast<uint32_t*>(ca + off) = lo;
        *reinterpret_cast<uint32_t*>(ca + off + 16) = hi;
        sum_a += part_sum;
      }
      if (HAS_B) {
        part_sum = 0;
        quantize_chunk<T>(vb[c], s0[c], s1[c], rcp_b, lo, hi, part_sum);
        if (valid && store_b) {
          *reinterpret_cast<uint32_t*>(cb + off) = lo;
          *reinterpret_cast<uint32_t*>(cb + off + 16) = hi;
          sum_b += part_sum;
        }
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum_a += __shfl_xor_sync(0xffffffffu, sum_a, o);
    sum_b += __shfl_xor_sync(0xffffffffu, sum_b, o);
  }
}

template <typename T, int TM>
__global__ void __launch_bounds__(ACT_THREADS, ACT_MIN_BLOCKS<T>)
act_kernel(const T* __restrict__ x, const float* __restrict__ inv_smooth, const T* __restrict__ down,
           const float* __restrict__ rank_scale, int M, int K, int R, int8_t* __restrict__ codes,
           float* __restrict__ sx, int* __restrict__ sumq, T* __restrict__ act) {
  __shared__ float part[ACT_WARPS][16][ACT_RCHUNK + 1];  // per-warp branch sums (+1: banks)
  __shared__ float amax_w[ACT_WARPS][16];
  __shared__ float rcp_s[16];
  static_assert(TM == 8 || TM == 16, "TM is 8 or 16");

  // launched plainly as the layer's first kernel, so the wait returns at once; it keeps a PDL
  // launch safe. The trigger lets the next kernel of the layer start early (csrc/launch.cuh).
  griddep_wait();
  griddep_launch();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int t0 = blockIdx.x * TM;
  // token rows g and g+8 of the tile; rows past M read row M-1 (never stored), rows past TM
  // are zeros and never loaded
  const T* xlo = x + (size_t)min(t0 + g, M - 1) * K + 8 * tq;
  const T* xhi = x + (size_t)min(t0 + g + 8, M - 1) * K + 8 * tq;
  float am_lo = 0.f, am_hi = 0.f;

  const int npass = R == 0 ? 1 : (R + ACT_RCHUNK - 1) / ACT_RCHUNK;
  for (int pass = 0; pass < npass; ++pass) {
    const int r0 = pass * ACT_RCHUNK;
    const int ntiles = min(ACT_RCHUNK, R - r0) / 8;  // 0 when R == 0; even (R % 16 == 0)
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const T* dp = down + ((size_t)(r0 / 16) * 8 + g) * 2 * K + 16 * tq;  // the branch layout
    const bool amax = pass == 0;
    switch (ntiles / 2) {  // a loop per rank-tile count: its loads are unconditional and batch up
      case 0: branch_slices<T, 0, TM == 16>(xlo, xhi, inv_smooth, dp, K, warp, tq, amax, am_lo, am_hi, acc); break;
      case 1: branch_slices<T, 1, TM == 16>(xlo, xhi, inv_smooth, dp, K, warp, tq, amax, am_lo, am_hi, acc); break;
      case 2: branch_slices<T, 2, TM == 16>(xlo, xhi, inv_smooth, dp, K, warp, tq, amax, am_lo, am_hi, acc); break;
      case 3: branch_slices<T, 3, TM == 16>(xlo, xhi, inv_smooth, dp, K, warp, tq, amax, am_lo, am_hi, acc); break;
      default: branch_slices<T, 4, TM == 16>(xlo, xhi, inv_smooth, dp, K, warp, tq, amax, am_lo, am_hi, acc); break;
    }
    if (ntiles) {
      // C layout: acc[2rt + j][2h + e] = (rank 16rt + g + 8h, token 8j + 2tq + e)
#pragma unroll
      for (int rt = 0; rt < 4; ++rt)
#pragma unroll
        for (int j = 0; j < (TM == 16 ? 2 : 1); ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            part[warp][8 * j + 2 * tq + (e & 1)][16 * rt + g + 8 * (e / 2)] = acc[2 * rt + j][e];
      __syncthreads();
      for (int i = tid; i < TM * ntiles * 8; i += ACT_THREADS) {
        const int row = i / (ntiles * 8), r = i % (ntiles * 8);
        float s = part[0][row][r];
#pragma unroll
        for (int w = 1; w < ACT_WARPS; ++w) s = __fadd_rn(s, part[w][row][r]);
        if (t0 + row < M) act[(size_t)(t0 + row) * R + r0 + r] = F16<T>::from_f(__fmul_rn(s, rank_scale[r0 + r]));
      }
      __syncthreads();  // part is reused by the next pass
    }
  }

  // per-token absmax: the four lanes of a row, then the eight warps (max is order-free)
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    am_lo = max_nan(am_lo, __shfl_xor_sync(0xffffffffu, am_lo, o));
    am_hi = max_nan(am_hi, __shfl_xor_sync(0xffffffffu, am_hi, o));
  }
  if (tq == 0) {
    amax_w[warp][g] = am_lo;
    amax_w[warp][g + 8] = am_hi;
  }
  __syncthreads();
  if (tid < TM) {
    float am = amax_w[0][tid];
#pragma unroll
    for (int w = 1; w < ACT_WARPS; ++w) am = max_nan(am, amax_w[w][tid]);
    const float scale = __fdiv_rn(am, 127.f);
    rcp_s[tid] = fminf(__frcp_rn(scale), FLT_MAX);  // scale 0 (a zero token): codes 0
    if (t0 + tid < M) sx[t0 + tid] = scale;
  }
  __syncthreads();

  // phase C: warp w takes rows w and w + 8 together (one inv_smooth load serves both); rows
  // past M re-read row M-1 and are never stored
  const int ta = t0 + warp, tb = ta + 8;
  if (ta >= M) return;
  const bool store_b = TM == 16 && tb < M;
  int sum_a, sum_b;
  quantize_rows<T, TM == 16>(x + (size_t)ta * K, x + (size_t)min(tb, M - 1) * K,
                             codes + (size_t)ta * K, codes + (size_t)tb * K, store_b, inv_smooth,
                             rcp_s[warp], TM == 16 ? rcp_s[warp + 8] : 0.f, K, lane, sum_a,
                             sum_b);
  if (lane == 0) {
    sumq[ta] = sum_a;
    if (store_b) sumq[tb] = sum_b;
  }
}

// ---------------------------------------------------------------------------------------------
// 1b. The activation work split in two launches (launcher variant 2)
// ---------------------------------------------------------------------------------------------
// act_kernel's unit of work is a 16-token block over all of K, two blocks per SM. At 4608 tokens
// that is 288 blocks for 264 slots: a second wave of 24 blocks keeps 24 SMs busy for most of a
// block's time while the others idle (ncu run 37: the SMs active 36 K of 57 K cycles at
// K = 3072, 141 K of 227 K at K = 12288). The per-token scale needs the whole row, so a finer
// split along K needs the row's maxima before any code is written. Two launches:
//   act_stats_kernel  block = 32 tokens x one k-chunk (act_chunk: 1024 values and up): the
//                     chunk's |x * inv_smooth| maxima and its share of x . down^T, as fp32
//                     partials in global memory; many short blocks, no long last wave.
//   act_quant_kernel  warp = one token row: the row maxima from the chunk maxima (max is
//                     order-free: sx and the codes equal act_kernel's bit for bit), the branch
//                     activation from the chunk partials added in chunk order (deterministic;
//                     another fp32 order than act_kernel's, held to the same bound by the
//                     tests), then act_kernel's quantize loop. Blocks run in reverse token order:
//                     the rows act_stats_kernel read last are the likeliest still in L2.
// x is read twice from memory (act_kernel's second read mostly hits L2), so this wins only where
// act_kernel's blocks leave SMs idle: a last wave at most a quarter full, or, at K >= 6144, fewer
// blocks than two thirds of the SMs; the backend picks it then (svdq/backends/cuda.py,
// act_variant_for). Measured (bench/NOTES.md, session 8): at 4608 tokens, rank 32, 106 / 129 us
// against 129 / 158 us at K = 12288 / 15360, equal at K = 3072; at 8192 tokens (a full last
// wave) 13-44% slower.
// Loading x and `down` into registers, not through shared memory, is measured: persistent
// variants that stage them by cp.async or TMA and read fragments by ldmatrix were correct and
// 1.3-2.4x slower (bench/NOTES.md, runs 90-96; the cause not isolated); staging only `down`, once
// per 128 tokens, was no faster at rank 32 and slower at rank 0 (run 108).
// Workspace (fp32, the binding allocates it): amax_part [M][KC], branch_part [M][KC][R16].
constexpr int STATS_WARPS = 4;
constexpr int STATS_THREADS = STATS_WARPS * 32;
constexpr int STATS_MT = 2;                       // 16-token groups: each down load serves 32 tokens
constexpr int STATS_TOKENS = 16 * STATS_MT;
constexpr int STATS_RCHUNK = 32;                  // ranks per pass: 2 m16 x 4 n8 tiles, 32 acc.
static_assert(STATS_RCHUNK == 32, "act_stats_kernel's reduction takes a pass's ranks as lanes");
// Four blocks per SM: at 4608 tokens and K = 3072 the grid (432 blocks) is then one wave (0.82
// on 132 SMs, 0.84 on 128); at three per SM it takes 1.09 waves and the kernel ~1.45x as long
// (run 107, 141 registers). Unbounded, ptxas gives 132 registers to fp16 on sm_90a and 134 to
// both dtypes on sm_86 / sm_89 (three blocks per SM); bf16 on sm_90a gets 128 unbounded and a
// bound changes its code, so it stays as measured (8 bytes of spills since run 195's tail, 0
// before). Bounded: 128, no spills on sm_80-89 (not measured on those GPUs) nor for fp16 on
// sm_90a (4 bytes before run 195; run 111).
constexpr int STATS_BLOCKS_PER_SM = 4;
template <typename T>
constexpr int STATS_MIN_BLOCKS =
#ifdef SVDQ_SM90A
    std::is_same<T, __half>::value ? STATS_BLOCKS_PER_SM : 0;
#else
    STATS_BLOCKS_PER_SM;
#endif
constexpr int QUANT_WARPS = 4;                    // rows per block, one per warp
constexpr int QUANT_KC = 8;  // chunk partials held in registers per row (act_chunk's cap)
constexpr int QUANT_THREADS = QUANT_WARPS * 32;

// k-chunk per act_stats_kernel block, for M tokens on `sms` SMs: a multiple of STATS_WARPS * 32.
// Up to K = 4096, 1024: measured best of 512 / 1024 / 2048 (runs 51-52; shorter chunks add
// partials, longer ones lengthen each warp's chain). Above, as many chunks as keep the grid
// within one wave of STATS_BLOCKS_PER_SM blocks per SM, between 2 and QUANT_KC (and >= 1024
// values each).
// Measured against the fixed 2048 / 2560 of before (runs 166, 168; K = 12288 / 15360, pairs):
// 4608 tokens, 3 chunks instead of 6: 2.4-2.7% faster at rank 32, the same at rank 0; 2560
// tokens, 6 either way; 6656 and 8192 tokens, 2: 2.6-3.9% faster at rank 32, -1.2% to +0.3% at
// rank 0 (act_kernel is picked there); 1024 tokens, 12 chunks of 1024 at K = 12288 were 8%
// faster at rank 32, 15 at K = 15360 ~30% slower at both ranks (cause not isolated), hence the
// cap of 8. With 8 chunks the pair beats act_kernel at K >= 6144 up to 1280 tokens (run 172),
// where the backend now picks it.
inline int act_chunk(int K, int M, int sms) {
  if (K <= 4096) return 1024;
  const int tiles = (M + STATS_TOKENS - 1) / STATS_TOKENS;
  const int fill = STATS_BLOCKS_PER_SM * sms / std::max(tiles, 1);  // chunks per tile, one wave
  const int kc = std::min(K / 1024, std::max(2, std::min(QUANT_KC, fill)));
  return ((K + kc - 1) / kc + STATS_THREADS - 1) / STATS_THREADS * STATS_THREADS;
}
// k-chunks per row: the stats grid's width and the workspace's partials per token
inline int act_chunks(int K, int M, int sms) {
  const int c = act_chunk(K, M, sms);
  return (K + c - 1) / c;
}

// act_stats_kernel's chunk maxima: a warp's 2 * STATS_MT rows (the four lanes of a row, then
// lane tq = 0 to shared memory), then after a barrier the warps' maxima per token
__device__ __forceinline__ void amax_to_shared(float* am, float* amax_w, int g, int tq) {
#pragma unroll
  for (int i = 0; i < 2 * STATS_MT; ++i) {
    am[i] = max_nan(am[i], __shfl_xor_sync(0xffffffffu, am[i], 1));
    am[i] = max_nan(am[i], __shfl_xor_sync(0xffffffffu, am[i], 2));
    if (tq == 0) amax_w[g + 8 * i] = am[i];
  }
}
__device__ __forceinline__ void amax_from_shared(const float (*amax_w)[STATS_TOKENS],
                                                 float* __restrict__ amax_part, int t0, int M,
                                                 int KC, int c, int tid) {
  if (tid < STATS_TOKENS && t0 + tid < M) {
    float m = amax_w[0][tid];
#pragma unroll
    for (int w = 1; w < STATS_WARPS; ++w) m = max_nan(m, amax_w[w][tid]);
    amax_part[(size_t)(t0 + tid) * KC + c] = m;
  }
}

// grid (KC chunks, ceil(M / 32) token tiles): the chunks of one tile run side by side
template <typename T>
__global__ void __launch_bounds__(STATS_THREADS, STATS_MIN_BLOCKS<T>)
act_stats_kernel(const T* __restrict__ x, const float* __restrict__ inv_smooth,
                 const T* __restrict__ down, int M, int K, int R, int chunk,
                 float* __restrict__ amax_part, float* __restrict__ branch_part) {
  // row stride 36 = 4 mod 32 banks: the C-layout stores (rows 2tq, columns g) hit 32 banks
  __shared__ float part[STATS_WARPS][STATS_TOKENS][STATS_RCHUNK + 4];
  __shared__ float amax_w[STATS_WARPS][STATS_TOKENS];
  // launched plainly as the layer's first kernel, so the wait returns at once; it keeps a PDL
  // launch safe. The trigger lets the next kernel of the layer start early (csrc/launch.cuh).
  griddep_wait();
  griddep_launch();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int c = blockIdx.x, KC = gridDim.x, t0 = blockIdx.y * STATS_TOKENS;
  // this warp's k-slices of the chunk: kb0, kb0 + step, ... < kend
  const int kb0 = c * chunk + warp * 32, kend = min(K, (c + 1) * chunk), step = STATS_WARPS * 32;
  const T* xr[2 * STATS_MT];  // rows past M read row M-1 (never stored)
#pragma unroll
  for (int i = 0; i < 2 * STATS_MT; ++i) xr[i] = x + (size_t)min(t0 + g + 8 * i, M - 1) * K + 8 * tq;
  float am[2 * STATS_MT];
#pragma unroll
  for (int i = 0; i < 2 * STATS_MT; ++i) am[i] = 0.f;

  const int npass = R == 0 ? 1 : (R + STATS_RCHUNK - 1) / STATS_RCHUNK;
  for (int pass = 0; pass < npass; ++pass) {
    const int r0 = pass * STATS_RCHUNK;
    const int ntiles = min(STATS_RCHUNK, R - r0) / 8;  // 0 when R == 0; even (R % 16 == 0)
    constexpr int NJ = 2 * STATS_MT;  // n8 token tiles
    float acc[NJ * STATS_RCHUNK / 16][4];
#pragma unroll
    for (int i = 0; i < NJ * STATS_RCHUNK / 16; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const T* dp = down + ((size_t)(r0 / 16) * 8 + g) * 2 * K + 16 * tq;  // the branch layout
    const bool amax = pass == 0;
    switch (ntiles / 2) {  // a loop per rank-tile count: its loads are unconditional and batch up
      case 0: branch_loop<T, 0, NJ, true, NJ * 2>(xr, inv_smooth, dp, kb0, kend, step, K, tq, amax, am, acc); break;
      case 1: branch_loop<T, 1, NJ, true, NJ * 2>(xr, inv_smooth, dp, kb0, kend, step, K, tq, amax, am, acc); break;
      default: branch_loop<T, 2, NJ, true, NJ * 2>(xr, inv_smooth, dp, kb0, kend, step, K, tq, amax, am, acc); break;
    }
    if (ntiles) {
      if (pass == 0) amax_to_shared(am, amax_w[warp], g, tq);
      // C layout: acc[NJ * rt + j][2h + e] = (rank 16rt + g + 8h, token 8j + 2tq + e)
#pragma unroll
      for (int rt = 0; rt < STATS_RCHUNK / 16; ++rt)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            part[warp][8 * j + 2 * tq + (e & 1)][16 * rt + g + 8 * (e / 2)] = acc[NJ * rt + j][e];
      // One barrier for the maxima and the sums: the grid is one wave, so every block's tail
      // adds to the kernel's time. With one barrier instead of three, stores free of bank
      // conflicts and the adds' loads batched, rank 32 at 4608 x 3072 takes 15.7 us, not 16.9
      // (run 195; the same bits).
      __syncthreads();
      if (pass == 0) amax_from_shared(amax_w, amax_part, t0, M, KC, c, tid);
      // warp w adds up token rows w, w + 4, ...; lane = rank
      const int nr = ntiles * 8;
#pragma unroll 4
      for (int i = 0; i < STATS_TOKENS / STATS_WARPS; ++i) {
        const int row = STATS_WARPS * i + warp;
        float s = part[0][row][lane];
#pragma unroll
        for (int w = 1; w < STATS_WARPS; ++w) s = __fadd_rn(s, part[w][row][lane]);
        if (lane < nr && t0 + row < M)
          branch_part[((size_t)(t0 + row) * KC + c) * R + r0 + lane] = s;
      }
      if (pass + 1 < npass) __syncthreads();  // part is reused by the next pass
    } else {  // rank 0: the maxima alone
      amax_to_shared(am, amax_w[warp], g, tq);
      __syncthreads();
      amax_from_shared(amax_w, amax_part, t0, M, KC, c, tid);
    }
  }
}

// A row's small inputs (its chunk maxima, branch partials and rank scales) all leave before any
// of them is used: written as plain loops, the compiler issued them as four dependent round
// trips to L2 at rank 32 (the first partial, the next ones, rank_scale, then the maxima after
// the act stores), and each warp's chain is the kernel's time (one wave). So row_rcp and
// branch_row below take their first loads from the caller or issue them unconditionally.

// The scale of row t from its chunk maxima, for a whole warp: sx = max / 127, rcp = RN(1/sx)
// (the largest float when the row is zero: codes 0), as act_kernel and quant.quantize_act.
// m0 = this lane's chunk maximum (chunk `lane`, 0 past KC), loaded by the caller up front.
__device__ __forceinline__ float row_rcp(float m0, const float* __restrict__ amax_part, int t,
                                         int KC, int lane, float& scale) {
  float m = m0;
  for (int c = lane + 32; c < KC; c += 32) m = max_nan(m, amax_part[(size_t)t * KC + c]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = max_nan(m, __shfl_xor_sync(0xffffffffu, m, o));
  scale = __fdiv_rn(m, 127.f);
  return fminf(__frcp_rn(scale), FLT_MAX);
}

// act[t, r] = round16((sum over chunks c, in order, of branch_part[t][c][r]) * rank_scale[r])
template <typename T>
__device__ __forceinline__ void branch_row(const float* __restrict__ branch_part,
                                           const float* __restrict__ rank_scale, int t, int KC,
                                           int R, int lane, T* __restrict__ act) {
  const float* p = branch_part + (size_t)t * KC * R;
  for (int r = lane; r < R; r += 32) {
    // unconditional loads (chunks past KC re-read the last one, from L1): predicated, the
    // compiler put an add between the first two and the rest
    float v[QUANT_KC];
#pragma unroll
    for (int c = 0; c < QUANT_KC; ++c) v[c] = p[min(c, KC - 1) * R + r];
    const float rs = rank_scale[r];
    float s = v[0];
#pragma unroll
    for (int c = 1; c < QUANT_KC; ++c)
      if (c < KC) s = __fadd_rn(s, v[c]);
    for (int c = QUANT_KC; c < KC; ++c) s = __fadd_rn(s, p[(size_t)c * R + r]);
    act[(size_t)t * R + r] = F16<T>::from_f(__fmul_rn(s, rs));
  }
}

// One row per warp, four-warp blocks in reverse token order. __launch_bounds__(.., 10): 48
// registers, ten blocks per SM, so the 1152 blocks of 4608 tokens are one wave (0.87 on 132
// SMs; sm_80 spills 4 bytes at 48, compile-checked only). Against two rows per warp in 8-warp
// blocks (80 registers, 2.2 blocks per SM at 4608 tokens) the pair is 1-3% faster at 4608
// tokens, rank 32 (runs 113-114); 6 or 8 chunks per lane in flight, 64 registers, or the first
// chunks of x requested before the scale's and branch's loads were no faster or slower.
template <typename T>
__global__ void __launch_bounds__(QUANT_THREADS, 10)
act_quant_kernel(const T* __restrict__ x, const float* __restrict__ inv_smooth,
                 const float* __restrict__ rank_scale, int M, int K, int R, int KC,
                 const float* __restrict__ amax_part, const float* __restrict__ branch_part,
                 int8_t* __restrict__ codes, float* __restrict__ sx, int* __restrict__ sumq,
                 T* __restrict__ act) {
  griddep_wait();  // the partials come from act_stats_kernel, launched just before
  griddep_launch();
  const int lane = threadIdx.x % 32;
  const int t = (gridDim.x - 1 - blockIdx.x) * QUANT_WARPS + threadIdx.x / 32;
  if (t >= M) return;
  const float m0 = lane < KC ? amax_part[(size_t)t * KC + lane] : 0.f;  // before branch_row's
  if (R) branch_row<T>(branch_part, rank_scale, t, KC, R, lane, act);       // loads: one round trip
  float scale;
  const float rcp = row_rcp(m0, amax_part, t, KC, lane, scale);
  if (lane == 0) sx[t] = scale;
  int sum, none;
  quantize_rows<T, false>(x + (size_t)t * K, x + (size_t)t * K, codes + (size_t)t * K, nullptr,
                          false, inv_smooth, rcp, 0.f, K, lane, sum, none);
  if (lane == 0) sumq[t] = sum;
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
static_assert(BT * out_stride<BN>() * 2 <= GEMM_SMEM, "epilogue staging must fit the pipeline smem");

// Register budget: 2 CTAs per SM (128 registers, 16 warps). One CTA per SM with up to 255
// registers (the compiler then batches ldmatrix ahead of the MMAs) measured 10% slower on the
// H200 (bench/NOTES.md, run 3).
template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS, 2)
gemm_kernel(const int8_t* __restrict__ codes, const float* __restrict__ sx,
            const int* __restrict__ sumq, const uint8_t* __restrict__ qweight,
            const int8_t* __restrict__ multT, const float* __restrict__ row_scale,
            const T* __restrict__ act, const T* __restrict__ up, int R,
            const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(128) uint8_t smem[];
  griddep_wait();  // the codes come from the activation kernel (csrc/launch.cuh)
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int wn = warp % 4, wt = warp / 4;
  const int n0 = blockIdx.x * BN, tk0 = blockIdx.y * BT;
  const int G = K / 64, KT = (K + BK - 1) / BK;

  // ---- producer: one k-tile into one stage (all threads) ----
  auto load_stage = [&](int stage, int kt) {
    uint8_t* s = smem + stage * STAGE_BYTES;
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
      uint32_t a[2][2][4];  // [m16 tile][k32 step][register]
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int row = wn * 32 + mt * 16 + g;
        widen_group(*reinterpret_cast<const uint2*>(s + SM_W + c * BN * 32 + row * 32 + 8 * tq),
                    *reinterpret_cast<const uint2*>(s + SM_W + c * BN * 32 + (row + 8) * 32 + 8 * tq),
                    (uint8_t)s[SM_MULT + c * BN + row], (uint8_t)s[SM_MULT + c * BN + row + 8],
                    a[mt]);
      }
#pragma unroll
      for (int st = 0; st < 2; ++st) {
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
          for (int nt = 0; nt < 8; ++nt) mma_u8s8(acc[mt][nt], a[mt][st], b[nt]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline smem is reused below for the output tile

  T* so = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
    epilogue_m16<T, 8, BN>(acc[mt], n0 + wn * 32 + mt * 16 + g, wn * 32 + mt * 16 + g,
                       tk0 + wt * 64, wt * 64, sx, sumq, row_scale, act, up, R, bias, so, M, N,
                       lane);
  __syncthreads();
  store_tile<T, BT, BN, GEMM_THREADS>(so, y, tk0, n0, M, N, tid);
}

}  // namespace svdq

// =============================================================================================
// Host launchers (no torch): the binding validates shapes; these return a cudaError_t.
// =============================================================================================
// PDL (csrc/launch.cuh) for the kernels that follow one of the layer's own: act_quant_kernel
// and the GEMM; the layer's first kernel is launched plainly.
template <typename T, int TM>
static cudaError_t launch_act(const void* x, int M, int K, const float* inv_smooth,
                              const void* down, const float* rank_scale, int R, int8_t* codes,
                              float* sx, int* sumq, void* act, cudaStream_t stream) {
  return svdq::launch(svdq::act_kernel<T, TM>, (M + TM - 1) / TM, svdq::ACT_THREADS, 0, stream,
                      false, (const T*)x, inv_smooth, (const T*)down, rank_scale, M, K, R, codes,
                      sx, sumq, (T*)act);
}

// fp32 workspace of the split activation kernels (variant 2): chunk maxima and branch partials
long long svdq_w4a8_act_workspace(int M, int K, int R, int variant) {
  if (variant != 2) return 0;
  const long long KC = svdq::act_chunks(K, M, svdq::sm_count());
  return (long long)M * KC * (1 + R);
}

template <typename T>
static cudaError_t launch_act_split(const void* x, int M, int K, const float* inv_smooth,
                                    const void* down, const float* rank_scale, int R,
                                    int8_t* codes, float* sx, int* sumq, void* act, float* work,
                                    cudaStream_t stream) {
  const int sms = svdq::sm_count();
  const int chunk = svdq::act_chunk(K, M, sms), KC = svdq::act_chunks(K, M, sms);
  float* amax_part = work;
  float* branch_part = work + (size_t)M * KC;
  dim3 grid(KC, (M + svdq::STATS_TOKENS - 1) / svdq::STATS_TOKENS);
  cudaError_t e = svdq::launch(svdq::act_stats_kernel<T>, grid, svdq::STATS_THREADS, 0, stream,
                               false, (const T*)x, inv_smooth, (const T*)down, M, K, R, chunk,
                               amax_part, branch_part);
  if (e != cudaSuccess) return e;
  return svdq::launch(svdq::act_quant_kernel<T>, (M + svdq::QUANT_WARPS - 1) / svdq::QUANT_WARPS,
                      svdq::QUANT_THREADS, 0, stream,
                      true, (const T*)x, inv_smooth, rank_scale, M, K, R, KC,
                      (const float*)amax_part, (const float*)branch_part, codes, sx, sumq,
                      (T*)act);
}

// variant 0: act_kernel, 16 tokens per block; 1: 8 tokens per block; 2: act_stats_kernel +
// act_quant_kernel (work = svdq_w4a8_act_workspace floats). The caller picks (svdq/backends/
// cuda.py); all three give the same codes, scales and sums.
int svdq_w4a8_act(const void* x, bool fp16, int M, int K, const float* inv_smooth, const void* down,
                  const float* rank_scale, int R, int8_t* codes, float* sx, int* sumq, void* act,
                  float* work, int variant, cudaStream_t stream) {
  if (M == 0) return 0;
#define SVDQ_ACT(TT, TM) \
  launch_act<TT, TM>(x, M, K, inv_smooth, down, rank_scale, R, codes, sx, sumq, act, stream)
  cudaError_t e;
  if (variant == 2) {
    if (fp16)
      e = launch_act_split<__half>(x, M, K, inv_smooth, down, rank_scale, R, codes, sx, sumq, act,
                                   work, stream);
    else
      e = launch_act_split<__nv_bfloat16>(x, M, K, inv_smooth, down, rank_scale, R, codes, sx,
                                          sumq, act, work, stream);
  } else if (fp16) {
    e = variant == 1 ? SVDQ_ACT(__half, 8) : SVDQ_ACT(__half, 16);
  } else {
    e = variant == 1 ? SVDQ_ACT(__nv_bfloat16, 8) : SVDQ_ACT(__nv_bfloat16, 16);
  }
#undef SVDQ_ACT
  return (int)e;
}

template <typename T>
static int launch_gemm(const int8_t* codes, const float* sx, const int* sumq,
                       const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                       const void* act, const void* up, int R, const void* bias, void* y, int M,
                       int N, int K, cudaStream_t stream) {
  // the attribute is per function and device; setting it every call is cheap and avoids a
  // per-device cache
  cudaError_t e = cudaFuncSetAttribute(svdq::gemm_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, svdq::GEMM_SMEM);
  if (e != cudaSuccess) return (int)e;
  dim3 grid((N + svdq::BN - 1) / svdq::BN, (M + svdq::BT - 1) / svdq::BT);
  return (int)svdq::launch(svdq::gemm_kernel<T>, grid, svdq::GEMM_THREADS, svdq::GEMM_SMEM,
                           stream, true, codes, sx, sumq, qweight, multT, row_scale,
                           (const T*)act, (const T*)up, R, (const T*)bias, (T*)y, M, N, K);
}

// The wgmma kernels (csrc/w4a8_sm90.cu); cudaErrorInvalidDeviceFunction where the extension was
// not built for sm_90a.
int svdq_w4a8_gemm_sm90(const int8_t* codes, const float* sx, const int* sumq,
                        const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                        const void* act, const void* up, int R, const void* bias, void* y, int M,
                        int N, int K, bool fp16, bool pingpong, int* part, int* arrived,
                        cudaStream_t stream);

// variant 1: mma.sync (every GPU from sm_80); 2: wgmma, 3: wgmma with ping-pong warpgroups
// (sm_90a builds only). The caller (svdq/backends/cuda.py) picks; all compute the same bits.
int svdq_w4a8_gemm(const int8_t* codes, const float* sx, const int* sumq, const uint8_t* qweight,
                   const int8_t* multT, const float* row_scale, const void* act, const void* up,
                   int R, const void* bias, void* y, int M, int N, int K, bool fp16,
                   int variant, int* part, int* arrived, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  if (variant == 2 || variant == 3)
    return svdq_w4a8_gemm_sm90(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias, y,
                               M, N, K, fp16, variant == 3, part, arrived, stream);
  if (fp16)
    return launch_gemm<__half>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias, y,
                               M, N, K, stream);
  return launch_gemm<__nv_bfloat16>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias,
                                    y, M, N, K, stream);
}
