"""JIT build of the CUDA extension (csrc/), cached per source hash, GPU arch, torch and CUDA.

    python -m svdq.build          # prebuild for the current GPU (install.py calls this)

The build runs through torch.utils.cpp_extension.load with ninja, for the current GPU's
architecture only. The result lives in $SVDQ_CACHE_DIR (default ~/.cache/svdquant) under a key
made of the sources' hash (with the link flags), the arch, the torch version and the CUDA
version, so that any change of these builds afresh and nothing stale is ever loaded. A file
lock keeps two processes (two ComfyUI instances, say) from building at once; the second waits
and then loads the first one's result. A finished build is imported directly, without invoking
ninja again.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("svdq")

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = ("w4a8.cu", "w4a8_sm90.cu", "dequant_w4.cu", "binding.cpp")
HEADERS = ("common.cuh", "launch.cuh", "sm90.cuh")   # hashed with the sources: a header change must rebuild
_module = None
_error: str | None = None
_pip_cudart: Path | None = None   # libcudart.so.N of the pip runtime, when building with pip's nvcc


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why and how to fix it."""


def cache_root() -> Path:
    return Path(os.environ.get("SVDQ_CACHE_DIR") or Path.home() / ".cache" / "svdquant")


def _pip_nvcc_home() -> str | None:
    """CUDA_HOME-like folder of a pip-installed nvcc: nvidia/cu13/bin/nvcc (CUDA 13 wheels; the
    CUDA 12 wheel nvidia/cuda_nvcc has ptxas only, but a local build of it may have nvcc)."""
    try:
        import nvidia  # namespace package shared by NVIDIA's pip wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cuda_nvcc"):
            home = Path(base) / sub
            if (home / "bin" / "nvcc").exists():
                return str(home)
    return None


def _find_cuda_home() -> str:
    """A CUDA toolkit with both nvcc and the runtime headers; tells torch's builder about it."""
    from torch.utils import cpp_extension
    cands = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in cands:
        if home and Path(home, "bin", "nvcc").exists() and \
                Path(home, "include", "cuda_runtime_api.h").exists():
            if home != cpp_extension.CUDA_HOME:
                cpp_extension.CUDA_HOME = home
                os.environ["CUDA_HOME"] = home
            return home
    pip_home = _pip_nvcc_home()
    if pip_home:
        _use_pip_nvcc(pip_home)
        log.info("SVDQuant: using nvcc from the pip package nvidia-cuda-nvcc (%s)", pip_home)
        return pip_home
    raise BuildError(
        "no CUDA compiler (nvcc) found. Install the CUDA toolkit matching torch "
        f"(CUDA {_torch_cuda()}) and set CUDA_HOME{_pip_nvcc_hint()}")


def _use_pip_nvcc(pip_home: str) -> None:
    """Point torch's builder at the pip toolchain. Headers and libcudart come from the
    nvidia-* wheels torch already depends on; the wheels ship only the versioned
    libcudart.so.N, which _compile gives the linker under the name torch asks for (-lcudart)."""
    global _pip_cudart
    import nvidia
    from torch.utils import cpp_extension
    bases = list(nvidia.__path__)
    incs = [i for b in bases for i in sorted(glob.glob(str(Path(b, "*", "include"))))]
    libs = [c for b in bases for c in sorted(glob.glob(str(Path(b, "*", "lib", "libcudart.so.*"))))]
    os.environ["CUDA_HOME"] = pip_home
    os.environ["CPATH"] = os.pathsep.join(incs + [os.environ.get("CPATH", "")]).strip(os.pathsep)
    cpp_extension.CUDA_HOME = pip_home
    _pip_cudart = Path(libs[0]) if libs else None


def _pip_nvcc_hint() -> str:
    """How to get a compiler with pip. From CUDA 13 the compiler, its front end (nvvm), the crt
    headers and CCCL are separate wheels; CUDA 12's nvidia-cuda-nvcc-cu12 holds ptxas but no
    nvcc, so there the toolkit is the only way."""
    cuda = _torch_cuda() or "12"
    if int(cuda.split(".")[0]) < 13:
        return " (for CUDA 12 no pip package carries nvcc)"
    pkgs = " ".join(f'"{p}=={cuda}.*"' for p in
                    ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-cccl"))
    return f"; or `pip install {pkgs}`"


def _torch_cuda() -> str | None:
    import torch
    return torch.version.cuda


@functools.lru_cache(maxsize=None)
def _link_flags() -> tuple[str, ...]:
    """Extra linker flags that keep the process down to one libstdc++.

    A toolchain without the development library libstdc++.so (a runtime-only image, like our
    H200 host's: `c++ -print-file-name=libstdc++.so` answers the bare name) silently links the
    static libstdc++.a into the extension. That second copy never runs its stream initializer
    (GCC 13 moved it into the library), so formatting a number - every error message that names
    a shape - segfaulted the interpreter (bench/NOTES.md, run 64). Naming the runtime library
    links the one libtorch already uses."""
    if not sys.platform.startswith("linux"):
        return ()
    from torch.utils import cpp_extension
    try:
        found = subprocess.run([cpp_extension.get_cxx_compiler(), "-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ()  # no compiler: the build will say so
    return () if os.path.isabs(found) else ("-l:libstdc++.so.6",)


def build_key(device=None) -> tuple[str, str]:
    """(key, arch) for the current GPU: source hash + arch + torch + CUDA versions."""
    import torch
    if not torch.cuda.is_available():
        raise BuildError("CUDA is not available in this torch build or on this machine")
    major, minor = torch.cuda.get_device_capability(device)
    # Hopper builds for sm_90a, whose arch-specific instructions (wgmma) the fast GEMM needs;
    # that code runs on compute capability 9.0 only, which is exactly the GPU we build for.
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(_link_flags()).encode())
    tv = torch.__version__.replace("+", "_")
    key = f"{h.hexdigest()[:16]}-sm{arch}-torch{tv}-cu{torch.version.cuda}"
    return key, arch


def _import_built(path: Path, name: str):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def load(verbose: bool = False):
    """Return the compiled extension module, building it once if needed. Raises BuildError."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise BuildError(_error)
    try:
        _module = _load(verbose)
        return _module
    except BuildError as e:
        _error = str(e)
        raise
    except Exception as e:  # compiler errors etc.: one clear line, the log has the rest
        _error = (f"building the SVDQuant CUDA extension failed ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                  f"rerun `python -m svdq.build --verbose` to see the compiler output")
        raise BuildError(_error) from e


def _load(verbose: bool):
    import torch  # noqa: F401
    from filelock import FileLock
    key, arch = build_key()
    name = "svdq_ext_" + key.split("-")[0]
    bdir = cache_root() / key
    so = bdir / f"{name}.so"
    t0 = time.perf_counter()
    if so.exists():
        mod = _import_built(so, name)
        log.info("SVDQuant: loaded cached CUDA extension %s (%.2f s)", bdir, time.perf_counter() - t0)
        return mod
    bdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(bdir) + ".lock"):
        if so.exists():  # another process built it while we waited
            mod = _import_built(so, name)
            log.info("SVDQuant: loaded CUDA extension built by another process (%s, waited %.1f s)",
                     bdir, time.perf_counter() - t0)
            return mod
        _find_cuda_home()
        from torch.utils import cpp_extension
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError as e:
            raise BuildError("ninja is required to build the CUDA extension: `pip install ninja`") from e
        log.warning("SVDQuant: building the CUDA extension for sm_%s in %s (first use only; "
                    "about a minute)", arch, bdir)
        mod = _compile(bdir, name, arch, verbose)
        dt = time.perf_counter() - t0
        log.warning("SVDQuant: built the CUDA extension in %.1f s", dt)
        (bdir / "build_seconds.txt").write_text(f"{dt:.1f}\n")
        return mod


def _cudart_link_dir(bdir: Path, cudart: Path) -> Path:
    """bdir/pip-cudart holding libcudart.so -> cudart, the name torch's -lcudart looks for. A
    link left by an earlier build may point at a runtime that has moved since (a dangling link:
    exists() is False and symlink_to would fail); it is pointed at this one."""
    link_dir = Path(bdir) / "pip-cudart"
    link_dir.mkdir(exist_ok=True)
    link = link_dir / "libcudart.so"
    if link.is_symlink() and link.resolve() != Path(cudart).resolve():
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(cudart)
    return link_dir


def _compile(bdir: Path, name: str, arch: str, verbose: bool):
    """cpp_extension.load of csrc/ for one architecture into bdir (ninja, no cache logic)."""
    from torch.utils import cpp_extension
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    num = arch.rstrip("a")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{num[:-1]}.{num[-1]}" + arch[len(num):]  # this GPU
    defs = ["-DSVDQ_SM90A"] if arch == "90a" else []
    ldflags = list(_link_flags())
    if _pip_cudart is not None:
        ldflags.append(f"-L{_cudart_link_dir(bdir, _pip_cudart)}")  # -L applies to every -l
    try:
        return cpp_extension.load(
            name=name, sources=[str(CSRC / s) for s in SOURCES], build_directory=str(bdir),
            extra_cflags=["-O3"] + defs, extra_cuda_cflags=["-O3", "-lineinfo"] + defs,
            extra_ldflags=ldflags, verbose=verbose)
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Prebuild the SVDQuant CUDA extension.")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    p.add_argument("--clean", action="store_true", help="delete this key's cached build first")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.clean:
            key, _ = build_key()
            shutil.rmtree(cache_root() / key, ignore_errors=True)
        t0 = time.perf_counter()
        load(verbose=args.verbose)
        print(f"SVDQuant CUDA extension ready ({time.perf_counter() - t0:.1f} s): "
              f"{cache_root() / build_key()[0]}")
        return 0
    except BuildError as e:
        print(f"SVDQuant CUDA extension unavailable: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
