#!/usr/bin/env bash
# The test command: set everything up (CPU wheel, patched and stock llama.cpp tools), then run pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" --tools
cd "$root"
MORPHKV_REQUIRE_TOOLS=1 exec "${MORPHKV_VENV:-$root/.venv}/bin/python" -m pytest -ra "$@"
