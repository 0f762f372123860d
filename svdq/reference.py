"""Reference execution: pure PyTorch, any device. It defines the numbers the kernels must produce.

A quantized linear computes

    y = main(x) + ((x @ down^T) * rank_scale) @ up^T + bias

where main(x) is the 4-bit GEMM of the smoothed, quantized input x / smooth with the int4
residual weight. `down` acts on the raw input (1/smooth is folded into it at quantization time),
so a LoRA appended to the branch needs no change. The branch activation is rounded to the
compute dtype before the up projection, as the fused GEMM epilogue feeds it to 16-bit MMAs.

Two activation paths run from the same stored weights (DESIGN.md principle 4):
- W4A4: int4 activations per token and group of 64, group-scaled int4 weights, a dequantized
  GEMM with fp32 accumulation (the INT4 tensor-core kernels for sm_80/86/89).
- W4A8: int8 activations with one scale per token, weights widened to int8 as code * mult with
  one fp32 scale per output row (quant.fold_group_scales), integer accumulation, one dequant.
"""
from __future__ import annotations

import contextlib

import torch

from . import quant

# Exact integer GEMM in fp32 blocks: |code| <= 127, |w8| <= 128, so a block of 1024 products
# sums below 2^24 and every fp32 partial sum is an exact integer.
_EXACT_K_BLOCK = 1024


@contextlib.contextmanager
def _no_tf32():
    """TF32 would round the operands of a 'float32' matmul on Ampere+; the spec is true fp32."""
    if not torch.cuda.is_available():
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def lowrank_act(x: torch.Tensor, down: torch.Tensor, rank_scale: torch.Tensor,
                act_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] -> (x @ down^T) * rank_scale, fp32 accumulation, rounded to act_dtype [M, r]."""
    with _no_tf32():
        a = x.float() @ down.float().t()
    return (a * rank_scale.float()).to(act_dtype)


def lowrank_up(act: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    with _no_tf32():
        return act.float() @ up.float().t()


def int_gemm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact integer GEMM of integer-valued tensors [M, K] x [N, K]^T -> float64 [M, N]."""
    acc = torch.zeros(xq.shape[0], wq.shape[0], dtype=torch.float64, device=xq.device)
    with _no_tf32():
        for k0 in range(0, xq.shape[1], _EXACT_K_BLOCK):
            blk = xq[:, k0:k0 + _EXACT_K_BLOCK].float() @ wq[:, k0:k0 + _EXACT_K_BLOCK].float().t()
            acc += blk.double()
    return acc


def w4a8_main(x: torch.Tensor, inv_smooth: torch.Tensor, codes: torch.Tensor,
              row_scale: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """The W4A8 GEMM without branch and bias: fp32 [M, N].

    acc = sum_k q_x[t,k] * (code[n,k] * mult[n,g(k)])   exact int32
    y   = float(acc) * (scale_x[t] * row_scale[n])     fp32, float(acc) rounded to nearest
    """
    xs = x.float() * inv_smooth.float()
    qx, sx = quant.quantize_act(xs, 8, None)
    acc = int_gemm(qx, quant.folded_weight(codes, mult)).float()
    return acc * (sx * row_scale.float().unsqueeze(0))


def w4a4_main(x: torch.Tensor, inv_smooth: torch.Tensor, codes: torch.Tensor,
              wscales: torch.Tensor, unsigned: bool = False) -> torch.Tensor:
    """The W4A4 GEMM without branch and bias: dequantized operands, fp32 accumulation.

    With unsigned=True (inputs that follow a GELU) the smoothed input is shifted by
    GELU_SHIFT / smooth to be non-negative, quantized to [0, 15], and the shift's contribution
    is subtracted again exactly in fp32.
    """
    xs = x.float() * inv_smooth.float()
    w = quant.dequantize_weight(codes, wscales)
    if unsigned:
        shift = quant.GELU_SHIFT * inv_smooth.float()
        xd = quant.fake_quantize_act(xs + shift, 4, unsigned=True)
        with _no_tf32():
            return xd @ w.t() - (shift @ w.t()).unsqueeze(0)
    xd = quant.fake_quantize_act(xs, 4)
    with _no_tf32():
        return xd @ w.t()


def w4a16_main(x: torch.Tensor, codes: torch.Tensor, wscales: torch.Tensor) -> torch.Tensor:
    """Weight-only 4-bit (adaLN modulation): the weight dequantized and rounded to the input's
    dtype (as the fused path writes it for its 16-bit GEMM), times the input, fp32 sums."""
    w = quant.dequantize_weight(codes, wscales).to(x.dtype)
    with _no_tf32():
        return x.float() @ w.float().t()
