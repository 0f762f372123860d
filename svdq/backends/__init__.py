"""Backend registry: one place that picks how an SVDQLinear runs.

A backend has a `name`, `available(device) -> (bool, reason)`, `prepare(layer)` (derive its own
layout from the layer's storage-layout buffers, once) and `forward(layer, prepared, x2d)`.
`select("auto", device)` prefers a compiled backend that supports the device and falls back to
the reference path with one warning that says why. The user can force a backend by name, or
with the environment variable SVDQ_BACKEND.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

from .reference import ReferenceBackend  # noqa: E402

log = logging.getLogger("svdq")

# name -> zero-argument factory; factories import their module lazily so that a missing
# compiler or CUDA never breaks `import svdq`.
_FACTORIES = {
    "reference": lambda: ReferenceBackend(act_bits=8),
    "reference-a4": lambda: ReferenceBackend(act_bits=4),
}
_INSTANCES: dict = {}
_AUTO_ORDER = ["cuda"]          # compiled backends tried by "auto", best first
_default = None                 # set_default's choice, for every device
_auto: dict = {}                # device type -> auto-selected backend
_warned: set = set()


def register(name: str, factory, auto: bool = False) -> None:
    _FACTORIES[name] = factory
    if auto and name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(0, name)


def names() -> list:
    return sorted(set(_FACTORIES) | set(_AUTO_ORDER) | {"auto"})


def get(name: str):
    if name == "auto":
        return select("auto")
    if name not in _INSTANCES:
        if name not in _FACTORIES:
            raise ValueError(f"unknown SVDQuant backend {name!r}; choose one of {names()}")
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def _device(device) -> torch.device:
    """`device`, or the GPU when there is one and the CPU otherwise."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def select(name: str | None = "auto", device=None):
    """Return the backend to use on `device` ("auto" unless SVDQ_BACKEND or `name` says)."""
    name = os.environ.get("SVDQ_BACKEND") or name or "auto"
    device = _device(device)
    if name != "auto":
        backend = get(name)
        ok, why = backend.available(device)
        if not ok:
            raise RuntimeError(f"SVDQuant backend {name!r} cannot run on {device}: {why}")
        return backend
    reasons = []
    for cand in _AUTO_ORDER:
        try:
            backend = get(cand)
            ok, why = backend.available(device)
        except Exception as e:  # a broken build must not stop the reference path
            ok, why = False, f"{type(e).__name__}: {e}"
        if ok:
            return backend
        reasons.append(f"{cand}: {why}")
    if device.type == "cuda":
        _warn_once("SVDQuant: no fused kernel for this GPU, using the slow PyTorch reference "
                   "path (" + "; ".join(reasons) + ")")
    return get("reference")


def default(device=None):
    """The process-wide default backend for layers on `device` (set_default's, or auto-selected
    once per device type: a layer kept on the CPU of a machine with a GPU runs the reference
    path, not the CUDA kernels)."""
    if _default is not None:
        return _default
    device = _device(device)
    if device.type not in _auto:
        _auto[device.type] = select("auto", device)
    return _auto[device.type]


def set_default(name_or_backend) -> None:
    """Run every layer without a backend of its own on this one (None: auto-select again)."""
    global _default
    _default = get(name_or_backend) if isinstance(name_or_backend, str) else name_or_backend


def _cuda():
    # relative: inside ComfyUI this package is custom_nodes.<pack>.svdq, not a top-level svdq
    return importlib.import_module(".cuda", __name__).CudaBackend()


register("cuda", _cuda)
