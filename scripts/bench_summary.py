#!/usr/bin/env python3
"""Summarise a scripts/gpu_bench.sh run: Markdown table (stock vs patched, ratios) and a PNG plot.

usage: bench_summary.py RUN_DIR [--out results/h100-bench] [--title TEXT]
       bench_summary.py --evictions LOG     (the eviction times of one llama-bench --verbose log)
RUN_DIR holds <shape>-<config>-{tg,pp}.json (llama-bench -o json), .log (its --verbose stderr) and
.mem (nvidia-smi memory.used samples, MiB) per process.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def load(run: Path, name: str) -> list[dict]:
    path = run / f"{name}.json"
    if not path.exists() or not path.read_text().strip():
        return []
    return json.loads(path.read_text())


def peak_mib(run: Path, name: str) -> int | None:
    path = run / f"{name}.mem"
    if not path.exists():
        return None
    vals = [int(x) for x in path.read_text().split() if x.strip().isdigit()]
    return max(vals) if vals else None


def kv_mib(run: Path, name: str) -> float | None:
    """The largest KV buffer llama.cpp reported while the process ran (K + V on one device: CUDA0, CPU, ...)."""
    path = run / f"{name}.log"
    if not path.exists():
        return None
    sizes = [float(m) for m in re.findall(r"llama_kv_cache: +\S+ KV buffer size = +([0-9.]+) MiB", path.read_text())]
    return max(sizes) if sizes else None


def eviction_groups(path: Path) -> dict[str, tuple[int, float, float, float]]:
    """{"N -> C": (count, min, median, max) ms} of the evictions one llama-bench --verbose log holds.
    An eviction between two ubatches of a depth's prompt starts while the GPU still runs the previous one,
    so its time includes that wait; the minimum of a group is close to the eviction alone."""
    if not path.exists():
        return {}
    groups: dict[str, list[float]] = {}
    for n_from, n_to, ms in re.findall(r"eviction \d+: (\d+) -> (\d+) cells .*?, ([0-9.]+) ms", path.read_text()):
        groups.setdefault(f"{n_from} -> {n_to}", []).append(float(ms))
    return {k: (len(v), min(v), sorted(v)[len(v) // 2], max(v)) for k, v in sorted(groups.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--evictions", type=Path, metavar="LOG",
                    help="only print the eviction times of one llama-bench --verbose log, grouped by cells")
    ap.add_argument("--out", type=Path, default=Path("results/h100-bench"))
    ap.add_argument("--title", default=None,
                    help="default: the machine named in RUN_DIR/gpu.txt or machine.txt, then the llama-bench arguments")
    args = ap.parse_args()
    if args.evictions:
        for cells, (n, lo, mid, hi) in eviction_groups(args.evictions).items():
            print(f"evictions {cells} cells: {n}, min {lo:.1f} ms, median {mid:.1f} ms, max {hi:.1f} ms")
        return
    if args.run is None:
        ap.error("RUN_DIR is needed (or --evictions LOG)")
    if args.title is None:
        gpu, machine = (p.read_text().strip() if p.exists() else "" for p in (args.run / "gpu.txt", args.run / "machine.txt"))
        if gpu:
            args.title = f"{gpu.split(',')[0].strip()}, llama-bench -p 0 -n 64 -fa 1 -ngl 99 -r 2, synthetic weights"
        elif machine:
            args.title = f"{machine}, llama-bench -p 0 -n 64 -fa 1 (scripts/cpu_bench.sh)"
        else:
            args.title = "llama-bench -p 0 -n 64 -fa 1"

    shapes = sorted({p.name.split("-stock-tg")[0] for p in args.run.glob("*-stock-tg.json")})
    lines = [f"# {args.title}", ""]
    plot_data = {}
    for shape in shapes:
        # kvbN: the patched tree with kv_budget=N; prev-kvbN: the same with the tree before the newest patches
        # (gpu_bench.sh's "prev" build), for a same-machine A/B of those patches
        configs = ["stock", "patched"] + sorted(
            {p.stem.split("-")[-2] for p in args.run.glob(f"{shape}-kvb*-tg.json")}, key=lambda c: int(c[3:])) + sorted(
            {"prev-" + p.stem.split("-")[-2] for p in args.run.glob(f"{shape}-prev-kvb*-tg.json")}, key=lambda c: int(c[8:]))
        tg = {c: {r["n_depth"]: (r["avg_ts"], r["stddev_ts"]) for r in load(args.run, f"{shape}-{c}-tg")} for c in configs}
        depths = sorted(tg["stock"])
        base = tg["stock"].get(0, (float("nan"), 0))[0]
        lines += [f"## {shape}: decode tokens/s at depth", "",
                  "| depth | " + " | ".join(configs) + " | " + " | ".join(f"{c} / stock d0" for c in configs[2:])
                  + " | patched / stock |",
                  "|---" * (len(configs) + len(configs[2:]) + 2) + "|"]
        for d in depths:
            cells = [f"{tg[c][d][0]:.1f} ± {tg[c][d][1]:.1f}" if d in tg[c] else "-" for c in configs]
            ratios = [f"{tg[c][d][0] / base:.3f}" if d in tg[c] else "-" for c in configs[2:]]
            same = f"{tg['patched'][d][0] / tg['stock'][d][0]:.3f}" if d in tg["patched"] else "-"
            lines.append(f"| {d} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {same} |")
        lines += ["", "| process | KV buffer (MiB, llama.cpp) | peak GPU memory (MiB, nvidia-smi) |", "|---|---|---|"]
        for c in configs:
            lines.append(f"| {c} (tg, depths up to {max(depths)}) | {kv_mib(args.run, f'{shape}-{c}-tg') or '-'} | "
                         f"{peak_mib(args.run, f'{shape}-{c}-tg') or '-'} |")
        ev = {c: eviction_groups(args.run / f"{shape}-{c}-tg.log") for c in configs[2:]}
        if any(ev.values()):
            lines += ["", "| process | evictions (cells) | count | min ms | median ms | max ms |", "|---|---|---|---|---|---|"]
            for c, groups in ev.items():
                for cells, (n, lo, mid, hi) in groups.items():
                    lines.append(f"| {c} (tg) | {cells} | {n} | {lo:.1f} | {mid:.1f} | {hi:.1f} |")
        pp = {name: load(args.run, f"{shape}-{name}-pp") for name in ("stock", "kvb2048")}
        if any(pp.values()):
            lines += ["", "| prefill | tokens | tokens/s | KV buffer (MiB) | peak GPU memory (MiB) |", "|---|---|---|---|---|"]
            for name, rows in pp.items():
                for r in rows:
                    lines.append(f"| {name} | {r['n_prompt']} | {r['avg_ts']:.1f} | {kv_mib(args.run, f'{shape}-{name}-pp') or '-'}"
                                 f" | {peak_mib(args.run, f'{shape}-{name}-pp') or '-'} |")
        lines.append("")
        plot_data[shape] = (depths, {c: [tg[c].get(d, (float("nan"),))[0] for d in depths] for c in configs})

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(plot_data), figsize=(6 * len(plot_data), 4.5), squeeze=False)
    for ax, (shape, (depths, series)) in zip(axes[0], plot_data.items()):
        for c, ys in series.items():
            ax.plot(depths, ys, marker="o", label=c)
        ax.set_xscale("symlog", linthresh=min([d for d in depths if d > 0] or [1]))  # linear up to the first depth
        ax.set_xlabel("depth (tokens already in context)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(shape)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "decode_vs_depth.png", dpi=120)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'decode_vs_depth.png'}")


if __name__ == "__main__":
    main()
