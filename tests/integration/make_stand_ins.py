"""Write tiny random stand-ins for the text encoder and VAE that stock ComfyUI loaders accept.

Run as a script with the ComfyUI host on the command line; it imports the host's own module
classes only to learn the tensor names and shapes, so the files always match the host version.
    python make_stand_ins.py --host <comfyui> --out <models dir>
Writes text_encoders/random_clip_l.safetensors (a CLIP-L for CLIPLoader type stable_diffusion:
context and pooled width 768) and vae_approx/taef1_{encoder,decoder}.safetensors (VAELoader "taef1").
"""
import argparse
import os
import sys


def _randomise(sd, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        if "norm" in k and k.endswith("weight"):
            t = torch.ones(v.shape)
        elif k.endswith("bias") or "norm" in k:
            t = torch.zeros(v.shape)
        else:
            # small weights keep a 12-layer random transformer finite
            t = torch.randn(v.shape, generator=g) * 0.02
        out[k] = t.to(torch.float16).contiguous()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.host))
    import torch
    from safetensors.torch import save_file
    from comfy.cli_args import args
    args.cpu = True  # the host's device probe must not look for a GPU here
    import comfy.sd1_clip
    import comfy.taesd.taesd as taesd

    te_dir = os.path.join(a.out, "text_encoders")
    va_dir = os.path.join(a.out, "vae_approx")
    os.makedirs(te_dir, exist_ok=True)
    os.makedirs(va_dir, exist_ok=True)

    clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    sd = {k: torch.empty(v.shape) for k, v in clip.transformer.state_dict().items()}
    sd = _randomise(sd, 1)
    save_file(sd, os.path.join(te_dir, "random_clip_l.safetensors"))

    vae = taesd.TAESD(latent_channels=16)
    enc = _randomise(vae.taesd_encoder.state_dict(), 2)
    dec = _randomise(vae.taesd_decoder.state_dict(), 3)
    # random convs decay to a flat image; a larger scale keeps some contrast in the picture
    dec = {k: (v.float() * 5).half() if v.dim() == 4 else v for k, v in dec.items()}
    save_file(enc, os.path.join(va_dir, "taef1_encoder.safetensors"))
    save_file(dec, os.path.join(va_dir, "taef1_decoder.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
