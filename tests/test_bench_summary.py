"""scripts/bench_summary.py: the stock-vs-patched table of a scripts/gpu_bench.sh run, on a made-up run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import load_script


def _tg(path: Path, speeds: dict[int, float]) -> None:
    path.write_text(json.dumps([{"n_depth": d, "avg_ts": v, "stddev_ts": 0.5} for d, v in speeds.items()]))


def test_table_ratios_memory_and_eviction_groups(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _tg(run / "m-stock-tg.json", {0: 100.0, 4096: 80.0})
    _tg(run / "m-patched-tg.json", {0: 99.0, 4096: 84.0})
    _tg(run / "m-kvb2048-tg.json", {0: 100.0, 4096: 96.0})
    _tg(run / "m-prev-kvb2048-tg.json", {0: 100.0, 4096: 94.0})  # the build before the newest patches
    (run / "m-stock-tg.log").write_text("llama_kv_cache:      CUDA0 KV buffer size =    32.00 MiB\n"
                                        "llama_kv_cache:      CUDA0 KV buffer size =  2048.00 MiB\n")
    (run / "m-stock-tg.mem").write_text("100\n3000\n250\n")
    (run / "m-kvb2048-tg.log").write_text(
        "budget_evict: eviction 1: 2560 -> 2048 cells (32 protected), pos_max = 2559, 30.000 ms\n"
        "budget_evict: eviction 2: 2560 -> 2048 cells (32 protected), pos_max = 3071, 10.000 ms\n"
        "budget_evict: eviction 3: 2560 -> 2048 cells (32 protected), pos_max = 3583, 20.000 ms\n"
        "budget_evict: eviction 4: 2112 -> 2048 cells (32 protected), pos_max = 4159, 8.500 ms\n")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["bench_summary.py", str(run), "--out", str(out), "--title", "T"])
    load_script("bench_summary").main()

    table = (out / "table.md").read_text()
    assert "| depth | stock | patched | kvb2048 | prev-kvb2048 | kvb2048 / stock d0 | prev-kvb2048 / stock d0 |" in table
    assert "| 4096 | 80.0 ± 0.5 | 84.0 ± 0.5 | 96.0 ± 0.5 | 94.0 ± 0.5 | 0.960 | 0.940 | 1.050 |" in table
    assert "| stock (tg, depths up to 4096) | 2048.0 | 3000 |" in table
    # evictions grouped by size: count, min, median, max
    assert "| kvb2048 (tg) | 2112 -> 2048 | 1 | 8.5 | 8.5 | 8.5 |" in table
    assert "| kvb2048 (tg) | 2560 -> 2048 | 3 | 10.0 | 20.0 | 30.0 |" in table


def test_evictions_of_one_log(tmp_path, monkeypatch, capsys):
    log = tmp_path / "ab.log"
    log.write_text("budget_evict: eviction 1: 2560 -> 2048 cells (32 protected), pos_max = 2559, 30.000 ms\n"
                   "budget_evict: eviction 2: 2112 -> 2048 cells (32 protected), pos_max = 2623, 6.000 ms\n"
                   "budget_evict: eviction 3: 2112 -> 2048 cells (32 protected), pos_max = 2687, 4.000 ms\n")
    monkeypatch.setattr(sys, "argv", ["bench_summary.py", "--evictions", str(log)])
    load_script("bench_summary").main()
    out = capsys.readouterr().out.splitlines()
    assert out == ["evictions 2112 -> 2048 cells: 2, min 4.0 ms, median 6.0 ms, max 6.0 ms",
                   "evictions 2560 -> 2048 cells: 1, min 30.0 ms, median 30.0 ms, max 30.0 ms"]
