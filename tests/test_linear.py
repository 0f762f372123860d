"""SVDQLinear: the reference forward against float64 math, and low-rank segments (LoRA)."""
import pytest
import torch

import svdq
from svdq import quant, reference
from helpers import rel_err


def make_layer(gen, k=192, n=80, rank=32, dtype=torch.float32):
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    x = torch.randn(64, k, generator=gen)
    return svdq.quantize_linear(w, torch.randn(n, generator=gen), x, rank=rank,
                                refine_iters=1, smooth_grid=4, dtype=dtype)


@pytest.mark.parametrize("m", [1, 7, 333])
def test_w4a8_reference_matches_float64(gen, m):
    layer = make_layer(gen)
    x = torch.randn(m, 192, generator=gen)
    layer.set_backend("reference")
    y = layer(x)
    # the same function in float64, written out from the spec
    codes = quant.unpack_int4(layer.qweight).double()
    row, mult = quant.fold_group_scales(quant.unpack_int4(layer.qweight), layer.wscales)
    xs = x.double() / layer.smooth.double()
    sx = xs.abs().amax(1, keepdim=True) / 127
    qx = torch.round(xs / sx).clamp(-127, 127)
    w8 = (codes.reshape(80, -1, 64) * mult.double()[..., None]).reshape(80, 192)
    main = (qx @ w8.t()) * sx * row.double()
    low = (x.double() @ layer.lowrank_down.double().t()) @ layer.lowrank_up.double().t()
    ref = main + low + layer.bias.double()
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("rank", [0, 32])
def test_nonfinite_token_rows_reference(gen, rank):
    """The reference (which defines the kernels' numbers) turns a token holding NaN or inf into a
    wholly non-finite output row, and leaves the other tokens as they were."""
    layer = make_layer(gen, rank=rank)
    layer.set_backend("reference")
    x = torch.randn(9, 192, generator=gen)
    clean = layer(x)
    x[2, 5], x[6, 100] = float("nan"), float("inf")
    y = layer(x)
    assert not torch.isfinite(y[[2, 6]]).any()
    keep = [0, 1, 3, 4, 5, 7, 8]
    assert torch.equal(y[keep], clean[keep])


def test_cpu_layer_runs_reference_on_a_gpu_machine(gen, monkeypatch):
    """A layer with no backend of its own that lies on the CPU (ComfyUI --cpu, a CPU test) runs
    the reference path even where a GPU is present: the default is chosen per device type (run
    154 on the H200 raised 'the layer lies on cpu' from the CUDA backend instead)."""
    from svdq import backends
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_auto", {})
    monkeypatch.setattr(backends, "_default", None)
    layer = make_layer(gen, rank=16)
    x = torch.randn(7, 192, generator=gen)
    y = layer(x)
    assert backends.default("cpu").name == "reference"
    layer.set_backend("reference")
    assert torch.equal(y, layer(x))


def test_int_gemm_is_exact(gen):
    xq = torch.randint(-127, 128, (5, 3000), generator=gen).float()
    wq = torch.randint(-128, 113, (6, 3000), generator=gen).float()
    exact = xq.long() @ wq.long().t()
    assert torch.equal(reference.int_gemm(xq, wq).long(), exact)


def test_segment_adds_scaled_lora(gen):
    layer = make_layer(gen)
    x = torch.randn(9, 192, generator=gen)
    base = layer(x)
    down, up = torch.randn(8, 192, generator=gen) * 0.1, torch.randn(80, 8, generator=gen) * 0.1
    layer.set_lowrank_segments([("lora_a", down, up, 0.7)])
    expect = base.double() + 0.7 * (x.double() @ down.double().t() @ up.double().t())
    assert rel_err(layer(x), expect) < 1e-5
    cached = layer.branch()[0]
    layer.set_segment_scale("lora_a", 0.0)
    assert layer.branch()[0] is cached                      # strength change: no re-concat
    assert torch.allclose(layer(x), base, atol=1e-6)
    with pytest.raises(KeyError, match="lora_b"):
        layer.set_segment_scale("lora_b", 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_lowrank_segments([("bad", down[:, :64], up, 1.0)])


def test_state_dict_roundtrip_and_bad_input(gen):
    layer = make_layer(gen, rank=16, dtype=torch.bfloat16)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "wscales", "smooth", "lowrank_down", "lowrank_up", "bias"}
    clone = svdq.SVDQLinear.from_tensors(sd)
    x = torch.randn(4, 192, generator=gen, dtype=torch.bfloat16)
    assert torch.equal(clone(x), layer(x))
    with pytest.raises(ValueError, match="192 features"):
        layer(torch.randn(2, 100))
    with pytest.raises(ValueError, match="multiple of 64"):
        svdq.SVDQLinear(100, 10)


def test_cuda_activation_kernel_choice(monkeypatch):
    """The fused backend's activation kernel by shape (no GPU needed: the SM count is given):
    the split kernels at K >= 6144 while act_kernel's 16-token blocks would fill under two
    thirds of the SMs; otherwise 8-token blocks up to 512 tokens at rank 0 (16-token blocks at
    rank > 0), the split kernels when act_kernel's last wave (two blocks per SM) is at most a
    quarter full, act_kernel otherwise; an explicit choice wins."""
    from svdq.backends import cuda
    monkeypatch.setattr(cuda, "_sm_count", lambda device=None: 132)   # H200: 264 block slots
    be = cuda.CudaBackend()
    be.act_variant = None
    ms = (1, 512, 513, 1392, 1393, 4096, 4224, 4608, 5280, 5296, 6144, 8192, 16896)
    by_count = {1: 1, 512: 1, 513: 0, 1392: 0, 1393: 0, 4096: 0,   # at most one wave
                4224: 0,                         # exactly one wave (264 blocks)
                4608: 2, 5280: 2,                # 288 / 330 blocks: 24 / 66 in the last wave
                5296: 0, 6144: 0, 8192: 0,       # 67, 120 and 248 in the last wave
                16896: 0}                        # four full waves
    assert {m: be.act_variant_for(m, 3072, 0) for m in ms} == by_count
    # rank > 0: 16-token blocks where rank 0 takes the 8-token ones
    assert {m: be.act_variant_for(m, 3072, 32) for m in ms} == {**by_count, 1: 0, 512: 0}
    # long rows: the split kernels up to 1392 tokens, 87 blocks of 16 (3 * 87 < 2 * 132 SMs)
    for k in (6144, 12288, 15360):
        for rank in (0, 32, 128):
            assert {m: be.act_variant_for(m, k, rank) for m in ms} == {
                **by_count, 1: 2, 512: 2, 513: 2, 1392: 2}, (k, rank)
    assert be.act_variant_for(1392, 6080, 32) == 0   # below SPLIT_MIN_K
    be.act_variant = 0
    assert be.act_variant_for(256, 12288, 32) == 0


def test_cuda_gemm_kernel_choice():
    """The wgmma GEMM's two kernels by shape (no GPU needed): the ping-pong kernel only at
    K <= 4096 and where the cooperative kernel's last wave of 128 x 256 tiles is short enough that
    twice as many 64-channel tiles at 1.1x half the cost finish sooner. On 132 SMs that is where
    it was measured faster (bench/NOTES.md, runs 145-148), and nowhere it was measured slower."""
    from svdq.backends.cuda import pingpong_pays
    flux = {"qkv": (3072, 9216), "proj": (3072, 3072), "mlp_fc1": (3072, 12288),
            "mlp_fc2": (12288, 3072), "single_in": (3072, 21504), "single_out": (15360, 3072)}
    picks = {(m, name) for m in (1024, 2048, 3072, 4608, 6144, 8192)
             for name, (k, n) in flux.items() if pingpong_pays(m, n, k, 132)}
    assert picks == {(1024, "qkv"), (2048, "qkv"), (2048, "proj"), (3072, "proj"),
                     (4608, "proj"), (6144, "proj")}
    # proj at 4608 tokens: 432 cooperative tiles take 4 rounds, 864 ping-pong tiles 7 half-cost
    # rounds (3.85 < 4); qkv: 10 rounds against 20 (11 > 10); K above the limit: never
    assert pingpong_pays(4608, 3072, 3072, 132) and not pingpong_pays(4608, 9216, 3072, 132)
    assert not pingpong_pays(4608, 3072, 4160, 132) and not pingpong_pays(4608, 3072, 3072, 0)


@pytest.mark.parametrize("r,k", [(16, 64), (48, 192)])
def test_cuda_branch_down_layout(r, k):
    """The activation kernels' layout of `down` (docs/kernels.md): within each 16-rank tile, rows
    g and g + 8 interleaved by 32-bit words, so that lane (g, tq) finds its m16n8k16 A fragment
    for k = kb + 8tq .. +7 as 16 contiguous bytes at ((8t + g) * 2K + 2kb + 16tq): rows g, g+8,
    g, g+8 x k pairs (k, k+1), (k, k+1), (k+2, k+3), (k+2, k+3). No GPU needed."""
    from svdq.backends.cuda import branch_down_layout
    down = torch.arange(r * k, dtype=torch.float64).reshape(r, k)   # every element distinct
    flat = branch_down_layout(down).reshape(-1)
    assert flat.shape == down.reshape(-1).shape and set(flat.tolist()) == set(down.reshape(-1).tolist())
    for t in range(r // 16):
        for g in range(8):
            for kb in range(0, k, 32):
                for tq in range(4):
                    p0 = kb + 8 * tq
                    off = (8 * t + g) * 2 * k + 2 * kb + 16 * tq
                    rg, rg8 = down[16 * t + g], down[16 * t + g + 8]
                    want = torch.stack([rg[p0:p0 + 2], rg8[p0:p0 + 2], rg[p0 + 2:p0 + 4],
                                        rg8[p0 + 2:p0 + 4], rg[p0 + 4:p0 + 6], rg8[p0 + 4:p0 + 6],
                                        rg[p0 + 6:p0 + 8], rg8[p0 + 6:p0 + 8]]).reshape(-1)
                    assert torch.equal(flat[off:off + 16], want)
