// Launching the layer's kernels: programmatic dependent launch (PDL) and the device facts the
// launchers need. Included by csrc/w4a8.cu and csrc/w4a8_sm90.cu.
//
// A layer is two or three kernels back to back on one stream (act_stats_kernel ->
// act_quant_kernel -> GEMM, or act_kernel -> GEMM). Launched plainly, each is scheduled only
// once the whole previous grid has finished, so every boundary costs a launch latency and the
// new kernel's prologue on an idle GPU. With PDL (sm_90+, the launch attribute
// cudaLaunchAttributeProgrammaticStreamSerialization) the next grid is scheduled as soon as every
// CTA of the previous one has called griddep_launch() (or exited); its CTAs take SMs as they
// free up, run their prologue, and block in griddep_wait() until the previous grid has
// completed and its memory is visible.
//
// Which launches use it: the second and third kernels of a layer, whose predecessor is the
// layer's own previous kernel (not the wgmma GEMM behind a short last wave's k-ranges, where it
// measured slower: csrc/w4a8_sm90.cu launch_sm90). The layer's first kernel is launched plainly
// and the GEMM never calls griddep_launch(), so nothing of a layer starts early behind someone
// else's kernel or the previous layer's GEMM. Measured on the H200 (bench/NOTES.md, runs
// 71-72): PDL inside the layer, 1-4% faster (proj at 4608 tokens 1.02-1.04x, the largest); with
// the first kernel also launched early behind the previous layer's GEMM, back-to-back layers ran
// 4-17% *slower*.
//
// The contract, for every kernel that can be launched with PDL: griddep_wait() comes before its
// first global-memory access, read or write. Kernel parameters, registers and shared memory
// are safe before it. Since each kernel waits for its predecessor, which had waited for its
// own, completion is transitive along the stream. On GPUs below sm_90, and for a launch without
// the attribute, both calls do nothing. SVDQ_PDL=0 turns PDL off (A/B timing, debugging).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

namespace svdq {

__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next PDL-launched grid be scheduled once every CTA of this one has called it. The
// activation kernels call it right after griddep_wait(): their successor's CTAs then take only
// SM space that theirs leave, and wait in griddep_wait() anyway.
__device__ __forceinline__ void griddep_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// An attribute of the current device, looked up once per device (0 if the query fails).
template <cudaDeviceAttr A>
inline int device_attr() {
  constexpr int DEVS = 64;
  static int cache[DEVS] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= DEVS) return 0;
  if (cache[dev] == 0 && cudaDeviceGetAttribute(&cache[dev], A, dev) != cudaSuccess) cache[dev] = 0;
  return cache[dev];
}
inline int sm_count() { return device_attr<cudaDevAttrMultiProcessorCount>(); }

// PDL needs sm_90; SVDQ_PDL=0 turns it off.
inline bool pdl_enabled() {
  const char* e = std::getenv("SVDQ_PDL");
  if (e && e[0] == '0' && e[1] == '\0') return false;
  return device_attr<cudaDevAttrComputeCapabilityMajor>() >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL when `pdl` and the device allow it.
// Returns the launch's cudaError_t.
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl && pdl_enabled() ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (e != cudaSuccess) (void)cudaGetLastError();  // reported here; not left for torch to find
  return e;
}

}  // namespace svdq
