"""`python -m svdq demo`: one command, no downloads, an image at the printed path."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run(args, env_extra, tmp_path):
    env = dict(os.environ, **env_extra)
    env.pop("SVDQ_BACKEND", None)
    p = subprocess.run([sys.executable, "-m", "svdq", "demo", "--out", str(tmp_path), *args],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = re.search(r"Image: (\S+)", p.stdout)
    assert m, p.stdout
    image = Path(m.group(1))
    assert image.is_file() and image.parent == tmp_path
    with Image.open(image) as im:
        assert im.size == (128, 128)
        lo, hi = im.convert("L").getextrema()
    assert hi > lo                      # not a flat picture
    assert (tmp_path / "models" / "svdq" / "demo-flux-tiny-svdq.safetensors").is_file()
    return p.stdout


def test_demo_through_comfyui(comfyui_host, tmp_path):
    out = _run([], {"COMFYUI_PATH": str(comfyui_host)}, tmp_path)
    assert "Quantize Checkpoint node" in out and "SVDQuant Model Loader" in out
    assert re.search(r"quantized in [\d.]+ s", out)


def test_demo_library_only(tmp_path):
    out = _run(["--no-comfyui"], {}, tmp_path)
    assert "svdq library alone" in out
    err = float(re.search(r"latent relative error: ([\d.]+)", out).group(1))
    assert err < 0.15
