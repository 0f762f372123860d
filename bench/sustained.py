"""Sustained throughput at FLUX shapes: each layer run back to back for a while, as a model's
steps run it, with the GPU's SM clock and board power sampled meanwhile.

    python bench/sustained.py [--m 4608] [--seconds 1.0] [--json out.json]

bench/linear.py times each method in 100 ms windows with the L2 flushed before every call, the
acceptance figures' method. This script answers a different question: what a long run sees once
the GPU has settled. On the H200 every one of these layers, ours and cuBLAS's, runs at the
700 W board limit, so the SM clock settles where each method's power draw puts it (bf16 cuBLAS
lower than ours: bench/NOTES.md, run 183), and the speed-up holds that clock difference. Without
a power limit in reach (a smaller load, another GPU) the ratios come out lower; the clock
column says how much of a ratio is clock. No L2 flush here: a layer's input stays in L2 between
calls where it fits, as a fresh activation partly does in a model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import subprocess
import time

import torch

from linear import SHAPES, make_layer


def sampler(device):
    """nvidia-smi sampling SM clock and board power every 50 ms, or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    cmd = ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw",
           "--format=csv,noheader,nounits", "-lms", "50"]
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        cmd += ["-i", f"GPU-{uuid}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def samples_of(proc):
    """[(unix time, MHz, W)] from the sampler's output (its timestamps are local time, as
    datetime's naive timestamp() reads them)."""
    proc.terminate()
    out = []
    for line in proc.stdout.read().splitlines():
        try:
            ts, clk, pw = (v.strip() for v in line.split(","))
            t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((t, float(clk), float(pw)))
        except ValueError:          # "[N/A]" fields, a partial last line
            continue
    return out


def sustain(fn, seconds):
    """(us per call, start, end): after half a second of the same calls, `seconds` of them."""
    def burst():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    t0 = time.time()
    while time.time() - t0 < 0.5:
        burst()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t1 = 0, time.time()
    e0.record()
    while time.time() - t1 < seconds:
        burst()
        calls += 10
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / calls * 1e3, t1, time.time()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=4608)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from svdq.backends.cuda import CudaBackend
    be = CudaBackend()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    proc = sampler(dev)
    time.sleep(0.5)
    runs = []
    for name, k, n in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
        layers = {r: make_layer(k, n, r) for r in (0, 32)}
        preps = {r: be.prepare(layers[r]) for r in (0, 32)}
        x = torch.randn(args.m, k, device=dev, dtype=torch.bfloat16)
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w),
               "r0": lambda: be.run(layers[0], preps[0], x),
               "r32": lambda: be.run(layers[32], preps[32], x)}
        for key, fn in fns.items():
            us, t1, t2 = sustain(fn, args.seconds)
            runs.append(dict(name=name, m=args.m, k=k, n=n, method=key, us=us, t1=t1, t2=t2))
        del w, layers, preps, x
        torch.cuda.empty_cache()
    samples = samples_of(proc) if proc is not None else []
    for r in runs:   # the first 100 ms of a window still carry the previous method's clock
        s = [(c, pw) for t, c, pw in samples if r["t1"] + 0.1 <= t <= r["t2"]]
        r["mhz"] = statistics.median(c for c, _ in s) if s else None
        r["watts"] = statistics.median(pw for _, pw in s) if s else None

    print(f"Sustained, M={args.m}, {torch.cuda.get_device_name()}: us per call over "
          f"{args.seconds:g} s after 0.5 s of the same calls; median SM clock and board power")
    print("| layer | bf16 us | MHz | W | ours r0 us | MHz | W | ours r32 us | MHz | W | "
          "x bf16 r0 | x bf16 r32 | r32/r0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    by = {(r["name"], r["method"]): r for r in runs}
    fmt = lambda v, f: "-" if v is None else format(v, f)
    gm = {"r0": [], "r32": []}
    for name, _, _ in SHAPES:
        b, r0, r32 = by[name, "bf16"], by[name, "r0"], by[name, "r32"]
        gm["r0"].append(b["us"] / r0["us"])
        gm["r32"].append(b["us"] / r32["us"])
        print(f"| {name} | " + " | ".join(
            f"{r['us']:.1f} | {fmt(r['mhz'], '.0f')} | {fmt(r['watts'], '.0f')}" for r in (b, r0, r32))
            + f" | {gm['r0'][-1]:.2f} | {gm['r32'][-1]:.2f} | {r32['us'] / r0['us']:.3f} |")
    geo = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in gm.items()}
    print(f"geomean x bf16, sustained: ours r0 {geo['r0']:.2f}  ours r32 {geo['r32']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": runs, "geomean": geo}, fh, indent=1)


if __name__ == "__main__":
    main()
