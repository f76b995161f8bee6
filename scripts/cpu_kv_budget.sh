#!/usr/bin/env bash
# The budgeted KV cache on this machine's CPU: llama-completion (patched tree) generating N tokens
# on the default model with the full cache and with --kv-budget C; prints KV buffer, evictions, speed.
#   scripts/cpu_kv_budget.sh [N=4096] [C=256]      (after scripts/setup.sh --tools)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-4096}"; budget="${2:-256}"
bin="$root/build/tools-cpu/patched/bin/llama-completion"
model="$("$root/.venv/bin/python" -c 'from morphkv_gguf.models import default_model_path as d; print(d())')"
prompt="Write a long story about a lighthouse keeper who records every passing ship in a ledger."
tmp="$(mktemp -d)"
for mode in full "budget$budget"; do
    extra=()
    [ "$mode" != full ] && extra=(--kv-budget "$budget")
    "$bin" -m "$model" -p "$prompt" -n "$n" -c 8192 --temp 0 --ignore-eos -no-cnv -t "$(nproc)" -fa on \
        --simple-io --no-warmup -v "${extra[@]}" > "$tmp/$mode.txt" 2> "$tmp/$mode.log"
    echo "== $mode"
    "$root/scripts/kv_budget_summary.sh" "$tmp/$mode.log" "$tmp/$mode.txt"
done
rm -rf "$tmp"
