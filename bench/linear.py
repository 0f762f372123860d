"""One linear layer at FLUX shapes: cuBLAS bf16, fp8 _scaled_mm with dynamic activation
quantization, and our fused W4A8 layer (activation kernel included) at rank 0 and rank 32.

    python bench/linear.py [--m 1024 4608 8192] [--rounds 8] [--dtype bf16|fp16] [--json out.json]

Median of triton.testing.do_bench (CUDA events, L2 flushed before each call) after warm-up,
random data, all in one run, so the ratios compare like with like. The layers are timed first,
then each kernel variant alone (see main()). Each shape's four methods (cuBLAS, fp8, ours at
rank 0 and 32) run in --rounds rounds of one 100 ms window each, the rounds' orders a balanced
Latin square (every method runs in every position and follows every other method equally
often), and the median over the rounds is reported. On the H200 every method holds the GPU at
its power limit, and a window's clock carries what ran before it (bench/NOTES.md, runs 180 and
193); one round per shape in a fixed order (--rounds 1: bf16, fp8, r0, r32, the method of runs
1-191) lets that history and one window's noise (about +-4% per ratio) into every ratio.
TFLOP/s counts 2*M*N*K for every method (the branch's extra 2*M*R*(K+N) is not counted as
useful work). --dtype sets the activations', outputs' and branch's 16-bit type and the cuBLAS
baseline's (bf16 by default, which the README's figures use); the tables call the baseline by
that name, the JSON rows under the key "bf16" either way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # svdq only; the bench never imports the ComfyUI nodes

ACT_VARIANTS = (0, 1, 2)   # activation kernels: 16- or 8-token blocks, split (csrc/w4a8.cu)
SHAPES = [("qkv", 3072, 9216), ("proj", 3072, 3072), ("mlp_fc1", 3072, 12288),
          ("mlp_fc2", 12288, 3072), ("single_in", 3072, 21504), ("single_out", 15360, 3072)]


def bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


# the layer methods in the key order that latin_orders' first row (0, 1, 3, 2) turns into the
# single pass's bf16, fp8, r0, r32
METHODS = ("bf16", "fp8", "r32", "r0")


def latin_orders(n):
    """n orders of range(n) in which each index takes every position once and follows every other
    index once (a Williams square; n even). Row 0 is 0, 1, n-1, 2, n-2, ..."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    return [[(v + i) % n for v in first] for i in range(n)]


def bench_rounds(fns, rounds):
    """{name: median ms over `rounds` windows} and {name: every window's ms}; fns' keys in the
    order that round 0 permutes (latin_orders)."""
    keys = list(fns)
    orders = latin_orders(len(keys))
    runs = {k: [] for k in keys}
    for i in range(rounds):
        for j in orders[i % len(orders)]:
            runs[keys[j]].append(bench(fns[keys[j]]))
    return {k: statistics.median(v) for k, v in runs.items()}, runs


def make_layer(k, n, rank, dtype=torch.bfloat16):
    from svdq import quant
    from svdq.linear import SVDQLinear
    layer = SVDQLinear(k, n, rank=rank, bias=True, device="cuda", dtype=dtype)
    with torch.no_grad():
        codes = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
        layer.qweight.copy_(quant.pack_int4(codes))
        del codes
        layer.wscales.copy_((torch.randn(n, k // 64, device="cuda") * 0.5).exp() * 0.01)
        layer.smooth.copy_((torch.randn(k, device="cuda") * 0.5).exp())
        if rank:
            layer.lowrank_down.normal_(0, k ** -0.5)
            layer.lowrank_up.normal_(0, 0.1)
        layer.bias.normal_(0, 0.1)
    layer.invalidate()
    return layer


def layer_bytes(layer, prep):
    """GPU bytes the layer holds, split into what the kernels read and the scales kept for the
    checkpoint/reference (wscales)."""
    from svdq.backends.cuda import CudaBackend
    br = CudaBackend._branch(layer, prep)
    t = [layer.qweight, layer.smooth, layer.lowrank_down, layer.lowrank_up, layer.bias,
         prep["multT"], prep["row_scale"], prep["inv_smooth"], br["rank_scale"]]
    t += [v for v in br["down"].values() if v.data_ptr() != layer.lowrank_down.data_ptr()]
    t += [v for v in br["up"].values() if v.data_ptr() != layer.lowrank_up.data_ptr()]
    kern = sum(x.numel() * x.element_size() for x in t if x is not None)
    return kern, layer.wscales.numel() * layer.wscales.element_size()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[1024, 4608, 8192])
    p.add_argument("--rounds", type=int, default=8,
                   help="rounds of each shape's four methods (module docstring); "
                        "1 = one fixed-order pass")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    base = args.dtype   # the baseline's label in the tables

    from svdq import build
    from svdq.backends.cuda import CudaBackend
    t0 = time.perf_counter()
    build.load()
    print(f"extension load: {time.perf_counter() - t0:.2f} s; {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    be = CudaBackend()
    # 1 mma.sync; 2 wgmma, 3 wgmma ping-pong (Hopper)
    gemm_variants = (1, 2, 3) if build.load().WGMMA else (1,)
    torch.manual_seed(0)
    rows, mem = {}, []
    # Pass 1, the layers as a model runs them (each launches only the kernels it picks). Pass 2,
    # their parts, every kernel variant alone. The passes are separate because launching the
    # ping-pong GEMM alone at shapes where it is never picked made the next shapes' rank-32
    # layers 3-14% slower in the same process (bench/NOTES.md, run 153); nothing timed here
    # follows a diagnostic launch.
    for name, k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5
        w8 = w.to(torch.float8_e4m3fn)
        wscale = torch.ones((), device="cuda")
        layers = {r: make_layer(k, n, r, dt) for r in (0, 32)}
        preps = {r: be.prepare(layers[r]) for r in (0, 32)}
        kb, sb = layer_bytes(layers[32], preps[32])
        mem.append((name, k, n, kb / (n * k), (kb + sb) / (n * k)))
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=dt)

            def fp8():
                s = (x.abs().amax().float() / 448.0).clamp_min(1e-12)
                xq = (x / s).to(torch.float8_e4m3fn)
                return torch._scaled_mm(xq, w8.t(), scale_a=s, scale_b=wscale,
                                        out_dtype=dt)

            fns = {"bf16": lambda: torch.nn.functional.linear(x, w), "fp8": fp8,
                   "r32": lambda: be.run(layers[32], preps[32], x),
                   "r0": lambda: be.run(layers[0], preps[0], x)}
            t, runs = bench_rounds({key: fns[key] for key in METHODS}, args.rounds)
            gv = be.gemm_variant_for(m, n, k)
            flop = 2.0 * m * n * k
            ratios = [a / b for a, b in zip(runs["r32"], runs["r0"])]
            rows[name, m] = dict(name=name, m=m, k=k, n=n, flop=flop, dtype=args.dtype,
                                 gemm_variant=gv, rounds=runs, **t)
            print(f"M={m:5d} {name:10s} {k:5d}->{n:5d}  " + "  ".join(
                f"{base if key == 'bf16' else key} {t[key]:.3f}ms {flop / t[key] / 1e9:6.0f}TF"
                for key in ("bf16", "fp8", "r0", "r32")) + f"  (layer gemm v{gv}; r32/r0 per "
                f"round {min(ratios):.3f}-{max(ratios):.3f})", flush=True)
        del w, w8, layers, preps
        torch.cuda.empty_cache()

    print("\n## Parts of the layers: rank 32 each kernel variant alone, rank 0 as picked")
    ext = build.load()
    for name, k, n in SHAPES:
        layer = make_layer(k, n, 32, dt)
        pr = be.prepare(layer)
        br = be._branch(layer, pr)
        down, up = br["down"][dt], br["up"][dt]
        layer0 = make_layer(k, n, 0, dt)
        pr0 = be.prepare(layer0)
        br0 = be._branch(layer0, pr0)
        down0, up0 = br0["down"][dt], br0["up"][dt]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            r = rows[name, m]
            # each kernel's inputs and outputs as the layers make them (codes etc. filled)
            y, (codes, sx, sq, act) = be.run(layer, pr, x, return_parts=True)
            for v in ACT_VARIANTS:
                r[f"act32v{v}"] = bench(lambda v=v: ext.act_quant(
                    x, pr["inv_smooth"], down, br["rank_scale"], codes, sx, sq, act, v))
            r["act_variant"] = be.act_variant_for(m, k, 32)
            r["act32"] = r[f"act32v{r['act_variant']}"]
            for v in gemm_variants:
                r[f"gemm32v{v}"] = bench(lambda v=v: ext.gemm(
                    codes, sx, sq, layer.qweight, pr["multT"], pr["row_scale"], act, up,
                    layer.bias, y, v))
            r["gemm32"] = r[f"gemm32v{r['gemm_variant']}"]
            # rank 0's two kernels as its layer picks them: what the branch adds to each
            y0, (c0, sx0, sq0, act0) = be.run(layer0, pr0, x, return_parts=True)
            r["act0"] = bench(lambda: ext.act_quant(x, pr0["inv_smooth"], down0,
                                                    br0["rank_scale"], c0, sx0, sq0, act0,
                                                    be.act_variant_for(m, k, 0)))
            r["gemm0"] = bench(lambda: ext.gemm(c0, sx0, sq0, layer0.qweight, pr0["multT"],
                                                pr0["row_scale"], act0, up0, layer0.bias, y0,
                                                r["gemm_variant"]))
            print(f"M={m:5d} {name:10s} {k:5d}->{n:5d}  " + "  ".join(
                f"{key} {r[key]:.3f}ms" for key in tuple(f"act32v{v}" for v in ACT_VARIANTS)
                + tuple(f"gemm32v{v}" for v in gemm_variants) + ("act0", "gemm0")), flush=True)
        del layer, pr, br, down, up, layer0, pr0, br0, down0, up0
        torch.cuda.empty_cache()
    rows = list(rows.values())

    print("\n## Bytes per weight (rank 32; kernel-read tensors / plus the checkpoint's wscales)")
    for name, k, n, b1, b2 in mem:
        print(f"{name:10s} {k:5d}->{n:5d}  {b1:.4f} B/weight  ({b2:.4f} with wscales)")

    print(f"\n## Summary: median ms, TFLOP/s (2MNK), speed vs cuBLAS {base}")
    hdr = (f"| M | layer | K->N | {base} ms | TF/s | fp8+q ms | x {base} | ours r0 ms | TF/s | "
           f"x {base} | ours r32 ms | TF/s | x {base} | r32/r0 | act r32 ms | gemm r32 ms | "
           f"act r0 ms | gemm r0 ms |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        f = r["flop"] / 1e9
        print(f"| {r['m']} | {r['name']} | {r['k']}->{r['n']} | {r['bf16']:.3f} | {f / r['bf16']:.0f} | "
              f"{r['fp8']:.3f} | {r['bf16'] / r['fp8']:.2f} | {r['r0']:.3f} | {f / r['r0']:.0f} | "
              f"{r['bf16'] / r['r0']:.2f} | {r['r32']:.3f} | {f / r['r32']:.0f} | "
              f"{r['bf16'] / r['r32']:.2f} | {r['r32'] / r['r0']:.3f} | {r['act32']:.3f} | "
              f"{r['gemm32']:.3f} | {r['act0']:.3f} | {r['gemm0']:.3f} |")
    for m in args.m:
        sel = [r for r in rows if r["m"] == m]
        gm = lambda key: math.exp(sum(math.log(r["bf16"] / r[key]) for r in sel) / len(sel))
        print(f"geomean x {base} at M={m}: fp8+q {gm('fp8'):.2f}  ours r0 {gm('r0'):.2f}  "
              f"ours r32 {gm('r32'):.2f}  (gemm alone r32: "
              + ", ".join(f"variant {v} {gm(f'gemm32v{v}'):.2f}" for v in gemm_variants)
              + f"; as the layer picks {gm('gemm32'):.2f}, variants "
              + "/".join(str(r["gemm_variant"]) for r in sel) + ")")
        print(f"  activation kernel r32, mean ms at M={m}: "
              + ", ".join(f"variant {v} {sum(r[f'act32v{v}'] for r in sel) / len(sel):.4f}"
                          for v in ACT_VARIANTS)
              + "; the layers use " + "/".join(str(r["act_variant"]) for r in sel))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "mem": mem}, fh, indent=1)


if __name__ == "__main__":
    main()
