#!/usr/bin/env bash
# Pack what scripts/gpu_bench.sh needs on the GPU machine into .gpu/ (git-excluded): the patched and
# the stock llama.cpp trees, only the parts a CUDA build of llama-bench reads, plus gguf-py for
# `morphkv gguf synth` (the GPU machine has no gguf package), the Python bindings and the default model.
# MORPHKV_PREV_TREE=DIR adds the files for a "prev" build: DIR is an earlier patched llama.cpp tree (e.g. the
# vendor/llama.cpp of a clone at an earlier commit, after its `python -m morphkv_gguf dev prepare`); the files
# that differ from the current patched tree are packed, and gpu_bench.sh builds them in the patched build dir.
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
# the Python side of the patched bindings (no native library), the default model and MORPHKV_GPU_MODELS
tar -C "$root/vendor/llama-cpp-python" -cJf "$root/.gpu/llama_cpp_py.tar.xz" --exclude='llama_cpp/lib' --exclude='__pycache__' llama_cpp
model="$("$root/.venv/bin/python" -c 'from morphkv_gguf.models import default_model_path; print(default_model_path())')"
# four pieces (two for the build phase, two for the test phase), each small enough to copy to the GPU machine
rm -f "$root/.gpu"/*.part.* "$root/.gpu/llama-prev-src.tar.xz"
split -n 4 -d "$model" "$root/.gpu/model.part."
sha256sum < "$model" | cut -d' ' -f1 > "$root/.gpu/model.sha256"
# MORPHKV_GPU_MODELS="gemma3-270m": a second real model in pieces of 48 MiB (one per run beside the rest)
for name in ${MORPHKV_GPU_MODELS:-}; do
    path="$("$root/.venv/bin/python" -c "from morphkv_gguf.models import resolve_model; print(resolve_model('$name'))")"
    split -b 48M -d "$path" "$root/.gpu/$name.part."
    sha256sum < "$path" | cut -d' ' -f1 > "$root/.gpu/$name.sha256"
done
# MORPHKV_PREV_TREE=DIR: the files of DIR that differ from the current patched tree, for a same-machine A/B
if [ -n "${MORPHKV_PREV_TREE:-}" ]; then
    prev="$MORPHKV_PREV_TREE" cur="${MORPHKV_PATCHED_TREE:-$root/vendor/llama.cpp}"
    [ -f "$prev/CMakeLists.txt" ] && [ -d "$prev/src" ] || {
        echo "MORPHKV_PREV_TREE=$prev is not a llama.cpp tree (expected CMakeLists.txt and src/ in it)" >&2; exit 2; }
    files="$(python3 - "$prev" "$cur" <<'PY'
import filecmp, os, sys
prev, cur = sys.argv[1:]

def files(base):
    """The files under the folders a llama-bench build reads, relative to base."""
    for top in ("CMakeLists.txt", "src", "include", "common", "ggml/include", "ggml/src", "tools/llama-bench"):
        path = os.path.join(base, top)
        if os.path.isfile(path):
            yield top
        for dirpath, _, names in os.walk(path):
            yield from (os.path.relpath(os.path.join(dirpath, n), base) for n in names)

gone = [rel for rel in files(prev) if not os.path.exists(os.path.join(cur, rel))]
changed = [rel for rel in files(cur) if os.path.exists(os.path.join(prev, rel))
           and not filecmp.cmp(os.path.join(prev, rel), os.path.join(cur, rel), shallow=False)]
if gone:
    sys.exit(f"MORPHKV_PREV_TREE: {', '.join(sorted(gone)[:5])} exist only in the prev tree (a prev build swaps changed files, "
             f"it cannot add files the current tree lacks)")
print(" ".join(sorted(changed)))
PY
)" || exit 2
    [ -n "$files" ] || { echo "MORPHKV_PREV_TREE: no file differs from the current patched tree" >&2; exit 2; }
    tar -C "$prev" -cJf "$root/.gpu/llama-prev-src.tar.xz" $files
    echo "prev ($prev): $(echo $files | wc -w) file(s): $files"
fi
ls -la "$root/.gpu"
