"""Our changes to the pinned upstream tree, kept as an ordered series of patch files.

``patches/series`` lists the patch files in the order they apply.  Each applied patch is one
commit on top of the ``pristine`` tag in ``vendor/llama-cpp-python`` (see
:mod:`morphkv_gguf.upstream`), whose message records the patch's name and sha256.  That makes
every question cheap and exact:

* *already patched?*  the commits after ``pristine`` name the series' patches with the same hashes;
* *foreign edits?*    ``git status`` of the vendor tree is not clean;
* *save work*         the diff of the working tree becomes a patch file (new, or the last one amended);
* *re-create*         every patch file can be written again from its commit (``export``).

The patches edit upstream files only.  Our own files (``native/``, ``bindings/``) are copied into the
tree by :func:`morphkv_gguf.overlay.sync`, which :func:`apply` runs first; the copies (listed in
its manifest) never count as unsaved edits and never enter a saved patch.

Paths inside patch files are relative to the sdist root (``vendor/llama.cpp/src/...`` for
llama.cpp, ``llama_cpp/...`` for the Python bindings).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import overlay
from .upstream import PRISTINE_TAG, REPO_ROOT, UpstreamError, VendorPaths, git, log, vendor_paths

PATCH_DIR = REPO_ROOT / "patches"
SERIES_FILE = "series"
_TRAILER = "morphkv-patch-sha256:"
_NAME_RE = re.compile(r"^[0-9]{4}-[a-z0-9][a-z0-9-]*\.patch$")


class PatchError(UpstreamError):
    """A patch that does not apply, or a vendor tree whose state would be lost by patching."""


@dataclass(frozen=True)
class Patch:
    name: str
    sha256: str


@dataclass
class PatchState:
    series: list[Patch]
    applied: list[Patch]
    dirty_files: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.applied == self.series

    @property
    def is_prefix(self) -> bool:
        return self.series[: len(self.applied)] == self.applied

    @property
    def pending(self) -> list[Patch]:
        return self.series[len(self.applied):] if self.is_prefix else list(self.series)


def _sha(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


def _commit_message(name: str, sha: str) -> str:
    """The message of the vendor commit that holds patch ``name`` (its trailer is what `status` compares)."""
    return f"{name}\n\n{_TRAILER} {sha}"


def read_series(patch_dir: Path = PATCH_DIR) -> list[Patch]:
    series_path = patch_dir / SERIES_FILE
    if not series_path.exists():
        raise PatchError(f"{series_path} is missing: it lists the patch files in the order they apply")
    patches = []
    for line_no, raw in enumerate(series_path.read_text().splitlines(), 1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        path = patch_dir / name
        if not path.exists():
            raise PatchError(f"{series_path}:{line_no}: {name} does not exist in {patch_dir}")
        patches.append(Patch(name, _sha(path.read_bytes())))
    return patches


def applied_patches(paths: VendorPaths) -> list[Patch]:
    out = git(paths.sdist_tree, "log", "--reverse", "--format=%s%x00%b%x01", f"{PRISTINE_TAG}..HEAD").stdout
    patches = []
    for entry in out.split("\x01"):
        entry = entry.strip("\n")
        if not entry:
            continue
        subject, _, body = entry.partition("\x00")
        sha = ""
        for line in body.splitlines():
            if line.startswith(_TRAILER):
                sha = line[len(_TRAILER):].strip()
        patches.append(Patch(subject.strip(), sha))
    return patches


def dirty_files(paths: VendorPaths) -> list[str]:
    """Edits of the vendor tree beyond the series (our files' copies are not edits)."""
    out = git(paths.sdist_tree, "status", "--porcelain", "--untracked-files=all").stdout
    ours = set(overlay.copied(paths))
    return [line[3:] for line in out.splitlines() if line.strip() and line[3:] not in ours]


def state(paths: VendorPaths | None = None, patch_dir: Path = PATCH_DIR) -> PatchState:
    paths = paths or vendor_paths()
    return PatchState(read_series(patch_dir), applied_patches(paths), dirty_files(paths))


def _check_patch(paths: VendorPaths, patch_path: Path) -> str | None:
    """None if the patch applies to the working tree, else git's words naming file and hunk."""
    proc = git(paths.sdist_tree, "apply", "--check", "--verbose", str(patch_path), check=False)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr + proc.stdout).splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]  # "error: patch failed: FILE:LINE" names the hunk
    return "\n".join(errors[:8] or lines[-8:]) or proc.stderr.strip()


def apply(paths: VendorPaths | None = None, patch_dir: Path = PATCH_DIR) -> list[str]:
    """Bring the vendor tree to our files plus exactly the patch series; return the patch names newly applied.

    Idempotent: an up-to-date tree is detected and left as is.  Refuses (PatchError) to touch a
    tree with edits that are not saved as patches, and names the first patch (file and hunk) that
    does not apply.
    """
    paths = paths or vendor_paths()
    st = state(paths, patch_dir)
    if st.up_to_date:
        overlay.sync(paths)
        if st.dirty_files:
            log(f"patches up to date; the vendor tree also has unsaved edits in {len(st.dirty_files)} "
                f"file(s) ({', '.join(st.dirty_files[:5])}): builds include them; "
                f"`morphkv dev patches save NAME` keeps them as a patch")
        else:
            log(f"all {len(st.series)} patches already applied")
        return []
    if st.dirty_files:
        conflicts = []
        for patch in st.pending:
            why = _check_patch(paths, patch_dir / patch.name)
            if why:
                conflicts.append(f"{patch.name}:\n{why}")
        detail = ("\nthe pending patches conflict with them:\n" + "\n".join(conflicts)) if conflicts else ""
        raise PatchError(
            f"the vendor tree {paths.sdist_tree} has edits that are not saved as patches: "
            f"{', '.join(st.dirty_files[:10])}{' ...' if len(st.dirty_files) > 10 else ''}{detail}\n"
            f"Save them with `morphkv dev patches save NAME`, or discard them with "
            f"`morphkv dev patches reset --discard`, then apply again.")
    if not st.is_prefix:
        log("patch series changed: rebuilding the patched tree from pristine")
        git(paths.sdist_tree, "reset", "-q", "--hard", PRISTINE_TAG)
    overlay.sync(paths)
    done = []
    for patch in st.pending:
        patch_path = patch_dir / patch.name
        why = _check_patch(paths, patch_path)
        if why:
            raise PatchError(f"patch {patch.name} does not apply to {paths.sdist_tree}:\n{why}")
        git(paths.sdist_tree, "apply", "--index", "--whitespace=nowarn", str(patch_path))
        git(paths.sdist_tree, "commit", "-q", "--allow-empty", "-m", _commit_message(patch.name, patch.sha256))
        done.append(patch.name)
        log(f"applied {patch.name}")
    return done


def reset(paths: VendorPaths | None = None, discard: bool = False) -> None:
    """Return the vendor tree to pristine, without our files (both come back with :func:`apply`)."""
    paths = paths or vendor_paths()
    dirty = dirty_files(paths)
    if dirty and not discard:
        raise PatchError(f"refusing to reset: unsaved edits in {', '.join(dirty[:10])}; pass --discard to drop them")
    git(paths.sdist_tree, "reset", "-q", "--hard", PRISTINE_TAG)
    git(paths.sdist_tree, "clean", "-q", "-fdx")


def _description(path: Path) -> str:
    """The free text above the first diff in a patch file (kept when the patch is re-written)."""
    if not path.exists():
        return ""
    text = path.read_text()
    idx = text.find("diff --git ")
    return text if idx < 0 else text[:idx]  # a file with no diff yet is all description


def _diff(paths: VendorPaths, a: str, b: str | None) -> str:
    args = ["diff", "--no-color", "--no-ext-diff", "--binary", "-U3", a]
    if b is None:
        args.insert(1, "--cached")
    else:
        args.append(b)
    return git(paths.sdist_tree, *args).stdout


def save(name: str, description: str = "", paths: VendorPaths | None = None,
         patch_dir: Path = PATCH_DIR) -> Path:
    """Save the vendor tree's unsaved edits as patch ``name``.

    If ``name`` is the last applied patch, that patch is amended; otherwise a new patch is
    appended to the series.
    """
    paths = paths or vendor_paths()
    if not _NAME_RE.match(name):
        raise PatchError(f"bad patch name {name!r}: expected NNNN-lowercase-words.patch, e.g. 0003-kv-budget-core.patch")
    st = state(paths, patch_dir)
    if not st.up_to_date:
        raise PatchError("the vendor tree is not at the current patch series; run `morphkv dev patches apply` first")
    if not st.dirty_files:
        raise PatchError("nothing to save: the vendor tree has no edits beyond the patch series")
    amend = bool(st.applied) and st.applied[-1].name == name
    if not amend and any(p.name == name for p in st.series):
        raise PatchError(f"{name} is already in the series and is not the last patch; "
                         f"edit it with `git rebase -i {PRISTINE_TAG}` in {paths.sdist_tree}, then `morphkv dev patches export`")
    # build outputs (llama_cpp/lib, ...) stay out: upstream's .gitignore names them
    # (an upstream .gitignore may re-include a copy of ours, e.g. tests/.gitignore's `!*.*`: name them)
    git(paths.sdist_tree, "add", "-A", "--", ".", *(f":(exclude){d}" for d in overlay.copied(paths)))
    base = "HEAD~1" if amend else "HEAD"
    body = _diff(paths, base, None)
    path = patch_dir / name
    text = (description or _description(path)) + body
    path.write_text(text)
    sha = _sha(text.encode())
    commit_args = ["commit", "-q", "-m", _commit_message(name, sha)]
    if amend:
        commit_args.insert(1, "--amend")
    git(paths.sdist_tree, *commit_args)
    if not amend:
        series_path = patch_dir / SERIES_FILE
        with open(series_path, "a") as f:
            f.write(name + "\n")
    log(f"{'amended' if amend else 'saved new'} patch {path}")
    return path


def export(paths: VendorPaths | None = None, patch_dir: Path = PATCH_DIR) -> list[Path]:
    """Re-write every patch file (and the series) from the vendor tree's commits."""
    paths = paths or vendor_paths()
    if dirty_files(paths):
        raise PatchError("the vendor tree has unsaved edits: save or discard them before exporting")
    revs = git(paths.sdist_tree, "rev-list", "--reverse", f"{PRISTINE_TAG}..HEAD").stdout.split()
    names = [p.name for p in applied_patches(paths)]
    written = []
    for rev, name in zip(revs, names):
        path = patch_dir / name
        path.write_text(_description(path) + _diff(paths, f"{rev}~1", rev))
        written.append(path)
    (patch_dir / SERIES_FILE).write_text("".join(n + "\n" for n in names))
    # the commits' trailers name the sha256 of their patch file, which `status` and `apply` compare:
    # re-stamp them (same trees, new messages) so that an exported series counts as applied
    parent = git(paths.sdist_tree, "rev-parse", PRISTINE_TAG).stdout.strip()
    for rev, path in zip(revs, written):
        tree = git(paths.sdist_tree, "rev-parse", f"{rev}^{{tree}}").stdout.strip()
        message = _commit_message(path.name, _sha(path.read_bytes()))
        parent = git(paths.sdist_tree, "commit-tree", tree, "-p", parent, "-m", message).stdout.strip()
    if written:
        git(paths.sdist_tree, "update-ref", "-m", "morphkv dev patches export", "HEAD", parent)
    log(f"exported {len(written)} patches to {patch_dir}")
    return written
