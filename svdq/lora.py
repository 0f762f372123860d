"""LoRA files for FLUX: parse the common key formats and convert them onto ComfyUI Flux layers.

Host-independent (never imports ComfyUI). A converted LoRA is a dict
    layer name (ComfyUI Flux naming) -> list of Part(start, length, down [r, K], up [length, r])
where alpha / rank is already folded into `up`, so strength is the only scale left. `start` and
`length` select the output rows of a fused layer (q/k/v inside qkv or single-block linear1);
a plain layer has start 0 and length = its output width.

Formats read:
- BFL / ComfyUI: `[diffusion_model.]double_blocks.0.img_attn.qkv.lora_A.weight` (or lora_down /
  lora_up), with optional `.alpha`.
- kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`.
- diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, also the kohya
  spelling `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch


class LoRAError(ValueError):
    """A LoRA file that cannot be applied; the message names the file, the keys and the fix."""


@dataclass
class Part:
    start: int
    length: int
    down: torch.Tensor   # [r, K]
    up: torch.Tensor     # [length, r], alpha / r folded in


# (suffix of the A matrix, suffix of the B matrix); alpha sits at "<base>.alpha"
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))
_TEXT_ENCODER = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.")
_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "base_model.model.", "transformer.",
             "unet.")


def load_file(path: str) -> dict:
    """Read a LoRA; only safetensors, because a pickle can run code."""
    if not str(path).lower().endswith((".safetensors", ".sft")):
        raise LoRAError(f"{path}: only .safetensors LoRA files are read. Fix: convert the file "
                        f"to safetensors (a pickled .ckpt/.pt can run code when loaded).")
    from safetensors.torch import load_file as _load
    try:
        return _load(str(path), device="cpu")
    except Exception as e:
        raise LoRAError(f"{path}: not a readable safetensors file ({e}). Fix: download the LoRA "
                        f"again, the file is damaged or not a LoRA.") from e


def _diffusers_targets(h: int, m: int) -> list[tuple[re.Pattern, object]]:
    """diffusers module name -> (comfy name, start, length); `m` is the single-block mlp width."""
    d = r"transformer_blocks\.(\d+)\."
    s = r"single_transformer_blocks\.(\d+)\."
    table = [
        (d + r"attn\.to_q", "double_blocks.{}.img_attn.qkv", 0, h),
        (d + r"attn\.to_k", "double_blocks.{}.img_attn.qkv", h, h),
        (d + r"attn\.to_v", "double_blocks.{}.img_attn.qkv", 2 * h, h),
        (d + r"attn\.add_q_proj", "double_blocks.{}.txt_attn.qkv", 0, h),
        (d + r"attn\.add_k_proj", "double_blocks.{}.txt_attn.qkv", h, h),
        (d + r"attn\.add_v_proj", "double_blocks.{}.txt_attn.qkv", 2 * h, h),
        (d + r"attn\.to_out\.0", "double_blocks.{}.img_attn.proj", 0, None),
        (d + r"attn\.to_add_out", "double_blocks.{}.txt_attn.proj", 0, None),
        (d + r"ff\.net\.0\.proj", "double_blocks.{}.img_mlp.0", 0, None),
        (d + r"ff\.net\.2", "double_blocks.{}.img_mlp.2", 0, None),
        (d + r"ff_context\.net\.0\.proj", "double_blocks.{}.txt_mlp.0", 0, None),
        (d + r"ff_context\.net\.2", "double_blocks.{}.txt_mlp.2", 0, None),
        (d + r"norm1\.linear", "double_blocks.{}.img_mod.lin", 0, None),
        (d + r"norm1_context\.linear", "double_blocks.{}.txt_mod.lin", 0, None),
        (s + r"attn\.to_q", "single_blocks.{}.linear1", 0, h),
        (s + r"attn\.to_k", "single_blocks.{}.linear1", h, h),
        (s + r"attn\.to_v", "single_blocks.{}.linear1", 2 * h, h),
        (s + r"proj_mlp", "single_blocks.{}.linear1", 3 * h, m),
        (s + r"proj_out", "single_blocks.{}.linear2", 0, None),
        (s + r"norm\.linear", "single_blocks.{}.modulation.lin", 0, None),
        (r"x_embedder", "img_in", 0, None),
        (r"context_embedder", "txt_in", 0, None),
        (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", 0, None),
        (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", 0, None),
        (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", 0, None),
        (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", 0, None),
        (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", 0, None),
        (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", 0, None),
        (r"proj_out", "final_layer.linear", 0, None),
    ]
    return [(re.compile("^" + p + "$"), (name, start, length)) for p, name, start, length in table]


def _group(sd: dict) -> tuple[dict, list]:
    """Split keys into {base module name: (A, B, alpha)} and the keys nothing understood."""
    groups, unknown = {}, []
    for k in sd:
        if k.startswith(_TEXT_ENCODER):
            continue  # a model-only loader leaves text-encoder parts to the CLIP side
        for a_suf, b_suf in _PAIRS:
            if k.endswith(a_suf):
                groups.setdefault(k[:-len(a_suf)], {})["A"] = sd[k]
                break
            if k.endswith(b_suf):
                groups.setdefault(k[:-len(b_suf)], {})["B"] = sd[k]
                break
        else:
            if k.endswith(".alpha"):
                groups.setdefault(k[:-len(".alpha")], {})["alpha"] = sd[k]
            else:
                unknown.append(k)
    return groups, unknown


def _widths(shapes: dict) -> tuple[int, int]:
    """Hidden size and single-block mlp width, read from the model's own layer shapes."""
    h = shapes["double_blocks.0.img_attn.proj"][0] if "double_blocks.0.img_attn.proj" in shapes \
        else shapes["single_blocks.0.linear2"][0]
    m = shapes["single_blocks.0.linear1"][0] - 3 * h if "single_blocks.0.linear1" in shapes else 0
    return h, m


def _resolve(base: str, shapes: dict, kohya: dict, diffusers: list):
    """Module base name from the file -> (comfy layer, start, length or None), or None."""
    name = base
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    if name in shapes:
        return name, 0, None
    for p in ("lora_unet_", "lora_transformer_"):
        if base.startswith(p):
            flat = base[len(p):]
            if p == "lora_unet_" and flat in kohya:
                return kohya[flat], 0, None
            name = _undot(flat)
            break
    for pat, (target, start, length) in diffusers:
        mt = pat.match(name)
        if mt:
            return target.format(*mt.groups()), start, length
    return None


def _undot(flat: str) -> str:
    """kohya's diffusers spelling back to dotted diffusers names (the known multi-word parts)."""
    s = flat
    for w in ("single_transformer_blocks", "transformer_blocks", "ff_context", "to_out",
              "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_q", "to_k", "to_v",
              "proj_mlp", "proj_out", "norm1_context", "x_embedder", "context_embedder",
              "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder",
              "linear_1", "linear_2"):
        s = s.replace(w, w.replace("_", "\x00"))
    return s.replace("_", ".").replace("\x00", "_")


def convert(sd: dict, shapes: dict, source: str = "LoRA") -> dict[str, list[Part]]:
    """Convert a LoRA state dict onto the layers in `shapes` ({name: (out, in)} of the model's
    Linears). Raises LoRAError naming every key it cannot place; `source` names the file."""
    h, m = _widths(shapes)
    kohya = {n.replace(".", "_"): n for n in shapes}
    diffusers = _diffusers_targets(h, m)
    groups, unknown = _group(sd)
    out: dict[str, list[Part]] = {}
    problems = []
    for base, g in sorted(groups.items()):
        if "A" not in g or "B" not in g:
            problems.append(f"{base}: has only one of lora_A/lora_B (down/up)")
            continue
        hit = _resolve(base, shapes, kohya, diffusers)
        if hit is None:
            unknown.append(base)
            continue
        target, start, length = hit
        if target not in shapes:
            problems.append(f"{base}: maps to {target}, which this model does not have")
            continue
        n_out, k_in = shapes[target]
        length = n_out - start if length is None else length
        down, up = g["A"].float(), g["B"].float()
        if down.dim() != 2 or up.dim() != 2:
            problems.append(f"{base}: not a linear LoRA (conv or LoKr/LoHa weights)")
            continue
        r = down.shape[0]
        if down.shape[1] != k_in or up.shape != (length, r):
            problems.append(f"{base}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                            f"{target} ({k_in} in, {length} out at row {start})")
            continue
        alpha = float(g["alpha"]) if "alpha" in g else float(r)
        out.setdefault(target, []).append(Part(start, length, down.contiguous(),
                                               (up * (alpha / r)).contiguous()))
    src = os.path.basename(str(source))
    if unknown or problems:
        lines = [f"unknown key: {k}" for k in sorted(unknown)[:20]]
        if len(unknown) > 20:
            lines.append(f"... and {len(unknown) - 20} more unknown keys")
        lines += problems[:20]
        what = ("none of its keys belong to a FLUX transformer; it is probably a LoRA for another "
                "model" if not out else "some keys do not fit this FLUX model")
        raise LoRAError(f"{src}: {what}.\n  " + "\n  ".join(lines) +
                        "\nFix: use a FLUX.1 LoRA in BFL/ComfyUI, kohya or diffusers/PEFT format "
                        "made for this model (same hidden size).")
    if not out:
        raise LoRAError(f"{src}: holds no LoRA weights. Fix: choose a FLUX.1 LoRA file.")
    return out


def stack(parts: list[Part], n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All parts of one layer as one low-rank pair: down [R, K], up [N, R] (zero outside each
    part's rows), so q/k/v LoRAs land on their slices of the fused output."""
    down = torch.cat([p.down for p in parts])
    up = torch.zeros(n_out, down.shape[0], dtype=down.dtype)
    col = 0
    for p in parts:
        r = p.down.shape[0]
        up[p.start:p.start + p.length, col:col + r] = p.up
        col += r
    return down, up


def delta(parts: list[Part]) -> list[tuple[int, int, torch.Tensor]]:
    """Per part (start, length, dense weight delta [length, K]) for layers kept in 16 bits."""
    return [(p.start, p.length, p.up @ p.down) for p in parts]
