"""SVDQLinear: one quantized linear layer, holding its tensors in storage (natural) layout.

Its buffers carry the checkpoint's names (docs/format.md), so `state_dict()` is the file's
content for this layer. The forward runs through a backend from svdq.backends; a backend may
derive its own layout from these buffers once (`prepared`), and is asked again when the device,
the buffers or the low-rank segments change.

The low-rank branch is a list of segments: the SVD branch from quantization, then any LoRAs
appended later. Each segment has a scale, applied to its columns of the branch activation, so a
LoRA's strength changes without re-concatenating or repacking anything. Backends derive state
from the weights in `prepare` and read `branch()` on every call, so neither appending a segment
nor changing a scale re-prepares the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import backends, quant

KINDS = ("w4a4", "w4a16")


@dataclass
class Segment:
    name: str
    down: torch.Tensor      # [r, K], acts on the raw input
    up: torch.Tensor        # [N, r]
    scale: float = 1.0


class SVDQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int = 32, bias: bool = True,
                 kind: str = "w4a4", act_unsigned: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16, scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"SVDQLinear kind must be one of {KINDS}, got {kind!r}")
        if in_features % quant.GROUP_SIZE:
            raise ValueError(f"SVDQLinear: in_features={in_features} is not a multiple of "
                             f"{quant.GROUP_SIZE}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.act_unsigned = act_unsigned
        n, k = out_features, in_features
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.zeros(n, k // quant.GROUP_SIZE, dtype=scale_dtype,
                                                    device=device))
        if kind == "w4a4":
            self.register_buffer("smooth", torch.ones(k, dtype=dtype, device=device))
            self.register_buffer("lowrank_down", torch.zeros(rank, k, dtype=dtype, device=device))
            self.register_buffer("lowrank_up", torch.zeros(n, rank, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)
        self.segments: list[Segment] = []
        self.backend = None                   # None: svdq.backends.default(its device)
        self._branch_cache = None
        self._prepared = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: dict, kind: str | None = None, act_unsigned: bool = False):
        """Build a layer from its checkpoint tensors (keys without the layer prefix)."""
        if "qweight" not in tensors or "wscales" not in tensors:
            raise KeyError("SVDQLinear.from_tensors needs 'qweight' and 'wscales'")
        kind = kind or ("w4a4" if "smooth" in tensors else "w4a16")
        n, k2 = tensors["qweight"].shape
        rank = tensors["lowrank_down"].shape[0] if kind == "w4a4" else 0
        ref = tensors.get("lowrank_down", tensors.get("bias", tensors["wscales"]))
        layer = cls(k2 * 2, n, rank=rank, bias="bias" in tensors, kind=kind,
                    act_unsigned=act_unsigned, device=tensors["qweight"].device,
                    dtype=ref.dtype, scale_dtype=tensors["wscales"].dtype)
        layer.load_state_dict({k: v for k, v in tensors.items()}, strict=True)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The rank (and the 16-bit dtypes) come from the file: resize our buffers to match.
        for name in ("lowrank_down", "lowrank_up", "smooth", "bias", "wscales"):
            key = prefix + name
            cur = self._buffers.get(name)
            if key in state_dict and cur is not None and (
                    cur.shape != state_dict[key].shape or cur.dtype != state_dict[key].dtype):
                src = state_dict[key]
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=cur.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.invalidate()

    # -- low-rank branch ----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.lowrank_down.shape[0] if self.kind == "w4a4" else 0

    def set_lowrank_segments(self, segments) -> None:
        """Replace the appended segments (LoRAs); items are Segment or (name, down, up, scale)."""
        if self.kind != "w4a4":
            raise ValueError("only w4a4 layers have a low-rank branch; merge LoRAs into w4a16 "
                             "layers' 16-bit output instead")
        segs = [s if isinstance(s, Segment) else Segment(*s) for s in segments]
        for s in segs:
            if s.down.shape[1] != self.in_features or s.up.shape[0] != self.out_features or \
                    s.down.shape[0] != s.up.shape[1]:
                raise ValueError(f"low-rank segment {s.name!r}: down {tuple(s.down.shape)} / up "
                                 f"{tuple(s.up.shape)} do not fit a {self.in_features}->"
                                 f"{self.out_features} layer")
        self.segments = segs
        self._branch_cache = None        # backends read branch() per call: weights stay prepared

    def set_segment_scale(self, name: str, scale: float) -> None:
        for s in self.segments:
            if s.name == name:
                s.scale = float(scale)
                if self._branch_cache is not None:     # only the scale vector changes
                    d, u, _ = self._branch_cache
                    self._branch_cache = (d, u, self._rank_scale(d.device))
                return
        raise KeyError(f"no low-rank segment named {name!r}")

    def _rank_scale(self, device) -> torch.Tensor:
        parts = [torch.ones(self.rank)] + [torch.full((s.down.shape[0],), s.scale)
                                            for s in self.segments]
        return torch.cat(parts).to(device=device, dtype=torch.float32)

    def branch(self):
        """(down [R, K], up [N, R], rank_scale fp32 [R]) over the SVD branch and all segments."""
        dev = self.qweight.device
        if self._branch_cache is None or self._branch_cache[0].device != dev:
            if self.segments:
                dt = self.lowrank_down.dtype
                down = torch.cat([self.lowrank_down] + [s.down.to(dev, dt) for s in self.segments])
                up = torch.cat([self.lowrank_up] + [s.up.to(dev, dt) for s in self.segments], 1)
            else:
                down, up = self.lowrank_down, self.lowrank_up
            self._branch_cache = (down, up, self._rank_scale(dev))
        return self._branch_cache

    # -- execution ----------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Forget backend-derived state (after the buffers changed in place)."""
        self._prepared = None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._branch_cache = None
        self._prepared = None
        return out

    def set_backend(self, backend) -> None:
        self.backend = backends.get(backend) if isinstance(backend, str) else backend
        self._prepared = None

    def prepared(self, backend):
        key = (backend.name, self.qweight.device)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, backend.prepare(self))
        return self._prepared[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SVDQLinear expects inputs with {self.in_features} features, got "
                             f"shape {tuple(x.shape)}")
        backend = self.backend or backends.default(self.qweight.device)
        x2 = x.reshape(-1, self.in_features)
        y = backend.forward(self, self.prepared(backend), x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, kind={self.kind}, rank={self.rank}, "
                f"segments={len(self.segments)}")
