"""The fused scoring op GGML_OP_KV_SCORES (native/ggml/src/ggml-cpu/kv-scores.cpp): its CPU kernel against
the composed ggml graph it replaces, through our check native/tests/test-kv-scores.cpp (built with the tools)."""

from __future__ import annotations

import subprocess

from conftest import require_tools


def test_fused_scores_equal_the_composed_graph_on_cpu():
    exe = require_tools("test-kv-scores", trees=("patched",))[("test-kv-scores", "patched")]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    last = run.stdout.strip().splitlines()[-1]
    n_ok, n_all = map(int, last.split()[0].split("/"))
    assert n_ok == n_all >= 90, last
