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

from .upstream import PRISTINE_TAG, REPO_ROOT, UpstreamError, VendorPaths, git, log, vendor_paths

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


@dataclass(frozen=True)
class _Copy:
    file: OverlayFile
    source_sha: str
    dest_sha: str | None      # the vendor copy's, None if there is none
    written_sha: str | None   # what set-up last wrote there (the manifest), None if it never did

    @property
    def edited(self) -> bool:
        """Neither what set-up wrote nor the repository's file: edited in place."""
        return (self.dest_sha is not None and self.written_sha is not None
                and self.dest_sha not in (self.written_sha, self.source_sha))


def _scan(paths: VendorPaths, repo_root: Path, manifest: dict[str, str]) -> list[_Copy]:
    """Every overlay file with the hashes of its source and its vendor copy (each file read once)."""
    copies = []
    for f in overlay_files(repo_root):
        dest = paths.sdist_tree / f.dest
        copies.append(_Copy(f, f.sha256, _sha(dest.read_bytes()) if dest.exists() else None, manifest.get(f.dest)))
    return copies


def edited_in_place(paths: VendorPaths | None = None, repo_root: Path = REPO_ROOT) -> list[str]:
    """Copies in the vendor tree whose content is neither what set-up wrote nor the repository's file."""
    paths = paths or vendor_paths()
    return [c.file.dest for c in _scan(paths, repo_root, _read_manifest(paths)) if c.edited]


@dataclass
class OverlayState:
    files: int                 # overlay files in the repository
    outdated: list[str]        # copies missing or older than the repository's file (set-up copies them)
    edited: list[str]          # copies edited in place (set-up refuses to overwrite them)


def state(paths: VendorPaths | None = None, repo_root: Path = REPO_ROOT) -> OverlayState:
    paths = paths or vendor_paths()
    copies = _scan(paths, repo_root, _read_manifest(paths))
    outdated = [c.file.dest for c in copies if not c.edited and c.dest_sha != c.source_sha]
    return OverlayState(len(copies), outdated, [c.file.dest for c in copies if c.edited])


def sync(paths: VendorPaths | None = None, repo_root: Path = REPO_ROOT) -> list[str]:
    """Copy every overlay file whose vendor copy differs; return the destinations written.

    Refuses (OverlayError) to overwrite a copy edited in place, and to place a file over one that
    the pristine upstream tree has (that is an edit of an upstream file: a patch's business).  Copies whose
    source was removed from the repository are removed from the vendor tree.
    """
    paths = paths or vendor_paths()
    manifest = _read_manifest(paths)
    copies = _scan(paths, repo_root, manifest)
    edited = [c.file.dest for c in copies if c.edited]
    if edited:
        raise OverlayError(
            f"the vendor tree's copies of {', '.join(edited)} were edited in place; our own files are edited in "
            f"the repository ({', '.join(sorted(OVERLAYS))}/), and set-up copies them. Move the edit there "
            f"(e.g. `cp vendor/llama-cpp-python/{edited[0]} <its file under native/ or bindings/>`), or delete the "
            f"vendor copy to drop it, then run set-up again.")
    tracked = set(_upstream_files(paths, [c.file.dest for c in copies]))
    clash = [c.file.dest for c in copies if c.file.dest in tracked]
    if clash:
        raise OverlayError(f"{', '.join(clash)} exist in the upstream tree: a file of ours may not replace an upstream "
                           f"file; change upstream files through patches/ instead")

    written = []
    for c in copies:
        if c.dest_sha != c.source_sha:
            dest = paths.sdist_tree / c.file.dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(c.file.source, dest)  # a new mtime: incremental builds recompile it
            written.append(c.file.dest)
        manifest[c.file.dest] = c.source_sha
    current = {c.file.dest for c in copies}
    for stale in sorted(set(manifest) - current):
        (paths.sdist_tree / stale).unlink(missing_ok=True)
        del manifest[stale]
        log(f"removed {stale} (no longer in the repository)")
    _manifest_path(paths).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if written:
        log(f"copied {len(written)} of our {len(copies)} source file(s) into the vendor tree")
    return written


def _upstream_files(paths: VendorPaths, names: list[str]) -> list[str]:
    if not names:
        return []
    out = git(paths.sdist_tree, "ls-tree", "-r", "--name-only", PRISTINE_TAG, "--", *names).stdout
    return [line for line in out.splitlines() if line]
