"""--kv-budget in llama.cpp's own tools (patched tree): long generation at a fixed KV buffer, clear refusals."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import require_tools


def _completion(model_path, *args: str) -> subprocess.CompletedProcess:
    tool = require_tools("llama-completion")[("llama-completion", "patched")]
    cmd = [str(tool), "-m", str(model_path), "-p", "Write a long story about a dragon who learns to cook.",
           "--temp", "0", "-no-cnv", "-t", "2", "--simple-io", "--no-warmup", "-v", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_long_generation_with_budget_keeps_the_kv_buffer_fixed(model_path):
    proc = _completion(model_path, "-n", "1024", "--ignore-eos", "-c", "4096", "--kv-budget", "128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = set(re.findall(r"CPU KV buffer size =\s+([0-9.]+) MiB", proc.stderr))
    sizes.discard("0.00")  # the memory-fitting pass allocates nothing
    assert len(sizes) == 1
    evictions = re.findall(r"budget_evict: eviction (\d+): (\d+) -> (\d+) cells", proc.stderr)
    assert len(evictions) >= 10
    assert all(int(after) == 128 for _, _, after in evictions)
    assert len(proc.stdout.split()) > 300, "no long answer"
    # an update that only evicted leaves the worst-case graph as it was: no reserve of it after an eviction
    log = proc.stderr
    assert "graph_reserve: reserving a graph" in log[:log.index("budget_evict: eviction 1:")]
    assert "graph_reserve: reserving a graph" not in log[log.index("budget_evict: eviction 1:"):]


@pytest.mark.parametrize("args, interval, cells", [
    (["--kv-budget", "2048"], "256 tokens (auto)", 2560),                                 # C/8, ubatch 512
    (["--kv-budget", "2048", "--kv-evict-interval", "auto", "-ub", "128"], "128 tokens (auto)", 2304),
    (["--kv-budget", "2048", "--kv-evict-interval", "32"], "32 tokens,", 2560),
])
def test_the_eviction_interval_defaults_to_the_automatic_one(model_path, args, interval, cells):
    proc = _completion(model_path, "-n", "4", "-c", "4096", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"eviction every {interval}" in proc.stderr
    assert f"-> {cells} cells allocated" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--kv-budget", "16", "--kv-window", "32"], "kv_budget (16) must be greater than kv_window (32)"),
    (["--kv-budget", "128", "--kv-fusion", "mean"], "unknown --kv-fusion 'mean' (accepted: sum, max)"),
    (["--kv-budget", "abc"], "--kv-budget expects a whole number, got 'abc'"),
    (["--kv-budget", "128", "--kv-evict-interval", "0"], "--kv-evict-interval must be at least 1"),
    (["--kv-budget", "128", "-fa", "off"], "needs flash attention"),
])
def test_bad_budget_options_are_refused_with_a_message(model_path, args, message):
    proc = _completion(model_path, "-n", "4", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Segmentation fault" not in proc.stderr and "GGML_ASSERT" not in proc.stderr


@pytest.mark.parametrize("shared", [False, True])
def test_batched_bench_measures_several_budgeted_sequences(model_path, shared):
    """llama-batched-bench --kv-budget: 4 sequences with 1024-token prompts (own prompts, or one shared prompt
    copied with seq_cp) and 64 generated tokens each, in 4 caches of the budgeted size; stock's tool the same
    without the option (the figures to compare)."""
    tools = require_tools("llama-batched-bench")
    npl, npp, ntg = 4, 1024, 64
    args = ["-m", str(model_path), "-c", str(npl * (npp + ntg)), "-b", "512", "-ub", "256", "-npp", str(npp),
            "-ntg", str(ntg), "-npl", str(npl), "-t", "2", "--output-format", "jsonl", *(["-pps"] if shared else [])]
    runs = {}
    for tree, extra in (("patched", ["--kv-budget", "128", "-v"]), ("stock", ["-lv", "4"])):
        proc = subprocess.run([str(tools[("llama-batched-bench", tree)]), *args, *extra], capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(rows) == 1, proc.stdout[-1000:]
        runs[tree] = (json.loads(rows[0]), proc.stdout + proc.stderr)
    row, log = runs["patched"]
    assert row["pl"] == npl and row["speed_tg"] > 0
    kv = [float(s) for s in re.findall(r"KV buffer size =\s+([0-9.]+) MiB", log) if float(s) > 0]
    kv_stock = [float(s) for s in re.findall(r"KV buffer size =\s+([0-9.]+) MiB", runs["stock"][1]) if float(s) > 0]
    assert kv and kv_stock and max(kv) <= max(kv_stock) / 2, (kv, kv_stock)
    assert "-> 512 cells allocated per sequence (4 sequences)" in log
    seqs = {int(s) for s in re.findall(r"budget_evict: eviction \d+: .*; seq (\d+)\)", log)}
    assert seqs == set(range(npl)), seqs  # every sequence evicted (a shared prompt: its copies too)
