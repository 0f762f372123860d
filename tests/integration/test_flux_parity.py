"""svdq.flux_model (the library's own FLUX, used without ComfyUI) equals ComfyUI's Flux.

Runs in a subprocess so that ComfyUI's top-level modules never enter the test process.
"""
import json
import subprocess
import sys

SCRIPT = r"""
import json, sys, torch
comfy_root, link_dir = sys.argv[1], sys.argv[2]
sys.path[:0] = [comfy_root, link_dir]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ldm.flux.model as fm, comfy.ops
import svdq
from svdq import synthetic
from svdq.flux_model import FluxModel
out = {}
for name, cfg in (("dev", svdq.FluxConfig.tiny()),
                  ("schnell", svdq.FluxConfig.tiny(guidance_embed=False, depth=1))):
    sd = synthetic.random_flux_state_dict(cfg, seed=5)
    ours = FluxModel.from_state_dict(cfg, sd)
    theirs = fm.Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                     **cfg.to_dict())
    theirs.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    for h, w, t in ((64, 48, 16), (72, 40, 7)):          # odd latent width: padded like ComfyUI
        inp = synthetic.random_inputs(cfg, height=h, width=w, txt_len=t, seed=h + w)
        with torch.no_grad():
            a = ours(**inp)
            b = theirs(inp["x"], inp["timestep"], inp["context"], inp["y"],
                       guidance=inp["guidance"])
        out[f"{name} {h}x{w}"] = float((a - b).norm() / b.norm())
print(json.dumps(out))
"""


def test_library_flux_equals_comfyui_flux(comfyui_host, svdq_path_dir):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(comfyui_host), svdq_path_dir],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    errs = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(errs) == 4
    # same float32 math in a different order: differences at float32 rounding level
    for case, e in errs.items():
        assert e < 1e-5, (case, e)
