"""The patch chain: applies to a pristine tree, is detected when re-applied, refuses foreign edits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from morphkv_gguf import patches, upstream
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
    assert "0001-llama-morphkv-version-marker.patch" in msg
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
