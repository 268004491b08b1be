#!/usr/bin/env bash
# Any registered method or combination on any task, with torchrun:
#   bash scripts/sweep.sh METHOD DATASET TASK [run.py options for every call...]
#   bash scripts/sweep.sh MiB+EWF ade 100-10
# The per-method scripts in scripts/voc/ and scripts/ade/ are shorthands of this one. Settings from
# the environment (GPU, NB_GPU, DATA_ROOT, NAME, MODEL, PRETRAINED, ORDERS, DRY_RUN, ...): see
# scripts/common.sh.
if (($# < 3)); then
    echo "usage: bash scripts/sweep.sh METHOD DATASET TASK [run.py options...]" >&2
    exit 2
fi
METHOD=$1 DATASET=$2 TASK=$3
shift 3
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_sweep "$@"
