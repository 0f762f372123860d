"""The reference backend: svdq.reference on any device, in the layer's compute dtype."""
from __future__ import annotations

import torch

from .. import quant, reference


class ReferenceBackend:
    def __init__(self, act_bits: int = 8):
        if act_bits not in (4, 8):
            raise ValueError("act_bits must be 4 or 8")
        self.act_bits = act_bits
        self.name = "reference" if act_bits == 8 else "reference-a4"

    def available(self, device):
        return True, ""

    def prepare(self, layer):
        # Only small derived tensors: codes are unpacked per call so that the reference path
        # never holds an 8-bit copy of the weights.
        prep = {}
        if layer.kind == "w4a4":
            prep["inv_smooth"] = 1.0 / layer.smooth.float()
            if self.act_bits == 8:
                codes = quant.unpack_int4(layer.qweight)
                prep["row_scale"], prep["mult"] = quant.fold_group_scales(codes, layer.wscales)
        return prep

    def forward(self, layer, prep, x):
        codes = quant.unpack_int4(layer.qweight)
        if layer.kind == "w4a16":
            y = reference.w4a16_main(x, codes, layer.wscales)
        else:
            if self.act_bits == 8:
                y = reference.w4a8_main(x, prep["inv_smooth"], codes, prep["row_scale"],
                                        prep["mult"])
            else:
                y = reference.w4a4_main(x, prep["inv_smooth"], codes, layer.wscales,
                                        layer.act_unsigned)
            down, up, rank_scale = layer.branch()
            if down.shape[0]:
                act_dtype = x.dtype if x.dtype != torch.float32 else torch.float32
                y = y + reference.lowrank_up(reference.lowrank_act(x, down, rank_scale, act_dtype),
                                             up)
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype)
