"""One activation-kernel and one GEMM launch at a FLUX shape, for ncu:

    ncu --clock-control none -k regex:"act_kernel|gemm_kernel" python bench/profile.py [M K N R]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.linear import make_layer  # noqa: E402
from svdq import build  # noqa: E402
from svdq.backends.cuda import CudaBackend  # noqa: E402

m, k, n, r = (int(v) for v in (sys.argv[1:5] if len(sys.argv) >= 5 else (4608, 3072, 3072, 32)))
build.load()
be = CudaBackend()
layer = make_layer(k, n, r)
prep = be.prepare(layer)
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    be.run(layer, prep, x)
torch.cuda.synchronize()
print("done", m, k, n, r)
