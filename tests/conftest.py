"""Test setup: make `svdq` importable without putting the repository root on sys.path.

The root also holds our `nodes/` package, which would shadow ComfyUI's own top-level `nodes`
module (DESIGN.md). So only `svdq` is exposed, through a link in a private folder.
"""
import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LINKS = tempfile.mkdtemp(prefix="svdq-path-")
os.symlink(os.path.join(ROOT, "svdq"), os.path.join(_LINKS, "svdq"))
sys.path.insert(0, _LINKS)


@pytest.fixture(scope="session")
def svdq_path_dir():
    """A folder holding only a link to svdq/: put it on a child process's path."""
    return _LINKS


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from the test's name: new data, reproducible runs."""
    import zlib
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    return torch.Generator().manual_seed(seed)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def comfyui_host():
    """The ComfyUI host: $COMFYUI_PATH, the custom_nodes folder around this checkout, or
    ../shared/comfyui. Missing under CI is a failure; elsewhere the test skips with the reason."""
    from svdq import demo
    try:
        host = demo.find_comfyui()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    if host is None:
        msg = ("no ComfyUI host: set COMFYUI_PATH, or check this repo out into "
               "<ComfyUI>/custom_nodes, or next to shared/comfyui")
        if _in_ci():
            pytest.fail(msg + " (CI=true: a missing host is a failure)")
        pytest.skip(msg)
    return host


