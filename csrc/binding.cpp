// Thin pybind11 binding for csrc/w4a8.cu, csrc/w4a8_sm90.cu and csrc/dequant_w4.cu: checks
// tensors, then calls the plain launchers.
// All shape rules live here (and in docs/kernels.md); the kernels trust them.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <utility>

int svdq_w4a8_act(const void* x, bool fp16, int M, int K, const float* inv_smooth, const void* down,
                  const float* rank_scale, int R, int8_t* codes, float* sx, int* sumq, void* act,
                  float* work, int variant, cudaStream_t stream);
long long svdq_w4a8_act_workspace(int M, int K, int R, int variant);
int svdq_w4a8_gemm(const int8_t* codes, const float* sx, const int* sumq, const uint8_t* qweight,
                   const int8_t* multT, const float* row_scale, const void* act, const void* up,
                   int R, const void* bias, void* y, int M, int N, int K, bool fp16,
                   int variant, int* part, int* arrived, cudaStream_t stream);
long long svdq_w4a8_gemm_sm90_workspace(int M, int N, int K, int* counters);
int svdq_w4a8_gemm_split_plan(int M, int N, int K, int sms, int* halves, int* full);

int svdq_dequant_w4(const uint8_t* qweight, const float* scales, void* w, int N, int K, bool fp16,
                    cudaStream_t stream);

static constexpr int64_t MAX_K = 65536;  // int32 accumulator bound: K * 240 * 127 < 2^31

#define CHECK_T(t, dt, what)                                                                  \
  TORCH_CHECK((t).is_cuda() && (t).is_contiguous() && (t).scalar_type() == (dt),              \
              "svdq: ", what, " must be a contiguous CUDA tensor of ", c10::toString(dt),    \
              ", got ", (t).scalar_type(), (t).is_contiguous() ? "" : " (non-contiguous)", \
              (t).is_cuda() ? "" : " on CPU")

static void check_k(int64_t K) {
  TORCH_CHECK(K > 0 && K % 64 == 0 && K <= MAX_K, "svdq w4a8: in_features K=", K,
              " must be a positive multiple of 64 and at most ", MAX_K);
}

static void check_rc(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "svdq: ", what, " failed: ", cudaGetErrorString((cudaError_t)rc));
}

// x [M,K] 16-bit; inv_smooth fp32 [K]; down [R,K] x.dtype; rank_scale fp32 [R]; R % 16 == 0.
// Outputs: codes int8 [M,K] (k permuted per 64, see w4a8.cu), sx fp32 [M], sumq int32 [M],
// act x.dtype [M,R].
void act_quant(torch::Tensor x, torch::Tensor inv_smooth, torch::Tensor down,
               torch::Tensor rank_scale, torch::Tensor codes, torch::Tensor sx, torch::Tensor sumq,
               torch::Tensor act, int64_t variant) {
  TORCH_CHECK(x.dim() == 2, "svdq act_quant: x must be 2-D [M, K]");
  TORCH_CHECK(variant >= 0 && variant <= 2, "svdq act_quant: variant ", variant, " is not 0 "
              "(16-token blocks), 1 (8-token blocks) or 2 (split over k-chunks)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "svdq: x must be bfloat16 or float16, got ",
              dt);
  CHECK_T(x, dt, "x");
  const int64_t M = x.size(0), K = x.size(1), R = down.size(0);
  check_k(K);
  TORCH_CHECK(R % 16 == 0, "svdq act_quant: rank ", R, " must be padded to a multiple of 16");
  CHECK_T(inv_smooth, at::kFloat, "inv_smooth");
  CHECK_T(down, dt, "lowrank_down (in x's dtype)");
  CHECK_T(rank_scale, at::kFloat, "rank_scale");
  CHECK_T(codes, at::kChar, "codes");
  CHECK_T(sx, at::kFloat, "sx");
  CHECK_T(sumq, at::kInt, "sumq");
  CHECK_T(act, dt, "act");
  TORCH_CHECK(inv_smooth.numel() == K && (R == 0 || down.size(1) == K) && rank_scale.numel() == R &&
                  codes.size(0) == M && codes.size(1) == K && sx.numel() == M &&
                  sumq.numel() == M && act.numel() == M * R,
              "svdq act_quant: tensor shapes do not match x [", M, ", ", K, "] and rank ", R);
  TORCH_CHECK(M < (1LL << 31), "svdq: too many tokens");
  const c10::cuda::CUDAGuard guard(x.device());
  // the split kernels' fp32 partials (variant 2 only); the caching allocator keeps it
  // stream-ordered
  const long long words = svdq_w4a8_act_workspace((int)M, (int)K, (int)R, (int)variant);
  const auto work =
      words ? torch::empty({words}, x.options().dtype(at::kFloat)) : torch::Tensor();
  check_rc(svdq_w4a8_act(x.data_ptr(), dt == at::kHalf, (int)M, (int)K,
                         inv_smooth.data_ptr<float>(), R ? down.data_ptr() : nullptr,
                         rank_scale.data_ptr<float>(), (int)R, codes.data_ptr<int8_t>(),
                         sx.data_ptr<float>(), sumq.data_ptr<int>(), act.data_ptr(),
                         words ? work.data_ptr<float>() : nullptr, (int)variant,
                         c10::cuda::getCurrentCUDAStream().stream()),
           "w4a8 activation kernel");
}

// The split GEMM's arrival counters (csrc/w4a8_sm90.cu), at least n of them, for the current
// device and stream: zero before every launch, because each launch leaves them zero (the last
// range of a tile to arrive resets its counter). So no memset runs between the activation
// kernel and the GEMM, which a PDL launch could not follow (bench/NOTES.md, runs 74 and 185).
// One buffer per device and stream: launches on one stream run in order, and two streams never
// share counters. Zeroed when made or grown (in stream order); kept for the process's life
// (an int per split tile), and never destroyed, so that nothing frees it after CUDA's teardown.
static int* split_counters(const torch::Tensor& like, int n) {
  static std::mutex mu;
  static auto* bufs = new std::map<std::pair<int, cudaStream_t>, torch::Tensor>();
  const std::lock_guard<std::mutex> lock(mu);
  torch::Tensor& t = (*bufs)[{(int)like.get_device(), c10::cuda::getCurrentCUDAStream().stream()}];
  // a plan splits at most half the SMs' worth of tiles (split_plan), so 256 counters serve any
  // GPU of up to 512 SMs without growing
  if (!t.defined() || t.numel() < n)
    t = torch::zeros({std::max(n, 256)}, like.options().dtype(at::kInt));
  return t.data_ptr<int>();
}

// y [M,N] = W4A8(codes) + act . up^T + bias.  qweight uint8 [N, K/2] natural layout,
// multT int8 [K/64, N], row_scale fp32 [N], up [N, R] y.dtype, bias [N] y.dtype or None.
void gemm(torch::Tensor codes, torch::Tensor sx, torch::Tensor sumq, torch::Tensor qweight,
          torch::Tensor multT, torch::Tensor row_scale, torch::Tensor act, torch::Tensor up,
          const c10::optional<torch::Tensor>& bias, torch::Tensor y, int64_t variant) {
  TORCH_CHECK(variant >= 1 && variant <= 3, "svdq gemm: variant ", variant, " is not 1 (mma.sync), "
              "2 (wgmma) or 3 (wgmma, ping-pong)");
#ifndef SVDQ_SM90A
  TORCH_CHECK(variant == 1, "svdq gemm: variant ", variant, " (wgmma) needs a Hopper GPU and an "
              "extension built for sm_90a");
#endif
  const auto dt = y.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "svdq: output must be bfloat16 or float16");
  CHECK_T(codes, at::kChar, "codes");
  CHECK_T(sx, at::kFloat, "sx");
  CHECK_T(sumq, at::kInt, "sumq");
  CHECK_T(qweight, at::kByte, "qweight");
  CHECK_T(multT, at::kChar, "multT");
  CHECK_T(row_scale, at::kFloat, "row_scale");
  CHECK_T(act, dt, "act");
  CHECK_T(up, dt, "lowrank_up (in the output dtype)");
  CHECK_T(y, dt, "y");
  const int64_t M = codes.size(0), K = codes.size(1), N = qweight.size(0), R = up.size(1);
  check_k(K);
  TORCH_CHECK(N > 0 && N % 8 == 0, "svdq w4a8: out_features N=", N,
              " must be a positive multiple of 8");
  TORCH_CHECK(R % 16 == 0, "svdq gemm: rank ", R, " must be padded to a multiple of 16");
  TORCH_CHECK(qweight.size(1) * 2 == K && multT.size(0) == K / 64 && multT.size(1) == N &&
                  row_scale.numel() == N && sx.numel() == M && sumq.numel() == M &&
                  act.numel() == M * R && up.size(0) == N && y.size(0) == M && y.size(1) == N,
              "svdq gemm: tensor shapes do not match codes [", M, ", ", K, "], qweight [", N,
              ", ", K / 2, "], rank ", R);
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    CHECK_T(*bias, dt, "bias");
    TORCH_CHECK(bias->numel() == N, "svdq gemm: bias must have N=", N, " elements");
    bptr = bias->data_ptr();
  }
  TORCH_CHECK(variant == 1 || N % 16 == 0, "svdq gemm: variant ", variant, " (wgmma) needs "
              "out_features N % 16 == 0 (its TMA copies need 16-byte strides), got N=", N,
              "; use variant 1");
  const c10::cuda::CUDAGuard guard(codes.device());
  // the wgmma kernel's k-split last wave: int32 partial sums and arrival counters
  int counters = 0;
  const long long words =
      variant == 2 ? svdq_w4a8_gemm_sm90_workspace((int)M, (int)N, (int)K, &counters) : 0;
  const auto work =
      words ? torch::empty({words}, codes.options().dtype(at::kInt)) : torch::Tensor();
  check_rc(svdq_w4a8_gemm(codes.data_ptr<int8_t>(), sx.data_ptr<float>(), sumq.data_ptr<int>(),
                          qweight.data_ptr<uint8_t>(), multT.data_ptr<int8_t>(),
                          row_scale.data_ptr<float>(), act.data_ptr(), up.data_ptr(), (int)R, bptr,
                          y.data_ptr(), (int)M, (int)N, (int)K, dt == at::kHalf, (int)variant,
                          words ? work.data_ptr<int>() : nullptr,
                          counters ? split_counters(codes, counters) : nullptr,
                          c10::cuda::getCurrentCUDAStream().stream()),
           "w4a8 GEMM kernel");
}

// w [N,K] (bf16/fp16) = code * scale for weight-only layers. qweight uint8 [N, K/2] natural
// layout, scales fp32 [N, K/64].
void dequant_w4(torch::Tensor qweight, torch::Tensor scales, torch::Tensor w) {
  const auto dt = w.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "svdq dequant_w4: w must be bfloat16 or "
              "float16, got ", dt);
  CHECK_T(qweight, at::kByte, "qweight");
  CHECK_T(scales, at::kFloat, "scales");
  CHECK_T(w, dt, "w");
  TORCH_CHECK(w.dim() == 2 && qweight.dim() == 2, "svdq dequant_w4: 2-D tensors expected");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K > 0 && K % 64 == 0, "svdq dequant_w4: in_features K=", K,
              " must be a positive multiple of 64");
  TORCH_CHECK(qweight.size(0) == N && qweight.size(1) * 2 == K && scales.numel() == N * (K / 64),
              "svdq dequant_w4: qweight [", qweight.size(0), ", ", qweight.size(1),
              "] and scales do not match w [", N, ", ", K, "]");
  TORCH_CHECK(N * K < (1LL << 40), "svdq dequant_w4: weight too large");
  const c10::cuda::CUDAGuard guard(w.device());
  check_rc(svdq_dequant_w4(qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), w.data_ptr(),
                           (int)N, (int)K, dt == at::kHalf,
                           c10::cuda::getCurrentCUDAStream().stream()),
           "w4 dequantize kernel");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SVDQuant kernels (csrc/w4a8.cu, csrc/dequant_w4.cu)";
  m.def("act_quant", &act_quant, "activation kernel: low-rank down + smooth + int8 per token",
        py::arg("x"), py::arg("inv_smooth"), py::arg("down"), py::arg("rank_scale"),
        py::arg("codes"), py::arg("sx"), py::arg("sumq"), py::arg("act"), py::arg("variant") = 0);
  m.def("gemm", &gemm, "W4A8 GEMM with fused low-rank up and bias", py::arg("codes"),
        py::arg("sx"), py::arg("sumq"), py::arg("qweight"), py::arg("multT"), py::arg("row_scale"),
        py::arg("act"), py::arg("up"), py::arg("bias"), py::arg("y"), py::arg("variant") = 1);
  m.def("dequant_w4", &dequant_w4, "weight-only 4-bit layers: codes * scale to 16 bits",
        py::arg("qweight"), py::arg("scales"), py::arg("w"));
  m.def("gemm_split_plan", [](int64_t M, int64_t N, int64_t K, int64_t sms) {
        int halves = 1, full = 0;
        const int splits =
            svdq_w4a8_gemm_split_plan((int)M, (int)N, (int)K, (int)sms, &halves, &full);
        return py::make_tuple(splits, halves, full);
      }, "the wgmma GEMM's wave plan on `sms` SMs: (k-ranges per tile of the last wave, token "
      "halves per tile of the last wave, tiles in full waves)",
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("sms"));
  m.attr("MAX_K") = MAX_K;
#ifdef SVDQ_SM90A
  m.attr("WGMMA") = true;   // built for sm_90a: gemm variants 2 and 3 exist
#else
  m.attr("WGMMA") = false;
#endif
}
