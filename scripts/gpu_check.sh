#!/usr/bin/env bash
# The GPU check in one command (at most 8 minutes on one H200): environment, `pytest -m cuda`,
# every method under O0/O1/O2 on SegFormer-B2 (512 px, batch 8, random weights), the benchmark
# of every method, and the demo at 96 px; prints a summary and writes a JSON report.
#   bash scripts/gpu_check.sh [--json gpu_check.json] [--budget_s 480] [--quick] [--parts ...]
# Options: python scripts/gpu_check.py --help. The interpreter is .venv's (set up by utils.sh);
# PYTHON=/path/to/python uses that one as it is, e.g. on a machine without network access whose
# Python already has the requirements.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  source utils.sh
  set -euo pipefail
  PYTHON=.venv/bin/python
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
