"""Manual check of the nodes on a CUDA machine, in-process (no server, no web frontend).

    python tests/integration/gpu_smoke.py <ComfyUI folder> [backend...]

Not collected by pytest (CI has no GPU). Builds ComfyUI's Flux through our loader on the GPU,
quantizes with the Quantize Checkpoint node, samples 16-bit vs 4-bit with each backend, and
checks SVDQ LoRA against ComfyUI's own LoRA loader; prints one line per result and exits
non-zero when a bound is missed.
"""
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

host = Path(sys.argv[1]).resolve()
backends = sys.argv[2:] or ["reference", "auto"]
repo = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(host))
from comfy.cli_args import args  # noqa: E402
args.cpu = not torch.cuda.is_available()    # lets the script itself be tried on a CPU
import folder_paths  # noqa: E402

base = Path(tempfile.mkdtemp(prefix="svdq-gpu-"))
for sub in ("diffusion_models", "loras", "svdq"):
    (base / sub).mkdir()
folder_paths.folder_names_and_paths["svdq"] = ([str(base / "svdq")], {".safetensors"})
folder_paths.add_model_folder_path("diffusion_models", str(base / "diffusion_models"), True)
folder_paths.add_model_folder_path("loras", str(base / "loras"), True)

spec = importlib.util.spec_from_file_location("svdq_ext", repo / "__init__.py",
                                              submodule_search_locations=[str(repo)])
ext = importlib.util.module_from_spec(spec)
sys.modules["svdq_ext"] = ext
spec.loader.exec_module(ext)
from svdq_ext.nodes.loader import SVDQuantModelLoader  # noqa: E402
from svdq_ext.nodes.lora import SVDQLoRA  # noqa: E402
from svdq_ext.nodes.quantize import QuantizeCheckpoint  # noqa: E402
from svdq_ext.svdq import demo  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

failures = []


def check(name, value, bound):
    ok = value < bound
    print(f"{'ok ' if ok else 'BAD'} {name}: {value:.4f} (bound {bound})", flush=True)
    if not ok:
        failures.append(name)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


cfg = demo.tiny_config()
cfg.depth, cfg.depth_single_blocks = 2, 2
demo.write_flux16(base / "diffusion_models" / "tiny.safetensors", cfg, seed=0)
g = torch.Generator().manual_seed(0)
cond = [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                "guidance": 3.5}]]
latent = torch.zeros(1, 16, 32, 32)
noise = comfy.sample.prepare_noise(latent, 1)


def sample(model):
    return comfy.sample.sample(model, noise, 8, 1.0, "euler", "simple", cond, cond, latent,
                               seed=1, disable_pbar=True).float().cpu()


print("device:", mm.get_torch_device(), torch.cuda.get_device_name() if torch.cuda.is_available()
      else "", flush=True)
m16 = SVDQuantModelLoader().load("tiny.safetensors", "default", "bfloat16", "auto")[0]
ref = sample(m16)
t0 = time.time()
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
q = QuantizeCheckpoint().quantize(m16, cond, 4, 0, 256, 32, "tiny-svdq", True)[0]
print(f"quantize node: {time.time() - t0:.1f} s, peak GPU {torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0:.0f} MiB;"
      f" sizes 16-bit {m16.model_size() / 2**20:.2f} MiB, 4-bit {q.model_size() / 2**20:.2f} MiB",
      flush=True)
check("4-bit model smaller than 16-bit", q.model_size() / m16.model_size(), 0.6)

for be in backends:
    m4 = SVDQuantModelLoader().load("tiny-svdq.safetensors", "default", "bfloat16", be)[0]
    t0 = time.time()
    out = sample(m4)
    names = {type(m.backend).__name__ for m in m4.model.diffusion_model.modules()
             if hasattr(m, "backend") and m.backend is not None}
    print(f"backend {be} -> {names}: {time.time() - t0:.1f} s", flush=True)
    check(f"4-bit ({be}) vs 16-bit latent", rel(out, ref), 0.06)
    assert torch.isfinite(out).all()

# LoRA: ours on the 4-bit model vs ComfyUI's own on the 16-bit model
h, m, r = cfg.hidden_size, cfg.mlp_hidden, 8
lora = {}
for name, n, k in [("double_blocks_0_img_attn_qkv", 3 * h, h), ("double_blocks_1_txt_mlp_2", h, m),
                   ("single_blocks_0_linear1", 3 * h + m, h), ("single_blocks_1_linear2", h, h + m),
                   ("txt_in", h, 768)]:
    lora[f"lora_unet_{name}.lora_down.weight"] = torch.randn(r, k, generator=g) * 0.15
    lora[f"lora_unet_{name}.lora_up.weight"] = torch.randn(n, r, generator=g) * 0.15
save_file(lora, str(base / "loras" / "l.safetensors"))
oracle_model, _ = comfy.sd.load_lora_for_models(m16, None, lora, 1.0, 0)
oracle = sample(oracle_model)
m4 = SVDQuantModelLoader().load("tiny-svdq.safetensors", "default", "bfloat16", backends[-1])[0]
ours = sample(SVDQLoRA().apply(m4, "l.safetensors", 1.0)[0])
zero = sample(SVDQLoRA().apply(m4, "l.safetensors", 0.0)[0])
plain = sample(m4)
print(f"LoRA effect on the 16-bit model: {rel(oracle, ref):.3f}", flush=True)
check("SVDQ LoRA on 4-bit vs stock LoRA on 16-bit", rel(ours, oracle), 0.06)
check("SVDQ LoRA strength 0 vs none", rel(zero, plain), 1e-3)
t0 = time.time()
SVDQLoRA().apply(m4, "l.safetensors", 0.5)
print(f"strength change (cached conversion): {time.time() - t0:.3f} s")
sys.exit(1 if failures else 0)
