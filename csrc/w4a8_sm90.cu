// SVDQuant W4A8 GEMM for Hopper (sm_90a): the same computation as gemm_kernel in csrc/w4a8.cu,
// on the asynchronous warpgroup MMA (wgmma), which mma.sync cannot reach: ~1979 dense int8 TOPS
// on the H100/H200 datasheet against the 1218 TOPS measured for mma.sync (DESIGN.md). Inputs,
// outputs and bits are those of gemm_kernel (the activation codes come from svdq_w4a8_act).
//
// wgmma takes its B operand only from shared memory and A from registers or shared memory, so
// the 4-bit weights, widened to int8 in registers, are A (the M side: 64 output channels per
// warpgroup) and the activation codes are B (the N side: 256 tokens). Per warp of the warpgroup,
// wgmma's A registers and its s32 accumulators are laid out as mma.m16n8k32's (rows 16w + g,
// 16w + g + 8; tokens 8i + 2tq + {0, 1}), so widen_group (csrc/common.cuh) serves both kernels
// unchanged. The epilogue computes epilogue_m16's numbers in the same order, with the low-rank
// up-projection on wgmma (k16 steps into the dequantized fp32 accumulators) instead of
// mma.sync; the tests assert that both kernels give the same bits.
//
// CTA: 2 warpgroups (256 threads) x 64 channels = BN 128 channels, BT = 256 tokens, k-tile 128
// (two k64 groups), m64n256k32 (128 s32 accumulators per thread), one CTA per SM (253
// registers). Shared memory per stage, 1024-aligned, filled by the tensor memory accelerator:
//
//   [0, BT*128)      activation codes [BT tokens][128 bytes], 2-D tensor map [M][K] with box
//                    128 x BT and 128-byte swizzle: 16-byte chunk c of token row r lands at chunk
//                    c ^ (r & 7), exactly wgmma's 128-byte swizzle, so one descriptor describes
//                    the tile: K-major, 8-row core groups 1024 bytes apart (SBO), and the k32 step
//                    s starts 32*s bytes in (the hardware swizzles the absolute address).
//   [.., +8192)      packed weights [2 groups][128 rows][32 bytes]: a 3-D map {32 bytes, N rows
//                    (stride K/2), K/64 groups (stride 32)} with box {32, 128, 2}, so that a
//                    half-warp's LDS.64 (rows g..g+3, 8 bytes at 8tq) covers 128 contiguous bytes
//   [.., +256)       multipliers [2 groups][128 rows]: 2-D map [K/64][N] (its 16-byte row
//                    stride needs N % 16 == 0; the caller falls back to mma.sync otherwise)
// After the five stages, the branch activation act [BT tokens][32 ranks] (16 KB): a 2-D map over
// act [M][R] (as bytes) with box 64 bytes x BT and the 64-byte swizzle (chunk c of row r at
// c ^ ((r / 2) & 3)), which the descriptor names (mode 2, eight 64-byte rows = SBO 512): the
// K-major B operand of a 16-bit wgmma, whose k16 step s starts 32*s bytes in. Ranks past 32 come
// as further slabs into the same buffer. A 64-rank slab (32 KB, 128-byte swizzle) left room for
// four stages only; the fifth made the rank-32 GEMM ~1% faster at every FLUX shape and a rank-112
// layer (four slabs instead of two) ~2% slower at K = 3072 (run 135).
// Boxes past M, N, K or R arrive zero-filled: zero codes add nothing, zero ranks are never
// multiplied (the epilogue issues R/16 steps), and outputs past M or N are never stored.
//
// Persistent: one CTA per SM walks the output tiles blockIdx.x, + gridDim.x, ... (channel tiles
// fastest), and the k-tiles of all its tiles form one stream, so the copies of the next tile's
// first k-tiles leave during this tile's last k-tiles and land during its epilogue. The epilogue
// therefore cannot stage its output in the stages at large: it uses the stage of the tile's last
// k-tile, which nothing refills until the next tile's first k-tile releases it, half a tile (128
// tokens, 34 KB) at a time.
//
// Last wave: when the tiles leave the last wave at most half full (432 tiles on 132 SMs: three
// full waves and 36 tiles), those tiles are split into k-ranges and each of the first CTAs takes
// one range as its last unit, in the same k-tile stream (no second launch); each range stores its
// exact int32 sums, and the last range of a tile to finish adds the others' and runs the
// epilogue (split_plan; integer sums, so the bits do not depend on the order). Measured against
// the unsplit plan, 5 interleaved rounds (run 58): mlp_fc2 1.14-1.18x, single_out 1.15-1.18x at
// 4608 tokens (a second launch for the ranges, run 55: 1.12x / 1.16x). Ranges of 8 or 4 k-tiles
// do not pay (proj 0.99x, runs 58, 116): at K = 3072 a CTA's fourth unit costs ~16 us whatever
// it holds (a range: main loop ~6 us, then the sums' stores, the last range's reads of them and
// the epilogue; docs/kernels.md, run 118). Tiles too short for ranges are split into
// two token halves of 128 tokens instead, on m64n128 wgmmas: qkv at 1024 tokens 1.05x (runs
// 100-101). A lone wave at most half full (<= 512 tokens at N = 3072) takes k-ranges too, one per
// CTA and no whole tile: mlp_fc2 / single_out's GEMM at 128-512 tokens 0.45-0.70x (run 174).
//
// Pipeline, no CTA barrier in the k loop: full[s] completes when a stage's three copies have
// landed (mbarrier transaction count). A warp that has finished the wgmmas reading a stage adds
// one to released[s] (a shared-memory counter, acq_rel); the warp whose add completes the count
// (the eighth) copies the next k-tile into that stage at once. There is no loader warp and no
// polling: a copy leaves exactly when its stage is free, S - 1 k-tiles ahead. Each k-tile is two
// halves (k64 groups) with their own A registers: a warpgroup widens one half while the other
// half's wgmmas run, waiting (wgmma.wait_group 1) only for the group that last used the
// registers it is about to overwrite. ptxas keeps this pipeline (no C7512/C7513 serialization
// warnings; checked with -Xptxas -v).
//
// Measured on the H200 (bench/NOTES.md): 256-token tiles 1.30x bf16 alone at M = 4608 against
// 1.20x with 128-token tiles at two CTAs per SM (run 16). The branch on wgmma costs 3-4% of the
// GEMM at rank 32 (run 25; 15% as mma.sync). Run 31: copies issued by the releasing warp instead
// of thread 0 polling once per k-tile (which let a late release cost a whole k-tile of lead):
// the GEMM 1.18x faster (1.36x -> 1.65x bf16 at M = 4608, run 35). Persistent, with the tile's
// sx/sumq copied to shared memory at its start: 1.09x more (1.76x bf16, runs 46-47). Not kept:
// 2-CTA clusters sharing the codes tile by TMA multicast (1.35x slower: each stage then waits
// for both CTAs' releases, run 29), a fifth stage beside a 64-rank slab (no change, run 32, when
// the loop waited on a polling loader), the whole output tile
// staged at once with its second half in the slab buffer (no gain, run 41). The epilogue is the
// fixed cost of every tile (~3.3 us at rank 0 against 14.4 us of main loop per 3072 of K, run
// 68) and nothing overlaps it; staging by stmatrix and loading up before the drain took
// 0.3-5% off the GEMM (run 70, bits unchanged). Overlapping it within a warpgroup needs a
// second accumulator set, for which 256-token tiles have no registers: 128-token tiles with two
// sets, each tile's epilogue behind the next tile's first k-tiles, were correct but 1.6x slower
// (runs 79-83, branch gemm-bt128): their main loop reaches ~63% of the tensor peak, this one
// ~93%. Across warpgroups, the ping-pong kernel below hides it; its slower main loop makes it
// pay only where this kernel's last wave is short (svdq/backends/cuda.py, pingpong_pays).

#include "launch.cuh"
#include "sm90.cuh"

#include <algorithm>
#include <cuda.h>          // CUtensorMap (types only: the encoder comes through cudart)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

namespace svdq {

constexpr int H_BN = 128, H_BT = 256, H_BK = 128, H_THREADS = 256, H_STAGES = 5;
constexpr int H_W = H_BT * H_BK;                                    // weights after the codes
constexpr int H_MULT = H_W + 2 * H_BN * 32;                         // multipliers after them
constexpr int H_STAGE = (H_MULT + 2 * H_BN + 1023) / 1024 * 1024;   // 41 KB
constexpr int H_TX = H_BT * H_BK + 2 * H_BN * 32 + 2 * H_BN;        // bytes copied per stage
constexpr int H_ACT = H_STAGES * H_STAGE;   // the branch activation, 32 ranks at a time
constexpr int H_ACT_R = 32, H_ACT_BYTES = H_BT * H_ACT_R * 2;
constexpr int H_BARS = H_ACT + H_ACT_BYTES;
constexpr int H_SXQ = H_BARS + 128;          // sx and sumq of the tile's tokens, [2 tiles][BT] each
constexpr int H_SMEM = H_SXQ + 2 * 2 * H_BT * 4 + 1024;             // + alignment
// int32 sums of one k-range of a split tile (split_plan): 128 per thread, [i][thread]
[[maybe_unused]] constexpr int H_PART = H_BT / 8 * 4 * H_THREADS;  // unused without sm_90a
static_assert(H_SMEM <= 227 * 1024, "one CTA per SM, within the opt-in shared memory");
static_assert(H_TX <= H_STAGE && (H_BT / 2) * out_stride<H_BN>() * 2 <= H_STAGE,
              "a stage holds a k-tile's copies, and half an output tile");

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format") of a K-major tile whose
// rows are SW bytes with the SW-byte swizzle: start address >> 4 in bits 0-13, leading byte
// offset >> 4 in 16-29 (unused by K-major swizzled layouts), stride byte offset >> 4 in 32-45
// (eight rows: 1024 for the codes' 128-byte rows, 512 for the branch slab's 64-byte rows),
// swizzle mode in 62-63 (1 = 128 bytes, 2 = 64).
template <int SW>
__device__ __forceinline__ uint64_t desc_kmajor(uint32_t saddr) {
  static_assert(SW == 128 || SW == 64, "the swizzles this file uses");
  return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(8 * SW >> 4) << 32) |
         ((uint64_t)(SW == 128 ? 1 : 2) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across a wgmma wait.
template <int NT> __device__ __forceinline__ void pin(int (&d)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
    asm volatile("" : "+r"(d[i][0]), "+r"(d[i][1]), "+r"(d[i][2]), "+r"(d[i][3])::"memory");
}
template <int NT> __device__ __forceinline__ void pin(float (&d)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
    asm volatile("" : "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])::"memory");
}

// The 128 accumulator operands of an m64n256 wgmma (32 n8 tiles x 4 registers per thread), for
// the asm statements below; c is the constraint ("+r" for s32, "+f" for f32).
#define SVDQ_D128 \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
  "}"
// the first 64 of them: an m64n128 wgmma's (16 n8 tiles)
#define SVDQ_D64 \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
  "}"
#define SVDQ_ACC4(c, d, i) c(d[i][0]), c(d[i][1]), c(d[i][2]), c(d[i][3])
#define SVDQ_ACC64(c, d) \
  SVDQ_ACC4(c, d, 0), SVDQ_ACC4(c, d, 1), SVDQ_ACC4(c, d, 2), SVDQ_ACC4(c, d, 3), \
  SVDQ_ACC4(c, d, 4), SVDQ_ACC4(c, d, 5), SVDQ_ACC4(c, d, 6), SVDQ_ACC4(c, d, 7), \
  SVDQ_ACC4(c, d, 8), SVDQ_ACC4(c, d, 9), SVDQ_ACC4(c, d, 10), SVDQ_ACC4(c, d, 11), \
  SVDQ_ACC4(c, d, 12), SVDQ_ACC4(c, d, 13), SVDQ_ACC4(c, d, 14), SVDQ_ACC4(c, d, 15)
#define SVDQ_ACC128(c, d) \
  SVDQ_ACC64(c, d), \
  SVDQ_ACC4(c, d, 16), SVDQ_ACC4(c, d, 17), SVDQ_ACC4(c, d, 18), SVDQ_ACC4(c, d, 19), \
  SVDQ_ACC4(c, d, 20), SVDQ_ACC4(c, d, 21), SVDQ_ACC4(c, d, 22), SVDQ_ACC4(c, d, 23), \
  SVDQ_ACC4(c, d, 24), SVDQ_ACC4(c, d, 25), SVDQ_ACC4(c, d, 26), SVDQ_ACC4(c, d, 27), \
  SVDQ_ACC4(c, d, 28), SVDQ_ACC4(c, d, 29), SVDQ_ACC4(c, d, 30), SVDQ_ACC4(c, d, 31)

// d[64 x 8 NTA] += A (4 registers per thread, u8) x B (descriptor, s8, K-major), s32: NTA = 32
// for a whole tile (256 tokens), 16 for a token half of the last wave (split_plan), which reads
// the first 128 token rows of the same B tile.
template <int NTA>
__device__ __forceinline__ void wgmma_u8s8(int (&d)[NTA][4], const uint32_t a[4], uint64_t desc) {
  if constexpr (NTA == 32)
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k32.s32.u8.s8 " SVDQ_D128
                 ", {%128, %129, %130, %131}, %132, 1;\n"
                 : SVDQ_ACC128("+r", d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
  else
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.s8 " SVDQ_D64
                 ", {%64, %65, %66, %67}, %68, 1;\n"
                 : SVDQ_ACC64("+r", d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

// d[64 x 256] += A (4 registers per thread, T) x B (descriptor, T, K-major), f32: the low-rank
// up-projection, k16 per call.
template <typename T>
__device__ __forceinline__ void wgmma_f32(float (&d)[32][4], const uint32_t a[4], uint64_t desc);
#define SVDQ_WGMMA_F32(TYPE, PTX)                                                          \
  template <>                                                                              \
  __device__ __forceinline__ void wgmma_f32<TYPE>(float (&d)[32][4], const uint32_t a[4],  \
                                                  uint64_t desc) {                         \
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX "." PTX " " SVDQ_D128 \
                 ", {%128, %129, %130, %131}, %132, 1, 1, 1, 0;\n"                          \
                 : SVDQ_ACC128("+f", d)                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                 \
  }
SVDQ_WGMMA_F32(__nv_bfloat16, "bf16")
SVDQ_WGMMA_F32(__half, "f16")
#undef SVDQ_WGMMA_F32

// f += up (ua: STEPS k16 fragments) x the act slab at shared address sa, and wait for it.
template <typename T, int STEPS>
__device__ __forceinline__ void lowrank_wgmma(float (&f)[32][4],
                                              const uint32_t (&ua)[H_ACT_R / 16][4], uint32_t sa) {
  wgmma_fence();
#pragma unroll
  for (int s16 = 0; s16 < STEPS; ++s16) wgmma_f32<T>(f, ua[s16], desc_kmajor<2 * H_ACT_R>(sa + 32 * s16));
  wgmma_commit();
  wgmma_wait<0>();
}

__device__ __forceinline__ void tma_2d(void* dst, const CUtensorMap* map, int c0, int c1,
                                       uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(smem_u32(dst)), "l"(map), "r"(c0), "r"(c1), "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void tma_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2,
                                       uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(smem_u32(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar)) : "memory");
}

// Two n8 token tiles (tokens t .. t + 15 of the staging tile) x this warp's 16 channels (ch ..
// ch + 15), plus the bias, rounded once to T (stage_n8's numbers) and written transposed into
// so[token][channel] by one stmatrix.x4.trans instead of 16 two-byte stores per lane. The C
// layout is stmatrix's fragment layout (lane holds row g, columns 2tq and 2tq + 1; here rows are
// channels, columns tokens), and .trans stores each 8x8 matrix column-wise: matrix m (tile
// m / 2, channels 8 * (m % 2) ..) lands as 8 token rows of 16 bytes, addressed by lanes
// 8m .. 8m + 7. The row stride (BN + 8) * 2 bytes keeps those 8 rows in distinct bank groups.
template <typename T, int BN>
__device__ __forceinline__ void stage_n16(const float (&f0)[4], const float (&f1)[4],
                                          const float (&bv)[2], bool has_bias, T* so, int t, int ch,
                                          int lane) {
  const float* f[2] = {f0, f1};
  uint32_t r[4];
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int hh = m % 2;
    float v0 = f[m / 2][2 * hh], v1 = f[m / 2][2 * hh + 1];
    if (has_bias) {
      v0 = __fadd_rn(v0, bv[hh]);
      v1 = __fadd_rn(v1, bv[hh]);
    }
    r[m] = pack2<T>(v0, v1);
  }
  const int m = lane / 8;
  const T* p = so + (t + 8 * (m / 2) + lane % 8) * out_stride<BN>() + ch + 8 * (m % 2);
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
               ::"r"(smem_u32(p)), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

// The A fragments of up's ranks r0 .. r0 + H_ACT_R - 1 (at most R) for this lane's channels
// n_lo, n_hi: the m16n8k16 A layout per warp, k16 step s16 in ua[s16].
template <typename T>
__device__ __forceinline__ void load_up(uint32_t (&ua)[H_ACT_R / 16][4], const T* __restrict__ up,
                                        int n_lo, int n_hi, int R, int r0, int tq) {
  const int steps = min(H_ACT_R, R - r0) / 16;
#pragma unroll
  for (int s16 = 0; s16 < H_ACT_R / 16; ++s16)
    if (s16 < steps) up_fragment(ua[s16], up, n_lo, n_hi, R, r0 + 16 * s16, tq);
}

// The epilogue's low-rank up-projection in both wgmma kernels: f += up x act, R ranks in slabs of
// H_ACT_R. Slab 0 and ua's first fragments are in flight already; before each later slab,
// next_slab(r0) waits until every warp sharing the buffer is done with the previous slab and
// copies slab r0 into it. `slabs` counts the copies waited for (the mbarrier's parity).
template <typename T, typename NextSlab>
__device__ __forceinline__ void lowrank_epilogue(float (&f)[32][4],
                                                 uint32_t (&ua)[H_ACT_R / 16][4],
                                                 const T* __restrict__ up, int n_lo, int n_hi,
                                                 int R, int tq, uint64_t* slab_full, int& slabs,
                                                 uint32_t sa, NextSlab next_slab) {
  for (int r0 = 0; r0 < R; r0 += H_ACT_R) {
    if (r0 > 0) {
      next_slab(r0);
      load_up(ua, up, n_lo, n_hi, R, r0, tq);
    }
    const int steps = min(H_ACT_R, R - r0) / 16;
    mbar_wait(slab_full, slabs & 1);
    ++slabs;
    switch (steps) {  // straight-line wgmma groups: no branch between the fence and the wgmmas
      case 1: lowrank_wgmma<T, 1>(f, ua, sa); break;
      default: lowrank_wgmma<T, 2>(f, ua, sa); break;
    }
    pin<32>(f);
  }
}

template <typename T>
__global__ void __launch_bounds__(H_THREADS, 1)
gemm_sm90_kernel(const __grid_constant__ CUtensorMap tm_codes,
                 const __grid_constant__ CUtensorMap tm_codes_half,
                 const __grid_constant__ CUtensorMap tm_w,
                 const __grid_constant__ CUtensorMap tm_mult,
                 const __grid_constant__ CUtensorMap tm_act, const float* __restrict__ sx,
                 const int* __restrict__ sumq, const float* __restrict__ row_scale,
                 const T* __restrict__ up, int R, const T* __restrict__ bias, T* __restrict__ y,
                 int M, int N, int K, int full_tiles, int splits, int halves,
                 int* __restrict__ part, int* __restrict__ arrived) {
#ifdef SVDQ_SM90A_DEVICE
  constexpr int S = H_STAGES, NT = H_BT / 8, BT = H_BT, BN = H_BN, WARPS = H_THREADS / 32;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + H_BARS);
  uint64_t* act_full = full + S;  // a 32-rank slab of the branch activation has landed
  // per stage: how many warps have finished reading it, summed over all its k-tiles
  uint32_t* released = reinterpret_cast<uint32_t*>(act_full + 1);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  // Work units. Whole output tiles blockIdx.x, + gridDim.x, ... below full_tiles (channel tiles
  // fastest), KT k-tiles each; then the tiles past full_tiles (a short last wave, split_plan),
  // each as `splits` k-ranges of KTR k-tiles or as `halves` = 2 token halves of 128 tokens (one
  // of the two counts is 1): tail unit r on CTA r, one more unit, the last, for CTAs below
  // (tiles - full_tiles) * parts. The k-tiles of all of a CTA's units form one stream (u), so the
  // copies run ahead across units, into the tail unit too.
  const int KT = (K + H_BK - 1) / H_BK, KTR = KT / splits, parts = splits * halves;
  const int n_tiles_n = (N + BN - 1) / BN, n_tiles = n_tiles_n * ((M + BT - 1) / BT);
  const int n_whole = (full_tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
  const bool has_tail = parts > 1 && (int)blockIdx.x < (n_tiles - full_tiles) * parts;
  const int my_tiles = n_whole + has_tail;
  if (my_tiles <= 0) return;  // the launcher never makes more CTAs than units; cheap to be sure
  const int n_iter = n_whole * KT + (has_tail ? KTR : 0);
  auto is_half = [&](int j) { return halves > 1 && j >= n_whole; };  // unit j is a token half
  uint8_t* slab = smem + H_ACT;
  // the epilogue's per-token sx and sumq, copied (cp.async) when the tile starts, so that the
  // epilogue reads shared memory: from global memory they waited ~4% of the GEMM (ncu, run 45)
  float* ssx = reinterpret_cast<float*>(smem + H_SXQ);  // [2][BT], by tile parity
  int* ssq = reinterpret_cast<int*>(ssx + 2 * BT);
  static_assert(H_THREADS == H_BT, "one token per thread for the sx/sumq copies");

  // unit j of this CTA: output tile (n0, tk0), its k-tiles kb .. kb + kn - 1. A token half
  // starts tk0 at the tile's first or 129th token; its copies, sx/sumq and slab are a whole
  // tile's from there (the rows past the half are never multiplied into what it stores).
  auto tile_of = [&](int j, int& n0, int& tk0, int& kb, int& kn) {
    int t = (int)blockIdx.x + j * (int)gridDim.x, half = 0;
    kb = 0;
    kn = KT;
    if (j >= n_whole) {  // the tail unit: unit blockIdx.x of the split tiles
      t = full_tiles + (int)blockIdx.x / parts;
      kb = ((int)blockIdx.x % splits) * KTR;
      kn = KTR;
      half = halves > 1 ? (int)blockIdx.x % 2 : 0;
    }
    n0 = (t % n_tiles_n) * BN;
    tk0 = (t / n_tiles_n) * BT + half * (BT / 2);
  };
  // k-tile kt of the output tile (n0, tk0) into stage s
  // (a token half copies only the 128 token rows of codes that its m64n128 wgmmas read)
  auto issue_at = [&](int s, int kt, int n0, int tk0, bool half) {
    uint8_t* st = smem + s * H_STAGE;
    mbar_expect_tx(&full[s], half ? H_TX - (H_BT / 2) * H_BK : H_TX);
    tma_2d(st, half ? &tm_codes_half : &tm_codes, kt * H_BK, tk0, &full[s]);
    tma_3d(st + H_W, &tm_w, 0, n0, kt * 2, &full[s]);
    tma_2d(st + H_MULT, &tm_mult, n0, kt * 2, &full[s]);
  };
  auto issue = [&](int u) {  // stream position u: two divisions, so not in the steady state
    const int j = u < n_whole * KT ? u / KT : n_whole;  // the range starts at n_whole * KT
    int n0, tk0, kb, kn;
    tile_of(j, n0, tk0, kb, kn);
    issue_at(u % S, kb + u - j * KT, n0, tk0, is_half(j));
  };
  auto issue_slab = [&](int tk0, int r0) {
    mbar_expect_tx(act_full, H_ACT_BYTES);
    tma_2d(slab, &tm_act, 2 * r0, tk0, act_full);
  };

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      released[s] = 0;
    }
    mbar_init(act_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    for (const CUtensorMap* m : {&tm_codes, &tm_codes_half, &tm_w, &tm_mult, &tm_act})
      if ((m != &tm_act || R > 0) && (m != &tm_codes_half || halves > 1))  // else not encoded
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(m) : "memory");
  }
  // All of the above may overlap the activation kernel's last CTAs (PDL, csrc/launch.cuh); the
  // copies, the sx/sumq loads and the stores come after the wait. No griddep_launch(): what
  // follows a layer is not ours to start early (csrc/launch.cuh says what that cost).
  griddep_wait();
  if (tid == 0) {
    for (int u = 0; u < S && u < n_iter; ++u) issue(u);
    if (R > 0) {  // the first tile's first slab, needed only after its main loop
      int n0, tk0, kb, kn;
      tile_of(0, n0, tk0, kb, kn);
      issue_slab(tk0, 0);
    }
  }
  __syncthreads();

  const int row = (warp / 4) * 64 + (warp % 4) * 16 + g;  // this lane's channels: row, row + 8
  uint32_t a[2][2][4];  // [k64 half][k32 step][register]
  uint32_t done = 0;    // lane 0: warps that had released that stage before this one did
  int slabs = 0;        // slab copies waited for so far: the parity of act_full
  int u = 0;            // position in the k-tile stream
  // u's stage (u % S), its mbarrier parity ((u / S) & 1) and u - 1's stage, kept as counters:
  // S = 5 is no power of two, and this is the loop's critical path
  int stage = 0, phase = 0, prev_stage = S - 1;

  for (int j = 0; j < my_tiles; ++j) {
    int n0, tk0, kb, kn, n0_next, tk0_next, kb_next, kn_next;  // this unit and the next
    tile_of(j, n0, tk0, kb, kn);
    tile_of(j + 1, n0_next, tk0_next, kb_next, kn_next);
    // two buffers: a warp here has passed the previous tile's post-loop barrier, so every warp
    // is done with the epilogue of tile j - 2, which used this buffer
    const int pb = (j & 1) * BT;
    {
      const int t = min(tk0 + tid, M - 1);  // tokens past M repeat row M - 1 (never stored)
      cp_async4(&ssx[pb + tid], sx + t, 4);
      cp_async4(&ssq[pb + tid], sumq + t, 4);
      cp_async_commit();
    }
    int acc[NT][4];

    const bool half_unit = is_half(j);
    // The main loop on m64n256 wgmmas, or on m64n128 for a token half (the first 128 token rows
    // of each codes tile): two copies of it, so that no branch separates a fence from its wgmmas.
    auto main_loop = [&](auto& d) {
#pragma unroll
      for (auto& v : d) v[0] = v[1] = v[2] = v[3] = 0;
      for (int kt = 0; kt < kn; ++kt, ++u) {
        const int s = stage;
        mbar_wait(&full[s], phase);
        __syncwarp();
        const uint8_t* st = smem + s * H_STAGE;
        const uint32_t sb = smem_u32(st);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          wgmma_wait<1>();  // the group that last read a[c] (k-tile u-1, half c) is done
          if (c == 1 && u > 0 && lane == 0)  // this warp has read all of k-tile u-1
            asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], 1;\n"
                         : "=r"(done) : "r"(smem_u32(&released[prev_stage])) : "memory");
          widen_group(*reinterpret_cast<const uint2*>(st + H_W + c * BN * 32 + row * 32 + 8 * tq),
                      *reinterpret_cast<const uint2*>(st + H_W + c * BN * 32 + (row + 8) * 32 + 8 * tq),
                      (uint8_t)st[H_MULT + c * BN + row], (uint8_t)st[H_MULT + c * BN + row + 8], a[c]);
          wgmma_fence();
#pragma unroll
          for (int k32 = 0; k32 < 2; ++k32)
            wgmma_u8s8(d, a[c][k32], desc_kmajor<H_BK>(sb + 64 * c + 32 * k32));
          wgmma_commit();
        }
        // the warp whose release completes k-tile u-1's stage refills it at once, possibly with
        // a k-tile of this CTA's next output tile. No division here: this runs once per k-tile
        // on the issuing warp's critical path, and its warpgroup's next wgmma waits for it (two
        // divisions cost the GEMM ~15%, run 39).
        if (u > 0 && lane == 0 && done % WARPS == WARPS - 1 && u - 1 + S < n_iter) {
          const int kv = kt - 1 + S, sv = prev_stage;  // == (u - 1 + S) % S
          if (kv < kn)
            issue_at(sv, kb + kv, n0, tk0, half_unit);
          else if (kv < kn + kn_next)
            issue_at(sv, kb_next + kv - kn, n0_next, tk0_next, is_half(j + 1));
          else
            issue(u - 1 + S);  // units under 4 k-tiles: the copy is two or more units ahead
        }
        prev_stage = s;
        if (++stage == S) {
          stage = 0;
          phase ^= 1;
        }
      }
    };
    // What the epilogue loads without needing the sums goes out before the drain, so that its
    // latency hides behind it: loaded after the dequantization, the up fragments' global loads
    // were exposed on every tile (ncu, run 69).
    const int n_lo = min(n0 + row, N - 1), n_hi = min(n0 + row + 8, N - 1);
    float rs[2];
    uint32_t ua[H_ACT_R / 16][4];
    auto drain = [&] {
      rs[0] = row_scale[n_lo];
      rs[1] = row_scale[n_hi];
      load_up(ua, up, n_lo, n_hi, R, 0, tq);
      wgmma_wait<0>();
    };
    if (half_unit) {
      // Each path drains its own wgmmas: with one drain after the two paths join, ptxas
      // serializes every wgmma of the kernel (C7515).
      int acc_h[NT / 2][4];
      main_loop(acc_h);
      drain();
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = i < NT / 2 ? acc_h[i][e] : 0;
    } else {
      main_loop(acc);
      drain();
    }
    pin<NT>(acc);
    cp_async_wait<0>();  // this thread's sx/sumq copies; the barrier below publishes them
    // Every warp's wgmmas are done with k-tile u-1's stage, which nothing refills before the
    // next tile's first k-tile releases it: the epilogue stages its output there, half a tile
    // (128 tokens) at a time. The other stages are meanwhile filling with the next tile.
    __syncthreads();
    uint8_t* out_stage = smem + prev_stage * H_STAGE;
    if (j >= n_whole && splits > 1) {
      // A k-range of a split tile: every range stores its exact int32 sums, and the last of the
      // tile's ranges to arrive adds the others' (integer addition: the same bits whatever the
      // order) and runs the epilogue. The usual last-block pattern: stores, fence, barrier,
      // counter. This is the CTA's last unit, so a range that is not last may leave. The last
      // arrival also sets the counter back to 0: no other range touches it in this launch, and
      // the next launch on the stream finds it zero without a memset before it (the binding
      // keeps the counters between launches, split_counters).
      const int unit = (int)blockIdx.x, first = unit - unit % splits;
      int* mine = part + (size_t)unit * H_PART + tid;
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(size_t)(4 * i + e) * H_THREADS] = acc[i][e];
      __threadfence();
      __syncthreads();
      uint32_t* flag = released + S;  // a spare word after the release counters
      if (tid == 0) {
        const bool last = atomicAdd(&arrived[unit / splits], 1) == splits - 1;
        if (last) arrived[unit / splits] = 0;
        *flag = last;
      }
      __syncthreads();
      if (!*flag) {
        if (R > 0) mbar_wait(act_full, slabs++ & 1);  // no copy may still be landing at exit
        continue;
      }
      __threadfence();
      for (int o = first; o < first + splits; ++o) {
        if (o == unit) continue;
        const int* other = part + (size_t)o * H_PART + tid;
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][e] += __ldcg(other + (size_t)(4 * i + e) * H_THREADS);
      }
    }

    // Epilogue: epilogue_m16's numbers (the same dequant_n8, csrc/common.cuh; stage_n16 rounds as
    // stage_n8 does), but the low-rank up-projection runs on wgmma straight into the dequantized
    // accumulators: up is A (registers, the m16n8k16 A layout per warp), the act tile is B,
    // copied by TMA with the 64-byte swizzle (K-major, a row of 32 ranks per token) in 32-rank
    // slabs, so the branch costs R/16 wgmmas per warpgroup instead of a chain of dependent loads
    // and mma.syncs per n8 tile.
    float f[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) dequant_n8(acc[i], 8 * i + 2 * tq, BT, ssx + pb, ssq + pb, rs, f[i]);
    lowrank_epilogue<T>(f, ua, up, n_lo, n_hi, R, tq, act_full, slabs, smem_u32(slab),
                        [&](int r0) {  // both warpgroups are done with the previous slab
                          __syncthreads();
                          if (tid == 0) issue_slab(tk0, r0);
                        });
    const float bv[2] = {bias ? F16<T>::to_f(bias[n_lo]) : 0.f, bias ? F16<T>::to_f(bias[n_hi]) : 0.f};
    T* so = reinterpret_cast<T*>(out_stage);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 1 && half_unit) break;  // the CTA's last unit: no next tile needs the slab
      if (h == 1) __syncthreads();     // the first half has been copied out
#pragma unroll
      for (int i = 0; i < NT / 2; i += 2)
        stage_n16<T, BN>(f[h * NT / 2 + i], f[h * NT / 2 + i + 1], bv, bias != nullptr, so, 8 * i,
                         row - g, lane);
      __syncthreads();
      // every warp's branch wgmmas are done: the slab may take the next tile's first ranks
      if (h == 0 && tid == 0 && R > 0 && j + 1 < my_tiles) issue_slab(tk0_next, 0);
      store_tile<T, BT / 2, BN, H_THREADS>(so, y, tk0 + h * BT / 2, n0, M, N, tid);
    }
    // No barrier here: a warp that runs ahead into the next tile releases out_stage only after
    // its own stores, and the copy into it waits for all eight warps' releases. The fence
    // orders this thread's generic accesses to out_stage before that copy's async-proxy writes.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Ping-pong variant (gemm variant 3): the epilogue hidden behind the other warpgroup's main loop.
//
// Above, both warpgroups share each k-tile (one 128-channel output tile) and both run the
// epilogue at once, so nothing feeds the tensor cores for the epilogue's ~3.3 us per tile: ~18%
// of a K = 3072 GEMM (run 68). Here each warpgroup owns its own output tile of 64 channels x 256
// tokens (the same m64n256 accumulators per thread) and the CTA's tiles alternate between them:
// warpgroup 0 takes tiles 0, 2, 4 ... of the CTA, warpgroup 1 tiles 1, 3, 5 .... Their main
// loops take turns (a named-barrier hand-off: a warpgroup starts its tile once the other has
// issued its last k-tile's wgmmas), so one warpgroup's epilogue runs during the other's main
// loop. The price: the codes tile of a k-tile now serves 64 channels, not 128, so the codes'
// L2-to-shared traffic doubles (~5-10% of the main loop, run 138), and one warpgroup's main loop
// alone runs slower than two sharing a tile: measured per 64-channel tile at K = 3072 (runs
// 145-148) ~1.07x half a tile above, and 1.1-1.2x at K >= 12288, where the epilogue is ~5% of a
// tile. It wins where the kernel above leaves a short last wave (proj at 2048-6144 tokens,
// 0.84-0.95x; qkv at 1024-2048); svdq/backends/cuda.py (pingpong_pays) picks by that count.
//
// One k-tile stream per CTA, as above (tile 0's k-tiles, then tile 1's, ...), in S stages of
//
//   [0, BT*128)      activation codes [BT tokens][128 bytes], the same map and swizzle as above
//   [.., +4096)      packed weights [2 groups][64 rows][32 bytes] (box {32, 64, 2})
//   [.., +128)       multipliers [2 groups][64 rows]
//
// 37 KB each, filled by a third warpgroup: one thread of it walks the stream and refills a stage
// as soon as its empty mbarrier completes. A stage is read by one MMA warpgroup, so four warps
// arrive on that mbarrier (lane 0 of each, after the wgmma wait that retires the stage's last
// wgmma). A warpgroup releases
// its tile's last k-tile right after its main loop: its next k-tile is a whole tile of the other
// warpgroup's later, and the stream would stall on a stage held through the epilogue. After the
// stages, one 18 KB buffer per warpgroup: the branch slab (16 KB, as above) during the
// epilogue's up-projection, then the staging of half its output tile (128 tokens x 64 channels,
// rows padded to 144 bytes) twice. Then the barriers and each warpgroup's sx/sumq.
//
// The hand-off also keeps the mbarrier parities right: a warpgroup waits on a stage's full
// barrier for stream position u only once the other has passed every position below its first
// k-tile, so the copy of u - S has landed and the parity (u / S) & 1 cannot match a stale phase.
// No last-wave split: half-width tiles leave at most one 64-channel tile of imbalance per CTA.
constexpr int P_BN = 64, P_STAGES = 5;
constexpr int P_W = H_BT * H_BK;                                    // weights after the codes
constexpr int P_MULT = P_W + 2 * P_BN * 32;                         // multipliers after them
constexpr int P_STAGE = (P_MULT + 2 * P_BN + 1023) / 1024 * 1024;   // 37 KB
constexpr int P_TX = H_BT * H_BK + 2 * P_BN * 32 + 2 * P_BN;        // bytes copied per stage
constexpr int P_BUF = (H_BT / 2) * out_stride<P_BN>() * 2;          // 18 KB: slab, then staging
constexpr int P_BUFS = P_STAGES * P_STAGE;                          // [2 warpgroups][P_BUF]
constexpr int P_BARS = P_BUFS + 2 * P_BUF;
constexpr int P_SXQ = P_BARS + 128;        // sx [2 warpgroups][BT], then sumq [2][BT]
constexpr int P_SMEM = P_SXQ + 2 * 2 * H_BT * 4 + 1024;             // + alignment
static_assert(P_SMEM <= 227 * 1024, "one CTA per SM, within the opt-in shared memory");
static_assert(P_TX <= P_STAGE && H_ACT_BYTES <= P_BUF && P_BUF % 1024 == 0,
              "a stage holds a k-tile's copies; a buffer holds the slab, 1024-aligned");
// named barriers: 1 + w "warpgroup w may start its main loop", 3 + w warpgroup w alone
[[maybe_unused]] constexpr int P_TURN = 1, P_WG = 3;  // unused without sm_90a
// A third warpgroup (the first) issues the copies, so that no MMA warp stops to issue them: with
// the refills on the MMA warps (a warp whose release completed a stage copied into it) this
// kernel was 1.2-1.4x slower than the one above at every FLUX shape (runs 140-144), with the
// copy warpgroup 0.91-1.07x at K = 3072 (run 145). Registers at launch:
// 65536 / 384 threads = 168 each; the copy warpgroup keeps 40, the MMA warpgroups take 232
// (128 * 40 + 256 * 232 = 64512). ptxas reports 168 and allocates the MMA code within 232
// (its SASS uses up to R227, no spills; the k loop keeps `WARPGROUP.DEPBAR.LE gsb0, 0x3`).
constexpr int P_THREADS = 384;
[[maybe_unused]] constexpr int P_REG_COPY = 40, P_REG_MMA = 232;  // unused without sm_90a

template <typename T>
__global__ void __launch_bounds__(P_THREADS, 1)
gemm_sm90_pp_kernel(const __grid_constant__ CUtensorMap tm_codes,
                    const __grid_constant__ CUtensorMap tm_w,
                    const __grid_constant__ CUtensorMap tm_mult,
                    const __grid_constant__ CUtensorMap tm_act, const float* __restrict__ sx,
                    const int* __restrict__ sumq, const float* __restrict__ row_scale,
                    const T* __restrict__ up, int R, const T* __restrict__ bias,
                    T* __restrict__ y, int M, int N, int K) {
#ifdef SVDQ_SM90A_DEVICE
  constexpr int S = P_STAGES, NT = H_BT / 8, BT = H_BT, BN = P_BN, WG_THREADS = 128;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + P_BARS);
  uint64_t* empty = full + S;     // per stage: its four reading warps are done with it
  uint64_t* act_full = empty + S; // [2]: a slab of warpgroup w's branch activation has landed
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int wg = warp / 4 - 1, wt = tid % WG_THREADS;  // wg -1: the copy warpgroup
  const int KT = (K + H_BK - 1) / H_BK;
  const int n_tiles_n = (N + BN - 1) / BN, n_tiles = n_tiles_n * ((M + BT - 1) / BT);
  const int my_tiles = (n_tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
  if (my_tiles <= 0) return;
  uint8_t* buf = smem + P_BUFS + wg * P_BUF;
  float* ssx = reinterpret_cast<float*>(smem + P_SXQ) + wg * BT;
  int* ssq = reinterpret_cast<int*>(smem + P_SXQ) + 2 * BT + wg * BT;

  auto tile_of = [&](int j, int& n0, int& tk0) {  // tile j of this CTA, channel tiles fastest
    const int t = (int)blockIdx.x + j * (int)gridDim.x;
    n0 = (t % n_tiles_n) * BN;
    tk0 = (t / n_tiles_n) * BT;
  };
  auto issue_at = [&](int s, int kt, int n0, int tk0) {  // k-tile kt of tile (n0, tk0) into s
    uint8_t* st = smem + s * P_STAGE;
    mbar_expect_tx(&full[s], P_TX);
    tma_2d(st, &tm_codes, kt * H_BK, tk0, &full[s]);
    tma_3d(st + P_W, &tm_w, 0, n0, kt * 2, &full[s]);
    tma_2d(st + P_MULT, &tm_mult, n0, kt * 2, &full[s]);
  };
  auto issue_slab = [&](int tk0, int r0) {
    mbar_expect_tx(&act_full[wg], H_ACT_BYTES);
    tma_2d(buf, &tm_act, 2 * r0, tk0, &act_full[wg]);
  };

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 4);
    }
    mbar_init(&act_full[0], 1);
    mbar_init(&act_full[1], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    for (const CUtensorMap* m : {&tm_codes, &tm_w, &tm_mult, &tm_act})
      if (m != &tm_act || R > 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"(m) : "memory");
  }
  griddep_wait();  // as above: nothing global before it
  __syncthreads();

  if (wg < 0) {  // the copy warpgroup: one thread walks the stream, a stage once it is released
    setmaxnreg_dec<P_REG_COPY>();
    if (tid != 0) return;
    int s = 0, phase = 0;
    for (int j = 0, u = 0; j < my_tiles; ++j) {
      int n0, tk0;
      tile_of(j, n0, tk0);
      for (int kt = 0; kt < KT; ++kt, ++u) {
        if (u >= S) mbar_wait(&empty[s], phase ^ 1);  // position u - S is released
        issue_at(s, kt, n0, tk0);
        if (++s == S) {
          s = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }
  setmaxnreg_inc<P_REG_MMA>();

  const int row = (warp % 4) * 16 + g;  // this lane's channels in the tile: row, row + 8
  uint32_t a[4][4];                     // [k32 step][register]: four groups in flight
  int slabs = 0;                        // this warpgroup's slab copies waited for

  for (int j = wg; j < my_tiles; j += 2) {
    int n0, tk0;
    tile_of(j, n0, tk0);
    // this warpgroup's previous epilogue ended with a proxy fence and its barrier: its sx/sumq
    // and its buffer are free
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int t = min(tk0 + wt + e * WG_THREADS, M - 1);  // tokens past M: never stored
      cp_async4(&ssx[wt + e * WG_THREADS], sx + t, 4);
      cp_async4(&ssq[wt + e * WG_THREADS], sumq + t, 4);
    }
    cp_async_commit();
    if (R > 0 && wt == 0) issue_slab(tk0, 0);
    if (j > 0) bar_sync(P_TURN + wg, 2 * WG_THREADS);  // the other has issued tile j - 1
    int u = j * KT, stage = u % S, phase = (u / S) & 1, prev_stage = 0;
    int acc[NT][4];
#pragma unroll
    for (auto& v : acc) v[0] = v[1] = v[2] = v[3] = 0;
    for (int kt = 0; kt < KT; ++kt, ++u) {
      const int s = stage;
      mbar_wait(&full[s], phase);
      __syncwarp();
      const uint8_t* st = smem + s * P_STAGE;
      const uint32_t sb = smem_u32(st);
      uint2 w_lo, w_hi;
      uint32_t m_lo = 0, m_hi = 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // k32 step q: k64 half q / 2, word q % 2 of each row
        const int c = q / 2;
        wgmma_wait<3>();  // the group that last read a[q] (k-tile u-1, step q) is done
        if (q == 3 && kt > 0 && lane == 0) mbar_arrive(&empty[prev_stage]);  // k-tile u-1 read
        if (q % 2 == 0) {
          w_lo = *reinterpret_cast<const uint2*>(st + P_W + c * BN * 32 + row * 32 + 8 * tq);
          w_hi = *reinterpret_cast<const uint2*>(st + P_W + c * BN * 32 + (row + 8) * 32 + 8 * tq);
          m_lo = (uint8_t)st[P_MULT + c * BN + row];
          m_hi = (uint8_t)st[P_MULT + c * BN + row + 8];
        }
        widen_step(q % 2 ? w_lo.y : w_lo.x, q % 2 ? w_hi.y : w_hi.x, m_lo, m_hi, a[q]);
        wgmma_fence();
        wgmma_u8s8(acc, a[q], desc_kmajor<H_BK>(sb + 32 * q));
        wgmma_commit();
      }
      prev_stage = s;
      if (++stage == S) {
        stage = 0;
        phase ^= 1;
      }
    }
    if (j + 1 < my_tiles) bar_arrive(P_TURN + (wg ^ 1), 2 * WG_THREADS);  // the other's turn

    // as above, the epilogue's global loads go out before the drain
    const int n_lo = min(n0 + row, N - 1), n_hi = min(n0 + row + 8, N - 1);
    const float rs[2] = {row_scale[n_lo], row_scale[n_hi]};
    uint32_t ua[H_ACT_R / 16][4];
    load_up(ua, up, n_lo, n_hi, R, 0, tq);
    wgmma_wait<0>();
    pin<NT>(acc);
    // the last k-tile's stage goes back to the stream now, not after the epilogue
    if (lane == 0) mbar_arrive(&empty[prev_stage]);
    cp_async_wait<0>();
    bar_sync(P_WG + wg, WG_THREADS);  // publishes this warpgroup's sx/sumq

    // the epilogue of the kernel above, per warpgroup
    float f[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) dequant_n8(acc[i], 8 * i + 2 * tq, BT, ssx, ssq, rs, f[i]);
    lowrank_epilogue<T>(f, ua, up, n_lo, n_hi, R, tq, &act_full[wg], slabs, smem_u32(buf),
                        [&](int r0) {  // this warpgroup is done with the previous slab
                          bar_sync(P_WG + wg, WG_THREADS);
                          if (wt == 0) issue_slab(tk0, r0);
                        });
    const float bv[2] = {bias ? F16<T>::to_f(bias[n_lo]) : 0.f, bias ? F16<T>::to_f(bias[n_hi]) : 0.f};
    T* so = reinterpret_cast<T*>(buf);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // before the first half: every warp's branch wgmmas are done with the slab; before the
      // second: the first half has been copied out
      if (h == 1 || R > 0) bar_sync(P_WG + wg, WG_THREADS);
#pragma unroll
      for (int i = 0; i < NT / 2; i += 2)
        stage_n16<T, BN>(f[h * NT / 2 + i], f[h * NT / 2 + i + 1], bv, bias != nullptr, so, 8 * i,
                         row - g, lane);
      bar_sync(P_WG + wg, WG_THREADS);
      store_tile<T, BT / 2, BN, WG_THREADS>(so, y, tk0 + h * BT / 2, n0, M, N, wt);
    }
    // the buffer's generic reads and writes before the next slab's async-proxy copy into it
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    bar_sync(P_WG + wg, WG_THREADS);
  }
#endif
}

}  // namespace svdq

// output tiles of the wgmma GEMM (what split_plan, the launcher and the workspace count)
static int gemm_tiles(int M, int N) {
  return ((N + svdq::H_BN - 1) / svdq::H_BN) * ((M + svdq::H_BT - 1) / svdq::H_BT);
}

// Wave plan. One CTA per SM walks whole tiles; when the tiles do not fill the last wave well
// (432 tiles on 132 SMs: three full waves and 36 tiles, so a fourth wave with 27% of the SMs
// busy for a whole tile's time), the last wave's tiles are split, one part per CTA: into k-ranges
// when the tile has k-tiles enough (36 tiles x 3 ranges run on 108 SMs for a third of the time),
// otherwise into two token halves of 128 tokens (72 half tiles, each half a tile's MMAs). A lone
// wave at most half full (few tokens: 24 tiles at 256 tokens and N = 3072) is split into k-ranges
// the same way, every CTA taking one range and no whole tile.
struct WavePlan {
  int tiles;       // output tiles in all
  int full_tiles;  // tiles of the full waves, walked whole
  int splits;      // k-ranges per tile of the last wave (1: none)
  int halves;      // token halves per tile of the last wave (1: none); splits or halves is 1
  int tail_tiles() const { return tiles - full_tiles; }  // the last wave's, split or halved
  // The split GEMM's int32 workspace, the k-ranges' sums [tail tiles][splits][H_PART], and its
  // arrival counters, one per split tile (zero before the launch and left zero after it). Both
  // empty without k-ranges.
  long long sums_words() const {
    return splits > 1 ? (long long)tail_tiles() * splits * svdq::H_PART : 0;
  }
  int counters() const { return splits > 1 ? tail_tiles() : 0; }
};
static WavePlan split_plan(int M, int N, int K, int sms) {
  using namespace svdq;
  const int tiles = gemm_tiles(M, N), KT = (K + H_BK - 1) / H_BK;
  WavePlan p{tiles, tiles, 1, 1};
  if (sms <= 0) return p;
  const int rest = tiles % sms;  // a lone wave (tiles < sms) is all rest
  if (rest == 0 || 2 * rest > sms) return p;  // the last wave is at least half full
  // ranges of at least 16 k-tiles: ranges of 8 or 4 lost or broke even (proj, mlp_fc1: runs 58, 116)
  for (int s = 2; s * rest <= sms && KT / s >= 16; ++s)
    if (KT % s == 0) p.splits = s;
  if (p.splits == 1) {
    // A lone wave stays whole: at <= 128 tokens a second half would be all rows past M, and
    // halves were measured only as a last wave's
    if (tiles < sms) return p;
    p.halves = 2;  // 2 * rest <= sms
  }
  p.full_tiles = tiles - rest;
  return p;
}

// the plan for the binding (tests): returns splits; halves and full-wave tiles in *halves, *full
int svdq_w4a8_gemm_split_plan(int M, int N, int K, int sms, int* halves, int* full) {
  const WavePlan p = split_plan(M, N, K, sms);
  *halves = p.halves;
  *full = p.full_tiles;
  return p.splits;
}

#ifdef SVDQ_SM90A
// cuTensorMapEncodeTiled from the driver, looked up once through the runtime (no -lcuda).
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess || q != cudaDriverEntryPointSuccess)
      p = nullptr;
#else
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
#endif
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A uint8 tensor map: dims[0] innermost (elements = bytes), strides in bytes for dims 1.., box.
template <int RANK>
static int make_map(CUtensorMap* map, const void* base, const cuuint64_t (&dims)[RANK],
                    const cuuint64_t (&strides)[RANK - 1], const cuuint32_t (&box)[RANK],
                    CUtensorMapSwizzle swizzle) {
  auto enc = tensor_map_encoder();
  if (!enc) return (int)cudaErrorNotSupported;
  cuuint32_t ones[RANK];
  for (int i = 0; i < RANK; ++i) ones[i] = 1;
  const CUresult r = enc(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, RANK, const_cast<void*>(base), dims,
                         strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                         CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : (int)cudaErrorInvalidValue;
}

// The tensor maps both wgmma kernels copy through, for tiles of bn channels x H_BT tokens:
// codes [M][K] (boxes of H_BK bytes x H_BT tokens, 128-byte swizzle), qweight as {32 bytes,
// N rows (stride K/2), K/64 groups (stride 32)} (boxes {32, bn, 2}), multT [K/64][N] (boxes
// {bn, 2}) and the branch activation [M, R] 16-bit as bytes, 32 ranks (64 bytes) by H_BT tokens
// a box, with the 64-byte swizzle; ranks past R arrive as zeros and are never multiplied (ta is
// left zeroed and unused when R == 0).
static int operand_maps(CUtensorMap* tc, CUtensorMap* tw, CUtensorMap* tm, CUtensorMap* ta,
                        const int8_t* codes, const uint8_t* qweight, const int8_t* multT,
                        const void* act, int R, int M, int N, int K, int bn) {
  using namespace svdq;
  *ta = CUtensorMap{};
  int rc = make_map<2>(tc, codes, {(cuuint64_t)K, (cuuint64_t)M}, {(cuuint64_t)K},
                       {(cuuint32_t)H_BK, (cuuint32_t)H_BT}, CU_TENSOR_MAP_SWIZZLE_128B);
  if (!rc)
    rc = make_map<3>(tw, qweight, {32, (cuuint64_t)N, (cuuint64_t)(K / 64)},
                     {(cuuint64_t)(K / 2), 32}, {32, (cuuint32_t)bn, 2},
                     CU_TENSOR_MAP_SWIZZLE_NONE);
  if (!rc)
    rc = make_map<2>(tm, multT, {(cuuint64_t)N, (cuuint64_t)(K / 64)}, {(cuuint64_t)N},
                     {(cuuint32_t)bn, 2}, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (!rc && R > 0)
    rc = make_map<2>(ta, act, {(cuuint64_t)R * 2, (cuuint64_t)M}, {(cuuint64_t)R * 2},
                     {(cuuint32_t)H_ACT_R * 2, (cuuint32_t)H_BT}, CU_TENSOR_MAP_SWIZZLE_64B);
  return rc;
}

template <typename T>
static int launch_sm90(const int8_t* codes, const float* sx, const int* sumq,
                      const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                      const void* act, const void* up, int R, const void* bias, void* y, int M,
                      int N, int K, int* part, int* arrived, cudaStream_t stream) {
  using namespace svdq;
  // persistent: one CTA per SM (or per unit, when there are fewer), each walking its tiles; a
  // short last wave's tiles split into k-ranges or token halves, one more unit for the first
  // CTAs, and a short lone wave's into k-ranges, one unit per CTA (split_plan)
  const int sms = sm_count();
  const WavePlan plan = split_plan(M, N, K, sms);
  const int full = plan.full_tiles, splits = plan.splits;
  CUtensorMap tc, tw, tm, ta;
  int rc = operand_maps(&tc, &tw, &tm, &ta, codes, qweight, multT, act, R, M, N, K, H_BN);
  // a token half's codes: 128 token rows a box. Unused without token halves.
  CUtensorMap th{};
  if (!rc && plan.halves > 1)
    rc = make_map<2>(&th, codes, {(cuuint64_t)K, (cuuint64_t)M}, {(cuuint64_t)K},
                     {(cuuint32_t)H_BK, (cuuint32_t)(H_BT / 2)}, CU_TENSOR_MAP_SWIZZLE_128B);
  if (rc) return rc;
  cudaError_t e = cudaFuncSetAttribute(gemm_sm90_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, H_SMEM);
  if (e != cudaSuccess) return (int)e;
  // the units: the whole tiles (one CTA walks several), or a lone wave's parts (one each)
  const int units = std::max(full, plan.tail_tiles() * splits * plan.halves);
  int grid = sms;
  if (grid <= 0 || units < grid) grid = units;
  // PDL (csrc/launch.cuh) behind the activation kernel; the k-ranges' counters need no memset in
  // between (split_counters in csrc/binding.cpp). Not behind a short last wave's ranges: there
  // the layers ran 1-3% slower with it (bench/NOTES.md, runs 185-186; not explained), a lone
  // wave's 1-5% faster.
  const bool pdl = splits == 1 || full == 0;
  return (int)launch(gemm_sm90_kernel<T>, grid, H_THREADS, H_SMEM, stream, pdl, tc, th, tw, tm,
                     ta, sx, sumq, row_scale, (const T*)up, R, (const T*)bias, (T*)y, M, N, K,
                     full, splits, plan.halves, part, arrived);
}

// The ping-pong kernel (variant 3): 64-channel tiles, no last-wave split, no workspace.
template <typename T>
static int launch_sm90_pp(const int8_t* codes, const float* sx, const int* sumq,
                          const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                          const void* act, const void* up, int R, const void* bias, void* y, int M,
                          int N, int K, cudaStream_t stream) {
  using namespace svdq;
  CUtensorMap tc, tw, tm, ta;
  const int rc = operand_maps(&tc, &tw, &tm, &ta, codes, qweight, multT, act, R, M, N, K, P_BN);
  if (rc) return rc;
  const cudaError_t e = cudaFuncSetAttribute(gemm_sm90_pp_kernel<T>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, P_SMEM);
  if (e != cudaSuccess) return (int)e;
  const int tiles = ((N + P_BN - 1) / P_BN) * ((M + H_BT - 1) / H_BT);
  int grid = sm_count();
  if (grid <= 0 || tiles < grid) grid = tiles;
  return (int)launch(gemm_sm90_pp_kernel<T>, grid, P_THREADS, P_SMEM, stream, true, tc, tw, tm,
                     ta, sx, sumq, row_scale, (const T*)up, R, (const T*)bias, (T*)y, M, N, K);
}
#endif  // SVDQ_SM90A

// int32 words of partial sums the GEMM needs for M x N x K, and in *counters its arrival counters
long long svdq_w4a8_gemm_sm90_workspace(int M, int N, int K, int* counters) {
#ifndef SVDQ_SM90A
  *counters = 0;
  return 0;
#else
  const WavePlan p = split_plan(M, N, K, svdq::sm_count());
  *counters = p.counters();
  return p.sums_words();
#endif
}

int svdq_w4a8_gemm_sm90(const int8_t* codes, const float* sx, const int* sumq,
                        const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                        const void* act, const void* up, int R, const void* bias, void* y, int M,
                        int N, int K, bool fp16, bool pingpong, int* part, int* arrived,
                        cudaStream_t stream) {
#ifndef SVDQ_SM90A
  return (int)cudaErrorInvalidDeviceFunction;  // this build has no sm_90a code
#else
  if (pingpong && fp16)
    return launch_sm90_pp<__half>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias, y,
                                  M, N, K, stream);
  if (pingpong)
    return launch_sm90_pp<__nv_bfloat16>(codes, sx, sumq, qweight, multT, row_scale, act, up, R,
                                         bias, y, M, N, K, stream);
  if (fp16)
    return launch_sm90<__half>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias, y, M,
                               N, K, part, arrived, stream);
  return launch_sm90<__nv_bfloat16>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias,
                                    y, M, N, K, part, arrived, stream);
#endif
}
