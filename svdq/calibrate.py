"""Calibration: record the inputs each quantized linear sees while the 16-bit model runs.

Works on any nn.Module whose submodules carry FLUX's ComfyUI names (ComfyUI's own Flux or
svdq.flux_model.FluxModel). It keeps a random subsample of token rows per layer on the CPU,
in bf16: about 2.4 GB for FLUX.1 at the default 1024 rows per layer.
"""
from __future__ import annotations

import torch


class ActivationRecorder:
    """Context manager: forward pre-hooks that sample each named layer's input rows."""

    def __init__(self, model: torch.nn.Module, names, rows_per_call: int = 128,
                 max_rows: int = 1024, seed: int = 0):
        self.model, self.names = model, list(names)
        self.rows_per_call, self.max_rows = rows_per_call, max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.samples = {n: [] for n in self.names}
        self._handles = []

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            have = sum(s.shape[0] for s in self.samples[name])
            take = min(self.rows_per_call, x.shape[0], self.max_rows - have)
            if take > 0:
                idx = torch.randperm(x.shape[0], generator=self.gen)[:take].to(x.device)
                self.samples[name].append(x.index_select(0, idx).to(torch.bfloat16).cpu())
        return hook

    def __enter__(self):
        modules = dict(self.model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"calibration: the model has no layers named {missing[:5]}; is it a "
                           f"FLUX.1 model?")
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> dict:
        """layer name -> Tensor [T, K] (bf16, CPU) of the recorded input rows."""
        return {n: torch.cat(s) for n, s in self.samples.items() if s}
