"""Run by ComfyUI-Manager after cloning: install our requirements with ComfyUI's interpreter,
then try to prebuild the CUDA kernels. Never installs or upgrades torch (the user's build
matches their GPU), and a missing CUDA toolkit never fails the install: the kernels are
built on first use instead, and without CUDA the PyTorch reference path runs.
"""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(path):
    """Lines of requirements.txt, minus comments and anything that would touch torch."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower()
            if name in ("torch", "torchvision", "torchaudio"):
                continue
            out.append(line)
    return out


def main():
    reqs = requirements(os.path.join(HERE, "requirements.txt"))
    if reqs:
        print("[ComfyUI-SVDQuant] installing:", " ".join(reqs), flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", *reqs])
    if not os.path.isfile(os.path.join(HERE, "svdq", "build.py")):
        return 0
    print("[ComfyUI-SVDQuant] prebuilding CUDA kernels (optional)", flush=True)
    try:
        r = subprocess.run([sys.executable, "-m", "svdq.build"], cwd=HERE, timeout=1800)
        if r.returncode != 0:
            print("[ComfyUI-SVDQuant] kernel prebuild skipped (exit %d); they build on first "
                  "use, or the reference path runs" % r.returncode, flush=True)
    except Exception as e:  # no CUDA, no compiler, timeout: never fail the install
        print(f"[ComfyUI-SVDQuant] kernel prebuild skipped ({e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
