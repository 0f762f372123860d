"""Quantize a whole FLUX.1 state dict, one layer at a time."""
from __future__ import annotations

import logging
import time

import torch

from . import quant
from .flux import FluxConfig, dense_shapes, layer_specs
from .svdquant import QuantConfig, layer_tensors, search_shared_smoothing, svdquant_weight

log = logging.getLogger("svdq")


def _weight(sd, name, device):
    try:
        return sd[f"{name}.weight"].to(device).float()
    except KeyError:
        raise KeyError(f"the FLUX state dict has no '{name}.weight'; is it a FLUX.1 "
                       f"transformer in ComfyUI naming?") from None


def quantize_flux(state_dict: dict, config: FluxConfig, calib: dict | None = None,
                  rank: int = 32, device=None, progress=None, should_stop=None,
                  **options) -> dict:
    """16-bit FLUX (ComfyUI names) -> the tensors of a v1 checkpoint (see save_checkpoint).

    calib: layer name -> Tensor [T, K] of recorded inputs (svdq.calibrate); layers without
    samples are quantized on the weight error alone. Only one layer's weights and samples are on
    `device` at a time. progress(done, total, name) reports each layer; should_stop() is polled
    between layers and may raise (ComfyUI's interrupt) or return True to stop.
    Returns the tensors; `quant_config` for the header is QuantConfig(...).to_dict().
    """
    cfg = QuantConfig(rank=rank, **options)
    device = torch.device(device) if device is not None else torch.device("cpu")
    specs = layer_specs(config)
    calib = calib or {}
    out = {}
    missing = [k for k in dense_shapes(config) if k not in state_dict]
    if missing:
        raise KeyError(f"the FLUX state dict lacks {missing[:5]}; it does not match the config")
    for k in dense_shapes(config):
        out[k] = state_dict[k].to(cfg.dtype)

    # Layers sharing an input share one smoothing vector, searched on their stacked weights.
    groups: dict = {}
    for name, spec in specs.items():
        if spec.smooth_group:
            groups.setdefault(spec.smooth_group, []).append(name)
    shared_lam = {}

    total, t0 = len(specs), time.time()
    for i, (name, spec) in enumerate(specs.items()):
        if should_stop is not None and should_stop():
            raise InterruptedError("quantization interrupted")
        w = _weight(state_dict, name, device)
        b = state_dict.get(f"{name}.bias")
        if spec.kind == "w4a16":
            codes, scales = quant.quantize_weight(w, cfg.scale_dtype)
            out[f"{name}.qweight"] = quant.pack_int4(codes).cpu()
            out[f"{name}.wscales"] = scales.cpu()
            if b is not None:
                out[f"{name}.bias"] = b.to(cfg.dtype)
        else:
            x = calib.get(name)
            x = None if x is None else x.to(device).float()
            lam = None
            members = groups.get(spec.smooth_group, [name])
            if len(members) > 1:
                if spec.smooth_group not in shared_lam:
                    ws = [_weight(state_dict, m, device) for m in members]
                    shared_lam[spec.smooth_group] = search_shared_smoothing(
                        ws, x, cfg, spec.act_unsigned)
                lam = shared_lam[spec.smooth_group]
            res = svdquant_weight(w, x, cfg, unsigned=spec.act_unsigned, lam=lam)
            for k, v in layer_tensors(res, b, cfg).items():
                out[f"{name}.{k}"] = v.cpu()
            log.debug("svdq: %s rel. output error %.4g", name, res["error"])
        del w
        if progress is not None:
            progress(i + 1, total, name)
    log.info("svdq: quantized %d layers in %.1f s", total, time.time() - t0)
    return out
