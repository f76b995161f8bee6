"""Per-token decode times around decode-time evictions, through the Python bindings (CPU or GPU wheel).

Decodes N single tokens with a budget and prints the median time of an ordinary token, of the token whose
llama_decode ran an eviction (eviction + the graph work around it), and of the token after it: the cost of
an eviction as a user's generation loop sees it, which the eviction's own timer (budget_evict in the log)
does not include all of.

    .venv/bin/python scripts/eviction_token_cost.py --kv-budget 256 --interval 64 --tokens 1500
"""
from __future__ import annotations

import argparse
import statistics
import time

from llama_cpp import Llama

from morphkv_gguf.models import default_model_path


def split_token_times(times_ms: list[float], evictions_after: list[int],
                      evictions_before: int = 0) -> tuple[list[float], list[float], list[float]]:
    """Split per-token decode times into (ordinary, evicting, the token after an evicting one).

    ``evictions_after[i]`` is the budget's eviction count after token i's decode; a token whose decode
    raised it ran an eviction.
    """
    ordinary: list[float] = []
    evicting: list[float] = []
    after: list[float] = []
    previous, previous_evicted = evictions_before, False
    for ms, n in zip(times_ms, evictions_after, strict=True):
        evicted = n != previous
        (evicting if evicted else after if previous_evicted else ordinary).append(ms)
        previous, previous_evicted = n, evicted
    return ordinary, evicting, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--kv-budget", type=int, default=256)
    ap.add_argument("--interval", type=int, default=64, help="eviction interval S (0 = automatic)")
    ap.add_argument("--tokens", type=int, default=1500, help="single-token decodes to time")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    args = ap.parse_args()
    if args.tokens < 1:
        ap.error(f"--tokens must be at least 1, got {args.tokens}")

    try:
        llm = Llama(str(args.model or default_model_path()), n_ctx=args.tokens + 256, kv_budget=args.kv_budget,
                    kv_evict_interval=args.interval or None, flash_attn=True, n_threads=args.threads,
                    n_gpu_layers=args.n_gpu_layers, verbose=False)
    except ValueError as e:  # a bad budget, interval or model file: llama-cpp-python says which
        ap.error(str(e))
    llm.eval(llm.tokenize(b"Write a long story about a robot who learns to paint."))
    evictions_before = llm.kv_budget_info()["n_evictions"]
    times_ms: list[float] = []
    evictions_after: list[int] = []
    for i in range(args.tokens):
        t0 = time.perf_counter()
        llm.eval([1000 + i % 500])  # token ids only need to be valid: the timing does not depend on them
        times_ms.append((time.perf_counter() - t0) * 1e3)
        evictions_after.append(llm.kv_budget_info()["n_evictions"])
    ordinary, evicting, after = split_token_times(times_ms, evictions_after, evictions_before)
    med = statistics.median
    print(f"kv_budget {args.kv_budget}, interval {llm.kv_budget_info()['kv_evict_interval']}, {args.tokens} tokens, "
          f"{len(evicting)} evictions")
    print(f"ordinary token: median {med(ordinary):.3f} ms")
    if evicting:
        print(f"evicting token: median {med(evicting):.3f} ms (+{med(evicting) - med(ordinary):.3f})")
    if after:
        print(f"token after:    median {med(after):.3f} ms (+{med(after) - med(ordinary):.3f})")


if __name__ == "__main__":
    main()
