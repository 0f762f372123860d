"""ComfyUI custom operations for SVDQuant FLUX: the Linear that ComfyUI's own Flux is built with.

ComfyUI creates every Linear through `operations.Linear(in, out, bias, dtype, device)` without
telling it the layer's name, so our Linear defers its weight (a meta tensor, no memory) and
takes whatever the checkpoint holds at load. The loader then swaps the layers that the file
stores in 4 bits for `SVDQOpsLinear` before loading, by name. Nothing here does maths beyond
calling into svdq.
"""
from __future__ import annotations

import torch

import comfy.ops
from ..svdq.linear import SVDQLinear


class SVDQOps(comfy.ops.manual_cast):
    class Linear(comfy.ops.manual_cast.Linear):
        """A 16-bit Linear whose weight is allocated only when its tensor arrives, so building a
        12B-parameter Flux skeleton costs nothing before the 4-bit layers replace most of it."""

        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            super().__init__(in_features, out_features, bias, device="meta", dtype=dtype)
            self._svdq_dtype = dtype

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            for name in ("weight", "bias"):
                key = prefix + name
                if key in state_dict and getattr(self, name) is not None:
                    t = state_dict[key]
                    if self._svdq_dtype is not None and t.is_floating_point():
                        t = t.to(self._svdq_dtype)
                    setattr(self, name, torch.nn.Parameter(t, requires_grad=False))
                elif getattr(self, name) is not None and getattr(self, name).is_meta:
                    missing_keys.append(key)
            for k in state_dict:
                if k.startswith(prefix) and k[len(prefix):] not in ("weight", "bias"):
                    unexpected_keys.append(k)


class SVDQOpsLinear(SVDQLinear):
    """A 4-bit layer inside ComfyUI's Flux. Adds the one thing SVDQLinear leaves to the host:
    LoRAs on w4a16 layers (no low-rank branch there) run as a side branch next to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.side = []          # [(name, down [r,K], up [N,r], scale)] for w4a16 layers
        # An empty stand-in for the 16-bit weight: its state_dict key lets ComfyUI's own LoRA
        # loader find this layer (ModelPatcher.add_patches accepts only existing keys). It is a
        # buffer, so ComfyUI never patches it; nodes/model.py routes those patches into the
        # low-rank branch instead. Zero elements, so the model's size stays the packed size.
        self.register_buffer("weight", torch.zeros(0, dtype=self.wscales.dtype))

    def set_loras(self, segments):
        if self.kind == "w4a4":
            self.set_lowrank_segments(segments)
        else:
            self.side = [list(s) for s in segments]

    def set_lora_scale(self, name, scale):
        if self.kind == "w4a4":
            self.set_segment_scale(name, scale)
        else:
            for s in self.side:
                if s[0] == name:
                    s[3] = float(scale)

    def forward(self, x):
        y = super().forward(x)
        for s in self.side:
            if s[3] == 0:
                continue
            if s[1].device != x.device or s[1].dtype != x.dtype:
                s[1], s[2] = s[1].to(x.device, x.dtype), s[2].to(x.device, x.dtype)
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, s[1]), s[2]) * s[3]
        return y
