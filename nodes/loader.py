"""SVDQuant Model Loader node."""
from __future__ import annotations

import folder_paths

from . import model as svdq_model


def checkpoint_names() -> list:
    # the svdq folder first: those are the files this node is for
    names = list(folder_paths.get_filename_list("svdq"))
    names += [n for n in folder_paths.get_filename_list("diffusion_models")
              if n.lower().endswith((".safetensors", ".sft")) and n not in names]
    return names


def full_path(name: str) -> str:
    for folder in ("svdq", "diffusion_models"):
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise FileNotFoundError(f"{name}: not found in models/svdq or models/diffusion_models. Fix: "
                            f"put the file there (or quantize one with 'Quantize Checkpoint') "
                            f"and refresh the node list")


class SVDQuantModelLoader:
    CATEGORY = "SVDQuant"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("ComfyUI's own FLUX model with 4-bit SVDQuant layers; connect it "
                       "wherever a FLUX MODEL goes (KSampler, LoRA, guidance nodes).",)
    DESCRIPTION = ("Loads a 4-bit SVDQuant FLUX.1 checkpoint (from models/svdq or "
                   "models/diffusion_models) as a normal ComfyUI MODEL.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (checkpoint_names(), {
                "tooltip": "SVDQuant checkpoint from models/svdq (or models/diffusion_models). "
                           "16-bit FLUX files load too, without quantization."}),
            "device": (svdq_model.devices(), {
                "default": "default",
                "tooltip": "Where the model runs. 'default' is ComfyUI's main device."}),
            "dtype": (list(svdq_model.DTYPES), {
                "default": "bfloat16",
                "tooltip": "Compute precision of the 16-bit parts. bfloat16 is safest; use "
                           "float16 on GPUs without bfloat16 (before Ampere)."}),
            "backend": (["auto", "cuda", "reference"], {
                "default": "auto",
                "tooltip": "Kernel choice. auto: the fused CUDA kernels where the GPU supports "
                           "them, else the PyTorch reference path (slow, runs anywhere)."}),
        }}

    def load(self, model_name, device="default", dtype="bfloat16", backend="auto"):
        return (svdq_model.load(full_path(model_name), device, dtype, backend),)
