"""Build ComfyUI's own Flux from a checkpoint file, and keep LoRA state per ModelPatcher.

Two kinds of file load here:
- SVDQuant checkpoints (header format "svdquant"): quantized layers become SVDQOpsLinear.
- 16-bit FLUX files. With a `model_config` header (tiny test and demo models) the config comes
  from it; otherwise ComfyUI's stock loader detects the model (full-size FLUX files).
"""
from __future__ import annotations

import json
import logging
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.supported_models
from .. import svdq
from ..svdq.flux import FluxConfig
from ..svdq.format import CheckpointError, load_checkpoint, read_header

from .ops import SVDQOps, SVDQOpsLinear

log = logging.getLogger("svdq")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
WRAPPER_KEY = "svdq_lora"


def devices() -> list:
    out = ["default", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def resolve_device(name: str) -> torch.device:
    return mm.get_torch_device() if name == "default" else torch.device(name)


def flux_config_of(patcher) -> FluxConfig:
    """The FluxConfig of a ComfyUI MODEL (ComfyUI keeps FluxParams in unet_config)."""
    uc = patcher.model.model_config.unet_config
    if uc.get("image_model") != "flux":
        raise ValueError(f"the MODEL is a {uc.get('image_model')!r} model, not FLUX.1; connect a "
                         f"FLUX.1 model")
    fields = FluxConfig.__dataclass_fields__
    return FluxConfig.from_dict({k: uc[k] for k in fields if k in uc})


def _model_config(cfg: FluxConfig, dtype, ops):
    cls = comfy.supported_models.Flux if cfg.guidance_embed else comfy.supported_models.FluxSchnell
    mc = cls(dict(cfg.to_dict(), image_model="flux"))
    mc.set_inference_dtype(dtype, None)
    mc.custom_operations = ops
    return mc


def _check_load(path, missing, unexpected, stand_ins=()):
    missing = [k for k in missing if k not in stand_ins]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the FLUX model its header describes "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); the file is "
                              f"damaged or was written by another tool, quantize it again")


def load(path: str, device="default", dtype="bfloat16", backend="auto"):
    """ModelPatcher for `path`. Errors name the file and say how to fix it."""
    header = read_header(path)                  # raises CheckpointError on a corrupt file
    meta = header.get("__metadata__") or {}
    load_device = resolve_device(device)
    compute = DTYPES[dtype]
    if meta.get("format") == "svdquant":
        ckpt = load_checkpoint(path)
        be = svdq.backends.select(backend, load_device)
        mc = _model_config(ckpt.config, compute, SVDQOps)
        model = mc.get_model({})
        dm = model.diffusion_model
        for name, spec in ckpt.layers.items():
            t = ckpt.layer_tensors(name)
            rank = t["lowrank_down"].shape[0] if "lowrank_down" in t else 0
            ref = t.get("lowrank_down", t.get("bias", t["wscales"]))
            layer = SVDQOpsLinear(spec.in_features, spec.out_features, rank=rank,
                                  bias="bias" in t, kind=spec.kind,
                                  act_unsigned=spec.act_unsigned, dtype=ref.dtype,
                                  scale_dtype=t["wscales"].dtype)
            layer.set_backend(be)
            parent, attr = name.rsplit(".", 1)
            setattr(dm.get_submodule(parent), attr, layer)
        missing, unexpected = dm.load_state_dict(ckpt.tensors, strict=False)
        _check_load(path, missing, unexpected, {f"{n}.weight" for n in ckpt.layers})
        log.info("SVDQuant: %s: %d 4-bit layers, backend %s", os.path.basename(path),
                 len(ckpt.layers), be.name)
    elif "model_config" in meta:
        try:
            cfg = FluxConfig.from_dict(json.loads(meta["model_config"]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: invalid model_config header ({e}); write the file "
                                  f"again") from None
        from safetensors.torch import load_file
        model = _model_config(cfg, compute, None).get_model({})
        missing, unexpected = model.diffusion_model.load_state_dict(load_file(path), strict=False)
        _check_load(path, missing, unexpected)
    else:
        try:
            patcher = comfy.sd.load_diffusion_model(path, model_options={"dtype": compute})
        except Exception as e:
            raise CheckpointError(
                f"{path}: not an SVDQuant checkpoint and not a FLUX model ComfyUI can detect "
                f"({type(e).__name__}: {str(e)[:200]}). Fix: choose a file made by 'Quantize "
                f"Checkpoint' (models/svdq) or a FLUX.1 .safetensors diffusion model") from None
        if patcher is None or patcher.model.model_config.unet_config.get("image_model") != "flux":
            raise CheckpointError(f"{path}: not a FLUX.1 model. Fix: choose a FLUX.1 file or an "
                                  f"SVDQuant checkpoint from models/svdq")
        _install(patcher)
        return patcher
    model.to(mm.unet_offload_device())
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=mm.unet_offload_device())
    _install(patcher)
    return patcher


def quantized_layers(dm) -> dict:
    return {n: m for n, m in dm.named_modules() if isinstance(m, SVDQOpsLinear)}


def linear_shapes(dm) -> dict:
    """{name: (out, in)} of every linear layer, 16-bit or 4-bit (LoRA targets)."""
    return {n: (m.out_features, m.in_features) for n, m in dm.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features")}


# -- per-patcher LoRA state -------------------------------------------------------------------
# ModelPatcher.clone() shares one nn.Module between patchers, so the 4-bit layers' LoRA
# segments cannot simply be set once: each patcher carries its wanted list in a wrapper around
# the diffusion model, and the wrapper brings the shared module to that state before running.
class LoraState:
    def __init__(self, loras=()):
        self.loras = tuple(loras)   # ((key, converted: {layer: (down, up)}, strength), ...)

    def __call__(self, executor, *args, **kwargs):
        dm = executor.class_obj
        apply(dm, self.loras + stock_loras(dm))
        return executor(*args, **kwargs)


def stock_loras(dm) -> tuple:
    """LoRA patches that ComfyUI's own loaders (LoraLoaderModelOnly) put on the 4-bit layers'
    stand-in weights, as low-rank entries like SVDQ LoRA's. The patcher that runs is the one
    ComfyUI marked current in pre_run; its patches are per clone, like ours."""
    base = dm.__dict__.get("_svdq_base")
    patcher = getattr(base() if base else None, "current_patcher", None)
    if patcher is None or not patcher.patches:
        return ()
    key = (id(patcher), patcher.patches_uuid)
    cached = dm.__dict__.get("_svdq_stock")
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = quantized_layers(dm)
    out = []
    for name, layer in layers.items():
        for i, p in enumerate(patcher.patches.get(f"diffusion_model.{name}.weight", ())):
            strength, adapter, strength_model, offset, function = p
            w = getattr(adapter, "weights", None)
            if getattr(adapter, "name", None) != "lora" or w[3] is not None or \
                    w[4] is not None or function is not None or strength_model != 1.0:
                raise ValueError(
                    f"{name}: this kind of model patch ({getattr(adapter, 'name', type(adapter))})"
                    f" cannot run on a 4-bit SVDQuant layer. Fix: use plain LoRAs, through SVDQ "
                    f"LoRA or Load LoRA")
            up, down = w[0].float(), w[1].float()
            scale = (float(w[2]) / down.shape[0]) if w[2] is not None else 1.0
            start, length = (offset[1], offset[2]) if offset else (0, layer.out_features)
            full_up = torch.zeros(layer.out_features, down.shape[0])
            full_up[start:start + length] = up * scale
            out.append((f"stock:{id(adapter)}", {name: (down, full_up)}, float(strength)))
    dm.__dict__["_svdq_stock"] = (key, tuple(out))
    return tuple(out)


def apply(dm, loras) -> None:
    want = tuple((key, strength) for key, _, strength in loras)
    have = getattr(dm, "_svdq_loras", ())
    if want == have:
        return
    layers = quantized_layers(dm)
    if [k for k, _ in want] == [k for k, _ in have]:
        # same LoRAs, new strengths: only the scales change, nothing is re-concatenated
        for i, (key, conv, strength) in enumerate(loras):
            for name in conv:
                if name in layers:
                    layers[name].set_lora_scale(f"{i}:{key}", strength)
    else:
        for name, layer in layers.items():
            segs = [(f"{i}:{key}", conv[name][0], conv[name][1], strength)
                    for i, (key, conv, strength) in enumerate(loras) if name in conv]
            if segs or layer.segments or layer.side:
                layer.set_loras(segs)
    dm._svdq_loras = want


def state_of(patcher) -> LoraState:
    ws = patcher.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    return ws[-1] if ws else LoraState()


def set_state(patcher, state: LoraState) -> None:
    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                     WRAPPER_KEY)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 state)


def _move_buffers(patcher, device_to, *args, **kwargs):
    # ComfyUI moves modules that own parameters; 4-bit layers hold only buffers, so follow it.
    if device_to is not None:
        for m in quantized_layers(patcher.model.diffusion_model).values():
            m.to(device_to)


def _install(patcher) -> None:
    import weakref
    # plain attribute, not a submodule: the diffusion model must not own its parent
    patcher.model.diffusion_model.__dict__["_svdq_base"] = weakref.ref(patcher.model)
    set_state(patcher, LoraState())
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, WRAPPER_KEY,
                                  _move_buffers)
