#!/usr/bin/env bash
# Set up .venv/ at the repository root with everything in requirements.txt.
# Idempotent: a re-run only checks that the installed set still matches.
# Usage: source utils.sh   (or: bash utils.sh)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[utils.sh] creating $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha"
WANT="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "[utils.sh] installing requirements (about a minute on a fresh machine)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
echo "[utils.sh] ready: $VENV/bin/python ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
