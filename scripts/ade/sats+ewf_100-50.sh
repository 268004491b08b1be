#!/usr/bin/env bash
# SATS+EWF on ADE20K, task 100-50:
# 100 base classes, then 50 in one step.
# Every step, step 0 shared with the methods that train it the same way; settings from the
# environment (GPU, NB_GPU, DATA_ROOT, NAME, PORT, EPOCHS, BATCH_SIZE, MODEL, DRY_RUN, ...): see
# scripts/common.sh. Arguments are passed to every run.py call.
METHOD=SATS+EWF DATASET=ade TASK=100-50
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_sweep "$@"
