"""SVDQuant of one linear layer (or of several that read the same input).

    W x  ~  (W diag(lam)) (x / lam)  =  [L + R] x_hat,   L = up @ down_hat (rank r, 16-bit)
                                                         R = 4-bit residual

1. Smoothing: lam_j = a_j^alpha / b_j^beta from the input's and the weight's per-channel absmax,
   picked on a grid by the quantized layer's output error on calibration inputs (the paper's
   rule: (0,0), (alpha,0) and (alpha,1-alpha) for alpha = k/grid).
2. Low-rank: L = SVD_r(W_hat), refined as L = SVD_r(W_hat - Q(W_hat - L)) while the output
   error improves.
3. Residual: R = W_hat - L, symmetric int4 in groups of 64.
The stored branch acts on the raw input (down = down_hat / lam), see docs/format.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant


@dataclass
class QuantConfig:
    rank: int = 32
    act_bits: int = 4             # activation precision the search optimises for (4 or 8)
    smooth: bool = True
    smooth_grid: int = 10         # alphas k/grid for k = 1..grid-1, in both grid families
    refine_iters: int = 10        # max low-rank refinement steps (stops at first non-improvement)
    gelu_shift: bool = True       # unsigned int4 inputs for post-GELU layers (docs/results.md)
    dtype: torch.dtype = torch.bfloat16         # 16-bit storage of smooth, branch, bias
    scale_dtype: torch.dtype = torch.bfloat16   # storage of the weight group scales

    def to_dict(self) -> dict:
        return {"weight_bits": 4, "group_size": quant.GROUP_SIZE, "rank": self.rank,
                "act_bits_calibrated": self.act_bits, "smoothing": self.smooth,
                "smooth_grid": self.smooth_grid, "refine_iters": self.refine_iters,
                "gelu_shift": self.gelu_shift, "dtype": str(self.dtype).replace("torch.", ""),
                "scale_dtype": str(self.scale_dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------------------------
def _svd_r(w: torch.Tensor, rank: int):
    """Rank-r truncation of w [N, K] -> (U_r S_r [N, r], V_r^T [r, K]), fp32, deterministic."""
    n, k = w.shape
    if rank == 0:
        return w.new_zeros(n, 0), w.new_zeros(0, k)
    if min(n, k) <= 4 * (rank + 16):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        # Randomised SVD: ~50x faster than a full SVD at FLUX sizes, and the rank-r subspace
        # it misses carries little energy after the steep drop of the first singular values.
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, q=rank + 16, niter=4)
        vh = v.t()
    return u[:, :rank] * s[:rank], vh[:rank]


def _fake_act(xs: torch.Tensor, bits: int, unsigned: bool, shift):
    if unsigned:
        return quant.fake_quantize_act(xs + shift, bits, unsigned=True) - shift
    return quant.fake_quantize_act(xs, bits)


def inputs_from_absmax(absmax: torch.Tensor, tokens: int = 256) -> torch.Tensor:
    """Stand-in calibration inputs when only per-channel absmax statistics are known: Gaussian
    rows whose channel j has standard deviation absmax_j / 3 (fixed seed, so reproducible)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(tokens, absmax.numel(), generator=g).to(absmax.device) * \
        (absmax.float() / 3)


class _Problem:
    """A weight (or stacked weights) with its calibration inputs and reference output."""

    def __init__(self, w: torch.Tensor, x: torch.Tensor | None, cfg: QuantConfig,
                 unsigned: bool):
        if x is not None and x.dim() == 1:
            x = inputs_from_absmax(x)
        self.w, self.x, self.cfg = w.float(), None if x is None else x.float(), cfg
        self.unsigned = unsigned and cfg.gelu_shift and cfg.act_bits == 4
        if self.x is not None:
            self.y_ref = self.x @ self.w.t()
            self.ref_energy = self.y_ref.square().sum().clamp_min(1e-30)

    def lam_candidates(self):
        b = self.w.abs().amax(0)
        if self.x is None or not self.cfg.smooth:
            return [(0.0, 0.0, torch.ones_like(b))]
        a = self.x.abs().amax(0)
        out = [(0.0, 0.0, torch.ones_like(b))]
        g = self.cfg.smooth_grid
        for kk in range(1, g):
            al = kk / g
            for be in (0.0, 1.0 - al):
                lam = a.pow(al) / b.pow(be)
                lam = torch.where(lam > 0, lam, torch.ones_like(lam))
                if not torch.isfinite(lam).all():
                    lam = torch.ones_like(lam)
                out.append((al, be, lam))
        return out

    def stored_lam(self, lam):
        lam = lam / lam.max()          # scale-free; keeps 16-bit storage in range
        return lam.to(self.cfg.dtype).float()

    def split_branch(self, lam, w_hat, rank):
        """SVD branch of w_hat, rounded to storage: (up, down_raw, L as the runtime applies it)."""
        us, vh = _svd_r(w_hat, rank)
        root = us.norm(dim=0).clamp_min(1e-30).sqrt() / vh.norm(dim=1).clamp_min(1e-30).sqrt()
        up = (us / root).to(self.cfg.dtype)               # balance magnitudes for 16-bit storage
        down_raw = (vh * root.unsqueeze(1) / lam).to(self.cfg.dtype)
        return up, down_raw, up.float() @ (down_raw.float() * lam)

    def error(self, lam, low, codes, scales) -> float:
        """Relative squared output error of the quantized layer (weight error without calib)."""
        w_q = quant.dequantize_weight(codes, scales)
        if self.x is None:
            return float((low + w_q - self.w * lam).square().sum() /
                         (self.w * lam).square().sum().clamp_min(1e-30))
        xs = self.x / lam
        shift = quant.GELU_SHIFT / lam
        y = _fake_act(xs, self.cfg.act_bits, self.unsigned, shift) @ w_q.t() + xs @ low.t()
        return float((y - self.y_ref).square().sum() / self.ref_energy)


def svdquant_weight(w: torch.Tensor, x: torch.Tensor | None, cfg: QuantConfig,
                    unsigned: bool = False, lam: torch.Tensor | None = None) -> dict:
    """Quantize one weight [N, K]; x [T, K] are calibration inputs (None: weight error only).

    Returns codes, scales, smooth (stored dtype), up, down (raw-input), the search trace and the
    final relative output error. `lam` forces a smoothing vector (shared smoothing groups).
    """
    prob = _Problem(w, x, cfg, unsigned)
    trace = {}
    if lam is None:
        lam = search_smoothing(prob, trace)
    lam = prob.stored_lam(lam)
    w_hat = prob.w * lam
    up, down, low = prob.split_branch(lam, w_hat, cfg.rank)
    codes, scales = quant.quantize_weight(w_hat - low, cfg.scale_dtype)
    err = prob.error(lam, low, codes, scales)
    errs = [err]
    for _ in range(cfg.refine_iters if cfg.rank else 0):
        target = w_hat - quant.dequantize_weight(codes, scales)
        up2, down2, low2 = prob.split_branch(lam, target, cfg.rank)
        codes2, scales2 = quant.quantize_weight(w_hat - low2, cfg.scale_dtype)
        err2 = prob.error(lam, low2, codes2, scales2)
        errs.append(err2)
        if err2 >= err:
            break
        up, down, low, codes, scales, err = up2, down2, low2, codes2, scales2, err2
    trace["refine_errors"] = errs
    return {"codes": codes, "scales": scales, "smooth": lam.to(cfg.dtype), "up": up,
            "down": down, "error": err, "trace": trace}


def search_smoothing(prob: _Problem, trace: dict | None = None) -> torch.Tensor:
    """The grid search: best lam by output error, low-rank branch built with one SVD."""
    best = None
    results = []
    for al, be, lam in prob.lam_candidates():
        lam_s = prob.stored_lam(lam)
        w_hat = prob.w * lam_s
        _, _, low = prob.split_branch(lam_s, w_hat, prob.cfg.rank)
        codes, scales = quant.quantize_weight(w_hat - low, prob.cfg.scale_dtype)
        err = prob.error(lam_s, low, codes, scales)
        results.append((al, be, err))
        if best is None or err < best[0]:
            best = (err, lam)
    if trace is not None:
        trace["smooth_grid"] = results
    return best[1]


def search_shared_smoothing(weights: list, x: torch.Tensor | None, cfg: QuantConfig,
                            unsigned: bool = False) -> torch.Tensor:
    """One lam for several layers reading the same input: searched on their stacked weights."""
    return search_smoothing(_Problem(torch.cat([w.float() for w in weights]), x, cfg, unsigned))


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, calib_inputs,
                    rank: int = 32, act_bits: int = 4, input_follows_gelu: bool = False,
                    **options):
    """Public entry point: SVDQuant one nn.Linear weight and return a runnable SVDQLinear.

    calib_inputs: Tensor [..., K] of inputs the layer sees; or a 1-D Tensor [K] of their
    per-channel absmax statistics (inputs_from_absmax); or None (weight error only).
    input_follows_gelu: the inputs are GELU outputs (>= -0.17), so the int4 path may quantize
    them unsigned after a shift (QuantConfig.gelu_shift).
    options: any QuantConfig field (smooth, smooth_grid, refine_iters, gelu_shift, dtype, ...).
    """
    from .linear import SVDQLinear
    cfg = QuantConfig(rank=rank, act_bits=act_bits, **options)
    x = calib_inputs
    if x is not None and x.dim() > 1:
        x = x.reshape(-1, weight.shape[1])
    unsigned = input_follows_gelu and cfg.gelu_shift
    res = svdquant_weight(weight, x, cfg, unsigned=unsigned)
    layer = SVDQLinear.from_tensors(layer_tensors(res, bias, cfg), kind="w4a4",
                                    act_unsigned=unsigned)
    layer.quant_error = res["error"]
    layer.quant_trace = res["trace"]
    return layer


def layer_tensors(res: dict, bias, cfg: QuantConfig) -> dict:
    """The checkpoint tensors of one w4a4 layer from a svdquant_weight result."""
    t = {"qweight": quant.pack_int4(res["codes"]), "wscales": res["scales"],
         "smooth": res["smooth"], "lowrank_down": res["down"].contiguous(),
         "lowrank_up": res["up"].contiguous()}
    if bias is not None:
        t["bias"] = bias.detach().to(cfg.dtype)
    return t
