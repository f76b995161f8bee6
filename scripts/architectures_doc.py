"""Writes docs/architectures.md from the every-architecture table (morphkv_gguf/data/kv_budget_architectures.tsv,
which `build/tools-cpu/patched/bin/test-kv-budget-archs` prints). Run from the repository root."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from morphkv_gguf.gguf_info import architectures_markdown, read_architectures_table  # noqa: E402

INTRO = """# Architectures under a budget

Every architecture the pinned llama.cpp knows, as `test-kv-budget-archs` finds it. That test
(`native/tests/test-kv-budget-archs.cpp`, built with the tools beside upstream's `test-llama-archs`, whose tiny random
model of each architecture it uses) creates a context with `kv_budget=64, kv_window=8, kv_evict_interval=16` on the
CPU and either

* **budgeted**: below the budget the logits equal the full cache's (flash attention, NMSE <= 1e-6), and decoding
  4x the budget keeps the cache's cells constant, evicts, and gives finite logits; or
* **refused**: the context is not created, and llama.cpp's error names the architecture, the reason and what is
  supported (the reason is shown below).

"Not tested" rows have no fixture upstream (encoders, T5, RWKV, Gemma 4, ...); what llama.cpp does with them is
not checked here. For sliding-window (iSWA) models the budget covers the full-attention layers and the
sliding-window layers keep llama.cpp's own bounded cache. `morphkv inspect` reads the same table
(`morphkv_gguf/data/kv_budget_architectures.tsv`), so it says what llama.cpp will do; CI runs the test and checks
that the table, this page and `inspect` agree with it (`tests/test_every_architecture.py`).

Regenerate after a change to the refusals:

```bash
build/tools-cpu/patched/bin/test-kv-budget-archs > morphkv_gguf/data/kv_budget_architectures.tsv
.venv/bin/python scripts/architectures_doc.py
```

"""


def main() -> None:
    table = read_architectures_table()
    counts = Counter(r.verdict for r in table.values())
    summary = (f"{len(table)} architectures: {counts['budget']} budgeted, {counts['refused']} refused, "
               f"{counts['untested']} not tested.\n\n")
    out = Path("docs/architectures.md")
    out.write_text(INTRO + summary + architectures_markdown(table))
    print(f"wrote {out} ({summary.strip()})")


if __name__ == "__main__":
    main()
