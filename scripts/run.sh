#!/usr/bin/env bash
# The main job on the default model: set up (CPU wheel), then one generation that prints its speed.
# Arguments replace the default prompt/options, e.g. scripts/run.sh "Tell me a story" -n 256
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
if [ $# -eq 0 ]; then
    set -- "Write a short story about a lighthouse keeper who keeps a ledger of passing ships." -n 256
fi
exec "${MORPHKV_VENV:-$root/.venv}/bin/morphkv" generate "$@"
