"""SVDQ LoRA node: a FLUX LoRA on the 4-bit model's low-rank branch, 16-bit layers merged."""
from __future__ import annotations

import os

import folder_paths
from ..svdq import lora as svdq_lora

from . import model as svdq_model

_CACHE: dict = {}   # (path, mtime, size, model shapes) -> converted LoRA; strength not in key
_CACHE_MAX = 8


def prepared(path: str, shapes: dict, quantized: set) -> tuple:
    """The LoRA converted for one model layout, cached so a strength change reuses it:
    (4-bit part {layer: (down, up)}, 16-bit part {patch key: delta})."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, tuple(sorted(shapes.items())),
           tuple(sorted(quantized)))
    if key not in _CACHE:
        conv = svdq_lora.convert(svdq_lora.load_file(path), shapes, source=path)
        four_bit, patches = {}, {}
        for name, parts in conv.items():
            if name in quantized:
                four_bit[name] = svdq_lora.stack(parts, shapes[name][0])
                continue
            # 16-bit layer: ComfyUI's own weight patching merges the delta at load time, per
            # patcher, so clones stay independent
            for start, length, d in svdq_lora.delta(parts):
                pk = f"diffusion_model.{name}.weight"
                if (start, length) != (0, shapes[name][0]):
                    pk = (pk, (0, start, length))
                patches[pk] = patches[pk] + d if pk in patches else d
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (four_bit, patches)
    return _CACHE[key]


class SVDQLoRA:
    CATEGORY = "SVDQuant"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA added; the input MODEL is left unchanged.",)
    DESCRIPTION = ("Applies a FLUX.1 LoRA (BFL/ComfyUI, kohya or diffusers/PEFT keys) to an "
                   "SVDQuant model without re-quantizing: it runs beside the 4-bit weights in "
                   "the 16-bit low-rank branch. Chain several for several LoRAs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX MODEL, usually from SVDQuant Model Loader or "
                                           "another SVDQ LoRA node."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {
                "tooltip": "A FLUX.1 LoRA in models/loras (.safetensors)."}),
            "strength": ("FLOAT", {
                "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                "tooltip": "How strongly the LoRA applies; 0 turns it off. Changing only this "
                           "reuses the converted LoRA."}),
        }}

    def apply(self, model, lora_name, strength):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        dm = model.model.diffusion_model
        shapes = svdq_model.linear_shapes(dm)
        four_bit, patches = prepared(path, shapes, set(svdq_model.quantized_layers(dm)))
        out = model.clone()
        for key, d in patches.items():
            out.add_patches({key: (d,)}, strength)
        state = svdq_model.state_of(model)
        ident = f"{os.path.basename(path)}@{os.stat(path).st_mtime_ns}"
        svdq_model.set_state(out, svdq_model.LoraState(
            state.loras + ((ident, four_bit, float(strength)),)))
        return (out,)
