#!/usr/bin/env bash
# DKD on Pascal-VOC 2012 (overlapped), task 5-3:
# 5 base classes, then 5 steps of 3 classes.
# Every step, step 0 shared with the methods that train it the same way; settings from the
# environment (GPU, NB_GPU, DATA_ROOT, NAME, PORT, EPOCHS, BATCH_SIZE, MODEL, DRY_RUN, ...): see
# scripts/common.sh. Arguments are passed to every run.py call.
METHOD=DKD DATASET=voc TASK=5-3
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_sweep "$@"
