#!/usr/bin/env bash
# SATS+NeST on ADE20K, task 50-50:
# 50 base classes, then 2 steps of 50 (table name 50).
# Every step, step 0 shared with the methods that train it the same way; settings from the
# environment (GPU, NB_GPU, DATA_ROOT, NAME, PORT, EPOCHS, BATCH_SIZE, MODEL, DRY_RUN, ...): see
# scripts/common.sh. Arguments are passed to every run.py call.
METHOD=SATS+NeST DATASET=ade TASK=50
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_sweep "$@"
