"""A compact FLUX.1 transformer for running without ComfyUI (the library path and the demo).

Inside ComfyUI we run ComfyUI's own Flux (DESIGN.md principle 1); this module exists so the
library can quantize, calibrate and run a model on its own. Parameter names are ComfyUI's, so
one state dict or checkpoint serves both, and tests check that both give the same output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .flux import FluxConfig, layer_specs
from .linear import SVDQLinear


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding of t * 1000 (cos half first), as FLUX was trained."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation matrices [B, L, dim/2, 2, 2] for positions pos [B, L]."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = (1.0 / theta ** scale).float()
    ang = pos.float()[..., None] * omega
    cos, sin = torch.cos(ang), torch.sin(ang)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*ang.shape, 2, 2)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] rotated pairwise by pe [B, 1, L, D/2, 2, 2], in fp32."""
    xp = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * xp[..., 0] + pe[..., 1] * xp[..., 1]
    return out.reshape(x.shape).type_as(x)


def attention(q, k, v, pe):
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)               # [B, L, H*D]


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = _RMSNorm(dim)
        self.key_norm = _RMSNorm(dim)


class _RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * \
            self.scale.to(x.dtype)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _heads(qkv, n_heads):
    b, length, _ = qkv.shape
    return qkv.reshape(b, length, 3, n_heads, -1).permute(2, 0, 3, 1, 4)   # 3 x [B, H, L, D]


class _Mod(nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.lin = nn.Linear(h, n * h)
        self.n = n

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class _Embedder(nn.Module):
    def __init__(self, k, h):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(k, h), nn.Linear(h, h)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class _Double(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h, m, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.hidden_size // cfg.num_heads
        self.heads = cfg.num_heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", _Mod(h, 6))
            attn = nn.Module()
            attn.qkv = nn.Linear(h, 3 * h, bias=cfg.qkv_bias)
            attn.norm = QKNorm(hd)
            attn.proj = nn.Linear(h, h)
            setattr(self, f"{s}_attn", attn)
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(h, m), nn.GELU(approximate="tanh"),
                                                    nn.Linear(m, h)))

    def forward(self, img, txt, vec, pe):
        mods, qkvs = {}, {}
        for s, x in (("img", img), ("txt", txt)):
            mods[s] = getattr(self, f"{s}_mod")(vec)
            sh, sc = mods[s][0], mods[s][1]
            attn = getattr(self, f"{s}_attn")
            q, k, v = _heads(attn.qkv((1 + sc) * _ln(x) + sh), self.heads)
            qkvs[s] = (attn.norm.query_norm(q), attn.norm.key_norm(k), v)
        q, k, v = (torch.cat([qkvs["txt"][i], qkvs["img"][i]], dim=2) for i in range(3))
        out = attention(q, k, v, pe)
        n_txt = txt.shape[1]
        res = {}
        for s, x, o in (("txt", txt, out[:, :n_txt]), ("img", img, out[:, n_txt:])):
            sh1, sc1, g1, sh2, sc2, g2 = mods[s]
            x = x + g1 * getattr(self, f"{s}_attn").proj(o)
            res[s] = x + g2 * getattr(self, f"{s}_mlp")((1 + sc2) * _ln(x) + sh2)
        return res["img"], res["txt"]


class _Single(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h, m = cfg.hidden_size, cfg.mlp_hidden
        self.h, self.mlp, self.heads = h, m, cfg.num_heads
        self.linear1 = nn.Linear(h, 3 * h + m)
        self.linear2 = nn.Linear(h + m, h)
        self.norm = QKNorm(h // cfg.num_heads)
        self.modulation = _Mod(h, 3)

    def forward(self, x, vec, pe):
        sh, sc, gate = self.modulation(vec)
        qkv, mlp = self.linear1((1 + sc) * _ln(x) + sh).split([3 * self.h, self.mlp], dim=-1)
        q, k, v = _heads(qkv, self.heads)
        out = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], -1))


class FluxModel(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        h, p2 = cfg.hidden_size, cfg.patch_size ** 2
        self.img_in = nn.Linear(cfg.in_channels * p2, h)
        self.time_in = _Embedder(256, h)
        self.vector_in = _Embedder(cfg.vec_in_dim, h)
        self.guidance_in = _Embedder(256, h) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(_Double(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(_Single(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = nn.Module()
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.final_layer.linear = nn.Linear(h, p2 * cfg.out_channels)

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, cfg: FluxConfig, sd: dict, dtype=torch.float32):
        """A 16-bit model from a state dict in ComfyUI naming."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
        return model

    @classmethod
    def from_checkpoint(cls, ckpt, dtype=torch.float32, backend=None):
        """A quantized model from an svdq.Checkpoint: our layers replace the quantized linears."""
        with torch.device("meta"):
            model = cls(ckpt.config)
        for name, spec in ckpt.layers.items():
            layer = SVDQLinear.from_tensors(ckpt.layer_tensors(name), spec.kind,
                                            spec.act_unsigned)
            if backend is not None:
                layer.set_backend(backend)
            model.set_submodule(name, layer)
        dense = {k: v.to(dtype) for k, v in ckpt.tensors.items()
                 if k.rsplit(".", 1)[0] not in ckpt.layers}
        model.load_state_dict(dense, strict=False, assign=True)
        meta_left = [n for n, p in model.named_parameters() if p.is_meta]
        if meta_left:
            raise ValueError(f"{ckpt.path}: tensors missing for {meta_left[:5]}")
        return model

    def quantized_layers(self) -> dict:
        names = set(layer_specs(self.cfg))
        return {n: m for n, m in self.named_modules() if n in names}

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x, timestep, context, y, guidance=None):
        """x [B, C, H, W] latent; timestep [B] in [0, 1]; context [B, T, C_ctx]; y [B, vec]."""
        cfg, p = self.cfg, self.cfg.patch_size
        b, c, hh, ww = x.shape
        x = F.pad(x, (0, (-ww) % p, 0, (-hh) % p), mode="circular")   # as ComfyUI pads
        gh, gw = x.shape[2] // p, x.shape[3] // p
        img = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        dt = self.img_in.weight.dtype if not isinstance(self.img_in, SVDQLinear) else x.dtype
        img = self.img_in(img.to(dt))
        vec = self.time_in(timestep_embedding(timestep).to(dt))
        if self.guidance_in is not None:
            g = guidance if guidance is not None else torch.full_like(timestep, 3.5)
            vec = vec + self.guidance_in(timestep_embedding(g).to(dt))
        vec = vec + self.vector_in(y.to(dt))
        txt = self.txt_in(context.to(dt))
        ids = torch.zeros(gh, gw, 3, device=x.device)
        ids[..., 1] = torch.arange(gh, device=x.device)[:, None]
        ids[..., 2] = torch.arange(gw, device=x.device)[None, :]
        ids = torch.cat([torch.zeros(txt.shape[1], 3, device=x.device), ids.reshape(-1, 3)])
        pe = torch.cat([rope(ids[None, :, i], d, cfg.theta) for i, d in enumerate(cfg.axes_dim)],
                       dim=-3).unsqueeze(1).expand(b, -1, -1, -1, -1, -1)
        for blk in self.double_blocks:
            img, txt = blk(img, txt, vec, pe)
        h = torch.cat([txt, img], 1)
        for blk in self.single_blocks:
            h = blk(h, vec, pe)
        img = h[:, txt.shape[1]:]
        shift, scale = self.final_layer.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        out = self.final_layer.linear((1 + scale) * _ln(img) + shift)
        out = out.reshape(b, gh, gw, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, -1, gh * p, gw * p)[:, :, :hh, :ww]
