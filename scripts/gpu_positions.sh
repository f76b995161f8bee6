#!/usr/bin/env bash
# CPU vs CUDA: on the GPU machine, build libllama with CUDA from the patched tree and dump what the
# budgeted cache keeps (scripts/kv_budget_positions.py) into $OUT; compare with a CPU dump made here.
#   phase build: needs .gpu/llama-patched.tar.xz .gpu/llama_cpp_py.tar.xz .gpu/model.part.00 .gpu/model.part.01
#   phase run:   needs .gpu/model.part.02 .gpu/model.part.03 .gpu/model.sha256
# (the pieces as scripts/gpu_bench_prepare.sh writes them)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/gpu_model_parts.sh"
work=/tmp/mkvpy
mkdir -p "$work"
case "${1:?usage: gpu_positions.sh build|run}" in
build)
    stage_model_parts "$work"
    mkdir -p "$work/src" "$work/py" && tar -xJf .gpu/llama-patched.tar.xz -C "$work/src" && tar -xJf .gpu/llama_cpp_py.tar.xz -C "$work/py"
    cmake -S "$work/src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF \
        -DGGML_CUDA_FA_QUANTS=f16-f16 > "$OUT/configure.log" 2>&1
    cmake --build "$work/build" --target llama -j 16 > "$OUT/build.log" 2>&1
    tail -2 "$OUT/build.log"
    ;;
run)
    join_model_parts "$work"
    mkdir -p "$work/stub" && echo "class Cache: pass" > "$work/stub/diskcache.py"
    export PYTHONPATH="$work/py:$work/stub" LLAMA_CPP_LIB_PATH="$work/build/bin"
    for g in head token; do
        python3 scripts/kv_budget_positions.py "$work/model.gguf" "$OUT/cuda-$g.npz" --gpu --granularity "$g"
    done
    ;;
esac
