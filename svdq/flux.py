"""FLUX.1 architecture as data: its config, which linears are quantized how, and the 16-bit rest.

Names follow ComfyUI's `comfy.ldm.flux.model.Flux` (the model we run), e.g.
`double_blocks.3.img_attn.qkv`, `single_blocks.0.linear1`. Nothing here imports ComfyUI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FAMILY = "flux1"


@dataclass
class FluxConfig:
    """Exactly the fields of ComfyUI's FluxParams, so `to_dict()` builds its Flux directly."""
    in_channels: int = 16
    out_channels: int = 16
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10000
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = True

    @classmethod
    def dev(cls) -> "FluxConfig":
        return cls()

    @classmethod
    def schnell(cls) -> "FluxConfig":
        return cls(guidance_embed=False)

    @classmethod
    def tiny(cls, **overrides) -> "FluxConfig":
        """FLUX architecture at hidden 256 (2 heads of 128, so the FLUX RoPE axes still fit)."""
        base = dict(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
        base.update(overrides)
        return cls(**base)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        missing = names - set(d)
        if unknown or missing:
            raise ValueError(f"FLUX config: unknown keys {sorted(unknown)}, missing keys "
                             f"{sorted(missing)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        h, heads = self.hidden_size, self.num_heads
        if h <= 0 or heads <= 0 or h % heads:
            raise ValueError(f"FLUX config: hidden_size {h} must be a positive multiple of "
                             f"num_heads {heads}")
        if sum(self.axes_dim) != h // heads:
            raise ValueError(f"FLUX config: axes_dim {self.axes_dim} must sum to the head dim "
                             f"{h // heads}")
        for name in ("hidden_size", "mlp_hidden"):
            if getattr(self, name) % 64:
                raise ValueError(f"FLUX config: {name}={getattr(self, name)} must be a multiple "
                                 f"of 64 (the quantization group size)")


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str                 # "w4a4": 4-bit weights and activations + low-rank branch
                              # "w4a16": 4-bit weights, 16-bit activations, no branch
    in_features: int
    out_features: int
    smooth_group: str | None  # layers reading the same tensor share one smoothing vector
    act_unsigned: bool        # input follows a GELU (non-negative after a shift)
    bias: bool = True


def layer_specs(cfg: FluxConfig) -> dict:
    """Every quantized linear of the model, by ComfyUI module name, in execution order.

    In ComfyUI's DoubleStreamBlock, qkv reads norm1's modulated output and mlp.0 reads norm2's,
    so they are different tensors and get separate smoothing groups; fused layers (qkv, single
    linear1) carry one smoothing vector for all their outputs by construction.
    """
    h, m = cfg.hidden_size, cfg.mlp_hidden
    specs = {}

    def add(name, kind, k, n, unsigned=False, bias=True):
        specs[name] = LayerSpec(name, kind, k, n, name if kind == "w4a4" else None, unsigned,
                                bias)

    for i in range(cfg.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            add(f"{p}_mod.lin", "w4a16", h, 6 * h)
            add(f"{p}_attn.qkv", "w4a4", h, 3 * h, bias=cfg.qkv_bias)
            add(f"{p}_attn.proj", "w4a4", h, h)
            add(f"{p}_mlp.0", "w4a4", h, m)
            add(f"{p}_mlp.2", "w4a4", m, h, unsigned=True)
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        add(f"{p}.modulation.lin", "w4a16", h, 3 * h)
        add(f"{p}.linear1", "w4a4", h, 3 * h + m)
        add(f"{p}.linear2", "w4a4", h + m, h)
    return specs


def layer_flags(cfg: FluxConfig, gelu_shift: bool) -> dict:
    """The layer map as a checkpoint stores it: act_unsigned only where the shift was used."""
    return {n: dataclasses.replace(s, act_unsigned=s.act_unsigned and gelu_shift)
            for n, s in layer_specs(cfg).items()}


def dense_shapes(cfg: FluxConfig) -> dict:
    """The tensors that stay 16-bit: embedders, final layer, QK-norm scales. name -> shape."""
    h = cfg.hidden_size
    p2 = cfg.patch_size ** 2
    head = h // cfg.num_heads
    shapes = {}

    def lin(name, k, n, bias=True):
        shapes[f"{name}.weight"] = (n, k)
        if bias:
            shapes[f"{name}.bias"] = (n,)

    lin("img_in", cfg.in_channels * p2, h)
    lin("time_in.in_layer", 256, h)
    lin("time_in.out_layer", h, h)
    lin("vector_in.in_layer", cfg.vec_in_dim, h)
    lin("vector_in.out_layer", h, h)
    if cfg.guidance_embed:
        lin("guidance_in.in_layer", 256, h)
        lin("guidance_in.out_layer", h, h)
    lin("txt_in", cfg.context_in_dim, h)
    for i in range(cfg.depth):
        for s in ("img", "txt"):
            for nk in ("query_norm", "key_norm"):
                shapes[f"double_blocks.{i}.{s}_attn.norm.{nk}.scale"] = (head,)
    for i in range(cfg.depth_single_blocks):
        for nk in ("query_norm", "key_norm"):
            shapes[f"single_blocks.{i}.norm.{nk}.scale"] = (head,)
    lin("final_layer.adaLN_modulation.1", h, 2 * h)
    lin("final_layer.linear", h, p2 * cfg.out_channels)
    return shapes


def dense_layers(cfg: FluxConfig) -> list:
    """Module names of the layers that stay 16-bit (for the checkpoint header)."""
    return sorted({k.rsplit(".", 1)[0] for k in dense_shapes(cfg)})


def quantized_shapes(spec: LayerSpec, rank: int) -> dict:
    """Checkpoint tensors of one quantized layer: suffix -> (shape, kind of dtype)."""
    n, k = spec.out_features, spec.in_features
    out = {"qweight": ((n, k // 2), "uint8"), "wscales": ((n, k // 64), "float16-like")}
    if spec.kind == "w4a4":
        out["smooth"] = ((k,), "float16-like")
        out["lowrank_down"] = ((rank, k), "float16-like")
        out["lowrank_up"] = ((n, rank), "float16-like")
    if spec.bias:
        out["bias"] = ((n,), "float16-like")
    return out
