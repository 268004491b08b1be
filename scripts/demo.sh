#!/usr/bin/env bash
# The embedded demo, one command on a fresh machine:
#   1. set up .venv/ (utils.sh),
#   2. generate the demo VOC-layout tree in demo_data/ if it is missing (1,000 + 200 images, 128 px),
#   3. learn VOC 15-5 with SATS on a small SegFormer trained from scratch on the CPU:
#      step 0 (background + 15 classes), then step 1 (5 new classes, old model frozen),
#      printing the base / new / all test mIoU after each step.
# Environment: METHOD (SATS), MODEL (segformer_b0), EPOCHS0 / EPOCHS (epochs of step 0 / 1),
# LR0 / LR, BATCH_SIZE, NAME, DEMO_ROOT (demo_data). Step 0 is reused when its checkpoint exists.
# PYTHON=/path/to/python runs with that interpreter as it is (no .venv set-up: for a machine
# without network access whose Python has the requirements, as scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PYTHON:-}" ]]; then
  python() { "$PYTHON" "$@"; }
else
  source utils.sh
  set -euo pipefail
fi

METHOD=${METHOD:-SATS}
MODEL=${MODEL:-segformer_b0}
EPOCHS0=${EPOCHS0:-6}
EPOCHS=${EPOCHS:-4}
LR0=${LR0:-0.05}
LR=${LR:-0.005}
BATCH_SIZE=${BATCH_SIZE:-8}
DEMO_ROOT=${DEMO_ROOT:-demo_data}
NAME=${NAME:-demo}
STEP0_NAME="${NAME}-step0"
DATE=$(date +%F)

python -c "import sys; from dataset.synthetic import ensure_demo_tree; print('[demo] data:', ensure_demo_tree(sys.argv[1]))" "$DEMO_ROOT/PascalVOC12"

common=(--data_root "$DEMO_ROOT" --dataset voc --task 15-5 --overlap --model "$MODEL" --no_pretrained
        --crop_size 96 --batch_size "$BATCH_SIZE" --num_workers 2 --val_interval 100 --sample_num 4
        --date "$DATE")

step0_ckpt="checkpoints/step/15-5-voc_${STEP0_NAME}_0.pth"
if [[ -f $step0_ckpt ]]; then
  echo "[demo] step 0 already trained: $step0_ckpt"
else
  echo "[demo] step 0: background + 15 classes, $EPOCHS0 epochs"
  python run.py "${common[@]}" --step 0 --lr "$LR0" --epochs "$EPOCHS0" --name "$STEP0_NAME"
fi
echo "[demo] step 1: 5 new classes with $METHOD, $EPOCHS epochs"
# the step-0 row of the method's results file (the same model: its table was printed above)
python run.py "${common[@]}" --step 0 --test --ckpt "$step0_ckpt" --method "$METHOD" --name "${NAME}-${METHOD}" > /dev/null
python run.py "${common[@]}" --step 1 --lr "$LR" --epochs "$EPOCHS" --method "$METHOD" \
  --step_ckpt "$step0_ckpt" --name "${NAME}-${METHOD}"
echo "[demo] summary of results/${DATE}_voc_15-5_${NAME}-${METHOD}.csv:"
python average_csv.py "results/${DATE}_voc_15-5_${NAME}-${METHOD}.csv" --dataset voc --task 15-5
echo "[demo] TensorBoard: tensorboard --logdir logs/15-5-voc"
