#!/usr/bin/env bash
# The main job on the default model: set up (CPU wheel), then one chat answer twice as long as the KV
# cache it runs in (--kv-budget 128: 768 cells), streamed, with its speed and KV memory at the end.
# Arguments replace the default prompt/options, e.g. scripts/run.sh "Tell me a story" -n 256 --kv-budget 256
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
if [ $# -eq 0 ]; then
    set -- "Write a long story about a lighthouse keeper who records every passing ship in a ledger." \
        -n 1536 --kv-budget 128 --temperature 0.7 --repeat-penalty 1.1 --ignore-eos
fi
exec "${MORPHKV_VENV:-$root/.venv}/bin/morphkv" generate "$@"
