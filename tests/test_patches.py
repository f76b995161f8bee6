"""The source layout: our files copied into a pristine tree, then the patch series (which edits upstream
files only) applied; re-applying is detected, foreign edits are refused, the series stays a design."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from morphkv_gguf import overlay, patches, upstream
from morphkv_gguf.overlay import OverlayError
from morphkv_gguf.patches import PatchError


@pytest.fixture(scope="module")
def fresh_vendor(tmp_path_factory) -> upstream.VendorPaths:
    """A vendor tree unpacked from the cached, verified sdist into a temporary folder."""
    sdist = upstream.fetch()
    return upstream.unpack(sdist, upstream.vendor_paths(tmp_path_factory.mktemp("vendor")))


@pytest.fixture
def patch_dir(tmp_path) -> Path:
    """A copy of patches/ that a test may change."""
    dst = tmp_path / "patches"
    shutil.copytree(patches.PATCH_DIR, dst)
    return dst


def test_sdist_is_the_pinned_one():
    sdist = upstream.fetch()
    assert upstream.sha256_file(sdist) == upstream.SDIST_SHA256


def test_series_applies_to_pristine_tree_and_reapply_is_detected(fresh_vendor):
    series = patches.read_series()
    assert series, "patches/series lists no patch"
    applied = patches.apply(fresh_vendor)
    assert applied == [p.name for p in series]
    st = patches.state(fresh_vendor)
    assert st.up_to_date and not st.dirty_files
    head = upstream.git(fresh_vendor.sdist_tree, "rev-parse", "HEAD").stdout
    # applying again changes nothing: no doubled hunks, no new commits
    assert patches.apply(fresh_vendor) == []
    assert upstream.git(fresh_vendor.sdist_tree, "rev-parse", "HEAD").stdout == head
    header = (fresh_vendor.llama_cpp / "include" / "llama.h").read_text()
    assert header.count("llama_morphkv_version") == 1
    # the stock tree next to it stays pristine
    assert "llama_morphkv_version" not in (fresh_vendor.stock_llama_cpp / "include" / "llama.h").read_text()


def test_foreign_edit_stops_with_file_and_hunk(fresh_vendor, patch_dir):
    patches.reset(fresh_vendor, discard=True)
    header = fresh_vendor.llama_cpp / "include" / "llama.h"
    text = header.read_text()
    header.write_text(text.replace("    LLAMA_API const char * llama_version(void);",
                                   "    LLAMA_API const char * llama_version(void); // local edit"))
    with pytest.raises(PatchError) as err:
        patches.apply(fresh_vendor, patch_dir)
    msg = str(err.value)
    assert "vendor/llama.cpp/include/llama.h" in msg
    assert "0004-llama-kv-budget-cache.patch" in msg
    assert "patch failed" in msg  # git names the hunk: "patch failed: <file>:<line>"
    assert header.read_text() != text, "the user's edit must survive"
    patches.reset(fresh_vendor, discard=True)
    assert patches.apply(fresh_vendor, patch_dir)


def test_patch_that_no_longer_applies_names_file_and_hunk(fresh_vendor, patch_dir):
    bad = patch_dir / "9999-does-not-apply.patch"
    bad.write_text(
        "diff --git a/vendor/llama.cpp/src/llama.cpp b/vendor/llama.cpp/src/llama.cpp\n"
        "--- a/vendor/llama.cpp/src/llama.cpp\n+++ b/vendor/llama.cpp/src/llama.cpp\n"
        "@@ -1,3 +1,3 @@\n-this line is not in the file\n+replacement\n context that is not there\n"
        " more missing context\n")
    with open(patch_dir / "series", "a") as f:
        f.write(bad.name + "\n")
    with pytest.raises(PatchError) as err:
        patches.apply(fresh_vendor, patch_dir)
    assert "9999-does-not-apply.patch" in str(err.value)
    assert "vendor/llama.cpp/src/llama.cpp" in str(err.value)
    # the patches before it stay applied, and nothing half-applied is left behind
    assert not patches.dirty_files(fresh_vendor)


def test_missing_series_entry_is_named(patch_dir):
    with open(patch_dir / "series", "a") as f:
        f.write("0042-not-there.patch\n")
    with pytest.raises(PatchError, match="0042-not-there.patch does not exist"):
        patches.read_series(patch_dir)


def test_save_new_patch_then_export_recreates_every_file(fresh_vendor, patch_dir):
    patches.reset(fresh_vendor, discard=True)
    patches.apply(fresh_vendor, patch_dir)
    readme = fresh_vendor.llama_cpp / "README.md"
    readme.write_text(readme.read_text() + "\nmorphkv test line\n")
    saved = patches.save("0099-test-note.patch", "test: a note\n\n", fresh_vendor, patch_dir)
    assert "+morphkv test line" in saved.read_text()
    assert (patch_dir / "series").read_text().splitlines()[-1] == "0099-test-note.patch"
    assert patches.state(fresh_vendor, patch_dir).up_to_date
    before = {p.name: p.read_text() for p in patch_dir.glob("*.patch")}
    patches.export(fresh_vendor, patch_dir)
    after = {p.name: p.read_text() for p in patch_dir.glob("*.patch")}
    assert after == before
    # and the repository's own patch files are exactly what the tree re-creates
    for name, text in after.items():
        if name != "0099-test-note.patch":
            assert text == (patches.PATCH_DIR / name).read_text(), name
    # a description edited in a patch file (an earlier patch changed after `git rebase -i`): export keeps
    # it, and re-stamps the commits so that the series still counts as applied
    first = patch_dir / (patch_dir / "series").read_text().splitlines()[0]
    first.write_text("edited description\n\n" + first.read_text())
    assert not patches.state(fresh_vendor, patch_dir).up_to_date
    patches.export(fresh_vendor, patch_dir)
    assert first.read_text().startswith("edited description\n")
    assert patches.state(fresh_vendor, patch_dir).up_to_date


def test_bad_patch_name_is_rejected(fresh_vendor, patch_dir):
    with pytest.raises(PatchError, match="expected NNNN-lowercase-words.patch"):
        patches.save("My Patch.diff", "", fresh_vendor, patch_dir)


# --- our own files (native/, bindings/) -------------------------------------------------------------


def test_our_files_are_copied_and_never_count_as_edits(fresh_vendor, patch_dir):
    patches.reset(fresh_vendor, discard=True)
    patches.apply(fresh_vendor, patch_dir)
    files = overlay.overlay_files()
    dests = {f.dest for f in files}
    assert "vendor/llama.cpp/src/llama-kv-budget.cpp" in dests
    assert "llama_cpp/_kv_budget.py" in dests
    for f in files:
        assert (fresh_vendor.sdist_tree / f.dest).read_bytes() == f.source.read_bytes(), f.dest
    assert overlay.copied(fresh_vendor) == sorted(dests)
    # not unsaved edits, not part of a saved patch (tests/.gitignore's `!*.*` re-includes test-kv-scores.cpp)
    assert patches.dirty_files(fresh_vendor) == []
    with pytest.raises(PatchError, match="nothing to save"):
        patches.save("0099-nothing.patch", "", fresh_vendor, patch_dir)
    st = overlay.state(fresh_vendor)
    assert st.files == len(files) and not st.outdated and not st.edited
    # the stock tree never receives them
    assert not (fresh_vendor.stock_llama_cpp / "src" / "llama-kv-budget.cpp").exists()


def test_copy_edited_in_place_is_never_overwritten(fresh_vendor, patch_dir):
    patches.reset(fresh_vendor, discard=True)
    patches.apply(fresh_vendor, patch_dir)
    copy = fresh_vendor.llama_cpp / "src" / "llama-kv-budget.h"
    original = copy.read_text()
    copy.write_text(original + "// edited in the vendor tree\n")
    assert overlay.state(fresh_vendor).edited == ["vendor/llama.cpp/src/llama-kv-budget.h"]
    with pytest.raises(OverlayError, match="llama-kv-budget.h were edited in place"):
        overlay.sync(fresh_vendor)
    assert copy.read_text().endswith("// edited in the vendor tree\n"), "the edit must survive"
    copy.unlink()  # dropping the copy is the documented way out
    overlay.sync(fresh_vendor)
    assert copy.read_text() == original


def test_removed_file_leaves_the_tree_and_upstream_files_cannot_be_replaced(fresh_vendor, tmp_path):
    patches.reset(fresh_vendor, discard=True)
    root = tmp_path / "repo"
    extra = root / "native" / "src" / "llama-extra.cpp"
    extra.parent.mkdir(parents=True)
    extra.write_text("// ours\n")
    assert overlay.sync(fresh_vendor, root) == ["vendor/llama.cpp/src/llama-extra.cpp"]
    assert (fresh_vendor.llama_cpp / "src" / "llama-extra.cpp").exists()
    extra.unlink()
    overlay.sync(fresh_vendor, root)
    assert not (fresh_vendor.llama_cpp / "src" / "llama-extra.cpp").exists()
    clash = root / "native" / "src" / "llama.cpp"
    clash.write_text("// would hide upstream's file\n")
    with pytest.raises(OverlayError, match="exist in the upstream tree"):
        overlay.sync(fresh_vendor, root)
    patches.reset(fresh_vendor, discard=True)


def test_fingerprint_follows_our_files(tmp_path):
    root = tmp_path / "repo"
    (root / "native" / "src").mkdir(parents=True)
    f = root / "native" / "src" / "a.cpp"
    f.write_text("int a;\n")
    before = overlay.fingerprint(root)
    f.write_text("int b;\n")
    assert overlay.fingerprint(root) != before


# --- the series as a design ------------------------------------------------------------------------


def _diffs(text: str) -> list[tuple[str, list[str]]]:
    """(path, lines) of every file a patch changes."""
    out = []
    for chunk in text.split("diff --git a/")[1:]:
        path = chunk.split(" b/", 1)[0]
        out.append((path, chunk.splitlines()))
    return out


def test_series_is_a_short_themed_set_of_upstream_edits(fresh_vendor):
    series = patches.read_series()
    assert 1 <= len(series) <= 10
    pristine = set(upstream.git(fresh_vendor.sdist_tree, "ls-tree", "-r", "--name-only",
                                upstream.PRISTINE_TAG).stdout.split())
    for patch in series:
        text = (patches.PATCH_DIR / patch.name).read_text()
        description = text[:text.index("diff --git ")].strip().split("\n\n")
        assert len(description) == 2 and description[0] and "\n" not in description[0], \
            f"{patch.name}: expected a subject line and one paragraph"
        assert "new file mode" not in text, f"{patch.name} adds a whole file: keep it under native/ or bindings/"
        for path, _ in _diffs(text):
            assert path in pristine, f"{patch.name} changes {path}, which is not an upstream file"


def test_no_patch_deletes_what_an_earlier_one_added(fresh_vendor):
    pristine_lines: dict[str, set[str]] = {}
    for patch in patches.read_series():
        for path, lines in _diffs((patches.PATCH_DIR / patch.name).read_text()):
            if path not in pristine_lines:
                show = upstream.git(fresh_vendor.sdist_tree, "show", f"{upstream.PRISTINE_TAG}:{path}")
                pristine_lines[path] = set(show.stdout.splitlines())
            removed = [ln[1:] for ln in lines if ln.startswith("-") and not ln.startswith("---")]
            rewritten = [ln for ln in removed if ln not in pristine_lines[path]]
            assert not rewritten, f"{patch.name} deletes lines of {path} that an earlier patch added: {rewritten[:3]}"


def test_rpc_backend_counts_the_new_op(fresh_vendor):
    """ggml-rpc.h asserts the number of ggml ops (a -DGGML_RPC=ON build fails otherwise); its count follows ours."""
    import re

    patches.apply(fresh_vendor)
    ggml_h = (fresh_vendor.llama_cpp / "ggml" / "include" / "ggml.h").read_text()
    body = ggml_h[ggml_h.index("enum ggml_op {"):ggml_h.index("GGML_OP_COUNT,")]
    n_ops = len(re.findall(r"^\s*GGML_OP_\w+\s*(?:=\s*0\s*)?,", body, flags=re.M))
    rpc_h = (fresh_vendor.llama_cpp / "ggml" / "include" / "ggml-rpc.h").read_text()
    assert re.search(r"static_assert\(GGML_OP_COUNT == (\d+)", rpc_h).group(1) == str(n_ops)
    assert "GGML_OP_KV_SCORES" in body
