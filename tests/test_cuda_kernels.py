"""The fused CUDA kernels (csrc/w4a8.cu) against the reference path (svdq/reference.py).

GPU only: skipped, with the reason shown, where torch sees no CUDA GPU.

Tolerances. The integer part is exact on both sides (int32 in the kernel, float64 in the
reference), and the kernel dequantizes with the same two fp32 roundings, so at rank 0 the output
must be bitwise identical to the reference, and the activation codes, scales and code sums must
equal quant.quantize_act's exactly. With a branch, the two sides sum in different orders (x.down:
tensor-core fp32 in the kernel, cuBLAS fp32 in the reference; act.up likewise, and the kernel
adds it to the main result inside the MMA). Bounds, with u = the 16-bit dtype's largest relative
spacing (bf16 2^-7, fp16 2^-10) and g = K * 2^-24 (a standard fp32 summation bound, both sides):
  branch activation a:  |a - a_ref| <= u*|a_ref| + 2*g*(|x| @ |down|^T)*|rank_scale|
      (one 16-bit rounding apart, unless the fp32 sums differ by more than that)
  output y:             |y - y_ref| <= 2*u*|y_ref| + u*(|a_ref| @ |up|^T) + 1e-5*(|y_ref| + S)
      (output rounding, one ulp of each branch activation it multiplies, fp32 order; S is the
       bound's second term over u)
and the norm-wise relative error below one unit roundoff of the dtype (bf16 4e-3, fp16 5e-4).
The share of bitwise-identical elements is printed for the notes, not asserted.
"""
import pytest
import torch

from helpers import needs_cuda, rel_err

pytestmark = needs_cuda

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
NORM_TOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


def _backends():
    from svdq.backends.cuda import CudaBackend
    from svdq.backends.reference import ReferenceBackend
    return CudaBackend(), ReferenceBackend(act_bits=8)


def make_layer(g, k, n, rank, dtype, bias=True):
    from svdq import quant
    from svdq.linear import SVDQLinear
    dev = "cuda"
    layer = SVDQLinear(k, n, rank=rank, bias=bias, kind="w4a4", device=dev, dtype=dtype)
    codes = torch.randint(-8, 8, (n, k), generator=g)                 # -8 included: the fold edge
    scales = (torch.randn(n, k // 64, generator=g) * 0.7).exp() * 0.02
    scales[torch.rand(n, k // 64, generator=g) < 0.02] = 0            # some empty groups (mult 0)
    with torch.no_grad():
        layer.qweight.copy_(quant.pack_int4(codes).to(dev))
        layer.wscales.copy_(scales.to(layer.wscales.dtype).to(dev))
        layer.smooth.copy_(((torch.randn(k, generator=g) * 0.5).exp()).to(dtype).to(dev))
        if rank:
            layer.lowrank_down.copy_((torch.randn(rank, k, generator=g) / k ** 0.5).to(dtype).to(dev))
            layer.lowrank_up.copy_((torch.randn(n, rank, generator=g) * 0.3).to(dtype).to(dev))
        if bias:
            layer.bias.copy_((torch.randn(n, generator=g) * 0.1).to(dtype).to(dev))
    layer.invalidate()
    return layer


def make_x(g, m, k, dtype):
    x = torch.randn(m, k, generator=g)
    out = torch.randperm(k, generator=g)[: max(1, k // 50)]
    x[:, out] *= 15                                                    # outlier channels
    return x.to(dtype).cuda()


def poison_allocator(floats):
    """Fill `floats` fp32 of the caching allocator's memory with NaN and free it, so that tensors
    allocated next (torch.empty in the backend) start poisoned: an unwritten element shows."""
    junk = torch.full((floats,), float("nan"), device="cuda")
    del junk


def check_close(y, ref, dtype, exact=False, layer=None, x=None):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert not torch.isnan(y).any(), "NaN in the kernel output"
    if exact:
        diff = (y.float() - ref.float()).abs()
        assert torch.equal(y, ref), (f"rank 0 must be bitwise identical to the reference; "
                                     f"{int((diff > 0).sum())} elements differ, max {diff.max():.3g}")
        print(f"[exact] {tuple(y.shape)} {dtype}: bitwise identical")
        return
    from svdq import reference
    down, up, rank_scale = layer.branch()
    a_ref = reference.lowrank_act(x, down, rank_scale, dtype).double()
    s = a_ref.abs() @ up.double().abs().t()
    yf, rf = y.double(), ref.double()
    u = ULP[dtype]
    order = 1e-5 + 2 * (down.shape[0] + 2) * 2.0 ** -24           # fp32 order, both sides
    bound = 2 * u * rf.abs() + u * s + order * (rf.abs() + s) + 1e-30
    over = (yf - rf).abs() / bound
    e = rel_err(y, ref)
    same = float((y == ref).float().mean())
    print(f"[close] {tuple(y.shape)} {dtype}: rel err {e:.2e}, {same:.1%} identical, "
          f"worst {float(over.max()):.2f} of the bound")
    assert not (over > 1).any(), (f"{int((over > 1).sum())} elements beyond the bound; worst "
                                  f"{float(over.max()):.3g}x; rel err {e:.3g}, {same:.1%} identical")
    assert e < NORM_TOL[dtype], f"relative error {e:.3g}"


SHAPES = [  # (M, K, N): FLUX layers at a few token counts, and the edges
    (333, 3072, 9216), (4608, 3072, 3072), (77, 12288, 3072), (129, 15360, 3072),
    (256, 3072, 21504), (1, 3072, 12288),
    (1, 64, 8), (7, 192, 136), (333, 320, 264), (129, 64, 1000), (3, 65536, 16), (200, 128, 8),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize("rank", [0, 32])
def test_linear_matches_reference_shapes(gen, m, k, n, rank, dtype):
    cuda, ref = _backends()
    layer = make_layer(gen, k, n, rank, dtype)
    x = make_x(gen, m, k, dtype)
    y_ref = ref.forward(layer, ref.prepare(layer), x)
    prep = cuda.prepare(layer)
    y = cuda.run(layer, prep, x, out=torch.full((m, n), float("nan"), dtype=dtype, device="cuda"))
    check_close(y, y_ref, dtype, exact=(rank == 0), layer=layer, x=x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rank", [0, 16, 32, 48, 112, 256])
@pytest.mark.parametrize("m,k,n", [(333, 3072, 3072), (7, 704, 392)])
def test_ranks(gen, m, k, n, rank, dtype):
    cuda, ref = _backends()
    layer = make_layer(gen, k, n, rank, dtype)
    x = make_x(gen, m, k, dtype)
    y_ref = ref.forward(layer, ref.prepare(layer), x)
    y = cuda.run(layer, cuda.prepare(layer), x)
    check_close(y, y_ref, dtype, exact=(rank == 0), layer=layer, x=x)


ACT_SHAPES = [(1, 64), (333, 3072), (17, 15360), (40, 704), (5, 3136), (4099, 3072),
              (2053, 12288), (1501, 15360), (33, 12352)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rank", [0, 16, 32, 48, 112])
@pytest.mark.parametrize("m,k", ACT_SHAPES)
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["tm16", "tm8", "split"])
def test_activation_kernel(gen, m, k, rank, dtype, variant):
    """Codes, scales and code sums exactly as quant.quantize_act; branch activation to 1 ulp.
    Variants: act_kernel with 16- or 8-token blocks, and the split pair (act_stats_kernel +
    act_quant_kernel), whose chunk partials (csrc/w4a8.cu act_chunk; counts for 132 SMs) cover
    K = 3136 in 4 with a short last one, K = 15360 in 8 (17 and 1501 tokens), K = 12288 in 8
    (2053 tokens) and K = 12352 in 8 with a short last one."""
    from svdq import quant, reference
    from svdq.backends.cuda import act_perm
    cuda, _ = _backends()
    cuda.act_variant = variant
    layer = make_layer(gen, k, 64, rank, dtype)
    x = make_x(gen, m, k, dtype)
    x[0, :] = 0 if m > 3 else x[0, :]                                   # a zero token (scale 0)
    prep = cuda.prepare(layer)
    poison_allocator(32 << 20)                         # the outputs come from the allocator
    _, (codes, sx, sumq, act) = cuda.run(layer, prep, x, return_parts=True)
    nat = torch.empty_like(codes)
    nat[:, act_perm(k, "cuda")] = codes
    qx, sref = quant.quantize_act(x.float() * prep["inv_smooth"], 8, None)
    assert torch.equal(nat.float(), qx)
    assert torch.equal(sx, sref[:, 0])
    assert torch.equal(sumq.long(), qx.sum(1).long())
    down, _, rank_scale = layer.branch()
    a_ref = reference.lowrank_act(x, down, rank_scale, dtype)
    assert act.shape == (m, rank)
    if rank:
        g = k * 2.0 ** -24
        bound = (ULP[dtype] * a_ref.double().abs()
                 + 2 * g * (x.double().abs() @ down.double().abs().t()) * rank_scale.double().abs()
                 + 1e-30)
        over = (act.double() - a_ref.double()).abs() / bound
        same = float((act == a_ref).float().mean())
        print(f"[act] {m}x{k} r{rank} {dtype}: {same:.1%} identical, worst {float(over.max()):.2f} "
              "of the bound")
        assert not (over > 1).any(), f"branch activation beyond the bound: worst {float(over.max()):.3g}x"


@pytest.mark.parametrize("rank", [0, 32])
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["tm16", "tm8", "split"])
def test_nonfinite_token_rows(gen, rank, variant):
    """A token holding NaN or inf gets a wholly non-finite output row, as in the reference and
    the 16-bit layer, whatever the activation kernel: its scale is NaN or inf instead of coming
    from its finite values (at rank 0 nothing else would carry the NaN). The other tokens keep
    their bits."""
    cuda, ref = _backends()
    cuda.act_variant = variant
    dtype = torch.bfloat16
    m, k, n = 45, 3072, 256
    layer = make_layer(gen, k, n, rank, dtype)
    x = make_x(gen, m, k, dtype)
    prep = cuda.prepare(layer)
    clean = cuda.run(layer, prep, x)
    bad = {3: float("nan"), 17: float("inf"), 30: float("-inf")}      # token -> value
    xb = x.clone()
    for t, v in bad.items():
        xb[t, int(torch.randint(k, (1,), generator=gen))] = v
    y = cuda.run(layer, prep, xb)
    y_ref = ref.forward(layer, ref.prepare(layer), xb)
    rows = torch.tensor(sorted(bad), device="cuda")
    keep = torch.ones(m, dtype=torch.bool, device="cuda")
    keep[rows] = False
    assert not torch.isfinite(y_ref[rows]).any()
    assert not torch.isfinite(y[rows]).any(), (
        f"{int(torch.isfinite(y[rows]).sum())} finite outputs in tokens with NaN/inf input")
    assert torch.equal(y[keep], clean[keep])


def test_deterministic_and_poison(gen):
    """Two runs give identical bits; a NaN-poisoned output and NaN-filled allocator memory are
    overwritten completely (intermediates come from the caching allocator)."""
    from svdq.backends.cuda import CudaBackend
    cuda, ref = _backends()
    dtype = torch.bfloat16
    layer = make_layer(gen, 3072, 3072, 32, dtype)
    x = make_x(gen, 333, 3072, dtype)
    prep = cuda.prepare(layer)
    poison_allocator(64 << 20)                                      # 256 MB of NaN
    y1, p1 = cuda.run(layer, prep, x, out=torch.full((333, 3072), float("nan"), dtype=dtype,
                                                     device="cuda"), return_parts=True)
    y2, p2 = cuda.run(layer, prep, x, return_parts=True)
    assert not torch.isnan(y1).any()
    assert torch.equal(y1, y2)
    # every GEMM kernel this build has computes the very same bits
    for v in _gemm_variants():
        other = CudaBackend()
        other.gemm_variant = v
        assert torch.equal(other.run(layer, prep, x), y1), f"GEMM variant {v} differs"
    # every activation kernel (16- and 8-token act_kernel, the split pair): same codes, scales and
    # sums; the branch sums run in other fp32 orders, so they are held to the reference
    for v in (0, 1, 2):
        other = CudaBackend()
        other.act_variant = v
        y3, p3 = other.run(layer, prep, x, return_parts=True)
        for a, b in zip(p1[:3], p3[:3]):
            assert torch.equal(a, b), f"activation variant {v} differs"
        check_close(y3, ref.forward(layer, ref.prepare(layer), x), dtype, layer=layer, x=x)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    check_close(y1, ref.forward(layer, ref.prepare(layer), x), dtype, layer=layer, x=x)


@pytest.mark.parametrize("act_variant", [0, 2], ids=["act_kernel", "split"])
def test_programmatic_launch_chain(gen, monkeypatch, act_variant):
    """A chain of layers, each fed the previous one's output through a torch op, with the
    layer's kernels started early by programmatic dependent launch (the default on sm_90+,
    csrc/launch.cuh) and without (SVDQ_PDL=0): identical bits. A kernel that read its input
    before its predecessor finished would read poisoned (NaN) or stale memory here."""
    from svdq.backends.cuda import CudaBackend
    dtype = torch.bfloat16
    layers = [make_layer(gen, 3072, 3072, 32, dtype) for _ in range(3)]
    x0 = make_x(gen, 4607, 3072, dtype)
    be = CudaBackend()
    be.act_variant = act_variant
    preps = [be.prepare(layer) for layer in layers]

    def chain():
        y = x0
        for layer, prep in zip(layers, preps):
            poison_allocator(16 << 20)
            y = be.run(layer, prep, y * 0.25)
        return y

    outs = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("SVDQ_PDL", pdl)
        outs[pdl] = chain()
        torch.cuda.synchronize()
    assert not torch.isnan(outs["1"]).any()
    assert torch.equal(outs["1"], outs["0"])


def _gemm_variants(n=16):
    from svdq import build
    return (1, 2, 3) if build.load().WGMMA and n % 16 == 0 else (1,)


def check_gemm_variants(layer, x, rank, dtype):
    """The layer on every GEMM variant this build has, each output overwriting a NaN-poisoned
    buffer: mma.sync held to the reference (bitwise at rank 0), every other variant bitwise
    equal to it. Returns the variants run."""
    from svdq.backends.cuda import CudaBackend
    _, ref = _backends()
    m, n = x.shape[0], layer.out_features
    outs = {}
    for v in _gemm_variants(n):
        be = CudaBackend()
        be.gemm_variant = v
        outs[v] = be.run(layer, be.prepare(layer), x,
                         out=torch.full((m, n), float("nan"), dtype=dtype, device="cuda"))
    check_close(outs[1], ref.forward(layer, ref.prepare(layer), x), dtype, exact=(rank == 0),
                layer=layer, x=x)
    for v, y in outs.items():
        assert not torch.isnan(y).any(), f"variant {v} left elements unwritten"
        assert torch.equal(y, outs[1]), (f"variant {v} differs from mma.sync in "
                                         f"{int((y != outs[1]).sum())} elements")
    return tuple(outs)


GEMM_SHAPES = [(4608, 3072, 3072), (333, 3072, 9216), (1, 64, 8), (7, 192, 136),
               (257, 320, 1000), (129, 15360, 264), (300, 704, 392), (7, 192, 144),
               (257, 320, 1008), (129, 15360, 272),
               # the persistent wgmma GEMM: ~16 and ~8 tiles per CTA with fewer k-tiles per tile
               # than stages (the copies run ahead into the next tiles), a K % 128 == 64 tail,
               # partial last channel and token tiles
               (8191, 64, 8192), (8193, 192, 4096), (3001, 320, 2064),
               # a short last wave split into k-ranges on a 132-SM H200 (test_gemm_split_plan):
               # 3 ranges of 32 k-tiles with a partial last token tile, 8 ranges of 16, and 2 of
               # 16 with a K % 128 == 64 tail; into token halves: 4608 x 3072 x 3072 above, 333 x
               # 3072 x 9216 above (the second halves wholly past M), a second half that ends
               # past M, and a K % 128 == 64 tail
               (4500, 12288, 3072), (4352, 16384, 4096), (300, 4032, 17408), (4500, 3072, 3072),
               (333, 3136, 9216),
               # a lone wave split into k-ranges: 6 of 20 k-tiles (129 x 15360 x 272 above), 2 of
               # 17 with a K % 128 == 64 tail and a partial channel tile
               (77, 4288, 400)]


def test_gemm_split_plan():
    """The wave plan of the wgmma GEMM: a last wave at most half full is split into k-ranges of
    at least 16 k-tiles (as many as fit on the SMs and divide the k-tiles), else into two token
    halves; a lone wave at most half full into k-ranges only; the GEMM_SHAPES above take it on
    the H200's 132 SMs."""
    from svdq import build
    plan = build.load().gemm_split_plan  # (M, N, K, SMs) -> (k-ranges, token halves, full tiles)
    assert plan(4500, 3072, 12288, 132) == (3, 1, 396)  # 432 tiles: 36 left, 3 x 36 <= 132
    assert plan(4352, 4096, 16384, 132) == (8, 1, 528)  # 544 tiles: 16 left, 128 k-tiles
    assert plan(300, 17408, 4032, 132) == (2, 1, 264)   # 272 tiles: 8 left, 32 k-tiles
    assert plan(4608, 3072, 15360, 132) == (3, 1, 396)  # single_out at 4608 tokens
    assert plan(4608, 3072, 3072, 132) == (1, 2, 396)   # 24 k-tiles: ranges too short, halves
    assert plan(333, 9216, 3072, 132) == (1, 2, 132)    # 144 tiles: 12 left
    assert plan(333, 9216, 3136, 132) == (1, 2, 132)    # the same with 25 k-tiles
    assert plan(4608, 9216, 3072, 132) == (1, 1, 1296)  # 108 left: the last wave is 82% full
    assert plan(256, 3072, 12288, 132) == (4, 1, 0)     # a lone wave of 24 tiles: 4 x 24 <= 132
    assert plan(512, 3072, 12288, 132) == (2, 1, 0)     # 48 tiles
    assert plan(129, 272, 15360, 132) == (6, 1, 0)      # 3 tiles, 120 k-tiles: 7 does not divide
    assert plan(77, 400, 4288, 132) == (2, 1, 0)        # 34 k-tiles
    assert plan(1024, 3072, 12288, 132) == (1, 1, 96)   # a lone wave 73% full stays whole
    assert plan(256, 3072, 3072, 132) == (1, 1, 24)     # 24 k-tiles: a lone wave is not halved
    assert plan(132 * 256, 128, 12288, 132) == (1, 1, 132)  # exactly one wave
    assert plan(4500, 3072, 6016, 132) == (1, 2, 396)   # 47 k-tiles: no range count divides


def test_gemm_split_counters_between_launches(gen):
    """The k-split GEMM's arrival counters live across launches, one set per stream, with no
    memset before a launch (each launch leaves them zero: csrc/binding.cpp split_counters).
    Three plans (3 ranges of a short last wave, 4 and 2 ranges of a lone wave, on the H200's 132
    SMs) launched back to back, twice, on the default stream and then on a second one: every
    output overwrites a poisoned buffer and equals the mma.sync GEMM's bits. A counter left
    non-zero would make a tile's last range miss its turn (the tile stays NaN) or go early."""
    from svdq import build
    from svdq.backends.cuda import CudaBackend
    if not build.load().WGMMA:
        pytest.skip("the k-split GEMM is the wgmma kernel's (an sm_90a build)")
    dtype = torch.bfloat16
    mma, wg = CudaBackend(), CudaBackend()
    mma.gemm_variant, wg.gemm_variant = 1, 2
    cases = []
    for m, k, n in [(4500, 12288, 3072), (256, 12288, 3072), (77, 4288, 400)]:
        layer = make_layer(gen, k, n, 32, dtype)
        x = make_x(gen, m, k, dtype)
        cases.append((layer, wg.prepare(layer), x, mma.run(layer, mma.prepare(layer), x)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for stream in (torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            outs = [wg.run(layer, prep, x, out=torch.full_like(want, float("nan")))
                    for _ in range(2) for layer, prep, x, want in cases]
        torch.cuda.current_stream().wait_stream(stream)
        where = "the second" if stream is side else "the default"
        for i, y in enumerate(outs):
            want = cases[i % len(cases)][3]
            assert torch.equal(y, want), (f"launch {i} on {where} stream: "
                                          f"{int((y != want).sum())} elements differ from "
                                          f"mma.sync ({int(torch.isnan(y).sum())} NaN)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# 48, 112: two and four 32-rank slabs in the wgmma epilogue
@pytest.mark.parametrize("rank", [0, 48, 112])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in GEMM_SHAPES])
def test_gemm_variants_bitwise(gen, m, k, n, rank, dtype):
    """The mma.sync GEMM and, on Hopper builds, the wgmma GEMM: identical bits (integer
    accumulation is exact, both epilogues round in the same order, and a k16 step of the branch
    gives the same fp32 result on wgmma as on mma.sync), each output overwriting a NaN-poisoned
    buffer; the first is also held to the reference."""
    layer = make_layer(gen, k, n, rank, dtype)
    variants = check_gemm_variants(layer, make_x(gen, m, k, dtype), rank, dtype)
    print(f"[gemm] {m}x{k}x{n} r{rank} {dtype}: variants {variants} identical")


# N % 16 == 0, so that every GEMM variant runs on Hopper builds
LARGE_SUM_SHAPES = [(333, 3072, 272), (4608, 3072, 3072), (129, 15360, 256)]


@pytest.mark.parametrize("rank", [0, 32])
@pytest.mark.parametrize("m,k,n", LARGE_SUM_SHAPES,
                         ids=[f"{m}x{k}x{n}" for m, k, n in LARGE_SUM_SHAPES])
def test_gemm_large_sums(gen, m, k, n, rank):
    """Integer sums v = acc - 128*sumq beyond 2^22, where fp32 starts to round them (and where
    an int-to-float shortcut by exponent bits stops being exact: bench/NOTES.md, run 163): a
    third of the channels hold every code 7 at one scale per row and a third of the tokens
    quantize to 127 throughout, so every tile mixes such sums with ordinary ones. Every variant
    bitwise equal to mma.sync, and rank 0 bitwise equal to the reference."""
    from svdq import quant, reference
    dtype = torch.bfloat16
    layer = make_layer(gen, k, n, rank, dtype)
    hot_n = (torch.rand(n, generator=gen) < 0.33).cuda()
    hot_t = (torch.rand(m, generator=gen) < 0.33).cuda()
    with torch.no_grad():
        codes = quant.unpack_int4(layer.qweight)
        codes[hot_n] = 7
        ws = layer.wscales.clone()
        ws[hot_n] = ws[hot_n].amax(-1, keepdim=True)
        layer.qweight.copy_(quant.pack_int4(codes))
        layer.wscales.copy_(ws)
    layer.invalidate()
    x = make_x(gen, m, k, dtype)
    x[hot_t] = layer.smooth.to(dtype)        # x * inv_smooth ~ 1 everywhere: codes 127
    # the sums the kernels convert, from the reference's integer parts
    qx, _ = quant.quantize_act(x.float() * (1.0 / layer.smooth.float()), 8, None)
    _, mult = quant.fold_group_scales(codes, layer.wscales)
    v = reference.int_gemm(qx, quant.folded_weight(codes, mult))
    big = float((v.abs() >= 2 ** 22).float().mean())
    assert 0.02 < big < 0.5, f"{big:.1%} of the sums beyond 2^22: the test lost its mix"
    variants = check_gemm_variants(layer, x, rank, dtype)
    print(f"[large sums] {m}x{k}x{n} r{rank}: {big:.1%} of |v| >= 2^22, "
          f"variants {variants} identical")


def test_gemm_variant_unavailable_is_refused(gen):
    """Variant 2 (wgmma) is refused with a message that says what it needs: an sm_90a build
    elsewhere, out_features % 16 == 0 on Hopper (its TMA copies need 16-byte strides)."""
    from svdq import build
    from svdq.backends.cuda import CudaBackend
    be = CudaBackend()
    be.gemm_variant = 2
    if build.load().WGMMA:
        n, match = 136, "N % 16"
    else:
        n, match = 16, "sm_90a"
    layer = make_layer(gen, 128, n, 0, torch.bfloat16)
    with pytest.raises(RuntimeError, match=match):
        be.run(layer, be.prepare(layer), make_x(gen, 3, 128, torch.bfloat16))
    assert CudaBackend().gemm_variant_for(3, n, 128) == 1   # the automatic choice falls back


_BAD_INPUT = """
import torch
from svdq import build
ext = build.load()
m, k, r = 5, 128, 16
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
inv = torch.rand(k, device="cuda") + 0.5
down = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
rs = torch.ones(r, device="cuda")
codes = torch.empty(m, k, dtype=torch.int8, device="cuda")
sx = torch.empty(m, device="cuda")
sq = torch.empty(m, dtype=torch.int32, device="cuda")
act = torch.empty(m, r, dtype=torch.bfloat16, device="cuda")
for bad in ((x, inv, down[:, :64].contiguous(), rs, codes, sx, sq, act, 0),
            (x, inv.cpu(), down, rs, codes, sx, sq, act, 0),
            (x, inv, down, rs, codes, sx, sq, act, 7)):
    try:
        ext.act_quant(*bad)
        print("accepted")
    except RuntimeError as e:
        print("refused:", str(e).splitlines()[0])
ext.act_quant(x, inv, down, rs, codes, sx, sq, act, 0)
print("good call ok", bool(torch.isfinite(act.float()).all()))
"""


def test_binding_rejects_bad_input():
    """The extension's own checks (csrc/binding.cpp) refuse bad input with an error that names the
    tensor and its shape, and the process survives it. In a child process, because a toolchain
    that linked a second, static libstdc++ into the extension made every message with a number in
    it segfault the interpreter (runs 59-64, bench/NOTES.md; svdq/build.py _link_flags): that
    must fail this test, not end the test session."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", _BAD_INPUT], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, (f"the process died (exit {p.returncode}) on a refused call:\n"
                               f"{p.stdout}{p.stderr[-2000:]}")
    lines = p.stdout.splitlines()
    refused = [ln for ln in lines if ln.startswith("refused:")]
    assert len(refused) == 3, p.stdout
    assert "tensor shapes do not match" in refused[0]
    assert "inv_smooth must be a contiguous CUDA tensor" in refused[1] and "on CPU" in refused[1]
    assert "variant 7 is not" in refused[2]
    assert "good call ok True" in lines


def test_lora_segments_odd_rank(gen):
    """A LoRA of rank 5 appended to a rank-32 branch (37: padded to 48), strength changed."""
    cuda, ref = _backends()
    dtype = torch.bfloat16
    k, n = 704, 392
    layer = make_layer(gen, k, n, 32, dtype)
    down = (torch.randn(5, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    up = (torch.randn(n, 5, generator=gen) * 0.3).to(dtype).cuda()
    layer.set_lowrank_segments([("lora", down, up, 0.7)])
    x = make_x(gen, 333, k, dtype)
    prep = cuda.prepare(layer)
    check_close(cuda.run(layer, prep, x), ref.forward(layer, ref.prepare(layer), x), dtype,
                layer=layer, x=x)
    padded = prep["branch"]["down"]
    layer.set_segment_scale("lora", -1.5)        # same prep: only the scale vector is rewritten
    check_close(cuda.run(layer, prep, x), ref.forward(layer, ref.prepare(layer), x), dtype,
                layer=layer, x=x)
    assert prep["branch"]["down"] is padded


def test_module_forward_and_registry(gen):
    """SVDQLinear.forward through the registry: "auto" picks cuda here; 3-D input; fp32 falls back."""
    from svdq import backends
    assert backends.select("auto", "cuda").name == "cuda"
    dtype = torch.bfloat16
    layer = make_layer(gen, 256, 128, 16, dtype)
    layer.set_backend("cuda")
    x = make_x(gen, 10, 256, dtype).reshape(2, 5, 256)
    y = layer(x)
    _, ref = _backends()
    check_close(y.reshape(10, 128), ref.forward(layer, ref.prepare(layer), x.reshape(10, 256)), dtype,
                layer=layer, x=x.reshape(10, 256))


@pytest.mark.parametrize("k,n", [(96, 64), (64 * 1025 + 64, 8), (128, 12)])
def test_rejects_bad_shapes(gen, k, n):
    from svdq.backends.cuda import CudaBackend
    from svdq.linear import SVDQLinear
    if k % 64:
        with pytest.raises(ValueError):
            SVDQLinear(k, n, device="cuda")
        return
    layer = SVDQLinear(k, n, rank=0, device="cuda")
    with pytest.raises(ValueError, match="multiple of|at most"):
        CudaBackend().prepare(layer)


# -- weight-only layers (adaLN modulation): csrc/dequant_w4.cu ---------------------------------
@pytest.mark.parametrize("n,k", [(18432, 3072), (8, 64), (24, 192), (1000, 15360)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_w4_bitwise(gen, n, k, dtype):
    """code * scale is exact in fp32, so the kernel's one rounding to 16 bits must equal the
    reference's bit for bit; a NaN-poisoned output must be overwritten everywhere."""
    from svdq import build, quant
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = ((torch.randn(n, k // 64, generator=gen) * 0.7).exp() * 0.02).to(torch.bfloat16)
    w = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
    build.load().dequant_w4(quant.pack_int4(codes).cuda(), scales.float().cuda(), w)
    assert torch.equal(w.cpu(), quant.dequantize_weight(codes, scales).to(dtype))


@pytest.mark.parametrize("m", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_layer_matches_reference(gen, m, dtype):
    from svdq import quant
    from svdq.linear import SVDQLinear
    cuda, ref = _backends()
    k, n = 3072, 9216
    layer = SVDQLinear(k, n, kind="w4a16", device="cuda", dtype=dtype)
    with torch.no_grad():
        layer.qweight.copy_(quant.pack_int4(torch.randint(-8, 8, (n, k), generator=gen)).cuda())
        layer.wscales.copy_((torch.rand(n, k // 64, generator=gen) * 0.01 + 1e-3).cuda())
        layer.bias.copy_((torch.randn(n, generator=gen) * 0.1).to(dtype).cuda())
    x = make_x(gen, m, k, dtype)
    prep = cuda.prepare(layer)
    y = cuda.forward(layer, prep, x)
    assert torch.equal(y, cuda.forward(layer, prep, x))
    e = rel_err(y, ref.forward(layer, ref.prepare(layer), x))
    print(f"[w4a16] {m}x{k}->{n} {dtype}: rel err {e:.2e}")
    # the same 16-bit weight on both sides; fp32 sums in another order, one output rounding
    assert e < NORM_TOL[dtype]
