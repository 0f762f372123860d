"""svdq.build's choice of linker flags (CPU only: no CUDA needed to decide or to link)."""
import ctypes
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
