"""The fused CUDA backend: W4A8 on the INT8 tensor cores, sm_80 and up (csrc/w4a8.cu, mma.sync;
on Hopper the GEMM runs on wgmma instead: csrc/w4a8_sm90.cu, the same bits).

prepare(layer) derives, on the layer's GPU, the small tensors the kernels need beside the
natural-layout 4-bit weights, which the GEMM reads as they are (no second copy of the weights):
  multT int8 [K/64, N] and row_scale fp32 [N]   the W4A8 scale fold (quant.fold_group_scales)
  inv_smooth fp32 [K]                           1 / smooth, as the reference computes it
  bias in the compute dtype
and, beside them, the low-rank branch zero-padded to R16 = ceil16(R) (down [R16, K] in the
activation kernels' layout, branch_down_layout; up [N, R16]; rank_scale [R16]), kept until the
layer's segments change (a strength change only rewrites rank_scale).
forward(layer, prepared, x) runs the activation kernel, then the GEMM (gemm_variant_for picks it).
w4a16 layers (adaLN modulation, GEMV-like) dequantize to 16 bits in one kernel pass, then
cuBLAS; fp32 inputs use the reference math.
"""
from __future__ import annotations

import functools
import os

import torch

from .. import quant
from .. import build as _build

MAX_K = 65536


def _ceil16(r: int) -> int:
    return (r + 15) // 16 * 16


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device=None) -> int:
    """The SM count of `device` (default: the current CUDA device)."""
    d = torch.device(device) if device is not None else torch.device("cuda")
    return _sms(d.index if d.index is not None else torch.cuda.current_device())


def act_perm(K: int, device=None) -> torch.Tensor:
    """perm[P] = natural k stored at position P of the kernel's activation codes (docs/kernels.md).

    Inside each group of 64: P = 32*s + 16*h + 4*tq + i  <->  j = 16*tq + 8*s + 2*i + h.
    """
    j = torch.arange(64)
    tq, s, i, h = j // 16, (j // 8) % 2, (j % 8) // 2, j % 2
    pos = 32 * s + 16 * h + 4 * tq + i
    perm64 = torch.empty(64, dtype=torch.long)
    perm64[pos] = j
    perm = (torch.arange(0, K, 64).unsqueeze(1) + perm64.unsqueeze(0)).reshape(-1)
    return perm.to(device) if device is not None else perm


def branch_down_layout(down: torch.Tensor) -> torch.Tensor:
    """down [R16, K] -> the activation kernels' layout of it, same shape (docs/kernels.md).

    Within each tile of 16 ranks, rows g and g + 8 are interleaved by 32-bit words (two k):
    element (16t + g + 8h, 2w + e) moves to flat position ((8t + g) * K/2 + w) * 4 + 2h + e, so
    that one 16-byte load is an m16n8k16 A fragment (csrc/w4a8.cu, branch_loop).
    """
    r, k = down.shape
    return down.view(r // 16, 2, 8, k // 2, 2).permute(0, 2, 3, 1, 4).reshape(r, k)


PINGPONG_MAX_K = 4096     # above it the per-tile epilogue that ping-pong hides is <= ~5% of a tile
PINGPONG_TILE_COST = 1.1  # a 64-channel ping-pong tile against half a 128-channel cooperative one


def pingpong_pays(m: int, n: int, k: int, sms: int) -> bool:
    """Whether the ping-pong wgmma GEMM (variant 3) beats the cooperative one (2) on `sms` SMs.

    Both are persistent, one CTA per SM, so each takes as long as its busiest CTA: ceil(tiles /
    sms) tiles. A ping-pong tile is half as wide (64 channels) and its epilogue hides behind the
    other warpgroup's main loop, but its main loop alone runs slower; measured at K = 3072 on the
    H200 (bench/NOTES.md, runs 145-148) it costs ~1.07x half a cooperative tile, so it wins only
    where the cooperative kernel's last wave is short: proj (3072 -> 3072) at 2048-6144 tokens
    0.84-0.95x, qkv at 1024-2048 tokens 0.87-0.96x; everywhere else it lost 0-21%. 1.1 keeps
    single_in at 1024 tokens (predicted 0.98 at 1.07, measured 1.005-1.02) on the cooperative
    kernel.
    """
    if k > PINGPONG_MAX_K or sms <= 0:
        return False
    token_tiles = -(-m // 256)
    coop = -(-(-(-n // 128) * token_tiles) // sms)
    pingpong = -(-(-(-n // 64) * token_tiles) // sms)
    return PINGPONG_TILE_COST * pingpong / 2 < coop


def check_shape(in_features: int, out_features: int) -> None:
    if in_features <= 0 or in_features % 64 or in_features > MAX_K:
        raise ValueError(f"SVDQuant cuda backend: in_features={in_features} must be a positive "
                         f"multiple of 64 and at most {MAX_K} (docs/kernels.md)")
    if out_features <= 0 or out_features % 8:
        raise ValueError(f"SVDQuant cuda backend: out_features={out_features} must be a positive "
                         "multiple of 8 (docs/kernels.md)")


class CudaBackend:
    name = "cuda"
    # GEMM kernel: 1 = mma.sync (csrc/w4a8.cu, sm_80+), 2 = wgmma, 3 = wgmma with ping-pong
    # warpgroups (csrc/w4a8_sm90.cu, Hopper builds only); all give the same bits. None = the
    # fastest this build has for the shape (gemm_variant_for).
    gemm_variant = (int(os.environ["SVDQ_GEMM_VARIANT"]) if os.environ.get("SVDQ_GEMM_VARIANT")
                    else None)
    # activation kernels (csrc/w4a8.cu): 0 = act_kernel with 16-token blocks, 1 = with 8-token
    # blocks, 2 = split in two launches over k-chunks; None = by shape (act_variant_for)
    act_variant = (int(os.environ["SVDQ_ACT_VARIANT"]) if os.environ.get("SVDQ_ACT_VARIANT")
                   else None)
    ACT_SMALL_M = 512
    SPLIT_MIN_K = 6144   # measured: the split kernels fill idle SMs best from here (not at 3072)

    def available(self, device):
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.type != "cuda":
            return False, f"the fused kernels need a CUDA device, not {device.type}"
        if not torch.cuda.is_available():
            return False, "torch reports no usable CUDA GPU"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return False, (f"the INT8 tensor-core kernels need compute capability 8.0 or newer; "
                           f"this GPU has {cap[0]}.{cap[1]}")
        try:
            _build.load()
        except _build.BuildError as e:
            return False, str(e)
        return True, ""

    @staticmethod
    def ext():
        return _build.load()

    def gemm_variant_for(self, m: int, n: int, k: int, device=None) -> int:
        """The GEMM kernel for M tokens x K -> N: wgmma where the build has it (Hopper) and its
        TMA copies allow (N % 16 == 0), else mma.sync; on wgmma, the ping-pong kernel (3) where
        pingpong_pays, else the cooperative one (2)."""
        wgmma = getattr(_build.load(), "WGMMA", False)
        v = self.gemm_variant
        if v is None:
            if not (wgmma and n % 16 == 0):
                return 1
            return 3 if pingpong_pays(m, n, k, _sm_count(device)) else 2
        if v not in (1, 2, 3):
            raise RuntimeError(f"svdq gemm: variant {v} is not 1 (mma.sync), 2 (wgmma) or 3 "
                               "(wgmma, ping-pong warpgroups)")
        if v > 1 and not wgmma:
            raise RuntimeError(f"svdq gemm: variant {v} (wgmma) needs a Hopper GPU and an "
                               "extension built for sm_90a; unset SVDQ_GEMM_VARIANT or use 1")
        if v > 1 and n % 16:
            raise RuntimeError(f"svdq gemm: variant {v} (wgmma) needs out_features N % 16 == 0 "
                               f"(its TMA copies need 16-byte strides), got N={n}; use variant 1")
        return v

    def act_variant_for(self, m: int, k: int, rank: int, device=None) -> int:
        """The activation kernel for M tokens of K features at branch rank `rank` (padded to 16):
        act_variant if set, else by shape (bench/NOTES.md, run 172: the three kernels alone on
        the H200, 256-8192 tokens, K = 3072 / 6144 / 12288 / 15360, ranks 0 / 32 / 128).

        act_kernel runs two 16-token blocks per SM (128 registers; fp16 is held there by its
        launch bound, csrc/w4a8.cu ACT_MIN_BLOCKS); each block walks whole rows of K.
        - Fewer blocks than about two thirds of the SMs leave SMs idle for a whole row's time.
          At K >= SPLIT_MIN_K the split kernels, whose blocks are a fraction of a row, fill the
          GPU instead and win at every rank up to 1280 tokens (80 blocks on 132 SMs: 1.15-1.3x at
          12288 / 15360) and lose from 1536 (96 blocks). At K = 3072 rows are short and they
          never win there below 4608 tokens.
        - Up to ACT_SMALL_M tokens the 8-token blocks (more blocks in flight) win at rank 0
          (1.1x at K = 3072) and lose at rank > 0 (their branch costs more: 1.1x at rank 32,
          1.6x at 128).
        - Above one wave, when the last wave of blocks is at most a quarter full (288 blocks on
          264 slots at 4608 tokens: 9%), the SMs idle through most of a block's time and the
          split kernels win (K >= 12288) or tie (3072); with the last wave fuller, act_kernel
          reads x once from DRAM where the split kernels read it twice, and wins or ties
          (6144 tokens, 45% full; 6656 and 8192 tokens; runs 55-56). The quarter is a threshold
          between the 9% and the 45% measured.
        """
        if self.act_variant is not None:
            return self.act_variant
        sms = _sm_count(device)
        blocks = (m + 15) // 16
        if k >= self.SPLIT_MIN_K and 3 * blocks < 2 * sms:
            return 2
        if m <= self.ACT_SMALL_M:
            return 1 if rank == 0 else 0
        slots = 2 * sms
        rest = blocks % slots
        return 2 if blocks > slots and 0 < rest and 4 * rest <= slots else 0

    def prepare(self, layer):
        if layer.kind == "w4a16":
            return {"wscales": layer.wscales.float().contiguous(),
                    "bias": {} if layer.bias is None else {layer.bias.dtype: layer.bias}}
        n, k = layer.out_features, layer.in_features
        check_shape(k, n)
        dev = layer.qweight.device
        if dev.type != "cuda":
            raise ValueError(f"SVDQuant cuda backend: the layer lies on {dev}, not on a CUDA GPU")
        with torch.no_grad():
            codes = quant.unpack_int4(layer.qweight)      # transient int8 [N, K], freed below
            row_scale, mult = quant.fold_group_scales(codes, layer.wscales)
            del codes
        return {
            "multT": mult.t().contiguous(),
            "row_scale": row_scale.float().contiguous(),
            "inv_smooth": (1.0 / layer.smooth.float()).contiguous(),
            "bias": {} if layer.bias is None else {layer.bias.dtype: layer.bias.contiguous()},
            "branch": None,
        }

    @staticmethod
    def _branch(layer, prep):
        """The low-rank branch zero-padded to R16, cached in `prep` until it changes.

        Weight-derived state (the fold) never depends on it, so appending a LoRA or changing a
        strength touches only this: a new scale vector reuses the padded down/up.
        """
        down, up, rank_scale = layer.branch()
        cached = prep["branch"]
        if cached is not None and cached["src"][0] is down and cached["src"][1] is up:
            if cached["src"][2] is not rank_scale:
                cached["rank_scale"][:rank_scale.shape[0]] = rank_scale.float()
                cached["src"] = (down, up, rank_scale)
            return cached
        n, k = layer.out_features, layer.in_features
        r, dev, dt = down.shape[0], down.device, layer.lowrank_down.dtype
        r16 = _ceil16(r)
        with torch.no_grad():
            d = torch.zeros(r16, k, dtype=dt, device=dev)
            d[:r] = down
            down_p = branch_down_layout(d)
            if r16 != r or not up.is_contiguous():
                up_p = torch.zeros(n, r16, dtype=dt, device=dev)
                up_p[:, :r] = up
            else:
                up_p = up
            rs = torch.zeros(r16, dtype=torch.float32, device=dev)
            rs[:r] = rank_scale.float()
        prep["branch"] = {"src": (down, up, rank_scale), "down": {dt: down_p}, "up": {dt: up_p},
                          "rank_scale": rs}
        return prep["branch"]

    @staticmethod
    def _as(cache: dict, dtype):
        """The tensor in `dtype` (converted once and kept; only when x's dtype differs)."""
        if dtype not in cache:
            src = next(iter(cache.values()))
            cache[dtype] = src.to(dtype).contiguous()
        return cache[dtype]

    def run(self, layer, prep, x: torch.Tensor, out: torch.Tensor | None = None,
            return_parts: bool = False):
        """The fused forward on x [M, K] (bf16/fp16). `out` may be given (tests poison it)."""
        ext = _build.load()
        x = x.contiguous()
        m, k = x.shape
        n = layer.out_features
        variant = self.gemm_variant_for(m, n, k, x.device)   # refuses an unavailable choice first
        dt = x.dtype
        br = self._branch(layer, prep)
        down = self._as(br["down"], dt)
        up = self._as(br["up"], dt)
        r16 = down.shape[0]
        dev = x.device
        codes = torch.empty(m, k, dtype=torch.int8, device=dev)
        sx = torch.empty(m, dtype=torch.float32, device=dev)
        sumq = torch.empty(m, dtype=torch.int32, device=dev)
        act = torch.empty(m, r16, dtype=dt, device=dev)
        ext.act_quant(x, prep["inv_smooth"], down, br["rank_scale"], codes, sx, sumq, act,
                      self.act_variant_for(m, k, r16, dev))
        y = out if out is not None else torch.empty(m, n, dtype=dt, device=dev)
        bias = self._as(prep["bias"], dt) if prep["bias"] else None
        ext.gemm(codes, sx, sumq, layer.qweight, prep["multT"], prep["row_scale"], act, up, bias, y,
                 variant)
        if return_parts:
            return y, (codes, sx, sumq, act)
        return y

    def dequant_w4(self, layer, prep, dtype):
        """The weight-only layer's weight in `dtype`, one pass (csrc/dequant_w4.cu)."""
        w = torch.empty(layer.out_features, layer.in_features, dtype=dtype,
                        device=layer.qweight.device)
        _build.load().dequant_w4(layer.qweight, prep["wscales"], w)
        return w

    def forward(self, layer, prep, x):
        if x.dtype not in (torch.bfloat16, torch.float16):
            return _reference_forward(layer, x)
        if layer.kind == "w4a16":
            # a GEMV per sample: transient 16-bit weight, then cuBLAS (fp32 accumulation)
            bias = self._as(prep["bias"], x.dtype) if prep["bias"] else None
            return torch.nn.functional.linear(x, self.dequant_w4(layer, prep, x.dtype), bias)
        if x.shape[0] == 0:
            return torch.empty(0, layer.out_features, dtype=x.dtype, device=x.device)
        return self.run(layer, prep, x)


def _reference_forward(layer, x):
    from . import get
    ref = get("reference")          # the same numbers: W4A8 with the fold
    return ref.forward(layer, ref.prepare(layer), x)
