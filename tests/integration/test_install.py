"""install.py (run by ComfyUI-Manager): never touches torch, never fails on a kernel build."""
import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("svdq_install", REPO / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_requirements_skip_torch_and_comments(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# c\nnumpy>=1.25  # why\ntorch>=2.4\ntorchvision\nTorch==2.1\nsafetensors\n\n")
    assert _load().requirements(req) == ["numpy>=1.25", "safetensors"]


def test_shipped_requirements_have_no_torch():
    names = [r.split(">")[0].split("=")[0].lower() for r in _load().requirements(
        REPO / "requirements.txt")]
    assert names and "torch" not in names


def test_a_failing_kernel_build_does_not_fail_the_install(monkeypatch):
    mod = _load()
    calls = []
    monkeypatch.setattr(mod.subprocess, "check_call", lambda cmd, **kw: calls.append(cmd))

    def build(cmd, **kw):
        calls.append(cmd)
        raise subprocess.TimeoutExpired(cmd, 1)

    monkeypatch.setattr(mod.subprocess, "run", build)
    assert mod.main() == 0
    assert calls[0][1:4] == ["-m", "pip", "install"] and "torch" not in " ".join(calls[0])
    assert calls[1][1:] == ["-m", "svdq.build"]
