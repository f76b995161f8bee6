"""Our own source files, kept as plain files in this repository and copied into the vendor tree.

Two folders mirror the places their files take in the upstream source distribution::

    native/     -> vendor/llama.cpp/   (C++/CUDA: the budgeted KV cache, the kv_scores op, its test)
    bindings/   -> ./                  (llama-cpp-python files of ours, e.g. llama_cpp/_kv_budget.py)

:func:`sync` copies them into the vendor tree before the patches are applied (the patches only edit
upstream files: CMake lists, enum entries, hooks).  A manifest in the vendor repository's git folder
records the sha256 of every copy it wrote: :mod:`morphkv_gguf.patches` never counts the copies as
unsaved edits nor saves them into a patch, and a copy that was edited in place is never overwritten
silently (the edit belongs in the repository's file).  The copies are deliberately not git-ignored in
the vendor tree: the wheel build (scikit-build-core) leaves ignored files out of the wheel.

Standard library only (runs during set-up).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .upstream import REPO_ROOT, UpstreamError, VendorPaths, log, vendor_paths

# repository folder -> destination inside the sdist tree
OVERLAYS: dict[str, str] = {
    "native": "vendor/llama.cpp",
    "bindings": "",
}
_MANIFEST = "morphkv-overlay.json"


class OverlayError(UpstreamError):
    """A copy in the vendor tree that was edited in place, or an overlay file that would hide an upstream file."""


@dataclass(frozen=True)
class OverlayFile:
    source: Path  # in the repository
    dest: str     # relative to the sdist tree, '/'-separated

    @property
    def sha256(self) -> str:
        return _sha(self.source.read_bytes())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def overlay_files(repo_root: Path = REPO_ROOT) -> list[OverlayFile]:
    """Every file of native/ and bindings/, with its destination (sorted, caches skipped)."""
    files = []
    for folder, dest_root in OVERLAYS.items():
        base = repo_root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            rel = path.relative_to(base).as_posix()
            files.append(OverlayFile(path, f"{dest_root}/{rel}" if dest_root else rel))
    return files


def fingerprint(repo_root: Path = REPO_ROOT) -> str:
    """One hash of every overlay file's destination and content (part of a build's identity)."""
    digest = hashlib.sha256()
    for f in overlay_files(repo_root):
        digest.update(f"{f.dest}:{f.sha256}\n".encode())
    return digest.hexdigest()


def _manifest_path(paths: VendorPaths) -> Path:
    return paths.sdist_tree / ".git" / _MANIFEST


def _read_manifest(paths: VendorPaths) -> dict[str, str]:
    path = _manifest_path(paths)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def copied(paths: VendorPaths | None = None) -> list[str]:
    """The copies set-up wrote into the vendor tree (paths relative to it)."""
    return sorted(_read_manifest(paths or vendor_paths()))


def edited_in_place(paths: VendorPaths | None = None, repo_root: Path = REPO_ROOT) -> list[str]:
    """Copies in the vendor tree whose content is neither what set-up wrote nor the repository's file."""
    paths = paths or vendor_paths()
    manifest = _read_manifest(paths)
    edited = []
    for f in overlay_files(repo_root):
        dest = paths.sdist_tree / f.dest
        if not dest.exists() or f.dest not in manifest:
            continue
        actual = _sha(dest.read_bytes())
        if actual not in (manifest[f.dest], f.sha256):
            edited.append(f.dest)
    return edited


@dataclass
class OverlayState:
    files: int                 # overlay files in the repository
    outdated: list[str]        # copies missing or older than the repository's file (set-up copies them)
    edited: list[str]          # copies edited in place (set-up refuses to overwrite them)


def state(paths: VendorPaths | None = None, repo_root: Path = REPO_ROOT) -> OverlayState:
    paths = paths or vendor_paths()
    files = overlay_files(repo_root)
    edited = edited_in_place(paths, repo_root)
    outdated = [f.dest for f in files if f.dest not in edited and (
        not (paths.sdist_tree / f.dest).exists() or _sha((paths.sdist_tree / f.dest).read_bytes()) != f.sha256)]
    return OverlayState(len(files), outdated, edited)


def sync(paths: VendorPaths | None = None, repo_root: Path = REPO_ROOT) -> list[str]:
    """Copy every overlay file whose vendor copy differs; return the destinations written.

    Refuses (OverlayError) to overwrite a copy edited in place, and to place a file over one that
    the pristine upstream tree has (that is an edit of an upstream file: a patch's business).  Copies whose
    source was removed from the repository are removed from the vendor tree.
    """
    paths = paths or vendor_paths()
    files = overlay_files(repo_root)
    edited = edited_in_place(paths, repo_root)
    if edited:
        raise OverlayError(
            f"the vendor tree's copies of {', '.join(edited)} were edited in place; our own files are edited in "
            f"the repository ({', '.join(sorted(OVERLAYS))}/), and set-up copies them. Move the edit there "
            f"(e.g. `cp vendor/llama-cpp-python/{edited[0]} <its file under native/ or bindings/>`), or delete the "
            f"vendor copy to drop it, then run set-up again.")
    tracked = set(_upstream_files(paths, [f.dest for f in files]))
    clash = [f.dest for f in files if f.dest in tracked]
    if clash:
        raise OverlayError(f"{', '.join(clash)} exist in the upstream tree: a file of ours may not replace an upstream "
                           f"file; change upstream files through patches/ instead")

    manifest = _read_manifest(paths)
    written = []
    for f in files:
        dest = paths.sdist_tree / f.dest
        sha = f.sha256
        if not dest.exists() or _sha(dest.read_bytes()) != sha:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.source, dest)  # a new mtime: incremental builds recompile it
            written.append(f.dest)
        manifest[f.dest] = sha
    current = {f.dest for f in files}
    for stale in sorted(set(manifest) - current):
        (paths.sdist_tree / stale).unlink(missing_ok=True)
        del manifest[stale]
        log(f"removed {stale} (no longer in the repository)")
    _manifest_path(paths).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if written:
        log(f"copied {len(written)} of our {len(files)} source file(s) into the vendor tree")
    return written


def _upstream_files(paths: VendorPaths, names: list[str]) -> list[str]:
    from .upstream import PRISTINE_TAG, git

    if not names:
        return []
    out = git(paths.sdist_tree, "ls-tree", "-r", "--name-only", PRISTINE_TAG, "--", *names).stdout
    return [line for line in out.splitlines() if line]
