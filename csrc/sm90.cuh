// Hopper primitives for the sm_90a kernels (csrc/w4a8_sm90.cu: the wgmma GEMM): the build guard
// and mbarriers (PTX ISA, "mbarrier").
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

}  // namespace svdq
