"""Weight-only 4-bit layers (FLUX adaLN modulation, one row per sample): time per call.

Side by side in one run: a stored bf16 weight (cuBLAS), our fused path (one-pass dequantize,
csrc/dequant_w4.cu, then cuBLAS), and the PyTorch reference path (unpack and dequantize with
torch ops per call). Prints median ms and the per-step total for FLUX.1-dev (38 modulation
layers of 3072->18432 and 38 of 3072->9216).
Usage (GPU): python3 bench/modulation.py
"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from svdq import quant  # noqa: E402
from svdq.backends.cuda import CudaBackend  # noqa: E402
from svdq.backends.reference import ReferenceBackend  # noqa: E402
from svdq.linear import SVDQLinear  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    g = torch.Generator().manual_seed(0)
    cuda, ref = CudaBackend(), ReferenceBackend(8)
    total = {}
    print("| M | K->N | bf16 weight ms | ours ms | reference ms | ours x bf16 |")
    print("|---|---|---|---|---|---|")
    for n, count in ((18432, 38), (9216, 38)):
        k = 3072
        layer = SVDQLinear(k, n, kind="w4a16", device="cuda")
        with torch.no_grad():
            codes = torch.randint(-8, 8, (n, k), generator=g)
            layer.qweight.copy_(quant.pack_int4(codes).cuda())
            layer.wscales.copy_((torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).cuda())
            layer.bias.normal_(0, 0.1)
        w16 = quant.dequantize_weight(codes, layer.wscales.cpu()).to(torch.bfloat16).cuda()
        pc, pr = cuda.prepare(layer), ref.prepare(layer)
        for m in (1, 2):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t = {"bf16": bench(lambda: torch.nn.functional.linear(x, w16, layer.bias)),
                 "ours": bench(lambda: cuda.forward(layer, pc, x)),
                 "ref": bench(lambda: ref.forward(layer, pr, x))}
            print(f"| {m} | {k}->{n} | {t['bf16']:.4f} | {t['ours']:.4f} | {t['ref']:.4f} | "
                  f"{t['bf16'] / t['ours']:.2f} |")
            if m == 1:
                for key, v in t.items():
                    total[key] = total.get(key, 0.0) + count * v
    print(f"FLUX.1-dev per step (batch 1, 76 modulation layers): bf16 {total['bf16']:.2f} ms, "
          f"ours {total['ours']:.2f} ms, reference {total['ref']:.2f} ms")


if __name__ == "__main__":
    main()
