#!/usr/bin/env bash
# Summarise one llama-completion run of the budgeted KV cache (run with -v so evictions are logged):
#   scripts/kv_budget_summary.sh RUN.log [RUN.txt]
# prints the KV buffer and budget lines, the eviction count and mean time, llama.cpp's eval timings,
# and the words generated when the text output is given.
set -euo pipefail
log="${1:?usage: kv_budget_summary.sh RUN.log [RUN.txt]}"
{ grep -E "KV buffer size|KV budget:" "$log" || true; } | sed 's/^[0-9.]* [A-Z] //' | { grep -v " 0.00 MiB" || true; } | sort -u
echo "evictions: $(grep -c 'budget_evict: eviction' "$log" || true)"
{ grep 'budget_evict: eviction' "$log" || true; } | sed -E 's/.*pos_max = -?[0-9]+, ([0-9.]+) ms.*/\1/' | awk '{s+=$1; n++} END {if (n) printf "mean eviction time: %.3f ms over %d\n", s/n, n}'
{ grep -E "eval time" "$log" || true; } | sed 's/^[0-9.]* [A-Z] //'
if [ $# -ge 2 ]; then
    echo "words generated: $(wc -w < "$2")"
fi
