#!/usr/bin/env bash
# The budgeted KV cache on the GPU machine (H100, H200), in two phases, each with part of the default model
# (98 MB, in pieces) and the source:
#   phase build: unpack the patched llama.cpp (.gpu/llama-patched.tar.xz), build llama-completion
#                for sm_90, keep the model pieces present (.gpu/model.part.00 .gpu/model.part.01) in /tmp
#   phase run:   needs the others (.gpu/model.part.02 .gpu/model.part.03 .gpu/model.sha256) and join them;
#                llama-completion with -n 4096 on the GPU, full cache and --kv-budget 256; logs and a summary into $OUT
# Prepare here: scripts/gpu_bench_prepare.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/gpu_model_parts.sh"
phase="${1:?usage: gpu_kv_budget.sh build|run}"
work=/tmp/mkv
mkdir -p "$work"
case "$phase" in
build)
    stage_model_parts "$work"
    mkdir -p "$work/src" && tar -xJf .gpu/llama-patched.tar.xz -C "$work/src"
    cmake -S "$work/src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DGGML_CUDA_FA_QUANTS=f16-f16 > "$OUT/configure.log" 2>&1
    cmake --build "$work/build" --target llama-completion -j 16 > "$OUT/build.log" 2>&1
    tail -3 "$OUT/build.log"
    ;;
run)
    join_model_parts "$work"
    bin="$work/build/bin/llama-completion"
    prompt="Write a long story about a lighthouse keeper who records every passing ship in a ledger."
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    for mode in full budget256; do
        extra=()
        [ "$mode" = budget256 ] && extra=(--kv-budget 256)
        "$bin" -m "$work/model.gguf" -p "$prompt" -n 4096 -c 8192 --temp 0 --ignore-eos -no-cnv -ngl 99 \
            -fa on --simple-io --no-warmup -v "${extra[@]}" > "$OUT/$mode.txt" 2> "$OUT/$mode.log" || echo "$mode failed: $?"
        { echo "== $mode"; bash scripts/kv_budget_summary.sh "$OUT/$mode.log" "$OUT/$mode.txt"; } | tee -a "$OUT/summary.txt"
    done
    ;;
*) echo "unknown phase '$phase' (accepted: build, run)" >&2; exit 2 ;;
esac
