"""Checkpoint format v1: bit-exact round trip, atomic writes, and every bad-input error."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import svdq
from svdq import synthetic
from svdq.format import CheckpointError


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    cfg = svdq.FluxConfig.tiny(depth=1, depth_single_blocks=1)
    sd = synthetic.random_flux_state_dict(cfg, seed=3)
    tensors = svdq.quantize_flux(sd, cfg, rank=16, refine_iters=1)
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    svdq.save_checkpoint(path, tensors, cfg, svdq.QuantConfig(rank=16).to_dict())
    return cfg, tensors, str(path)


def _rewrite(src, dst, edit_meta=None, edit_tensors=None):
    ck = svdq.load_checkpoint(src)
    from safetensors import safe_open
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    tensors = dict(ck.tensors)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst, metadata=meta)
    return dst


def test_roundtrip_bit_exact(tiny_ckpt):
    cfg, tensors, path = tiny_ckpt
    ck = svdq.load_checkpoint(path)
    assert ck.config == cfg
    assert set(ck.tensors) == set(tensors)
    for k, v in tensors.items():
        assert ck.tensors[k].dtype == v.dtype and torch.equal(ck.tensors[k], v), k
    assert ck.quant["rank"] == 16
    assert ck.layers["double_blocks.0.img_mlp.2"].act_unsigned is True
    assert ck.layers["double_blocks.0.img_attn.qkv"].act_unsigned is False


def test_no_overwrite_and_no_temp_left(tiny_ckpt, tmp_path):
    cfg, tensors, path = tiny_ckpt
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError, match="already exists"):
        svdq.save_checkpoint(path, tensors, cfg)
    assert open(path, "rb").read() == before
    out = tmp_path / "a.safetensors"
    svdq.save_checkpoint(out, tensors, cfg)
    svdq.save_checkpoint(out, tensors, cfg, overwrite=True)
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        svdq.load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(tiny_ckpt, tmp_path):
    data = open(tiny_ckpt[2], "rb").read()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors.*truncated or corrupt"):
        svdq.load_checkpoint(bad)


@pytest.mark.parametrize("payload", [b"", b"\x00\x01", b"garbage" * 10,
                                     struct.pack("<Q", 20) + b"{not json........}"])
def test_corrupt_file(tmp_path, payload):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(payload)
    with pytest.raises(CheckpointError, match="corrupt.safetensors.*truncated or corrupt"):
        svdq.load_checkpoint(bad)


def test_not_svdq_file(tmp_path):
    plain = tmp_path / "flux16.safetensors"
    save_file({"img_in.weight": torch.randn(4, 4)}, plain)
    with pytest.raises(CheckpointError, match="not an SVDQuant checkpoint.*Load Diffusion Model"):
        svdq.load_checkpoint(plain)


def test_wrong_version(tiny_ckpt, tmp_path):
    bad = _rewrite(tiny_ckpt[2], tmp_path / "v9.safetensors",
                   edit_meta=lambda m: m.update(format_version="9"))
    with pytest.raises(CheckpointError, match="v9.safetensors.*version '9'"):
        svdq.load_checkpoint(bad)


def test_unknown_family(tiny_ckpt, tmp_path):
    bad = _rewrite(tiny_ckpt[2], tmp_path / "sd3.safetensors",
                   edit_meta=lambda m: m.update(model_family="sd3"))
    with pytest.raises(CheckpointError, match="sd3.safetensors.*model family 'sd3'"):
        svdq.load_checkpoint(bad)


def test_bad_config(tiny_ckpt, tmp_path):
    def edit(m):
        c = json.loads(m["model_config"])
        c["num_heads"] = 3
        m["model_config"] = json.dumps(c)
    bad = _rewrite(tiny_ckpt[2], tmp_path / "cfg.safetensors", edit_meta=edit)
    with pytest.raises(CheckpointError, match="cfg.safetensors.*model_config"):
        svdq.load_checkpoint(bad)


def test_missing_tensor(tiny_ckpt, tmp_path):
    bad = _rewrite(tiny_ckpt[2], tmp_path / "miss.safetensors",
                   edit_tensors=lambda t: t.pop("single_blocks.0.linear2.wscales"))
    with pytest.raises(CheckpointError,
                       match="miss.safetensors.*'single_blocks.0.linear2.wscales' is missing"):
        svdq.load_checkpoint(bad)


def test_misshaped_tensor(tiny_ckpt, tmp_path):
    def edit(t):
        t["double_blocks.0.txt_attn.qkv.qweight"] = t["double_blocks.0.txt_attn.qkv.qweight"][:-1]
    bad = _rewrite(tiny_ckpt[2], tmp_path / "shape.safetensors", edit_tensors=edit)
    with pytest.raises(CheckpointError, match="shape.safetensors.*txt_attn.qkv.qweight.*expected"):
        svdq.load_checkpoint(bad)


def test_wrong_dtype(tiny_ckpt, tmp_path):
    def edit(t):
        t["img_in.weight"] = t["img_in.weight"].to(torch.int32)
    bad = _rewrite(tiny_ckpt[2], tmp_path / "dtype.safetensors", edit_tensors=edit)
    with pytest.raises(CheckpointError, match="dtype.safetensors.*img_in.weight.*I32"):
        svdq.load_checkpoint(bad)
