#!/usr/bin/env bash
# Method comparison on the generated VOC stand-in: runs scripts/synth/compare.py with the
# repository's virtual environment (PYTHON overrides it). Arguments are passed on, e.g.
#   scripts/synth/compare.sh --quick
#   scripts/synth/compare.sh --methods FT MiB SATS --tasks 15-5 --seeds 3
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
if [[ ! -x $PYTHON ]]; then
    echo "no Python at $PYTHON: create the virtual environment (.venv) or set PYTHON" >&2
    exit 1
fi
exec "$PYTHON" "$REPO_ROOT/scripts/synth/compare.py" "$@"
