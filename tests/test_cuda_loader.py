"""The SVDQuant Model Loader's model on a CUDA GPU: the fused backend inside ComfyUI's own Flux.

GPU only (skips, with the reason, without CUDA). Runs in a subprocess that imports the extension
as a package, as ComfyUI does, so the backend registry's relative imports are exercised too.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import needs_cuda

REPO = Path(__file__).resolve().parents[1]

pytestmark = needs_cuda

SCRIPT = r"""
import json, sys, torch
comfy_root, pack_dir, link_dir, ckpt = sys.argv[1:5]
sys.path[:0] = [comfy_root, pack_dir, link_dir]
import comfy.options
import comfy.model_management as mm
import svdquant_pack.nodes.model as loader
from svdq import synthetic
import svdq
out = {}
cfg = svdq.inspect_checkpoint(ckpt)[0]
inp = synthetic.random_inputs(cfg, height=96, width=80, txt_len=13, seed=3)
ys = {}
for backend in ("cuda", "reference"):
    patcher = loader.load(ckpt, device="cuda:0", dtype="bfloat16", backend=backend)
    mm.load_models_gpu([patcher])
    dm = patcher.model.diffusion_model
    names = [type(l.backend).__name__ for l in loader.quantized_layers(dm).values()]
    out[backend + "_backends"] = sorted(set(names))
    args = {k: (v.to("cuda", torch.bfloat16) if v is not None else None) for k, v in inp.items()}
    with torch.no_grad():
        ys[backend] = dm(args["x"], args["timestep"], args["context"], args["y"],
                         guidance=args["guidance"]).float().cpu()
    out[backend + "_finite"] = bool(torch.isfinite(ys[backend]).all())
    mm.unload_all_models()
out["rel"] = float((ys["cuda"] - ys["reference"]).norm() / ys["reference"].norm())
print(json.dumps(out))
"""


def test_loader_runs_fused_backend_on_gpu(comfyui_host, svdq_path_dir, tmp_path):
    import svdq
    from svdq import synthetic
    cfg = svdq.FluxConfig.tiny()
    sd = synthetic.random_flux_state_dict(cfg, seed=8)
    ckpt = tmp_path / "tiny-svdq.safetensors"
    svdq.save_checkpoint(ckpt, svdq.quantize_flux(sd, cfg, None, rank=32, refine_iters=1), cfg,
                         svdq.QuantConfig(rank=32).to_dict())
    pack = tmp_path / "pack"
    pack.mkdir()
    os.symlink(REPO, pack / "svdquant_pack")            # imported as a package, as ComfyUI does
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(comfyui_host), str(pack), svdq_path_dir,
                          str(ckpt)], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(out)
    assert out["cuda_backends"] == ["CudaBackend"]
    assert out["reference_backends"] == ["ReferenceBackend"]
    assert out["cuda_finite"] and out["reference_finite"]
    # same W4A8 numbers per layer up to bf16 rounding (test_cuda_kernels), compounded over 4
    # blocks of bf16 math
    assert out["rel"] < 2e-2
