"""Quantization primitives: the numbers every backend must reproduce.

Everything here is the numerical specification (DESIGN.md principle 2). The CUDA kernels are
tested against these functions; when a kernel changes how it rounds or scales, this file changes
first. Layouts are described in docs/format.md (storage) and docs/kernels.md (W4A8 fold).
"""
from __future__ import annotations

import torch

GROUP_SIZE = 64          # input channels per weight / activation scale group
WEIGHT_QMAX = 7          # symmetric int4 weights: codes in [-7, 7] (-8 accepted when imported)
GELU_SHIFT = 0.171875    # > -min(GELU_tanh) = 0.16997; makes post-GELU inputs non-negative
FOLD_MULT_MAX = 16       # W4A8 fold: int4 code * multiplier must fit int8 for code -8 too


def _check_groups(t: torch.Tensor, what: str, group: int = GROUP_SIZE) -> None:
    if t.shape[-1] % group:
        raise ValueError(f"{what}: the input dimension {t.shape[-1]} is not a multiple of the "
                         f"group size {group}; pad the layer's input channels to a multiple of {group}")


# ----------------------------------------------------------------------------------------------
# int4 packing: two codes per byte, natural order (docs/format.md §2)
# ----------------------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7], shape [..., K] with K even -> uint8 [..., K/2].

    Byte j holds code 2j in its low nibble and code 2j+1 in its high nibble, as two's complement.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int16)
    if c.numel() and (c.min() < -8 or c.max() > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    nib = (c & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 codes [..., K] in [-8, 7] (inverse of pack_int4)."""
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    codes = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# weights: symmetric int4, groups of 64 along K, 16-bit scales, round to nearest (even)
# ----------------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16):
    """W [N, K] float -> (codes int8 [N, K], scales [N, K/64] of scale_dtype).

    The scale is rounded to its 16-bit storage type *before* the codes are computed, so the
    stored (codes, scale) pair is exactly what every backend dequantizes.
    """
    _check_groups(w, "quantize_weight")
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    scale = (wg.abs().amax(-1) / WEIGHT_QMAX).to(scale_dtype)
    s = scale.float().unsqueeze(-1)
    codes = torch.where(s > 0, torch.round(wg / torch.where(s > 0, s, 1.0)), 0.0)
    codes = codes.clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return codes.reshape(n, k), scale


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(int8 codes [N, K], scales [N, K/64]) -> float32 [N, K]."""
    n, k = codes.shape
    w = codes.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE) * scales.float().unsqueeze(-1)
    return w.reshape(n, k)


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    return dequantize_weight(*quantize_weight(w))


# ----------------------------------------------------------------------------------------------
# activations: dynamic, per token (and per group of 64 for 4 bits)
# ----------------------------------------------------------------------------------------------
def quantize_act(x: torch.Tensor, bits: int, group: int | None, unsigned: bool = False):
    """x [M, K] float32 -> (codes [M, K] float32 holding integers, scales [M, G] float32).

    scale = amax / qmax (IEEE division), code = rint(x * rcp) clamped to the range, with
    rcp = 1 / scale rounded to fp32 once per group and round-half-to-even: the kernels multiply
    by that reciprocal rather than divide each value (docs/kernels.md). A zero group gets scale 0
    (rcp saturates to the largest float) and codes 0. group=None means one scale per token.
    """
    if unsigned:
        qmin, qmax = 0, (1 << bits) - 1
    else:
        qmax = (1 << (bits - 1)) - 1
        qmin = -qmax
    m, k = x.shape
    g = k if group is None else group
    _check_groups(x, "quantize_act", g)
    xg = x.float().reshape(m, k // g, g)
    amax = xg.abs().amax(-1) if not unsigned else xg.clamp_min(0).amax(-1)
    # Tensor / tensor: on CUDA, torch divides by a CPU scalar as a multiplication with its fp32
    # reciprocal, which is not the IEEE quotient the kernels use.
    scale = amax / torch.full_like(amax, qmax)
    rcp = (torch.ones_like(scale) / scale).clamp_max(torch.finfo(torch.float32).max)
    codes = torch.round(xg * rcp.unsqueeze(-1)).clamp(qmin, qmax)
    return codes.reshape(m, k), scale


def dequantize_act(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    m, k = codes.shape
    g = k // scales.shape[1]
    return (codes.reshape(m, -1, g) * scales.unsqueeze(-1)).reshape(m, k)


def fake_quantize_act(x: torch.Tensor, bits: int, unsigned: bool = False) -> torch.Tensor:
    """The activation quantizer of the given path: 4 bits in groups of 64, 8 bits per token."""
    group = GROUP_SIZE if bits == 4 else None
    return dequantize_act(*quantize_act(x, bits, group, unsigned))


# ----------------------------------------------------------------------------------------------
# W4A8 scale fold (docs/kernels.md): group scales -> one fp32 scale per output row times a small
# integer multiplier per group, so the int8 GEMM needs no per-group work in its main loop.
# ----------------------------------------------------------------------------------------------
_FOLD_DIVISORS = (16.0, 15.5, 15.0, 14.5, 14.0, 13.5, 13.0, 12.5, 12.0, 11.0, 10.0)


def fold_group_scales(codes: torch.Tensor, scales: torch.Tensor):
    """(int codes [N, K], group scales [N, G]) -> (row_scale float32 [N], mult int8 [N, G]).

    Each group scale s_g becomes row_scale * mult_g with mult_g an integer in [0, 16], so that
    code * mult_g fits int8 (-8 * 16 = -128). Per row, row_scale = max_g(s_g) / d for the divisor
    d in _FOLD_DIVISORS that minimises the squared weight error sum_g (s_g - row_scale*m_g)^2 *
    sum_k code^2. Deterministic and device-independent up to fp32 rounding of the candidates.
    """
    n, k = codes.shape
    s = scales.float()
    energy = codes.float().reshape(n, -1, GROUP_SIZE).square().sum(-1)        # [N, G]
    smax = s.amax(-1, keepdim=True)                                           # [N, 1]
    best_err = torch.full((n,), float("inf"), device=s.device)
    best_row = torch.zeros(n, device=s.device)
    best_mult = torch.zeros_like(s)
    for d in _FOLD_DIVISORS:
        row = smax / d
        mult = torch.round(s / torch.where(row > 0, row, 1.0)).clamp(0, FOLD_MULT_MAX)
        err = ((s - row * mult).square() * energy).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_row = torch.where(better, row.squeeze(-1), best_row)
        best_mult = torch.where(better.unsqueeze(-1), mult, best_mult)
    return best_row, best_mult.to(torch.int8)


def folded_weight(codes: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """The int8 weight the W4A8 GEMM multiplies: code * mult of its group, as int16 [N, K]."""
    n, k = codes.shape
    w8 = codes.to(torch.int16).reshape(n, -1, GROUP_SIZE) * mult.to(torch.int16).unsqueeze(-1)
    return w8.reshape(n, k)
