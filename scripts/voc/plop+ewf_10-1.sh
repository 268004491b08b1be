#!/usr/bin/env bash
# PLOP+EWF on Pascal-VOC 2012 (overlapped), task 10-1:
# 10 base classes, then 10 steps of one class.
# Every step, step 0 shared with the methods that train it the same way; settings from the
# environment (GPU, NB_GPU, DATA_ROOT, NAME, PORT, EPOCHS, BATCH_SIZE, MODEL, DRY_RUN, ...): see
# scripts/common.sh. Arguments are passed to every run.py call.
METHOD=PLOP+EWF DATASET=voc TASK=10-1
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_sweep "$@"
