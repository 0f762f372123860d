"""svdq: SVDQuant 4-bit FLUX.1, host-independent (torch, numpy, safetensors; never ComfyUI).

Public API (see README.md):
    quantize_linear(weight, bias, calib_inputs, rank=32, act_bits=4) -> SVDQLinear
    quantize_flux(state_dict, config, calib=None, rank=32, ...) -> checkpoint tensors
    save_checkpoint(path, tensors, config, quant_config) / load_checkpoint(path) -> Checkpoint
"""
from .backends import select as select_backend
from .calibrate import ActivationRecorder
from .flux import FluxConfig, LayerSpec, dense_layers, layer_flags, layer_specs
from .format import Checkpoint, CheckpointError, inspect_checkpoint, load_checkpoint, save_checkpoint
from .linear import Segment, SVDQLinear
from .model import quantize_flux
from .quant import pack_int4, unpack_int4
from .svdquant import QuantConfig, quantize_linear

__version__ = "0.1.0"

__all__ = [
    "ActivationRecorder", "Checkpoint", "CheckpointError", "FluxConfig", "LayerSpec",
    "QuantConfig", "SVDQLinear", "Segment", "dense_layers", "inspect_checkpoint", "layer_flags",
    "layer_specs", "load_checkpoint", "pack_int4", "quantize_flux", "quantize_linear",
    "save_checkpoint", "select_backend", "unpack_int4",
]
