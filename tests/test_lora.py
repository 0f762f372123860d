"""svdq.lora: the three key formats land on the same ComfyUI layers with the same deltas."""
import pytest
import torch

from svdq import lora

H, M = 64, 256          # hidden width and single-block mlp width of a toy FLUX


def shapes():
    s = {"img_in": (H, 64), "final_layer.linear": (64, H)}
    for p in ("img", "txt"):
        s[f"double_blocks.0.{p}_attn.qkv"] = (3 * H, H)
        s[f"double_blocks.0.{p}_attn.proj"] = (H, H)
        s[f"double_blocks.0.{p}_mlp.0"] = (4 * H, H)
        s[f"double_blocks.0.{p}_mlp.2"] = (H, 4 * H)
        s[f"double_blocks.0.{p}_mod.lin"] = (6 * H, H)
    s["single_blocks.0.linear1"] = (3 * H + M, H)
    s["single_blocks.0.linear2"] = (H, H + M)
    s["single_blocks.0.modulation.lin"] = (3 * H, H)
    return s


def pair(n, k, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)


def dense(conv, name, n, k):
    w = torch.zeros(n, k)
    for start, length, d in lora.delta(conv[name]):
        w[start:start + length] += d
    return w


def test_bfl_kohya_and_peft_give_the_same_qkv_delta():
    (dq, uq), (dk, uk), (dv, uv) = pair(H, H, seed=1), pair(H, H, seed=2), pair(H, H, seed=3)
    fused_down = torch.cat([dq, dk, dv])
    fused_up = torch.block_diag(uq, uk, uv)
    bfl = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": fused_down,
           "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": fused_up,
           "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(12.0)}
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": fused_down,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": fused_up,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(12.0)}
    peft = {}
    for n, (d, u) in zip("qkv", [(dq, uq), (dk, uk), (dv, uv)]):
        peft[f"transformer.transformer_blocks.0.attn.to_{n}.lora_A.weight"] = d
        peft[f"transformer.transformer_blocks.0.attn.to_{n}.lora_B.weight"] = u
        peft[f"transformer.transformer_blocks.0.attn.to_{n}.alpha"] = torch.tensor(4.0)
    expect = fused_up @ fused_down              # alpha 12 over rank 12, alpha 4 over rank 4: 1
    for sd in (bfl, kohya, peft):
        conv = lora.convert(sd, shapes())
        assert list(conv) == ["double_blocks.0.img_attn.qkv"]
        torch.testing.assert_close(dense(conv, "double_blocks.0.img_attn.qkv", 3 * H, H), expect)


def test_single_block_splits_land_on_linear1_rows_and_linear2():
    sd, parts = {}, {}
    for i, (n, rows) in enumerate([("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H),
                                   ("proj_mlp", M)]):
        d, u = pair(rows, H, seed=10 + i)
        parts[n] = (d, u)
        base = f"lora_transformer_single_transformer_blocks_0_{n.replace('.', '_')}"
        sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"] = d, u
    d2, u2 = pair(H, H + M, seed=20)
    sd["transformer.single_transformer_blocks.0.proj_out.lora_A.weight"] = d2
    sd["transformer.single_transformer_blocks.0.proj_out.lora_B.weight"] = u2
    conv = lora.convert(sd, shapes())
    w1 = dense(conv, "single_blocks.0.linear1", 3 * H + M, H)
    torch.testing.assert_close(w1[H:2 * H], parts["attn.to_k"][1] @ parts["attn.to_k"][0])
    torch.testing.assert_close(w1[3 * H:], parts["proj_mlp"][1] @ parts["proj_mlp"][0])
    torch.testing.assert_close(dense(conv, "single_blocks.0.linear2", H, H + M), u2 @ d2)
    down, up = lora.stack(conv["single_blocks.0.linear1"], 3 * H + M)
    torch.testing.assert_close(up @ down, w1)


def test_other_architecture_is_refused_by_name():
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}
    with pytest.raises(lora.LoRAError) as e:
        lora.convert(sd, shapes(), source="/x/sdxl_style.safetensors")
    msg = str(e.value)
    assert "sdxl_style.safetensors" in msg and "another model" in msg
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in msg and "Fix:" in msg


def test_mismatched_shape_is_reported_with_the_layer():
    d, u = pair(H, 2 * H)
    sd = {"double_blocks.0.img_attn.proj.lora_A.weight": d,
          "double_blocks.0.img_attn.proj.lora_B.weight": u}
    with pytest.raises(lora.LoRAError, match=r"double_blocks\.0\.img_attn\.proj.*do not fit"):
        lora.convert(sd, shapes(), source="big.safetensors")


def test_text_encoder_keys_are_skipped_and_only_safetensors_load(tmp_path):
    d, u = pair(H, H)
    sd = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
          "double_blocks.0.txt_attn.proj.lora_down.weight": d,
          "double_blocks.0.txt_attn.proj.lora_up.weight": u}
    assert list(lora.convert(sd, shapes())) == ["double_blocks.0.txt_attn.proj"]
    with pytest.raises(lora.LoRAError, match="only .safetensors"):
        lora.load_file(tmp_path / "x.ckpt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(lora.LoRAError, match="bad.safetensors"):
        lora.load_file(bad)
