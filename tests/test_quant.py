"""Quantization primitives: packing, weight and activation quantizers, the W4A8 fold."""
import pytest
import torch

from svdq import quant
from helpers import rel_err


@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (7, 130), (2, 3, 66)])
def test_pack_roundtrip_all_values(shape, gen):
    codes = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    codes.view(-1)[:16] = torch.arange(-8, 8, dtype=torch.int8)[: codes.numel()]
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(quant.unpack_int4(packed), codes)


def test_pack_layout_is_natural():
    # code 2j in the low nibble, 2j+1 in the high nibble, two's complement (docs/format.md)
    packed = quant.pack_int4(torch.tensor([[1, -2, 7, -8]], dtype=torch.int8))
    assert packed.tolist() == [[0xE1, 0x87]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        quant.pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        quant.pack_int4(torch.tensor([[8, 0]]))


@pytest.mark.parametrize("n,k", [(1, 64), (5, 192), (33, 640)])
def test_weight_quant_error_bound(n, k, gen):
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    codes, scales = quant.quantize_weight(w)
    assert codes.abs().max() <= 7 and scales.dtype == torch.bfloat16
    deq = quant.dequantize_weight(codes, scales)
    # round to nearest: at most half a step per element, step = stored group scale (bf16
    # rounding of the scale adds at most 2^-8 relative to the group's absmax = 7 steps)
    step = scales.float().repeat_interleave(64, dim=1)
    assert ((deq - w).abs() <= step * (0.5 + 7 * 2 ** -8) + 1e-6).all()


def test_weight_quant_zero_group():
    w = torch.zeros(2, 128)
    w[0, 64:] = 0.875          # absmax/7 = 0.125 is exact in bf16
    codes, scales = quant.quantize_weight(w)
    assert torch.equal(quant.dequantize_weight(codes, scales), w)


@pytest.mark.parametrize("bits,group", [(4, 64), (8, None), (8, 64)])
@pytest.mark.parametrize("m,k", [(1, 64), (7, 128), (333, 192)])
def test_act_quant_error_bound(bits, group, m, k, gen):
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 10
    codes, scales = quant.quantize_act(x, bits, group)
    qmax = (1 << (bits - 1)) - 1
    assert codes.abs().max() <= qmax and torch.equal(codes, codes.round())
    g = k if group is None else group
    step = scales.repeat_interleave(g, dim=1)
    err = (quant.dequantize_act(codes, scales) - x).abs()
    assert (err <= step * 0.5 * (1 + 1e-6) + 1e-12).all()
    # relative error of the whole tensor shrinks ~16x from 4 to 8 bits
    limit = {4: 0.15, 8: 0.012}[bits]
    assert rel_err(quant.dequantize_act(codes, scales), x) < limit


def test_act_quant_unsigned(gen):
    x = torch.nn.functional.gelu(torch.randn(9, 128, generator=gen) * 2, approximate="tanh")
    xs = x + quant.GELU_SHIFT
    assert (xs >= 0).all()
    codes, scales = quant.quantize_act(xs, 4, 64, unsigned=True)
    assert codes.min() >= 0 and codes.max() <= 15
    err = (quant.dequantize_act(codes, scales) - xs).abs()
    assert (err <= scales.repeat_interleave(64, 1) * 0.5 * (1 + 1e-6)).all()


def test_fold_group_scales(gen):
    w = torch.randn(64, 1024, generator=gen) * torch.rand(1, 1024, generator=gen).pow(2) * 4
    codes, scales = quant.quantize_weight(w)
    row, mult = quant.fold_group_scales(codes, scales)
    assert mult.min() >= 0 and mult.max() <= quant.FOLD_MULT_MAX
    w8 = quant.folded_weight(codes, mult)
    assert w8.min() >= -128 and w8.max() <= 127
    folded = w8.float() * row[:, None]
    exact = quant.dequantize_weight(codes, scales)
    # the fold's extra error must be well below the int4 quantization error itself
    assert rel_err(folded, exact) < 0.5 * rel_err(exact, w)
    assert rel_err(folded, w) < 1.2 * rel_err(exact, w)
