"""A whole quantized FLUX model on the fused CUDA backend, against the reference path.

GPU only. The kernels themselves are checked element-wise in test_cuda_kernels.py; this checks
that the backend works inside a model: device moves, w4a16 layers, LoRA segments whose rank is
not a multiple of 16, and a strength change without a rebuild.
"""
import pytest
import torch

import svdq
from svdq import synthetic
from svdq.flux_model import FluxModel
from helpers import needs_cuda, rel_err

pytestmark = needs_cuda


@pytest.fixture(scope="module")
def quantized():
    cfg = svdq.FluxConfig.tiny()
    sd = synthetic.random_flux_state_dict(cfg, seed=21)
    m16 = FluxModel.from_state_dict(cfg, sd)
    with svdq.ActivationRecorder(m16, svdq.layer_specs(cfg)) as rec:
        m16(**synthetic.random_inputs(cfg, height=128, width=128, txt_len=32, seed=0))
    tensors = svdq.quantize_flux(sd, cfg, rec.result(), rank=32, device="cuda")
    ckpt = svdq.Checkpoint("<memory>", tensors, cfg, {}, svdq.layer_flags(cfg, True))
    return cfg, m16, ckpt


def _run(model, backend, inp):
    for layer in model.quantized_layers().values():
        layer.set_backend(backend)
    with torch.no_grad():
        return model(**inp)


def test_model_cuda_matches_reference(quantized):
    cfg, m16, ckpt = quantized
    model = FluxModel.from_checkpoint(ckpt, dtype=torch.bfloat16).cuda()
    inp = {k: (v.cuda().to(torch.bfloat16) if v is not None else None)
           for k, v in synthetic.random_inputs(cfg, height=136, width=120, txt_len=77,
                                               seed=4).items()}
    y_cuda = _run(model, "cuda", inp)
    y_ref = _run(model, "reference", inp)
    again = _run(model, "cuda", inp)
    assert torch.equal(y_cuda, again)                       # deterministic, run to run
    e = rel_err(y_cuda, y_ref)
    print(f"\ntiny FLUX bf16, cuda vs reference: rel err {e:.2e}")
    # per layer the two agree to bf16 rounding; through 4 blocks of bf16 math that stays ~1e-2
    assert e < 2e-2
    with torch.no_grad():
        y16 = m16.cuda().to(torch.bfloat16)(**inp)
    assert rel_err(y_cuda, y16) < 0.1


def test_lora_segments_on_cuda(quantized):
    cfg, _, ckpt = quantized
    model = FluxModel.from_checkpoint(ckpt, dtype=torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(7)
    for name, layer in model.quantized_layers().items():
        if layer.kind == "w4a4":
            down = (torch.randn(8, layer.in_features, generator=g) * 0.02).to(torch.bfloat16)
            up = (torch.randn(layer.out_features, 8, generator=g) * 0.02).to(torch.bfloat16)
            layer.set_lowrank_segments([("lora", down.cuda(), up.cuda(), 1.0)])   # rank 40
    inp = {k: (v.cuda().to(torch.bfloat16) if v is not None else None)
           for k, v in synthetic.random_inputs(cfg, height=64, width=64, txt_len=9,
                                               seed=5).items()}
    y1 = _run(model, "cuda", inp)
    assert rel_err(y1, _run(model, "reference", inp)) < 2e-2
    for layer in model.quantized_layers().values():
        if layer.kind == "w4a4":
            layer.set_segment_scale("lora", 0.0)
    y0 = _run(model, "cuda", inp)
    for layer in model.quantized_layers().values():
        if layer.kind == "w4a4":
            layer.set_lowrank_segments([])
    base = _run(model, "cuda", inp)
    assert rel_err(y0, base) < 1e-2 and rel_err(y1, base) > 1e-2
