#!/usr/bin/env python3
"""Draw the figures of docs/benchmarks.md from the measured files under results/.

usage: bench_plots.py [--results results] [--out docs/img]

  eviction_split.png   stage timings of one steady eviction (median), from the `budget_evict: eviction N` debug
                       lines of the runs listed in EVICTION_RUNS
  many_sequences.png   llama-batched-bench: aggregate decode speed and KV buffer, stock vs --kv-budget, from the
                       JSON line and the KV buffer line of each log in BATCHED_RUNS

Every figure names its machine, date and commit; the commands are on the results pages the files come from.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

# (label, log file under results/) -- the eviction's own debug line, steady evictions only
EVICTION_RUNS = [
    ("CPU 2-core EPYC, C=512\nbefore (dece716), 2026-12-05", "cpu-eviction-scoring-2026-12-05/evictions-old.log"),
    ("CPU 2-core EPYC, C=512\n86ba0d7, 2026-12-05", "cpu-eviction-scoring-2026-12-05/evictions-new.log"),
    ("H100, 8B F16, C=2048\nfull gather (eb860dc), 2026-12-05", "h100-bench/eviction-moves-ab/ab-kvb2048-prev.log.gz"),
    ("H100, 8B F16, C=2048\nrow moves (799dfa9, not kept)", "h100-bench/eviction-moves-ab/ab-kvb2048.log.gz"),
    ("H200, 8B F16, C=2048, W=32 protected\nbe2b1cb, 2026-12-02", "h200-bench/eviction-layout/ab-kvb2048.evictions.txt"),
]

STAGES = ["inputs", "order", "read-back", "plan", "gather", "moves", "metadata", "wait"]

# (label, log file under results/)
BATCHED_RUNS = [
    ("stock\n32 x 16384", "h200-bench/batched-per-sequence/batched-stock-kvb0-32-x-16384.log"),
    ("--kv-budget 2048\n32 x 16384", "h200-bench/batched-per-sequence/batched-patched-kvb2048-32-x-16384.log"),
    ("--kv-budget 2048\n32 x 131072 (shared)", "h200-bench/batched-per-sequence/batched-patched-kvb2048-32-x-131072-pps.log"),
]

# issue 19's targets for the budgeted runs (2 x stock's measured 1181 tokens/s, <= 11 GiB of KV)
BATCHED_TARGET_TPS = 2360.0
BATCHED_TARGET_KV_GIB = 11.0

EVICT_RE = re.compile(r"budget_evict: eviction (\d+): (\d+) -> (\d+) cells.*?, ([\d.]+) ms \((.*?)\)")


def read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", errors="replace") as f:
            return f.read()
    return path.read_text(errors="replace")


def eviction_stages(path: Path) -> tuple[dict[str, float], int]:
    """Median of every stage over the steady evictions (the most common 'from -> to' cell counts, the first left out)."""
    rows = []
    for m in EVICT_RE.finditer(read_text(path)):
        stages = {k: float(v) for k, v in re.findall(r"([a-z-]+) ([\d.]+)(?: ms)?(?=[,;]|$)", m.group(5))}
        rows.append(((m.group(2), m.group(3)), int(m.group(1)), float(m.group(4)), stages))
    if not rows:
        raise SystemExit(f"bench_plots: no eviction lines in {path}")
    shape = Counter(r[0] for r in rows if r[1] > 1).most_common(1)[0][0]
    steady = [r for r in rows if r[0] == shape and r[1] > 1]
    med = {s: statistics.median(r[3].get(s, 0.0) for r in steady) for s in STAGES}
    med["total"] = statistics.median(r[2] for r in steady)
    return med, len(steady)


def plot_eviction_split(results: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(label, *eviction_stages(results / rel)) for label, rel in EVICTION_RUNS]
    fig, ax = plt.subplots(figsize=(10, 0.9*len(data) + 1.6))
    colors = dict(zip(STAGES, plt.get_cmap("tab10").colors))
    labelled: set[str] = set()
    for i, (label, med, n) in enumerate(data):
        left = 0.0
        for s in STAGES:
            if med[s] > 0.005:
                ax.barh(i, med[s], left=left, color=colors[s], label=None if s in labelled else s)
                labelled.add(s)
                left += med[s]
        ax.text(left + 0.2, i, f"{med['total']:.1f} ms total (median of {n})", va="center", fontsize=8)
    ax.set_yticks(range(len(data)), [d[0] for d in data], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per steady eviction (stages as logged; on a GPU the gather's launch overlaps the metadata)")
    ax.set_title("One eviction, by stage")
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / "eviction_split.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def batched_run(path: Path) -> tuple[float, float]:
    """(aggregate decode tokens/s, KV buffer GiB) of one llama-batched-bench log."""
    text = read_text(path)
    speed = None
    for line in text.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            speed = json.loads(line)["speed_tg"]
    kv = [float(x) for x in re.findall(r"KV buffer size = +([\d.]+) MiB", text)]
    if speed is None or not kv:
        raise SystemExit(f"bench_plots: no llama-batched-bench result or KV buffer line in {path}")
    return speed, sum(kv)/1024


def plot_many_sequences(results: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, *batched_run(results / rel)) for label, rel in BATCHED_RUNS]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(runs))
    for ax, k, ylabel, target in ((a1, 1, "decode tokens/s, all sequences", BATCHED_TARGET_TPS),
                                  (a2, 2, "KV buffer, GiB", BATCHED_TARGET_KV_GIB)):
        bars = ax.bar(x, [r[k] for r in runs], color=["tab:blue", "tab:green", "tab:olive"][:len(runs)])
        ax.bar_label(bars, fmt="%.0f" if k == 1 else "%.1f", fontsize=8)
        ax.axhline(target, color="tab:red", ls="--", lw=1)
        ax.annotate(f"target {'>=' if k == 1 else '<='} {target:g}", (len(runs) - 0.5, target), ha="right",
                    va="bottom", fontsize=8, color="tab:red")
        ax.set_xticks(list(x), [r[0] for r in runs], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("32 sequences, 128 tokens generated each, 8B F16 shape (H200, 2026-12-04, commit db60a22)", fontsize=10)
    fig.tight_layout()
    path = out / "many_sequences.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--results", type=Path, default=root / "results", help="the results folder")
    ap.add_argument("--out", type=Path, default=root / "docs" / "img", help="where the PNGs go")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (plot_eviction_split(args.results, args.out), plot_many_sequences(args.results, args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
