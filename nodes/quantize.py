"""Quantize Checkpoint node: a 16-bit FLUX MODEL in, a 4-bit SVDQuant file and MODEL out."""
from __future__ import annotations

import logging
import os
import re
import time

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import folder_paths
from .. import svdq

from . import model as svdq_model

log = logging.getLogger("svdq")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]*$")


def output_path(name: str, overwrite: bool) -> str:
    """models/svdq/<name>.safetensors; a name with a path in it is refused, not cleaned up,
    so nothing is ever written where the user did not expect."""
    raw = name
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    if not name or ".." in name or not _NAME.match(name) or os.path.isabs(raw):
        raise ValueError(f"output name {raw!r} is not a plain file name (no folders, '..', "
                         f"slashes or leading dots). Fix: use a name like 'flux-dev-svdq'; the "
                         f"file goes to models/svdq.")
    folder = folder_paths.get_folder_paths("svdq")[0]
    path = os.path.join(folder, name + ".safetensors")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists. Fix: choose another output name, or set "
                              f"overwrite to true to replace it.")
    return path


def calibrate(model, conditioning, steps, seed, resolution, names):
    """Run the 16-bit model over a short text-to-image sampling and record each layer's inputs."""
    latent = torch.zeros(1, 16, resolution // 8, resolution // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    pbar = comfy.utils.ProgressBar(steps)

    def callback(step, x0, x, total):
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(step + 1, total)
        log.info("SVDQuant calibration: step %d/%d", step + 1, total)

    dm = model.model.diffusion_model
    with svdq.ActivationRecorder(dm, names, seed=seed) as rec:
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", conditioning,
                            conditioning, latent, seed=seed, callback=callback,
                            disable_pbar=True)
    return rec.result()


class QuantizeCheckpoint:
    CATEGORY = "SVDQuant"
    FUNCTION = "quantize"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The quantized 4-bit model, loaded from the file just written.",)
    DESCRIPTION = ("Turns a 16-bit FLUX.1 model (your own fine-tune too) into an SVDQuant "
                   "4-bit checkpoint in models/svdq: samples a few images to record each "
                   "layer's inputs, then quantizes one layer at a time.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The 16-bit FLUX.1 model to quantize (from Load "
                                           "Diffusion Model)."}),
            "conditioning": ("CONDITIONING", {
                "tooltip": "Calibration prompt(s), encoded like for sampling. Prompts like "
                           "your real ones give the best 4-bit model."}),
            "steps": ("INT", {"default": 8, "min": 1, "max": 100,
                              "tooltip": "Sampling steps recorded for calibration."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "control_after_generate": True,
                             "tooltip": "Seed of the calibration noise and token sampling."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16,
                                   "tooltip": "Side of the square calibration image, pixels."}),
            "rank": ("INT", {"default": 32, "min": 0, "max": 256, "step": 8,
                             "tooltip": "Rank of the 16-bit low-rank branch. 32 is the usual "
                                        "choice; higher is more accurate and slower."}),
            "output_name": ("STRING", {"default": "flux-svdq-r32",
                                       "tooltip": "File name in models/svdq (no folders); "
                                                  ".safetensors is added."}),
            "overwrite": ("BOOLEAN", {"default": False,
                                      "tooltip": "Replace an existing file of that name. Off: "
                                                 "an existing file is an error."}),
        }}

    def quantize(self, model, conditioning, steps, seed, resolution, rank, output_name,
                 overwrite):
        path = output_path(output_name, overwrite)    # fail before any long work
        if svdq_model.quantized_layers(model.model.diffusion_model):
            raise ValueError("Quantize Checkpoint: the MODEL is already a 4-bit SVDQuant model. "
                             "Fix: connect the 16-bit FLUX model (Load Diffusion Model) instead.")
        config = svdq_model.flux_config_of(model)
        names = list(svdq.layer_specs(config))
        t0 = time.time()
        mm.load_models_gpu([model])
        calib = calibrate(model, conditioning, steps, seed, resolution, names)
        # one model copy on the GPU at a time: move the 16-bit one out before quantizing
        device = model.load_device
        mm.unload_all_models()
        mm.soft_empty_cache()
        state = {k: v for k, v in model.model.diffusion_model.state_dict().items()}
        pbar = comfy.utils.ProgressBar(len(names))

        def progress(done, total, name):
            pbar.update_absolute(done, total)
            if done == total or done % 10 == 0:
                log.info("SVDQuant: quantized %d/%d layers (%s)", done, total, name)

        def should_stop():
            mm.throw_exception_if_processing_interrupted()
            return False

        tensors = svdq.quantize_flux(state, config, calib=calib, rank=rank, device=device,
                                     progress=progress, should_stop=should_stop)
        svdq.save_checkpoint(path, tensors, config,
                             quant_config=svdq.QuantConfig(rank=rank).to_dict(),
                             overwrite=overwrite)
        log.info("SVDQuant: wrote %s in %.1f s", path, time.time() - t0)
        dtype = "float16" if model.model.get_dtype() == torch.float16 else "bfloat16"
        return (svdq_model.load(path, "default", dtype, "auto"),)
