"""Checkpoint format v1: one safetensors file, natural layouts, config in the header.

docs/format.md is the specification; this module writes and validates it. Every error names
the file and says how to fix the problem.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .flux import (FAMILY, FluxConfig, LayerSpec, dense_layers, dense_shapes, layer_flags,
                   layer_specs, quantized_shapes)

FORMAT_NAME = "svdquant"
FORMAT_VERSION = 1
FLOAT16ISH = (torch.float16, torch.bfloat16, torch.float32)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


@dataclass
class Checkpoint:
    path: str
    tensors: dict           # name -> Tensor (CPU)
    config: FluxConfig
    quant: dict             # quantization config from the header
    layers: dict            # name -> LayerSpec (with act_unsigned as stored)

    def layer_tensors(self, name: str) -> dict:
        pre = name + "."
        return {k[len(pre):]: v for k, v in self.tensors.items() if k.startswith(pre)}


def save_checkpoint(path, tensors: dict, config: FluxConfig, quant_config: dict | None = None,
                    overwrite: bool = False) -> str:
    """Write atomically: a temporary file in the same folder, then a rename.

    An existing file is kept unless overwrite=True. The header's layer list is the FLUX layer
    map of `config`, with act_unsigned where quant_config's gelu_shift was used (as
    quantize_flux quantized those layers).
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or ask to overwrite")
    config.validate()
    layers = layer_flags(config, bool((quant_config or {}).get("gelu_shift", False)))
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "model_family": FAMILY,
        "model_config": json.dumps(config.to_dict()),
        "quant_config": json.dumps(quant_config or {}),
        "layers": json.dumps({n: {"kind": s.kind, "act_unsigned": s.act_unsigned}
                              for n, s in layers.items()}),
        "unquantized": json.dumps(dense_layers(config)),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".svdq-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} appeared while writing; it was left untouched")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_header(path) -> dict:
    """The safetensors JSON header, checked against the file size (truncation, corruption)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; check the name and the models folder")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size} bytes")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                              f"({e}); download or quantize it again") from None
    return header


def _json_meta(path, meta, key):
    try:
        return json.loads(meta[key])
    except KeyError:
        raise CheckpointError(f"{path}: header lacks '{key}'; the file is not a complete "
                              f"SVDQuant checkpoint, quantize it again") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: header field '{key}' is not valid JSON ({e}); the "
                              f"file is damaged, quantize it again") from None


def inspect_checkpoint(path, header: dict | None = None):
    """Validate the header only: (FluxConfig, quant dict, layers dict). Cheap; for listings."""
    header = read_header(path) if header is None else header
    meta = header.get("__metadata__") or {}
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        hint = ("it looks like a 16-bit FLUX checkpoint: load it with the stock 'Load Diffusion "
                "Model' node, or turn it into 4 bits with 'Quantize Checkpoint'"
                if any(k.endswith(".weight") for k in header) else
                "use a file made by Quantize Checkpoint or svdq.save_checkpoint")
        raise CheckpointError(f"{path}: not an SVDQuant checkpoint (format={fmt!r}); {hint}")
    ver = meta.get("format_version")
    if ver != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: SVDQuant format version {ver!r}, this extension reads "
                              f"version {FORMAT_VERSION}; update ComfyUI-SVDQuant or re-quantize")
    if meta.get("model_family") != FAMILY:
        raise CheckpointError(f"{path}: model family {meta.get('model_family')!r} is not "
                              f"supported (only {FAMILY!r}); use a FLUX.1 checkpoint")
    try:
        config = FluxConfig.from_dict(_json_meta(path, meta, "model_config"))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: invalid model_config ({e}); quantize it again") from None
    quant = _json_meta(path, meta, "quant_config")
    stored = _json_meta(path, meta, "layers")
    expected = layer_specs(config)
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise CheckpointError(f"{path}: the layer list does not match a FLUX model of this "
                              f"config (missing {missing[:5]}, unexpected {extra[:5]}); the file "
                              f"is damaged or from another tool, quantize it again")
    layers = {}
    for name, spec in expected.items():
        entry = stored[name]
        if entry.get("kind") != spec.kind:
            raise CheckpointError(f"{path}: layer {name} is stored as {entry.get('kind')!r}, "
                                  f"expected {spec.kind!r}; quantize it again")
        layers[name] = LayerSpec(name, spec.kind, spec.in_features, spec.out_features,
                                 spec.smooth_group, bool(entry.get("act_unsigned", False)),
                                 spec.bias)
    return config, quant, layers


def _expected_tensors(config, layers, header):
    """name -> (shape, dtype rule) for every tensor the file must hold."""
    exp = {k: (tuple(s), "float16-like") for k, s in dense_shapes(config).items()}
    for name, spec in layers.items():
        rank = 0
        if spec.kind == "w4a4":
            entry = header.get(f"{name}.lowrank_down")
            rank = entry["shape"][0] if entry else 0
        for suffix, (shape, rule) in quantized_shapes(spec, rank).items():
            exp[f"{name}.{suffix}"] = (tuple(shape), rule)
    return exp


_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def load_checkpoint(path, device="cpu") -> Checkpoint:
    """Read and validate a v1 checkpoint; raises CheckpointError naming the file and the fix."""
    path = os.fspath(path)
    header = read_header(path)
    config, quant, layers = inspect_checkpoint(path, header)
    expected = _expected_tensors(config, layers, header)
    for name, (shape, rule) in expected.items():
        entry = header.get(name)
        if entry is None:
            raise CheckpointError(f"{path}: tensor '{name}' is missing; the file is incomplete, "
                                  f"quantize it again")
        dt = _DTYPES.get(entry["dtype"])
        ok_dtype = dt == torch.uint8 if rule == "uint8" else dt in FLOAT16ISH
        if tuple(entry["shape"]) != shape or not ok_dtype:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {entry['shape']} dtype "
                                  f"{entry['dtype']}, expected shape {list(shape)} "
                                  f"({'uint8' if rule == 'uint8' else 'a 16/32-bit float'}); "
                                  f"the file does not match its own config, quantize it again")
    extra = sorted(set(header) - set(expected) - {"__metadata__"})
    if extra:
        raise CheckpointError(f"{path}: unexpected tensors {extra[:5]}; the file is not a "
                              f"FLUX SVDQuant v1 checkpoint of its stated config")
    tensors = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in expected:
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for damaged data
        raise CheckpointError(f"{path}: could not read tensor data ({e}); the file is corrupt, "
                              f"download or quantize it again") from None
    return Checkpoint(path, tensors, config, quant, layers)
