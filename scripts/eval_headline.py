#!/usr/bin/env python3
"""Headline table of `morphkv eval` runs on the same prompts: the baselines of one run and MorphKV
tuned on the dev split (one policy spec per budget, from other runs), with per-prompt wins.

    scripts/eval_headline.py MAIN.json --tuned 64=morphkv-max --tuned 128=morphkv-max:window=64 \
        --tuned 256=morphkv-max:window=128 --tuned 512=morphkv-max:window=256 EXTRA.json ...
"""
from __future__ import annotations

import argparse
import sys

from morphkv_gguf.evaluation import load_results


def load_runs(paths: list[str]) -> tuple[dict, list[str]]:
    """(prompt id, policy, budget) -> run; every file must hold the same prompts and the same full cache."""
    runs: dict = {}
    prompts: list[str] | None = None
    nll_full: dict = {}
    for path in paths:
        doc = load_results(path)
        ids = [p["id"] for p in doc["prompts"]]
        if prompts is None:
            prompts = ids
        elif set(ids) != set(prompts):
            sys.exit(f"{path}: other prompts than {paths[0]}")
        for p in doc["prompts"]:
            for r in p["runs"]:
                if r["policy"] == "full":
                    # the full cache is the reference of every file: its NLL must agree
                    prev = nll_full.setdefault(p["id"], r["nll"])
                    if abs(prev - r["nll"]) > 1e-9:
                        sys.exit(f"{path}: full-cache NLL of {p['id']} differs from {paths[0]} (other references?)")
                runs[(p["id"], r["policy"], r["budget"])] = r
    return runs, prompts or []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="eval.json or eval.json.gz files (the first holds the baselines)")
    ap.add_argument("--tuned", action="append", default=[], metavar="C=SPEC",
                    help="the dev-selected policy spec at budget C")
    ap.add_argument("--baselines", default="morphkv,streaming,h2o,snapkv")
    a = ap.parse_args()
    runs, prompts = load_runs(a.files)
    tuned = {}
    for t in a.tuned:
        c, _, spec = t.partition("=")
        tuned[int(c)] = spec
    base = a.baselines.split(",")
    budgets = sorted({b for (_, _, b) in runs if b is not None})
    mean = lambda pol, b, key: sum(runs[(p, pol, b)][key] for p in prompts) / len(prompts)
    cols = (["morphkv tuned"] if tuned else []) + base
    print("| C | " + " | ".join(f"{c} KL" for c in cols) + " | tuned wins vs streaming | tuned NLL ratio | streaming NLL ratio |")
    print("|---:|" + "---:|" * (len(cols) + 3))
    for b in budgets:
        cells = []
        if tuned:
            spec = tuned.get(b)
            cells.append(f"**{mean(spec, b, 'kl'):.4f}** ({spec})" if spec else "-")
        for pol in base:
            cells.append(f"{mean(pol, b, 'kl'):.4f}" if all((p, pol, b) in runs for p in prompts) else "-")
        if tuned and b in tuned:
            wins = sum(runs[(p, tuned[b], b)]["kl"] < runs[(p, "streaming", b)]["kl"] for p in prompts)
            extra = [f"{wins}/{len(prompts)}", f"{mean(tuned[b], b, 'nll_ratio'):.3f}",
                     f"{mean('streaming', b, 'nll_ratio'):.3f}"]
        else:
            extra = ["-", "-", "-"]
        print(f"| {b} | " + " | ".join(cells + extra) + " |")


if __name__ == "__main__":
    main()
