// Weight-only 4-bit layers (the adaLN modulation linears, `w4a16`): dequantize to 16 bits in
// one pass, then a cuBLAS GEMM on the 16-bit input. These layers see one row per sample (the
// conditioning vector), so they are bandwidth-bound GEMVs; the fused W4A8 GEMM would gain
// nothing, and per-call PyTorch dequantization costs ~10 passes over the weight.
//
// Layout (docs/format.md §3): qweight uint8 [N, K/2] natural order; byte j of a row holds code
// 2j in its low nibble and code 2j+1 in its high nibble, two's complement. Read as a
// little-endian 32-bit word, word w of a row holds codes 8w..8w+7 at bits 4i (i = 0..7), all in
// the group g = 8w / 64 (a group of 64 codes is 8 words), whose scale is scales[n, g].
//
// Numbers: w[n, k] = T(float(code) * scale[n, g]) with scale given in fp32 (the stored 16-bit
// scale, widened exactly). code * scale is exact in fp32 (4-bit times 11-bit mantissas), so the
// only rounding is the final one to T, as in svdq/reference.py w4a16_main.
//
// One thread per word: one 4-byte load, one 16-byte store (8 x 16-bit outputs, 16-byte aligned
// since K % 64 == 0).

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace svdq {

__device__ __forceinline__ uint16_t to_bits(float v, __nv_bfloat16*) {
  __nv_bfloat16 h = __float2bfloat16_rn(v);
  return *reinterpret_cast<uint16_t*>(&h);
}
__device__ __forceinline__ uint16_t to_bits(float v, __half*) {
  __half h = __float2half_rn(v);
  return *reinterpret_cast<uint16_t*>(&h);
}

template <typename T>
__global__ void dequant_w4_kernel(const uint32_t* __restrict__ q, const float* __restrict__ scales,
                                  T* __restrict__ w, long long words, int words_per_row,
                                  int groups) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= words) return;
  const long long n = idx / words_per_row;
  const int wr = (int)(idx - n * words_per_row);
  const float s = scales[n * groups + wr / 8];
  const uint32_t word = q[idx];
  uint32_t packed[4];
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    // sign-extend each nibble: shift it to the top of an int32, then arithmetic shift back
    const int lo = (int)(word << (28 - 4 * i)) >> 28;
    const int hi = (int)(word << (24 - 4 * i)) >> 28;
    packed[i / 2] = (uint32_t)to_bits((float)lo * s, (T*)nullptr) |
                    ((uint32_t)to_bits((float)hi * s, (T*)nullptr) << 16);
  }
  reinterpret_cast<uint4*>(w)[idx] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
}

}  // namespace svdq

// Host launcher (no torch): the binding validates shapes; returns a cudaError_t.
int svdq_dequant_w4(const uint8_t* qweight, const float* scales, void* w, int N, int K, bool fp16,
                    cudaStream_t stream) {
  const long long words = (long long)N * (K / 8);
  if (words == 0) return 0;
  const int threads = 256;
  const unsigned blocks = (unsigned)((words + threads - 1) / threads);
  if (fp16)
    svdq::dequant_w4_kernel<__half><<<blocks, threads, 0, stream>>>(
        (const uint32_t*)qweight, scales, (__half*)w, words, K / 8, K / 64);
  else
    svdq::dequant_w4_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        (const uint32_t*)qweight, scales, (__nv_bfloat16*)w, words, K / 8, K / 64);
  return (int)cudaGetLastError();
}
