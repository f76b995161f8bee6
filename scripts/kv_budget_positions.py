"""Dump what a budgeted cache keeps after teacher-forcing a fixed text (for CPU vs CUDA comparisons).

    python scripts/kv_budget_positions.py MODEL OUT.npz [--gpu] [--budget 128] [--granularity head]

The same tokens (tests/data/sample.txt, repeated) are evaluated one ubatch at a time, so both backends
see identical input regardless of sampling; the file holds kv_budget_positions() of every layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--gpu", action="store_true", help="offload every layer (-ngl 99)")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--granularity", choices=["head", "token"], default="head")
    ap.add_argument("--tokens", type=int, default=700)
    args = ap.parse_args()

    # llama_cpp first: importing numpy before the CUDA build of libllama crashed on the GPU machine
    from llama_cpp import Llama
    import numpy as np

    llm = Llama(model_path=args.model, n_ctx=2048, n_batch=64, n_ubatch=64, kv_budget=args.budget,
                kv_window=16, kv_evict_interval=32, kv_granularity=args.granularity,
                n_gpu_layers=99 if args.gpu else 0, verbose=False, seed=1)
    text = (Path(__file__).resolve().parent.parent / "tests" / "data" / "sample.txt").read_text()
    tokens = llm.tokenize((text * 3).encode())[: args.tokens]
    llm.eval(tokens)
    info = llm.kv_budget_info()
    layers = np.stack([llm.kv_budget_positions(il) for il in range(info["n_layer"])])
    np.savez(args.out, positions=layers, n_evictions=info["n_evictions"], n_used=info["n_used"])
    print(f"{args.out}: {info['n_evictions']} evictions, {info['n_used']} cells used, positions {layers.shape}")


if __name__ == "__main__":
    main()
