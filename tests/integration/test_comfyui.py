"""The extension inside a real ComfyUI: registration, the shipped workflows end to end, the
numbers against the 16-bit model and stock LoRA loading, and the error paths.

Models are tiny random FLUX-architecture files written here (1 double + 1 single block, hidden
256); the shipped API workflows run with only file names, sizes and steps rewritten, and the
FLUX text encoders / VAE swapped for random CLIP-L and taef1 stand-ins (svdq.demo).
"""
import json
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdq
from svdq import demo

pytestmark = pytest.mark.integration

SIZE, STEPS = 128, 4
DEV16, SCHNELL16 = "tiny-flux-dev.safetensors", "tiny-flux-schnell.safetensors"
DEV4, SCHNELL4 = "tiny-flux-dev-svdq.safetensors", "tiny-flux-schnell-svdq.safetensors"
DEV4_R0 = "tiny-flux-dev-svdq-rank0.safetensors"   # no low-rank branch: plain smoothed W4A4
LORA_A, LORA_B = "tiny-lora-peft.safetensors", "tiny-lora-kohya.safetensors"

# Relative L2 error of the final latent, 4-bit vs 16-bit, same seed, as measured here (CPU,
# bf16, reference backend, 128x128, 4 euler steps): dev 0.024, schnell 0.013, dev with two
# LoRAs vs the 16-bit model with the same LoRAs merged by ComfyUI 0.029; dev at rank 0 (no
# low-rank branch anywhere) 0.027. Two seeds of the same 16-bit model differ by about 1.3.
# Faults measured on the same tiny model with the library (svdq.flux_model): one layer's
# low-rank branch dropped gives 0.047-0.087. The bound sits between the two: 1.5x the largest
# measurement, below a single missing branch.
QUANT_BOUND = 0.045


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- fixtures ---------------------------------------------------------------------------------
def _peft_lora(cfg, g, s=0.15):
    h, m, r = cfg.hidden_size, cfg.mlp_hidden, 4
    sd = {}

    def add(base, n, k):
        sd[f"transformer.{base}.lora_A.weight"] = torch.randn(r, k, generator=g) * s
        sd[f"transformer.{base}.lora_B.weight"] = torch.randn(n, r, generator=g) * s
        sd[f"transformer.{base}.alpha"] = torch.tensor(float(r))

    for p in ("to_q", "to_k", "to_v", "add_k_proj"):
        add(f"transformer_blocks.0.attn.{p}", h, h)
    add("transformer_blocks.0.ff.net.0.proj", m, h)
    add("transformer_blocks.0.norm1.linear", 6 * h, h)          # a w4a16 layer
    add("single_transformer_blocks.0.attn.to_q", h, h)
    add("single_transformer_blocks.0.proj_mlp", m, h)
    add("single_transformer_blocks.0.proj_out", h, h + m)
    add("x_embedder", h, cfg.in_channels * 4)                    # a 16-bit layer
    return sd


def _kohya_lora(cfg, g, s=0.15):
    h, m, r = cfg.hidden_size, cfg.mlp_hidden, 8
    sd = {}

    def add(name, n, k):
        base = "lora_unet_" + name.replace(".", "_")
        sd[f"{base}.lora_down.weight"] = torch.randn(r, k, generator=g) * s
        sd[f"{base}.lora_up.weight"] = torch.randn(n, r, generator=g) * s
        sd[f"{base}.alpha"] = torch.tensor(4.0)

    add("double_blocks.0.img_mlp.2", h, m)
    add("double_blocks.0.txt_attn.proj", h, h)
    add("single_blocks.0.linear1", 3 * h + m, h)
    add("txt_in", h, cfg.context_in_dim)
    return sd


@pytest.fixture(scope="module")
def models(comfy):
    m = comfy.models
    demo.write_flux16(m / "diffusion_models" / DEV16, demo.tiny_config(), seed=0)
    demo.write_flux16(m / "diffusion_models" / SCHNELL16, demo.tiny_config(schnell=True), seed=1)
    cfg = demo.tiny_config()
    g = torch.Generator().manual_seed(5)
    (m / "loras").mkdir(exist_ok=True)
    save_file(_peft_lora(cfg, g), str(m / "loras" / LORA_A))
    save_file(_kohya_lora(cfg, g), str(m / "loras" / LORA_B))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
              str(m / "loras" / "sdxl-style-lora.safetensors"))
    save_file({"foo": torch.zeros(4)}, str(m / "diffusion_models" / "not-a-model.safetensors"))
    return m


def graph(name, **changes):
    g = demo.with_stand_ins(demo.load_api(name), SIZE, STEPS)
    for class_type, values in changes.items():
        demo.set_inputs(g, class_type, **values)
    return g


def with_latent_output(g, tag):
    """Add a stock SaveLatent after the KSampler so the test can read the latent."""
    ks = next(k for k, n in g.items() if n["class_type"] == "KSampler")
    g["900"] = {"class_type": "SaveLatent",
                "inputs": {"samples": [ks, 0], "filename_prefix": f"latents/{tag}"}}
    return g


def run_ok(comfy, g):
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", demo.error_message(entry) + \
        "\n" + comfy.log_tail()
    return entry


def latent(comfy, g, tag=None):
    entry = run_ok(comfy, with_latent_output(g, tag or uuid.uuid4().hex[:8]))
    files = comfy.output_files(entry, "latents")
    assert len(files) == 1
    return load_file(str(files[0]))["latent_tensor"].float(), entry


def run_error(comfy, g):
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "error", "the prompt should have failed"
    return demo.error_message(entry)


@pytest.fixture(scope="module")
def quantized(comfy, models):
    """Both 4-bit files, made by the shipped quantize workflow (Quantize Checkpoint node)."""
    entries = {}
    for src, out, rank in ((DEV16, DEV4, 32), (SCHNELL16, SCHNELL4, 32), (DEV16, DEV4_R0, 0)):
        g = graph("flux1-quantize-checkpoint",
                  SVDQuantModelLoader={"model_name": src},
                  SVDQuantQuantizeCheckpoint={"output_name": out[:-len(".safetensors")],
                                              "rank": rank},
                  SaveImage={"filename_prefix": out[:-len(".safetensors")]})
        entries[out] = run_ok(comfy, g)
    return entries


# -- registration -----------------------------------------------------------------------------
def test_object_info_lists_the_three_nodes_with_tooltips(comfy):
    info = comfy.get("/object_info")
    expect = {"SVDQuantModelLoader": ("SVDQuant Model Loader",
                                      {"model_name", "device", "dtype", "backend"}),
              "SVDQuantQuantizeCheckpoint": ("Quantize Checkpoint",
                                             {"model", "conditioning", "steps", "seed",
                                              "resolution", "rank", "output_name", "overwrite"}),
              "SVDQuantLoRA": ("SVDQ LoRA", {"model", "lora_name", "strength"})}
    for cls, (title, inputs) in expect.items():
        node = info[cls]
        assert node["display_name"] == title
        assert node["python_module"].startswith("custom_nodes.")
        req = node["input"]["required"]
        assert set(req) == inputs
        for name, spec in req.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{cls}.{name} has no tooltip"
        assert node["output"] == ["MODEL"]
    assert {"bfloat16", "float16"} == set(info["SVDQuantModelLoader"]["input"]["required"]
                                          ["dtype"][0])


def test_workflows_are_templates_and_ui_matches_api(comfy):
    templates = comfy.get("/workflow_templates")
    names = set(templates.get("ComfyUI-SVDQuant", []))
    assert names == {"flux1-dev-svdq", "flux1-schnell-svdq", "flux1-dev-svdq-two-loras",
                     "flux1-quantize-checkpoint"}
    info = comfy.get("/object_info")
    for name in names:
        ui = json.loads((demo.WORKFLOWS / f"{name}.json").read_text())
        api = demo.load_api(name)
        by_id = {str(n["id"]): n for n in ui["nodes"]}
        assert set(by_id) == set(api)
        for nid, node in api.items():
            u = by_id[nid]
            assert u["type"] == node["class_type"]
            spec = info[node["class_type"]]["input"]
            order = [k for k in info[node["class_type"]]["input_order"]["required"] +
                     info[node["class_type"]]["input_order"].get("optional", [])]
            widgets = [k for k in order if not isinstance(node["inputs"].get(k), list)
                       and k in node["inputs"]]
            values = [v for v in u["widgets_values"] if v not in ("fixed", "randomize")]
            assert values == [node["inputs"][k] for k in widgets], (name, nid)
            linked = {i["name"]: i["link"] for i in u.get("inputs", [])}
            for k, v in node["inputs"].items():
                if isinstance(v, list):
                    link = next(l for l in ui["links"] if l[0] == linked[k])
                    assert [str(link[1]), link[2], str(link[3])] == [v[0], v[1], nid]
            assert spec  # every class in the workflow exists in this ComfyUI


# -- the workflows end to end -----------------------------------------------------------------
def test_quantize_workflow_writes_a_file_the_loader_loads(comfy, quantized):
    for out, entry in quantized.items():
        path = comfy.models / "svdq" / out
        ck = svdq.load_checkpoint(path)
        assert ck.layers and any(k.endswith(".qweight") for k in ck.tensors)
        images = comfy.output_files(entry)
        assert images and images[0].stat().st_size > 0
    # the written file also appears in the loader's list
    names = comfy.get("/object_info/SVDQuantModelLoader")["SVDQuantModelLoader"]["input"][
        "required"]["model_name"][0]
    assert DEV4 in names and SCHNELL4 in names


@pytest.mark.parametrize("wf,q,f", [("flux1-dev-svdq", DEV4, DEV16),
                                    ("flux1-schnell-svdq", SCHNELL4, SCHNELL16)])
def test_workflow_image_and_4bit_close_to_16bit(comfy, quantized, wf, q, f):
    lat_q, entry = latent(comfy, graph(wf, SVDQuantModelLoader={"model_name": q}))
    images = comfy.output_files(entry)
    assert images and images[0].suffix == ".png" and images[0].stat().st_size > 0
    lat_f, _ = latent(comfy, graph(wf, SVDQuantModelLoader={"model_name": f}))
    lat_f2, _ = latent(comfy, graph(wf, SVDQuantModelLoader={"model_name": f},
                                    KSampler={"seed": 43}))
    err, spread = rel(lat_q, lat_f), rel(lat_f2, lat_f)
    print(f"{wf}: 4-bit vs 16-bit latent rel. error {err:.4f}; other seed {spread:.4f}")
    assert torch.isfinite(lat_q).all()
    assert err < QUANT_BOUND
    assert err < 0.2 * spread
    if q == DEV4:   # the low-rank branch is what makes 4 bits this close
        lat_0, _ = latent(comfy, graph(wf, SVDQuantModelLoader={"model_name": DEV4_R0}))
        err0 = rel(lat_0, lat_f)
        print(f"{wf}: same with rank 0 (no low-rank branch): {err0:.4f}")
        assert err < err0


def _lora_graph(model, strengths, stock=False):
    g = graph("flux1-dev-svdq-two-loras", SVDQuantModelLoader={"model_name": model})
    loras = sorted((k for k, n in g.items() if n["class_type"] == "SVDQuantLoRA"), key=int)
    for nid, name, s in zip(loras, (LORA_A, LORA_B), strengths):
        inp = g[nid]["inputs"]
        inp.update(lora_name=name, strength=s)
        if stock:   # ComfyUI's own LoRA loader as the oracle
            g[nid] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": inp["model"], "lora_name": name, "strength_model": s}}
    return g


def test_two_loras_match_stock_lora_on_the_16bit_model(comfy, quantized):
    base, _ = latent(comfy, graph("flux1-dev-svdq", SVDQuantModelLoader={"model_name": DEV16}))
    oracle, _ = latent(comfy, _lora_graph(DEV16, (1.0, 0.8), stock=True))
    ours16, _ = latent(comfy, _lora_graph(DEV16, (1.0, 0.8)))
    ours4, entry = latent(comfy, _lora_graph(DEV4, (1.0, 0.8)))
    assert comfy.output_files(entry)[0].stat().st_size > 0     # the workflow's image
    effect = rel(oracle, base)
    e16, e4 = rel(ours16, oracle), rel(ours4, oracle)
    print(f"LoRA effect {effect:.4f}; SVDQ LoRA on 16-bit vs stock {e16:.5f}; "
          f"on 4-bit vs stock-on-16-bit {e4:.4f}")
    assert effect > 0.2                 # the LoRAs really change the picture
    assert e16 < 0.01                   # same conversion as ComfyUI's own loader
    assert e4 < QUANT_BOUND and e4 < 0.3 * effect


def test_stock_lora_loader_works_on_the_4bit_model(comfy, quantized):
    """ComfyUI's own LoraLoaderModelOnly on an SVDQuant model: its patches on the 4-bit layers
    run in the low-rank branch, like SVDQ LoRA's."""
    oracle, _ = latent(comfy, _lora_graph(DEV16, (1.0, 0.8), stock=True))
    ours4, _ = latent(comfy, _lora_graph(DEV4, (1.0, 0.8)))
    stock4, _ = latent(comfy, _lora_graph(DEV4, (1.0, 0.8), stock=True))
    print(f"stock LoRA loader on 4-bit vs SVDQ LoRA: {rel(stock4, ours4):.2e}; vs 16-bit "
          f"oracle {rel(stock4, oracle):.4f}")
    plain4, _ = latent(comfy, graph("flux1-dev-svdq", SVDQuantModelLoader={"model_name": DEV4}))
    assert rel(stock4, plain4) > 0.2     # the LoRAs did reach the 4-bit layers
    assert rel(stock4, ours4) < 1e-2     # same branch matrices, so equal here
    assert rel(stock4, oracle) < QUANT_BOUND


def test_lora_strength_zero_and_clones_stay_independent(comfy, quantized):
    plain, _ = latent(comfy, graph("flux1-dev-svdq", SVDQuantModelLoader={"model_name": DEV4}))
    one, _ = latent(comfy, _lora_graph(DEV4, (1.0, 0.8)))
    # strength 0 after strength 1: only the scales change on the shared module
    zero, _ = latent(comfy, _lora_graph(DEV4, (0.0, 0.0)))
    print(f"strength 0 vs no LoRA: {rel(zero, plain):.2e}; strength 1 vs none: "
          f"{rel(one, plain):.3f}")
    assert rel(zero, plain) < 1e-3
    assert rel(one, plain) > 0.2
    # the same graphs again (denoise 0.9999 defeats ComfyUI's output cache, same schedule):
    # each patcher brings the shared module back to its own LoRA state
    again, _ = latent(comfy, graph("flux1-dev-svdq", SVDQuantModelLoader={"model_name": DEV4},
                                   KSampler={"denoise": 0.99995}))
    g = _lora_graph(DEV4, (1.0, 0.8))
    demo.set_inputs(g, "KSampler", denoise=0.99995)
    one_again, _ = latent(comfy, g)
    assert rel(again, plain) < 1e-3
    assert rel(one_again, one) < 1e-3


def test_quantize_honours_interrupt(comfy, models):
    g = graph("flux1-quantize-checkpoint", SVDQuantModelLoader={"model_name": DEV16},
              SVDQuantQuantizeCheckpoint={"output_name": "interrupted", "steps": 100,
                                          "resolution": 256})
    status, body = comfy.post("/prompt", {"prompt": g})
    assert status == 200, body
    pid = body["prompt_id"]
    deadline = time.time() + 60
    while time.time() < deadline and not comfy.get("/queue")["queue_running"]:
        time.sleep(0.05)
    time.sleep(1.0)     # inside the 100 calibration steps (several seconds here)
    comfy.post("/interrupt", {})
    while time.time() < deadline:
        h = comfy.get(f"/history/{pid}")
        if pid in h and h[pid]["status"].get("completed") is not None:
            break
        time.sleep(0.2)
    events = [ev for ev, _ in h[pid]["status"]["messages"]]
    assert "execution_interrupted" in events, events
    assert not (models / "svdq" / "interrupted.safetensors").exists()


# -- errors: named file, a fix, and ComfyUI keeps serving -------------------------------------
def test_errors_name_the_file_and_the_fix(comfy, quantized, models):
    src = models / "svdq" / DEV4
    corrupt = models / "svdq" / "corrupt.safetensors"
    corrupt.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    msg = run_error(comfy, graph("flux1-dev-svdq",
                                 SVDQuantModelLoader={"model_name": "corrupt.safetensors"}))
    assert "corrupt.safetensors" in msg and "again" in msg, msg

    msg = run_error(comfy, graph("flux1-dev-svdq",
                                 SVDQuantModelLoader={"model_name": "not-a-model.safetensors"}))
    assert "not-a-model.safetensors" in msg and "Fix" in msg, msg

    g = _lora_graph(DEV4, (1.0, 1.0))
    lora_ids = [k for k, n in g.items() if n["class_type"] == "SVDQuantLoRA"]
    g[lora_ids[0]]["inputs"]["lora_name"] = "sdxl-style-lora.safetensors"
    msg = run_error(comfy, g)
    assert "sdxl-style-lora.safetensors" in msg and "another model" in msg and "Fix" in msg, msg
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in msg

    g = graph("flux1-quantize-checkpoint", SVDQuantModelLoader={"model_name": DEV16},
              SVDQuantQuantizeCheckpoint={"output_name": "../escaped"})
    msg = run_error(comfy, g)
    assert "../escaped" in msg and "Fix" in msg, msg
    assert not (models / "escaped.safetensors").exists()

    g = graph("flux1-quantize-checkpoint", SVDQuantModelLoader={"model_name": DEV16},
              SVDQuantQuantizeCheckpoint={"output_name": DEV4[:-len(".safetensors")]})
    before = (models / "svdq" / DEV4).stat().st_mtime_ns
    msg = run_error(comfy, g)
    assert DEV4 in msg and "overwrite" in msg, msg
    assert (models / "svdq" / DEV4).stat().st_mtime_ns == before

    g = graph("flux1-quantize-checkpoint", SVDQuantModelLoader={"model_name": DEV4},
              SVDQuantQuantizeCheckpoint={"output_name": "twice"})
    msg = run_error(comfy, g)
    assert "already a 4-bit" in msg and "Fix" in msg, msg

    # the server is still fine: a following prompt succeeds
    entry = run_ok(comfy, graph("flux1-dev-svdq", SVDQuantModelLoader={"model_name": DEV4},
                                KSampler={"seed": 7}))
    assert comfy.output_files(entry)
