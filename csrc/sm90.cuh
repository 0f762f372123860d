// Hopper primitives for the sm_90a kernels (csrc/w4a8_sm90.cu: the wgmma GEMM): the build guard
// mbarriers (PTX ISA, "mbarrier") and named barriers.
#pragma once

#include "common.cuh"

// Device code for sm_90a only: every other target compiles the kernels' bodies away (the host
// launchers refuse them first).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SVDQ_SM90A_DEVICE 1
#elif defined(__CUDA_ARCH__) && defined(SVDQ_SM90A)
#error "SVDQ_SM90A builds need -gencode=arch=compute_90a,code=sm_90a (svdq/build.py sets it)"
#endif

namespace svdq {

__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)),
               "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, int parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
}

// A consumer's release of a stage: one arrival (release semantics at CTA scope, the default).
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}

// Moves registers between warpgroups (PTX ISA "setmaxnreg", sm_90a): every warp of the
// warpgroup executes it. The copy warpgroup gives up what it does not need, the MMA
// warpgroups take it; ptxas allocates the code after each instruction within its count.
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Named barriers 1..15 (0 is __syncthreads): bar_sync waits until `threads` threads have arrived
// (itself included), bar_arrive counts this thread without waiting, for one-way hand-offs
// between warpgroups. threads is a multiple of 32.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace svdq
