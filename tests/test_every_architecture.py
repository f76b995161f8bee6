"""Every architecture llama.cpp knows, with a KV budget: native/tests/test-kv-budget-archs.cpp (beside upstream's
test-llama-archs, on its tiny random model of each architecture) budgets each one (below the budget the logits equal
the full cache's; over 4x the budget the cells stay constant) or sees it refused with a message. The packaged table
that `morphkv inspect` reads, and docs/architectures.md, must say what it finds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import pytest

from conftest import require_tools
from morphkv_gguf.gguf_info import (BUDGET_ACCEPTED, architectures_markdown, budget_support, read_architectures_table,
                                    read_model_shape)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
REGENERATE = ("build/tools-cpu/patched/bin/test-kv-budget-archs > morphkv_gguf/data/kv_budget_architectures.tsv && "
              "python scripts/architectures_doc.py")


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    exe = require_tools("test-kv-budget-archs", trees=("patched",))[("test-kv-budget-archs", "patched")]
    out = tmp_path_factory.mktemp("arch-models")
    proc = subprocess.run([str(exe), "-o", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_architectures_table(proc.stdout), out


def test_every_architecture_is_budgeted_or_refused_with_a_reason(found):
    rows, _ = found
    assert {r.verdict for r in rows.values()} <= {"budget", "refused", "untested"}
    for arch in ("llama", "qwen2", "qwen3", "mistral3", "phi3", "granite", "gemma2", "gemma3", "cohere2", "gpt-oss",
                 "llama4"):
        assert rows[arch].verdict == "budget", rows[arch]
    for arch, words in [("mamba", "recurrent"), ("jamba", "hybrid"), ("deepseek2", "latent attention"),
                        ("mpt", "ALiBi"), ("qwen2vl", "M-RoPE"),
                        ("grok", "flash attention"), ("dream", "no KV cache")]:
        assert rows[arch].verdict == "refused" and words in rows[arch].detail, rows[arch]
        assert f"({BUDGET_ACCEPTED})" in rows[arch].detail  # inspect names what is supported as llama.cpp does
    # the iSWA models budget their full-attention layers only (half of the fixture's layers at most)
    assert "budgeted layers" in rows["gemma3"].detail


def test_the_packaged_table_is_what_the_test_finds(found):
    rows, _ = found

    def key(table):  # the budget's figures (evictions, NMSE) are informative, the verdicts and reasons are the contract
        return {a: (r.config, r.verdict, "" if r.verdict == "budget" else r.detail) for a, r in table.items()}

    assert key(read_architectures_table()) == key(rows), f"stale table: regenerate it with `{REGENERATE}`"


def test_inspect_agrees_with_the_test_on_every_fixture_model(found):
    rows, models = found
    checked = dropped_pattern = 0
    for path in sorted(models.glob("*.gguf")):
        shape = read_model_shape(path)
        ok, reason = budget_support(shape)
        if not ok and "every layer uses sliding-window attention" in reason:
            # llama.cpp's GGUF writer drops the fixture's layer pattern: the file falls back to the architecture's
            # default, under which both of its layers are sliding-window ones (llama.cpp bounds that cache itself)
            assert rows[shape.architecture].verdict == "budget" and len(shape.swa_layers) == 2
            assert f"{shape.architecture}.attention.sliding_window_pattern" not in gguf.GGUFReader(path).fields
            dropped_pattern += 1
            continue
        assert ok == (rows[shape.architecture].verdict == "budget"), (shape.architecture, reason)
        assert shape.architecture in reason
        checked += 1
    assert checked + dropped_pattern >= sum(r.verdict != "untested" for r in rows.values())
    assert dropped_pattern <= 5


def test_the_docs_table_is_the_packaged_one():
    assert architectures_markdown() in DOCS.read_text(), f"stale docs/architectures.md: run `{REGENERATE}`"
