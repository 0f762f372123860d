"""`python -m svdq demo`: the whole job on a tiny FLUX-architecture model, no downloads.

1. Writes a tiny random 16-bit FLUX model (with outlier channels like a trained one).
2. Quantizes it through Quantize Checkpoint: the real node inside ComfyUI when one is found
   (COMFYUI_PATH, the custom_nodes folder this extension sits in, or ../shared/comfyui), else
   the same library calls (svdq.ActivationRecorder + svdq.quantize_flux) without ComfyUI.
3. Generates an image with workflows/api/flux1-dev-svdq.json (ComfyUI), or with the library's
   own FLUX forward and a plain latent preview (no ComfyUI), and prints where it is.

The ComfyUI driver here (server start, /prompt, /history, stand-in text encoder and VAE) is
shared with tests/integration. svdq itself never imports ComfyUI: the stand-in writer runs in a
child process with the host on its path.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
CLIP_STAND_IN = "random_clip_l.safetensors"


def find_comfyui(explicit: str | None = None) -> Path | None:
    """The ComfyUI host: explicit path, $COMFYUI_PATH, <ComfyUI>/custom_nodes/<this repo>,
    or <repo>/../shared/comfyui. An explicit or $COMFYUI_PATH that is not a host is an error."""
    given = explicit or os.environ.get("COMFYUI_PATH")
    if given:
        p = Path(given).expanduser().resolve()
        if not (p / "main.py").is_file() or not (p / "comfy").is_dir():
            raise FileNotFoundError(f"{p}: not a ComfyUI folder (no main.py and comfy/). Fix: "
                                    f"point COMFYUI_PATH at your ComfyUI checkout")
        return p
    for p in (REPO.parent.parent if REPO.parent.name == "custom_nodes" else None,
              REPO.parent / "shared" / "comfyui"):
        if p is not None and (p / "main.py").is_file() and (p / "comfy").is_dir():
            return p.resolve()
    return None


# -- tiny models ------------------------------------------------------------------------------
def tiny_config(schnell: bool = False):
    from .flux import FluxConfig
    # 768-wide context and pooled vector: what the CLIP-L stand-in produces
    return FluxConfig.tiny(context_in_dim=768, vec_in_dim=768, depth=1, depth_single_blocks=1,
                           guidance_embed=not schnell)


def write_flux16(path, cfg, seed: int = 0) -> str:
    """A random 16-bit FLUX file in ComfyUI naming whose header carries its config, so that
    SVDQuant Model Loader can build it (ComfyUI's detection only knows full-size FLUX)."""
    from safetensors.torch import save_file
    from .flux import FAMILY
    from .synthetic import random_flux_state_dict
    sd = random_flux_state_dict(cfg, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    save_file(sd, tmp, metadata={"model_family": FAMILY,
                                 "model_config": json.dumps(cfg.to_dict())})
    os.replace(tmp, path)
    return str(path)


_STAND_INS = r"""
import os, sys, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True                      # the host's device probe must not look for a GPU
import comfy.sd1_clip, comfy.taesd.taesd as taesd

def rand(sd, seed, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if "norm" in k and k.endswith("weight"):
            t = torch.ones(v.shape)
        elif k.endswith("bias") or "norm" in k:
            t = torch.zeros(v.shape)
        elif v.dim() == 4:   # convs: about unit gain per layer, so the picture keeps contrast
            t = torch.randn(v.shape, generator=g) * gain / (v[0].numel() ** 0.5)
        else:   # small weights keep a 12-layer random transformer finite
            t = torch.randn(v.shape, generator=g) * 0.02
        out[k] = t.half().contiguous()
    return out

models = sys.argv[2]
os.makedirs(os.path.join(models, "text_encoders"), exist_ok=True)
os.makedirs(os.path.join(models, "vae_approx"), exist_ok=True)
clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
sd = {k: torch.empty(v.shape) for k, v in clip.transformer.state_dict().items()}
save_file(rand(sd, 1), os.path.join(models, "text_encoders", sys.argv[3]))
vae = taesd.TAESD(latent_channels=16)
save_file(rand(vae.taesd_encoder.state_dict(), 2), os.path.join(models, "vae_approx", "taef1_encoder.safetensors"))
dec = rand(vae.taesd_decoder.state_dict(), 3)
# the RGB output conv: centre the picture at mid-grey instead of at black
for k, v in dec.items():
    if k.endswith("bias") and v.shape == (3,):
        dec[k] = torch.full((3,), 0.5).half()
save_file(dec, os.path.join(models, "vae_approx", "taef1_decoder.safetensors"))
"""


def make_stand_ins(host: Path, models: Path) -> None:
    """Random CLIP-L (CLIPLoader type stable_diffusion) and taef1 VAE files that stock ComfyUI
    loaders accept. Shapes come from the host's own classes, in a child process."""
    if (models / "text_encoders" / CLIP_STAND_IN).exists() and \
            (models / "vae_approx" / "taef1_decoder.safetensors").exists():
        return
    subprocess.run([sys.executable, "-c", _STAND_INS, str(host), str(models), CLIP_STAND_IN],
                   check=True, cwd=str(host))


def load_api(name: str) -> dict:
    with open(WORKFLOWS / "api" / f"{name}.json") as f:
        return json.load(f)


def with_stand_ins(graph: dict, size: int = 128, steps: int | None = None) -> dict:
    """A shipped workflow adapted to tiny models: the FLUX text encoders become the CLIP-L
    stand-in, the VAE becomes taef1, stock 16-bit loading goes through our loader (ComfyUI's
    detection only knows full-size FLUX), the image gets small."""
    g = copy.deepcopy(graph)
    for node in g.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": CLIP_STAND_IN, "type": "stable_diffusion",
                              "device": "default"}
        elif ct == "VAELoader":
            inp["vae_name"] = "taef1"
        elif ct == "UNETLoader":
            node["class_type"] = "SVDQuantModelLoader"
            node["inputs"] = {"model_name": inp["unet_name"], "device": "default",
                              "dtype": "bfloat16", "backend": "auto"}
        elif ct in ("EmptySD3LatentImage", "EmptyLatentImage"):
            inp["width"] = inp["height"] = size
        elif ct == "SVDQuantQuantizeCheckpoint":
            inp["resolution"] = size
            inp["steps"] = steps or inp["steps"]
        elif ct == "KSampler" and steps:
            inp["steps"] = steps
    return g


def set_inputs(graph: dict, class_type: str, **values) -> dict:
    """Set widget values on every node of a class (e.g. model_name); returns the graph."""
    hit = False
    for node in graph.values():
        if node["class_type"] == class_type:
            node["inputs"].update(values)
            hit = True
    if not hit:
        raise KeyError(f"workflow has no {class_type} node")
    return graph


# -- a ComfyUI server driven over HTTP ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's main.py on a loopback port, with this extension and a private base folder."""

    def __init__(self, host: Path, base: Path, extension: Path = REPO):
        self.host, self.base = Path(host), Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for d in ("custom_nodes", "models", "input", "output", "user", "temp"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "ComfyUI-SVDQuant"
        if not link.exists():
            link.symlink_to(Path(extension).resolve(), target_is_directory=True)
        self.log_path = self.base / "comfyui.log"
        self.proc = None

    def start(self) -> "ComfyServer":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
             str(self.port), "--base-directory", str(self.base), "--database-url",
             "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=str(self.host), stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not answer in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw or b"{}")
        except ValueError:      # some routes (/interrupt) answer with an empty or text body
            return status, {"text": raw.decode(errors="replace")}

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue an API-format graph and wait for its /history entry (success or error)."""
        status, body = self.post("/prompt", {"prompt": graph})
        if status != 200:
            raise RuntimeError(f"/prompt refused the graph ({status}): {json.dumps(body)[:2000]}")
        pid = body["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            h = self.get(f"/history/{pid}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                if h[pid]["status"].get("status_str") in ("success", "error"):
                    return h[pid]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s:\n{self.log_tail()}")

    def output_files(self, entry: dict, kind: str = "images") -> list:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for f in node_out.get(kind, []):
                out.append(self.base / "output" / f.get("subfolder", "") / f["filename"])
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


def error_message(entry: dict) -> str:
    """The exception message of a failed /history entry."""
    for ev, data in entry.get("status", {}).get("messages", []):
        if ev == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


# -- the demo ---------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[svdq demo] {msg}", flush=True)


def run_with_comfyui(host: Path, work: Path, steps: int, size: int) -> Path:
    models = work / "models"
    _say(f"ComfyUI found at {host}; starting it headless (CPU) on a private folder {work}")
    server = ComfyServer(host, work).start()
    try:
        _say("writing a tiny random FLUX.1-dev-architecture model and text-encoder/VAE stand-ins")
        write_flux16(models / "diffusion_models" / "demo-flux-tiny.safetensors", tiny_config())
        make_stand_ins(host, models)
        server.wait_ready()
        _say("running workflows/api/flux1-quantize-checkpoint.json (Quantize Checkpoint node)")
        g = with_stand_ins(load_api("flux1-quantize-checkpoint"), size, steps)
        set_inputs(g, "SVDQuantModelLoader", model_name="demo-flux-tiny.safetensors")
        set_inputs(g, "SVDQuantQuantizeCheckpoint", output_name="demo-flux-tiny-svdq",
                   overwrite=True)
        set_inputs(g, "SaveImage", filename_prefix="svdq-demo-quantize")
        t0 = time.time()
        entry = server.run(g)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"quantize workflow failed: {error_message(entry)}")
        _say(f"quantized in {time.time() - t0:.1f} s -> "
             f"{models / 'svdq' / 'demo-flux-tiny-svdq.safetensors'}")
        _say("running workflows/api/flux1-dev-svdq.json with SVDQuant Model Loader")
        g = with_stand_ins(load_api("flux1-dev-svdq"), size, steps)
        set_inputs(g, "SVDQuantModelLoader", model_name="demo-flux-tiny-svdq.safetensors")
        set_inputs(g, "SaveImage", filename_prefix="svdq-demo")
        entry = server.run(g)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"text-to-image workflow failed: {error_message(entry)}")
        return server.output_files(entry)[0]
    except Exception:
        _say("ComfyUI log tail:\n" + server.log_tail(3000))
        raise
    finally:
        server.stop()


def run_library_only(work: Path, steps: int, size: int, seed: int = 42) -> Path:
    """No ComfyUI: calibrate, quantize and sample with svdq's own FLUX forward; the picture is
    a plain view of three latent channels (there is no VAE without a host)."""
    import torch
    from PIL import Image
    from . import ActivationRecorder, layer_specs, quantize_flux, save_checkpoint
    from . import QuantConfig, load_checkpoint
    from .flux_model import FluxModel
    from .synthetic import random_flux_state_dict, random_inputs

    cfg = tiny_config()
    _say("no ComfyUI found: using the svdq library alone")
    sd = random_flux_state_dict(cfg, 0)
    model = FluxModel.from_state_dict(cfg, sd)
    inp = random_inputs(cfg, height=size, width=size, txt_len=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(inp["x"].shape, generator=g)

    def sample(m):
        x = x0.clone()
        ts = torch.linspace(1, 0, steps + 1)
        with torch.no_grad():
            for i in range(steps):
                v = m(x, ts[i:i + 1], inp["context"], inp["y"], inp["guidance"])
                x = x + (ts[i + 1] - ts[i]) * v
        return x

    _say(f"calibrating: {steps} sampling steps of the 16-bit model")
    with ActivationRecorder(model, list(layer_specs(cfg)), seed=seed) as rec:
        ref = sample(model)

    def progress(done, total, name):
        if done == total or done % 4 == 0:
            _say(f"quantized {done}/{total} layers ({name})")

    tensors = quantize_flux(sd, cfg, calib=rec.result(), progress=progress)
    path = work / "models" / "svdq" / "demo-flux-tiny-svdq.safetensors"
    save_checkpoint(path, tensors, cfg, quant_config=QuantConfig().to_dict(), overwrite=True)
    _say(f"wrote {path}")
    q = FluxModel.from_checkpoint(load_checkpoint(path))
    lat = sample(q)
    err = float((lat - ref).norm() / ref.norm())
    _say(f"4-bit vs 16-bit latent relative error: {err:.3f}")
    rgb = lat[0, :3]
    rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-8)
    img = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    out = work / "output" / "svdq-demo.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    img.resize((size, size), Image.NEAREST).save(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m svdq demo",
                                 description="Quantize a tiny FLUX model and make an image.")
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, the custom_nodes "
                                      "folder this extension is in, or ../shared/comfyui)")
    ap.add_argument("--no-comfyui", action="store_true", help="use the library alone")
    ap.add_argument("--out", help="work folder (default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args(argv)
    work = Path(a.out or tempfile.mkdtemp(prefix="svdq-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    host = None if a.no_comfyui else find_comfyui(a.comfyui)
    t0 = time.time()
    if host is not None:
        image = run_with_comfyui(host, work, a.steps, a.size)
    else:
        image = run_library_only(work, a.steps, a.size)
    final = work / "svdq-demo.png"
    if image != final:
        shutil.copyfile(image, final)
    _say(f"done in {time.time() - t0:.0f} s. Image: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
