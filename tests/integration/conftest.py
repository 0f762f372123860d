"""Integration tests against the real ComfyUI host: one headless server per test module.

The host is found through $COMFYUI_PATH, the custom_nodes folder this checkout sits in, or
<repo>/../shared/comfyui. Under CI (CI=true) a missing host fails the run; elsewhere the tests
skip with the reason (the `comfyui_host` fixture in tests/conftest.py).
"""
import os
from pathlib import Path

import pytest

from svdq import demo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stand_ins(comfyui_host, tmp_path_factory):
    """Text-encoder and VAE stand-ins, written once per session and linked into each base."""
    models = tmp_path_factory.mktemp("stand_ins")
    demo.make_stand_ins(comfyui_host, models)
    return models


@pytest.fixture(scope="module")
def comfy(comfyui_host, stand_ins, tmp_path_factory):
    """A running ComfyUI with this extension loaded and the stand-ins in its models folder."""
    base = tmp_path_factory.mktemp("comfy_base")
    server = demo.ComfyServer(comfyui_host, base, REPO).start()
    try:
        for sub in ("text_encoders", "vae_approx"):
            dst = base / "models" / sub
            dst.mkdir(parents=True, exist_ok=True)
            for f in (stand_ins / sub).iterdir():
                os.symlink(f, dst / f.name)
        server.models = base / "models"
        server.wait_ready()
        yield server
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        server.stop()
