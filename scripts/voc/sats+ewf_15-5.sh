#!/usr/bin/env bash
# SATS+EWF on Pascal-VOC 2012 (overlapped), task 15-5:
# 15 base classes, then 5 new classes in one step.
# Every step, step 0 shared with the methods that train it the same way; settings from the
# environment (GPU, NB_GPU, DATA_ROOT, NAME, PORT, EPOCHS, BATCH_SIZE, MODEL, DRY_RUN, ...): see
# scripts/common.sh. Arguments are passed to every run.py call.
METHOD=SATS+EWF DATASET=voc TASK=15-5
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
run_sweep "$@"
