"""scripts/gpu_bench.sh's run phase with stand-ins for llama-bench and nvidia-smi: every process's files
come back packed in one archive (one file to copy back from the GPU machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_BENCH = """#!/bin/sh
echo '[{"n_depth": 0, "avg_ts": 1.0, "stddev_ts": 0.1}]'
echo 'llama_kv_cache:      CUDA0 KV buffer size =    32.00 MiB' >&2
echo 'llama_kv_cache:      CUDA0 KV buffer size =  4096.00 MiB' >&2
echo 'llama_kv_cache:      CUDA0 KV buffer size =   288.00 MiB' >&2
"""
FAKE_SMI = """#!/bin/sh
echo 100
case "$*" in *-lms*) exec sleep 30 ;; esac  # sampling runs until killed, a query returns
"""


def _run_phase(tmp_path: Path, trees: tuple[str, ...], bench_script: str, **env_extra: str) -> tuple[Path, Path]:
    """Run gpu_bench.sh's run phase with ``bench_script`` as every tree's llama-bench; returns (work, out)."""
    work, out, bin_dir = tmp_path / "work", tmp_path / "out", tmp_path / "bin"
    for tree in trees:
        exe = work / f"build-{tree}" / "bin" / "llama-bench"
        exe.parent.mkdir(parents=True)
        exe.write_text(bench_script)
        exe.chmod(0o755)
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    out.mkdir()
    env = dict(os.environ, OUT=str(out), MORPHKV_BENCH_WORK=str(work), PATH=f"{bin_dir}:{os.environ['PATH']}",
               **env_extra)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "run"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return work, out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_phase_packs_every_process_into_one_archive(tmp_path):
    _, out = _run_phase(tmp_path, ("stock", "patched"), FAKE_BENCH,
                        MORPHKV_BENCH_SHAPES="llama-3.2-1b llama-3.1-8b:q4_0", MORPHKV_BENCH_BUDGETS="1024 2048")

    assert sorted(p.name for p in out.iterdir()) == ["gpu.txt", "run.tgz", "summary.txt"]
    with tarfile.open(out / "run.tgz") as tar:
        names = {Path(n).name for n in tar.getnames() if n != "."}
    expected = {"llama-3.2-1b-stock-tg", "llama-3.2-1b-patched-tg", "llama-3.2-1b-kvb1024-tg", "llama-3.2-1b-kvb2048-tg",
                "llama-3.2-1b-stock-pp", "llama-3.2-1b-kvb2048-pp",
                # quantized weights: stock and the headline budget only
                "llama-3.1-8b-q4_0-stock-tg", "llama-3.1-8b-q4_0-kvb2048-tg"}
    assert names == {f"{p}.{ext}" for p in expected for ext in ("json", "log", "mem")}
    # the largest of a process's KV buffers (one context per depth)
    assert all("KV buffer size =  4096.00 MiB" in line for line in (out / "summary.txt").read_text().splitlines())


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_phase_measures_the_prev_build_with_its_own_libraries(tmp_path):
    """With a "prev" build (the patched tree before its newest patches), the 8B shape also gets kv_budget=2048
    from it, its llama-bench loading the libraries beside it (LD_LIBRARY_PATH before the RUNPATH)."""
    work, out = _run_phase(tmp_path, ("stock", "patched", "prev"), FAKE_BENCH + 'echo "libs: ${LD_LIBRARY_PATH%%:*}" >&2\n',
                           MORPHKV_BENCH_SHAPES="llama-3.2-1b llama-3.1-8b", MORPHKV_BENCH_BUDGETS="2048")
    with tarfile.open(out / "run.tgz") as tar:
        names = {Path(n).name for n in tar.getnames() if n != "."}
        log = tar.extractfile("./llama-3.1-8b-prev-kvb2048-tg.log").read().decode()
    assert "llama-3.1-8b-prev-kvb2048-tg.json" in names
    assert not any(n.startswith("llama-3.2-1b-prev") for n in names)  # MORPHKV_BENCH_PREV_SHAPES: the 8B shape
    assert f"libs: {work / 'build-prev' / 'bin'}" in log


def test_unknown_phase_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "sweep"], capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(tmp_path), MORPHKV_BENCH_WORK=str(tmp_path / "work")), timeout=30)
    assert proc.returncode == 2
    assert "unknown phase 'sweep' (accepted: build, test, eval, kernel, run, batched)" in proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_model_pieces_staged_over_two_phases_join_to_the_checked_model(tmp_path):
    """scripts/gpu_model_parts.sh: pieces present in two phases are joined and checked against model.sha256; a
    missing piece is refused with a message instead of leaving a truncated model."""
    import hashlib

    model = bytes(range(256)) * 41
    (tmp_path / ".gpu").mkdir()
    (tmp_path / ".gpu" / "model.sha256").write_text(hashlib.sha256(model).hexdigest() + "\n")
    pieces = [model[i:i + 2624] for i in range(0, len(model), 2624)]
    assert len(pieces) == 4
    work = tmp_path / "work"
    work.mkdir()
    helper = ROOT / "scripts" / "gpu_model_parts.sh"

    def phase(present: list[int], action: str) -> subprocess.CompletedProcess:
        for p in (tmp_path / ".gpu").glob("model.part.*"):
            p.unlink()
        for i in present:
            (tmp_path / ".gpu" / f"model.part.0{i}").write_bytes(pieces[i])
        return subprocess.run(["bash", "-c", f'. "{helper}"; {action} "{work}"'], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)

    assert phase([0, 1], "stage_model_parts").returncode == 0
    missing = phase([3], "join_model_parts")  # piece 2 never present
    assert missing.returncode == 1 and "do not add up" in missing.stderr
    assert not (work / "model.gguf").exists()
    joined = phase([2, 3], "join_model_parts")
    assert joined.returncode == 0, joined.stderr
    assert (work / "model.gguf").read_bytes() == model


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cpu_bench_runs_stock_patched_and_each_budget_then_summarises(tmp_path):
    """scripts/cpu_bench.sh with stand-in llama-bench binaries: one process per configuration, the KV-buffer
    and eviction lines kept, and bench_summary.py's table with the budget's ratio to stock at depth 0."""
    bins = tmp_path / "bins"
    for tree in ("stock", "patched"):
        exe = bins / tree / "bin" / "llama-bench"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n"
                       "echo '[{\"n_depth\": 0, \"avg_ts\": 100.0, \"stddev_ts\": 1.0},"
                       " {\"n_depth\": 8192, \"avg_ts\": 80.0, \"stddev_ts\": 1.0}]'\n"
                       "echo 'llama_kv_cache:        CPU KV buffer size =    22.50 MiB' >&2\n"
                       "echo 'some other line' >&2\n")
        exe.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    out = tmp_path / "out"
    env = dict(os.environ, MORPHKV_CPU_BENCH_BINS=str(bins), MORPHKV_MODEL=str(model),
               MORPHKV_CPU_BENCH_BUDGETS="256 512")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cpu_bench.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "raw").glob("*.json")) == [
        "m-kvb256-tg.json", "m-kvb512-tg.json", "m-patched-tg.json", "m-stock-tg.json"]
    assert (out / "raw" / "m-kvb512-tg.log").read_text() == "llama_kv_cache:        CPU KV buffer size =    22.50 MiB\n"
    table = (out / "table.md").read_text()
    assert "| 8192 | 80.0 ± 1.0 | 80.0 ± 1.0 | 80.0 ± 1.0 | 80.0 ± 1.0 | 0.800 | 0.800 | 1.000 |" in table
    assert "| kvb512 (tg, depths up to 8192) | 22.5 | - |" in table


def test_cpu_bench_without_tools_says_what_to_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cpu_bench.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, MORPHKV_CPU_BENCH_BINS=str(tmp_path / "none")))
    assert proc.returncode == 2
    assert "llama-bench is missing: run scripts/setup.sh --tools" in proc.stderr
