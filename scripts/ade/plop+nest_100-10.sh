#!/usr/bin/env bash
# PLOP+NeST on ADE20K, task 100-10:
# 100 base classes, then 5 steps of 10.
# Every step, step 0 shared with the methods that train it the same way; settings from the
# environment (GPU, NB_GPU, DATA_ROOT, NAME, PORT, EPOCHS, BATCH_SIZE, MODEL, DRY_RUN, ...): see
# scripts/common.sh. Arguments are passed to every run.py call.
METHOD=PLOP+NeST DATASET=ade TASK=100-10
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_sweep "$@"
