#!/usr/bin/env bash
# Stock vs patched llama.cpp on this machine's CPU, the GPU sweep's comparison (scripts/gpu_bench.sh run) for
# the default model: decode tokens/s at depth (llama-bench -d) for stock, patched without a budget and each
# kv_budget, one process each, then scripts/bench_summary.py's table and plot into OUT_DIR.
#   scripts/cpu_bench.sh [OUT_DIR=results/cpu-bench]        (after scripts/setup.sh --tools)
# MORPHKV_CPU_BENCH_DEPTHS ("0,512,2048,8192"), MORPHKV_CPU_BENCH_BUDGETS ("512"), MORPHKV_CPU_BENCH_REPS (2),
# MORPHKV_MODEL (another GGUF), MORPHKV_CPU_BENCH_THREADS (nproc), MORPHKV_CPU_BENCH_BINS (build/tools-cpu).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/results/cpu-bench}"
depths="${MORPHKV_CPU_BENCH_DEPTHS:-0,512,2048,8192}"
budgets="${MORPHKV_CPU_BENCH_BUDGETS:-512}"
reps="${MORPHKV_CPU_BENCH_REPS:-2}"
threads="${MORPHKV_CPU_BENCH_THREADS:-$(nproc)}"
bins="${MORPHKV_CPU_BENCH_BINS:-$root/build/tools-cpu}"  # {stock,patched}/bin/llama-bench
for t in stock patched; do
    [ -x "$bins/$t/bin/llama-bench" ] || { echo "cpu_bench.sh: $bins/$t/bin/llama-bench is missing: run scripts/setup.sh --tools" >&2; exit 2; }
done
model="${MORPHKV_MODEL:-$("$root/.venv/bin/python" -c 'from morphkv_gguf.models import default_model_path as d; print(d())')}"
[ -f "$model" ] || { echo "cpu_bench.sh: no model file '$model'" >&2; exit 2; }
shape="$(basename "$model" .gguf)"
raw="$out/raw"
mkdir -p "$raw"
# the machine, for the summary's title
cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1 || true)"
echo "${cpu:-CPU}, $threads threads" > "$raw/machine.txt"

bench() {  # config tree extra-args...
    local config=$1 tree=$2; shift 2
    local t0=$SECONDS
    echo "[cpu_bench] $shape $config: llama-bench -d $depths -r $reps $*" >&2
    "$bins/$tree/bin/llama-bench" -m "$model" -p 0 -n 64 -d "$depths" -fa 1 -t "$threads" -r "$reps" -o json --verbose "$@" \
        > "$raw/$shape-$config-tg.json" 2> "$raw/$shape-$config-tg.full.log"
    # keep what the summary reads: KV buffers and evictions
    grep -E "KV buffer size|budget_evict" "$raw/$shape-$config-tg.full.log" > "$raw/$shape-$config-tg.log" || true
    rm -f "$raw/$shape-$config-tg.full.log"
    echo "[cpu_bench] $shape $config: $((SECONDS - t0)) s" >&2
}
bench stock stock
bench patched patched
for c in $budgets; do
    bench "kvb$c" patched -kvb "$c"
done
"$root/.venv/bin/python" "$root/scripts/bench_summary.py" "$raw" --out "$out"
