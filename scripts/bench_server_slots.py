#!/usr/bin/env python3
"""llama-server with N slots, with and without a KV budget: N concurrent requests of the same length, aggregate
generation speed and KV buffer. Usage (from the repository root, after scripts/setup.sh --tools):

    .venv/bin/python scripts/bench_server_slots.py [--slots 4] [--tokens 1200] [--budget 128] [-c 16384] [-t 2]

Prints one line per server (budget, wall time, aggregate tokens/s, mean per-slot tokens/s, KV buffer MiB)."""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llama_server import LlamaServer  # noqa: E402
from morphkv_gguf.build import tool_path  # noqa: E402
from morphkv_gguf.models import default_model_path  # noqa: E402

ANIMALS = ["fox", "whale", "crow", "bear", "otter", "heron", "lynx", "moth"]


def run(server: Path, model: Path, budget: int, args: argparse.Namespace, log: Path) -> str:
    cmd = ["-c", str(args.ctx), "-np", str(args.slots), "-t", str(args.threads), "--no-warmup", "--no-kv-unified",
           "-lv", "4"] + (["--kv-budget", str(budget)] if budget else [])
    with LlamaServer(server, model, log, cmd) as srv:
        prompts = [f"Story {k}: write a long tale about a {ANIMALS[k % len(ANIMALS)]}." for k in range(args.slots)]
        body = {"n_predict": args.tokens, "temperature": 0, "ignore_eos": True}
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.slots) as pool:
            outs = list(pool.map(lambda p: srv.post("/completion", {"prompt": p, **body}), prompts))
        wall = time.monotonic() - t0
        n = sum(o["tokens_predicted"] for o in outs)
        per_slot = sum(o["timings"]["predicted_per_second"] for o in outs) / len(outs)
        return (f"kv_budget {budget or 'off':>4}: {args.slots} x {args.tokens} tokens in {wall:.1f} s, "
                f"{n / wall:.1f} tokens/s aggregate, {per_slot:.1f} tokens/s per slot, KV buffer {srv.kv_buffer_mib():.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1200)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("-c", "--ctx", type=int, default=16384)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    server = tool_path("llama-server", "patched")
    if not server.exists():
        print(f"{server} not built: run scripts/setup.sh --tools", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for budget in (args.budget, 0):
            print(run(server, default_model_path(), budget, args, Path(tmp) / f"server-{budget}.log"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
