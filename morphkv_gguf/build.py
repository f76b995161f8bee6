"""Builds: the patched llama-cpp-python wheel, and llama.cpp's tools from the patched and stock trees.

Standard library only (runs during set-up).  Build trees live under ``build/`` and are reused, so a
second build only recompiles what a patch changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import overlay
from .patches import PATCH_DIR, read_series
from .upstream import REPO_ROOT, SDIST_SHA256, UpstreamError, VendorPaths, log, vendor_paths

BUILD_DIR = REPO_ROOT / "build"
DIST_DIR = REPO_ROOT / "dist"
VARIANTS = ("cpu", "cuda")
TREES = ("patched", "stock")
DEFAULT_TOOL_TARGETS = ("llama-completion", "llama-cli", "llama-bench", "llama-batched-bench", "llama-perplexity",
                        "llama-server")


class BuildError(UpstreamError):
    pass


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise BuildError(f"unknown build variant {variant!r}: accepted values are {', '.join(VARIANTS)}")


def _jobs() -> str:
    return os.environ.get("MORPHKV_JOBS") or str(os.cpu_count() or 2)


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, log_path: Path | None = None) -> None:
    """Run a build command; on failure show the end of its output and stop."""
    log("$ " + " ".join(cmd))
    start = time.monotonic()
    if log_path is None:
        proc = subprocess.run(cmd, cwd=cwd, env=env)
        tail = ""
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as f:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    if proc.returncode != 0:
        raise BuildError(f"build step failed (exit code {proc.returncode}): {' '.join(cmd)}\n{tail}"
                         + (f"\nfull log: {log_path}" if log_path else ""))
    log(f"done in {time.monotonic() - start:.0f} s")


def source_fingerprint(variant: str, cuda_arch: str) -> str:
    """Identifies what a wheel was built from: the sdist, our files, every patch, and the build options."""
    digest = hashlib.sha256()
    digest.update(SDIST_SHA256.encode())
    digest.update(overlay.fingerprint().encode())
    for patch in read_series(PATCH_DIR):
        digest.update(f"{patch.name}:{patch.sha256}\n".encode())
    digest.update(f"{variant}:{cuda_arch}".encode())
    return digest.hexdigest()[:16]


def wheel_cmake_args(variant: str, cuda_arch: str) -> list[str]:
    args = ["-DGGML_NATIVE=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
    if variant == "cuda":
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    return args


def find_wheel(variant: str = "cpu") -> Path | None:
    wheels = sorted((DIST_DIR / variant).glob("llama_cpp_python-*.whl"))
    return wheels[-1] if wheels else None


def build_wheel(variant: str = "cpu", cuda_arch: str = "90", force: bool = False,
                paths: VendorPaths | None = None) -> Path:
    """Build the patched llama-cpp-python wheel into dist/<variant>/ (skipped when up to date)."""
    _check_variant(variant)
    paths = paths or vendor_paths()
    out_dir = DIST_DIR / variant
    stamp = out_dir / ".fingerprint"
    fingerprint = source_fingerprint(variant, cuda_arch)
    existing = find_wheel(variant)
    if not force and existing and stamp.exists() and stamp.read_text().strip() == fingerprint:
        log(f"wheel up to date: {existing}")
        return existing
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("llama_cpp_python-*.whl"):
        old.unlink()
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(wheel_cmake_args(variant, cuda_arch))
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = _jobs()
    build_dir = BUILD_DIR / f"wheel-{variant}"
    log(f"building the {variant} wheel (a first build takes several minutes; log: {build_dir}.log)")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-w", str(out_dir),
          "--config-settings", f"build-dir={build_dir}",
          str(paths.sdist_tree)], env=env, log_path=BUILD_DIR / f"wheel-{variant}.log")
    wheel = find_wheel(variant)
    if wheel is None:
        raise BuildError(f"pip reported success but no wheel is in {out_dir}")
    stamp.write_text(fingerprint + "\n")
    log(f"built {wheel} ({wheel.stat().st_size / 2**20:.1f} MiB)")
    return wheel


def tools_dir(variant: str = "cpu") -> Path:
    return BUILD_DIR / f"tools-{variant}"


def tool_path(name: str, tree: str = "patched", variant: str = "cpu") -> Path:
    """Path of a built llama.cpp tool, e.g. tool_path('llama-completion', 'stock')."""
    if tree not in TREES:
        raise BuildError(f"unknown tree {tree!r}: accepted values are {', '.join(TREES)}")
    return tools_dir(variant) / tree / "bin" / name


def build_tools(variant: str = "cpu", trees: tuple[str, ...] = TREES,
                targets: tuple[str, ...] = DEFAULT_TOOL_TARGETS, cuda_arch: str = "90") -> Path:
    """Build llama.cpp's tools from each tree through the top-level CMakeLists.txt."""
    _check_variant(variant)
    for tree in trees:
        if tree not in TREES:
            raise BuildError(f"unknown tree {tree!r}: accepted values are {', '.join(TREES)}")
    out = tools_dir(variant)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(REPO_ROOT), "-B", str(out), *generator,
                 f"-DMORPHKV_TREES={';'.join(trees)}", f"-DMORPHKV_TOOL_TARGETS={';'.join(targets)}",
                 f"-DMORPHKV_CUDA={'ON' if variant == 'cuda' else 'OFF'}",
                 f"-DMORPHKV_CUDA_ARCHITECTURES={cuda_arch}"]
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=_jobs())
    log(f"building {', '.join(targets)} from the {' and '.join(trees)} tree(s) ({variant}); "
        f"a first build takes a while on few cores (log: {out}.log)")
    _run(configure, env=env, log_path=BUILD_DIR / f"tools-{variant}-configure.log")
    _run(["cmake", "--build", str(out)], env=env, log_path=BUILD_DIR / f"tools-{variant}.log")
    return out
