"""`import llama_cpp` loads our patched build, and the markers agree everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as native

from morphkv_gguf import MORPHKV_VERSION
from morphkv_gguf.runtime import build_info
from morphkv_gguf.upstream import vendor_paths


def test_python_bindings_are_the_morphkv_build():
    assert llama_cpp.__version__ == f"0.3.36+morphkv.{MORPHKV_VERSION}"


def test_native_library_carries_the_patch_set():
    assert native.llama_morphkv_version().decode() == MORPHKV_VERSION
    assert f"MORPHKV = {MORPHKV_VERSION}" in native.llama_print_system_info().decode()
    info = build_info()
    assert info.patched
    # the library is the one installed with the wheel, not some other libllama on the system
    assert Path(info.library_path).resolve().parent == (Path(llama_cpp.__file__).parent / "lib").resolve()


def test_patch_marker_matches_package_version():
    header = (vendor_paths().llama_cpp / "include" / "llama.h").read_text()
    m = re.search(r'#define LLAMA_MORPHKV_VERSION "([^"]+)"', header)
    assert m and m.group(1) == MORPHKV_VERSION
