"""svdq.build: its cache key and its choice of linker flags (CPU only: no CUDA needed to decide or
to link)."""
import ctypes
import os
import shutil
import stat
import subprocess
import sys

import pytest

from svdq import build

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF toolchains only")


def _fake_cxx(tmp_path, answer: str) -> str:
    """A compiler that answers -print-file-name the way a given toolchain does."""
    exe = tmp_path / "fake-c++"
    exe.write_text(f"#!/bin/sh\necho '{answer}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


@linux_only
@pytest.mark.parametrize("answer,flags", [
    ("libstdc++.so", ("-l:libstdc++.so.6",)),            # no development library: name the runtime
    ("/usr/lib/gcc/x86_64-linux-gnu/13/libstdc++.so", ()),  # a full toolchain: nothing to add
])
def test_link_flags_follow_the_toolchain(tmp_path, monkeypatch, answer, flags):
    monkeypatch.setenv("CXX", _fake_cxx(tmp_path, answer))
    build._link_flags.cache_clear()
    try:
        assert build._link_flags() == flags
    finally:
        build._link_flags.cache_clear()


@linux_only
@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_runtime_libstdcxx_flag_links_and_formats_numbers(tmp_path):
    """The flag the fix adds is accepted by a real linker and the result formats numbers through
    the process's libstdc++ (what crashed on the H200 host with a static copy)."""
    src = tmp_path / "fmt.cpp"
    src.write_text('#include <sstream>\n#include <cstring>\n'
                   'extern "C" int fmt(long v, char* out) {\n'
                   '  std::ostringstream s; s << "K=" << v; std::strcpy(out, s.str().c_str());\n'
                   '  return (int)s.str().size(); }\n')
    so = tmp_path / "libfmt.so"
    subprocess.run(["c++", "-shared", "-fPIC", str(src), "-o", str(so), "-l:libstdc++.so.6"],
                   check=True, capture_output=True)
    needed = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert "libstdc++.so.6" in needed
    lib = ctypes.CDLL(str(so))
    buf = ctypes.create_string_buffer(64)
    v = 3072 + 64 * (tmp_path.stat().st_ino % 97)
    assert lib.fmt(ctypes.c_long(v), buf) == len(f"K={v}")
    assert buf.value.decode() == f"K={v}"


def _fake_pip_cuda(tmp_path, monkeypatch):
    """A site-packages `nvidia` namespace laid out like the CUDA 13 wheels: nvidia/cu13/{bin,
    include, lib}, with only the versioned libcudart."""
    import types
    root = tmp_path / "nvidia"
    for d in ("cu13/bin", "cu13/include", "cu13/lib", "cudnn/include"):
        (root / d).mkdir(parents=True)
    (root / "cu13/bin/nvcc").write_text("#!/bin/sh\n")
    (root / "cu13/lib/libcudart.so.13").write_bytes(b"\x7fELF")
    ns = types.ModuleType("nvidia")
    ns.__path__ = [str(root)]
    monkeypatch.setitem(sys.modules, "nvidia", ns)
    return root


@linux_only
def test_pip_toolchain_is_found_and_wired(tmp_path, monkeypatch):
    from torch.utils import cpp_extension
    root = _fake_pip_cuda(tmp_path, monkeypatch)
    monkeypatch.setenv("CPATH", "/keep/this")
    monkeypatch.delenv("CUDA_HOME", raising=False)        # restored after the test
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.setattr(build, "_pip_cudart", None)
    home = build._pip_nvcc_home()
    assert home == str(root / "cu13")
    build._use_pip_nvcc(home)
    assert cpp_extension.CUDA_HOME == home and os.environ["CUDA_HOME"] == home
    cpath = os.environ["CPATH"].split(os.pathsep)
    assert cpath == [str(root / "cu13/include"), str(root / "cudnn/include"), "/keep/this"]
    assert build._pip_cudart == root / "cu13/lib/libcudart.so.13"


@pytest.mark.parametrize("cuda,expect", [
    ("12.8", ["no pip package carries nvcc"]),          # nvidia-cuda-nvcc-cu12 has ptxas only
    ("13.0", ['"nvidia-cuda-nvcc==13.0.*"', '"nvidia-nvvm==13.0.*"', '"nvidia-cuda-crt==13.0.*"',
              '"nvidia-cuda-cccl==13.0.*"']),
])
def test_pip_hint_names_packages_that_exist_for_that_cuda(monkeypatch, cuda, expect):
    monkeypatch.setattr(build, "_torch_cuda", lambda: cuda)
    hint = build._pip_nvcc_hint()
    assert all(p in hint for p in expect), hint
    assert "-cu1" not in hint        # nvidia-cuda-nvcc-cu12 has ptxas only, -cu13 is empty


@linux_only
def test_cudart_link_follows_the_runtime(tmp_path):
    """The libcudart.so link in the build folder points at the pip runtime, also when a link from
    an earlier build dangles (the runtime moved) or points elsewhere."""
    old, new = tmp_path / "old" / "libcudart.so.13", tmp_path / "new" / "libcudart.so.13"
    for f in (old, new):
        f.parent.mkdir()
        f.write_bytes(b"\x7fELF")
    bdir = tmp_path / "build"
    bdir.mkdir()
    link = build._cudart_link_dir(bdir, old) / "libcudart.so"
    assert link.resolve() == old.resolve()
    assert build._cudart_link_dir(bdir, old) / "libcudart.so" == link   # kept as it is
    old.unlink()                                                        # dangling now
    build._cudart_link_dir(bdir, new)
    assert link.resolve() == new.resolve() and link.exists()


def test_cache_key_covers_every_kernel_source():
    """A file of csrc/ that the key leaves out could change without a rebuild."""
    on_disk = {p.name for p in build.CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")}
    assert on_disk == set(build.SOURCES) | set(build.HEADERS)
