#!/usr/bin/env bash
# MiB+NeST on Pascal-VOC 2012 (overlapped), task 15-1:
# 15 base classes, then 5 single-class steps (table name 15-5s).
# Every step, step 0 shared with the methods that train it the same way; settings from the
# environment (GPU, NB_GPU, DATA_ROOT, NAME, PORT, EPOCHS, BATCH_SIZE, MODEL, DRY_RUN, ...): see
# scripts/common.sh. Arguments are passed to every run.py call.
METHOD=MiB+NeST DATASET=voc TASK=15-5s
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_sweep "$@"
