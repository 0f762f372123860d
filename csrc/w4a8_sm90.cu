// SVDQuant W4A8 GEMM for Hopper (sm_90a): the same computation as gemm_kernel in csrc/w4a8.cu,
// on the asynchronous warpgroup MMA (wgmma), which mma.sync cannot reach: ~1979 dense int8 TOPS
// on the H100/H200 datasheet against the 1218 TOPS measured for mma.sync (DESIGN.md). Inputs,
// outputs and bits are those of gemm_kernel (the activation codes come from svdq_w4a8_act).
//
// wgmma takes its B operand only from shared memory and A from registers or shared memory, so
// the 4-bit weights, widened to int8 in registers, are A (the M side: 64 output channels per
// warpgroup) and the activation codes are B (the N side: BT tokens), straight from the
// cp.async stages. That is the orientation gemm_kernel already uses, with the same fragments:
// per warp of the warpgroup, wgmma's A registers and its s32 accumulators are laid out as
// mma.m16n8k32's (rows 16w + g, 16w + g + 8; tokens 8i + 2tq + {0, 1}), so widen_group and
// epilogue_m16 (csrc/common.cuh) serve both kernels unchanged.
//
// CTA: 2 warpgroups (256 threads) x 64 channels = BN 128 channels, BT = 128 tokens, k-tile 128
// (two k64 groups, four m64n128k32 wgmma steps per warpgroup), two CTAs per SM (128 registers:
// 64 accumulators). Shared memory per stage, 1024-aligned:
//
//   [0, BT*128)             activation codes [BT tokens][128 bytes], 16-byte chunk c of token
//                           row r at chunk c ^ (r & 7): exactly wgmma's 128-byte swizzle (address
//                           bits 4-6 XOR bits 7-9), so one descriptor describes the tile: K-major,
//                           8-row core groups 1024 bytes apart (SBO), and the k32 step s starts
//                           32*s bytes in (the hardware swizzles the absolute address).
//   [BT*128, +8192)         packed weights [2 groups][128 rows][32 bytes], as in gemm_kernel
//   [.., +256)              multipliers [2 groups][128 rows]
//
// Pipeline: STAGES cp.async stages, all threads copy. A k-tile's wgmmas run while the
// warpgroup waits for the next k-tile's copies; before widening the next weights into the same
// registers it waits for them to finish (keeping a second register set live instead makes ptxas
// serialize every wgmma: warning C7513). After that wait and the barrier, no warpgroup reads
// stage (kt-1)%S any more, so it takes k-tile kt+STAGES-1. cp.async writes through the generic
// proxy and wgmma reads through the async proxy: fence.proxy.async between the two, before the
// barrier. The other three warpgroups on the SM keep the tensor cores busy while one widens.

#include "common.cuh"

namespace svdq {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SVDQ_WGMMA_DEVICE 1
#elif defined(__CUDA_ARCH__) && defined(SVDQ_SM90A)
#error "SVDQ_SM90A builds need -gencode=arch=compute_90a,code=sm_90a (svdq/build.py sets it)"
#endif

// Tile and pipeline. Measured on the H200 (bench/NOTES.md, runs 11-13), against this 128 x 128
// tile with two CTAs per SM: 256 tokens x 128 channels (one CTA per SM, m64n256k32) 0.85x of
// its speed, 128 tokens x 256 channels (four warpgroups, one CTA per SM) 0.84x.
constexpr int H_BN = 128, H_BT = 128, H_BK = 128, H_THREADS = 256, H_STAGES = 4;
constexpr int H_W = H_BT * H_BK;                                 // weights after the activations
constexpr int H_MULT = H_W + 2 * H_BN * 32;
constexpr int H_STAGE = (H_MULT + 2 * H_BN + 1023) / 1024 * 1024;  // 25 KB
constexpr int H_SMEM = H_STAGES * H_STAGE + 1024;  // + slack to align the base; 2 CTAs per SM fit
static_assert(H_BT * out_stride<H_BN>() * 2 <= H_STAGES * H_STAGE, "the output tile must fit");
static_assert(2 * (H_SMEM + 1024) <= 228 * 1024, "two CTAs per SM (228 KB, 1 KB reserved each)");

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in
// bits 0-13, leading byte offset >> 4 in 16-29 (unused by K-major swizzled layouts), stride
// byte offset >> 4 in 32-45 (1024: eight 128-byte rows), swizzle mode in 62-63 (1 = 128 bytes).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
  return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
         ((uint64_t)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accumulator accesses across a wgmma wait.
template <int NT> __device__ __forceinline__ void pin(int (&d)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
    asm volatile("" : "+r"(d[i][0]), "+r"(d[i][1]), "+r"(d[i][2]), "+r"(d[i][3])::"memory");
}

// d[64 x 8*NT] += A (4 registers per thread, u8) x B (descriptor, s8, K-major), s32.
template <int NT> __device__ __forceinline__ void wgmma_u8s8(int (&d)[NT][4], const uint32_t a[4],
                                                             uint64_t desc);
template <> __device__ __forceinline__ void wgmma_u8s8<16>(int (&d)[16][4], const uint32_t a[4],
                                                         uint64_t desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, 1;\n"
      : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]), "+r"(d[1][3]),
        "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3]), "+r"(d[3][0]), "+r"(d[3][1]), "+r"(d[3][2]), "+r"(d[3][3]),
        "+r"(d[4][0]), "+r"(d[4][1]), "+r"(d[4][2]), "+r"(d[4][3]), "+r"(d[5][0]), "+r"(d[5][1]), "+r"(d[5][2]), "+r"(d[5][3]),
        "+r"(d[6][0]), "+r"(d[6][1]), "+r"(d[6][2]), "+r"(d[6][3]), "+r"(d[7][0]), "+r"(d[7][1]), "+r"(d[7][2]), "+r"(d[7][3]),
        "+r"(d[8][0]), "+r"(d[8][1]), "+r"(d[8][2]), "+r"(d[8][3]), "+r"(d[9][0]), "+r"(d[9][1]), "+r"(d[9][2]), "+r"(d[9][3]),
        "+r"(d[10][0]), "+r"(d[10][1]), "+r"(d[10][2]), "+r"(d[10][3]), "+r"(d[11][0]), "+r"(d[11][1]), "+r"(d[11][2]), "+r"(d[11][3]),
        "+r"(d[12][0]), "+r"(d[12][1]), "+r"(d[12][2]), "+r"(d[12][3]), "+r"(d[13][0]), "+r"(d[13][1]), "+r"(d[13][2]), "+r"(d[13][3]),
        "+r"(d[14][0]), "+r"(d[14][1]), "+r"(d[14][2]), "+r"(d[14][3]), "+r"(d[15][0]), "+r"(d[15][1]), "+r"(d[15][2]), "+r"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <typename T>
__global__ void __launch_bounds__(H_THREADS, 2)
gemm_sm90_kernel(const int8_t* __restrict__ codes, const float* __restrict__ sx,
                 const int* __restrict__ sumq, const uint8_t* __restrict__ qweight,
                 const int8_t* __restrict__ multT, const float* __restrict__ row_scale,
                 const T* __restrict__ act, const T* __restrict__ up, int R,
                 const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
#ifdef SVDQ_WGMMA_DEVICE
  constexpr int S = H_STAGES, NT = H_BT / 8, THREADS = H_THREADS, BT = H_BT, BN = H_BN;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int row = (warp / 4) * 64 + (warp % 4) * 16 + g;  // this lane's channels: row, row + 8
  const int n0 = blockIdx.x * BN, tk0 = blockIdx.y * BT;
  const int G = K / 64, KT = (K + H_BK - 1) / H_BK;

  auto load_stage = [&](int stage, int kt) {
    uint8_t* s = smem + stage * H_STAGE;
    const int kbase = kt * H_BK;
#pragma unroll
    for (int i = 0; i < (BT * H_BK / 16) / THREADS; ++i) {
      const int c = tid + i * THREADS, r = c / 8, ch = c % 8;
      const int kk = kbase + ch * 16;
      const bool ok = kk < K;
      const int8_t* src = codes + (size_t)min(tk0 + r, M - 1) * K + (ok ? kk : 0);
      cp_async16(s + r * H_BK + ((ch ^ (r & 7)) * 16), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < (2 * BN * 2) / THREADS; ++i) {
      const int c = tid + i * THREADS, grp = c / (2 * BN), rem = c % (2 * BN);
      const int r = rem / 2, h = rem % 2, kg = kt * 2 + grp;
      const bool ok = kg < G;
      const uint8_t* src = qweight + (size_t)min(n0 + r, N - 1) * (K / 2) + (ok ? kg * 32 + h * 16 : 0);
      cp_async16(s + H_W + grp * BN * 32 + r * 32 + h * 16, src, ok ? 16 : 0);
    }
    if (tid < 2 * BN / 4) {
      const int grp = tid / (BN / 4), r = (tid % (BN / 4)) * 4, kg = kt * 2 + grp;
      const bool ok = kg < G && n0 + r < N;
      cp_async4(s + H_MULT + grp * BN + r, ok ? multT + (size_t)kg * N + n0 + r : multT,
                ok ? 4 : 0);
    }
  };

  int acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0;

#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < KT) load_stage(st, st);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    wgmma_wait<0>();  // this warpgroup's wgmmas of k-tile kt-1 are done: `a` is free again
    pin<NT>(acc);
    cp_async_wait<S - 2>();
    fence_proxy_async();
    __syncthreads();  // k-tile kt has landed; nobody reads stage (kt-1)%S any more
    if (kt + S - 1 < KT) load_stage((kt + S - 1) % S, kt + S - 1);
    cp_async_commit();
    const uint8_t* s = smem + (kt % S) * H_STAGE;
    uint32_t a[2][2][4];  // [k64 group][k32 step][register]
#pragma unroll
    for (int c = 0; c < 2; ++c)
      widen_group(*reinterpret_cast<const uint2*>(s + H_W + c * BN * 32 + row * 32 + 8 * tq),
                  *reinterpret_cast<const uint2*>(s + H_W + c * BN * 32 + (row + 8) * 32 + 8 * tq),
                  (uint8_t)s[H_MULT + c * BN + row], (uint8_t)s[H_MULT + c * BN + row + 8],
                  a[c]);
    wgmma_fence();
    const uint32_t sb = smem_u32(s);
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int st = 0; st < 2; ++st) wgmma_u8s8<NT>(acc, a[c][st], desc_sw128(sb + 64 * c + 32 * st));
    wgmma_commit();
  }
  wgmma_wait<0>();
  pin<NT>(acc);
  cp_async_wait<0>();
  __syncthreads();  // every wgmma and copy is done: the stages become the output tile

  T* so = reinterpret_cast<T*>(smem);
  epilogue_m16<T, NT, BN>(acc, n0 + row, row, tk0, 0, sx, sumq, row_scale, act, up, R, bias, so, M, N,
                      lane);
  __syncthreads();
  store_tile<T, BT, BN, THREADS>(so, y, tk0, n0, M, N, tid);
#endif
}

}  // namespace svdq

template <typename T>
static int launch_sm90(const int8_t* codes, const float* sx, const int* sumq,
                       const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                       const void* act, const void* up, int R, const void* bias, void* y, int M,
                       int N, int K, cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(svdq::gemm_sm90_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, svdq::H_SMEM);
  if (e != cudaSuccess) return (int)e;
  dim3 grid((N + svdq::H_BN - 1) / svdq::H_BN, (M + svdq::H_BT - 1) / svdq::H_BT);
  svdq::gemm_sm90_kernel<T><<<grid, svdq::H_THREADS, svdq::H_SMEM, stream>>>(
      codes, sx, sumq, qweight, multT, row_scale, (const T*)act, (const T*)up, R, (const T*)bias,
      (T*)y, M, N, K);
  return (int)cudaGetLastError();
}

int svdq_w4a8_gemm_sm90(const int8_t* codes, const float* sx, const int* sumq,
                        const uint8_t* qweight, const int8_t* multT, const float* row_scale,
                        const void* act, const void* up, int R, const void* bias, void* y, int M,
                        int N, int K, bool fp16, cudaStream_t stream) {
#ifndef SVDQ_SM90A
  return (int)cudaErrorInvalidDeviceFunction;  // this build has no sm_90a code
#else
  if (fp16)
    return launch_sm90<__half>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias, y, M,
                               N, K, stream);
  return launch_sm90<__nv_bfloat16>(codes, sx, sumq, qweight, multT, row_scale, act, up, R, bias,
                                    y, M, N, K, stream);
#endif
}
