#!/usr/bin/env bash
# Pack what scripts/gpu_bench.sh needs on the GPU machine into .gpu/ (git-excluded): the patched and
# the stock llama.cpp trees, only the parts a CUDA build of llama-bench reads, plus gguf-py for
# `morphkv gguf synth` (the GPU machine has no gguf package), the Python bindings and the default model.
# MORPHKV_PREV=NNNN (e.g. 0017) adds the files for a "prev" build: the patched tree as it was after patch NNNN.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$root/.gpu"
grep -qx ".gpu/" "$root/.git/info/exclude" 2>/dev/null || { mkdir -p "$root/.git/info"; echo ".gpu/" >> "$root/.git/info/exclude"; }
pack() {  # tree-dir out
    tar -C "$1" -cJf "$2" --exclude='ggml/src/ggml-vulkan' --exclude='ggml/src/ggml-sycl' --exclude='ggml/src/ggml-opencl' \
        --exclude='ggml/src/ggml-cann' --exclude='ggml/src/ggml-musa' --exclude='ggml/src/ggml-metal' \
        --exclude='ggml/src/ggml-webgpu' --exclude='ggml/src/ggml-hexagon' --exclude='ggml/src/ggml-zdnn' \
        --exclude='tools/server/public*' --exclude='tools/ui' --exclude='*.gguf' \
        CMakeLists.txt cmake ggml src include common vendor tools app gguf-py tests $(cd "$1" && ls -d licenses LICENSE 2>/dev/null)
    echo "$2: $(du -h "$2" | cut -f1)"
}
pack "${MORPHKV_PATCHED_TREE:-$root/vendor/llama.cpp}" "$root/.gpu/llama-patched.tar.xz"
pack "$root/vendor/stock/vendor/llama.cpp" "$root/.gpu/llama-stock.tar.xz"
# the Python side of the patched bindings (no native library) and the default model
tar -C "$root/vendor/llama-cpp-python" -cJf "$root/.gpu/llama_cpp_py.tar.xz" --exclude='llama_cpp/lib' --exclude='__pycache__' llama_cpp
model="$("$root/.venv/bin/python" -c 'from morphkv_gguf.models import default_model_path; print(default_model_path())')"
# four pieces: two travel with the build call, two with the test call (at most 64 MiB travel per call)
rm -f "$root/.gpu"/model.part.* "$root/.gpu/llama-prev-src.tar.xz"
split -n 4 -d "$model" "$root/.gpu/model.part."
sha256sum < "$model" | cut -d' ' -f1 > "$root/.gpu/model.sha256"
# MORPHKV_PREV=NNNN: also the files that the patches after NNNN change, as they were after patch NNNN;
# gpu_bench.sh build makes a "prev" build of them for a same-machine A/B of the newer patches
if [ -n "${MORPHKV_PREV:-}" ]; then
    vrepo="$root/vendor/llama-cpp-python"
    rev="$(git -C "$vrepo" log --format=%H -n1 --grep="^${MORPHKV_PREV}-")"
    [ -n "$rev" ] || { echo "MORPHKV_PREV=$MORPHKV_PREV: no applied patch of that number in $vrepo" >&2; exit 2; }
    files="$(git -C "$vrepo" diff --name-only "$rev" HEAD -- vendor/llama.cpp)"
    for f in $files; do
        git -C "$vrepo" cat-file -e "$rev:$f" 2>/dev/null || { echo "MORPHKV_PREV: $f is new after $MORPHKV_PREV (not supported)" >&2; exit 2; }
    done
    git -C "$vrepo" archive --format=tar "$rev" $files | xz > "$root/.gpu/llama-prev-src.tar.xz"
    echo "prev (after patch $MORPHKV_PREV): $(echo $files | wc -w) file(s): $files"
fi
ls -la "$root/.gpu"
