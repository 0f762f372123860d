"""Random FLUX-architecture weights with planted activation outliers, for tests and the demo.

Random weights have no outlier channels, unlike trained diffusion models, whose activations
have a few channels 20-50x larger than the rest. We plant them where FLUX makes them: the adaLN
'scale' of a few channels is large, so (1 + scale) * LayerNorm(x) blows those channels up in the
input of qkv, mlp.0 and linear1.
"""
from __future__ import annotations

import torch

from .flux import FluxConfig, dense_shapes, layer_specs


def random_flux_state_dict(cfg: FluxConfig, seed: int = 0, outliers: bool = True,
                           outlier_frac: float = 0.01, dtype=torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def rnd(shape, std):
        return torch.randn(shape, generator=g) * std

    for name, shape in dense_shapes(cfg).items():
        if name.endswith(".scale"):
            sd[name] = 1.0 + rnd(shape, 0.05)
        elif name.endswith(".bias"):
            sd[name] = rnd(shape, 0.02)
        else:
            sd[name] = rnd(shape, shape[1] ** -0.5)
    h = cfg.hidden_size
    n_out = max(2, round(outlier_frac * h))
    for name, spec in layer_specs(cfg).items():
        sd[f"{name}.weight"] = rnd((spec.out_features, spec.in_features), spec.in_features ** -0.5)
        if spec.bias:
            sd[f"{name}.bias"] = rnd((spec.out_features,), 0.02)
        if spec.kind == "w4a16":
            # Small gates keep a random residual stream stable through the blocks.
            sd[f"{name}.weight"] *= 0.1
            chunks = 6 if "double" in name else 3
            scale_chunks = (1, 4) if chunks == 6 else (1,)
            if outliers:
                for c in scale_chunks:
                    idx = torch.randperm(h, generator=g)[:n_out]
                    sd[f"{name}.bias"][c * h + idx] = 20 + 30 * torch.rand(n_out, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def random_inputs(cfg: FluxConfig, batch: int = 1, height: int = 32, width: int = 32,
                  txt_len: int = 16, seed: int = 0, dtype=torch.float32) -> dict:
    """Keyword arguments for FluxModel.forward: a latent, a timestep and text conditioning."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, cfg.in_channels, height // 8, width // 8, generator=g).to(dtype),
        "timestep": torch.rand(batch, generator=g).to(dtype),
        "context": torch.randn(batch, txt_len, cfg.context_in_dim, generator=g).to(dtype),
        "y": torch.randn(batch, cfg.vec_in_dim, generator=g).to(dtype),
        "guidance": torch.full((batch,), 3.5, dtype=dtype) if cfg.guidance_embed else None,
    }
