# Shared logic of the sweep scripts in scripts/voc/ and scripts/ade/ (sourced, not run).
#
# A sweep script sets METHOD, DATASET and TASK, sources this file and calls `run_sweep "$@"`.
# run_sweep then, from the repository root:
#   1. trains step 0 once per (task, step-0 recipe, model) under a shared name, unless its
#      checkpoint already exists: every method whose step 0 is plain cross-entropy (FT, LWF, ILT,
#      MiB, PLOP, SATS, their -M variants and their +technique combinations) reuses the same file;
#      LWF-MC, EWC, RW, PI and SSUL have their own step 0 (BCE, regulariser importance, unknown
#      channel). The registry (methods/, `python scripts/method_info.py METHOD DATASET TASK`)
#      says which;
#   2. tests that step-0 model under the method's name (so the method's results file has a step-0
#      row), then trains and tests every incremental step in turn, step 1 starting from the shared
#      file (--step_ckpt);
#   3. prints the summary of the results file with average_csv.py.
#
# Environment (all optional):
#   GPU=0             CUDA_VISIBLE_DEVICES of the run        NB_GPU   processes (default: #GPU ids)
#   DATA_ROOT=data    dataset folder (relative to the repository root)
#   NAME=$METHOD      experiment name: checkpoints, logs and
#                     results/{START_DATE}_{DATASET}_{TASK}_{NAME}.csv
#   PORT              torchrun master port (default: random in 9000-9999)
#   MODEL=segformer_b2
#   BATCH_SIZE        per process (default: 24 / NB_GPU, the papers' total batch of 24)
#   EPOCHS            epochs of each incremental step; INITIAL_EPOCHS: of step 0
#                     (defaults: VOC 30, ADE 60 as in the MiB/PLOP/SATS READMEs; SSUL: 50 / 100)
#   LR0, LR           learning rate of step 0 and of later steps (default 0.01 and 0.001; SSUL 0.01
#                     VOC / 0.05 ADE at every step as in clovaai/SSUL)
#   OPT_LEVEL=O1      mixed precision (the scripts of all three repositories use O1)
#   CROP_VAL=1        1: evaluate on a 512 centre crop, the protocol every published number used
#                     (MiB, PLOP and SATS all cropped by default); 0: full images
#   CHECKPOINT_DIR=checkpoints/step
#   STEP0_PREFIX=step0  prefix of the shared step-0 name (which includes the family, the model and
#                     LR0 when it is not 0.01); change it when you change other step-0 settings
#                     (epochs, batch, data), otherwise the existing file is reused
#   RESUME=0          1: a step whose checkpoint exists is resumed / re-tested (--ckpt) and the
#                     results file is kept
#   EXTRA_ARGS        extra run.py options for every command (arguments of the script are added too)
#   PRETRAINED        --pretrained of every command: a file, hf:OWNER/REPO[@REV] or torchvision[:WEIGHTS]
#   ORDERS            several tasks in turn, e.g. ORDERS="15-5s_b 15-5s_c 15-5s_d" (PLOP's shuffled
#                     15-1 orders), then one mean ± std summary over them
#   DRY_RUN=1         print the commands instead of running them
#   PYTHON (default: .venv/bin/python if present, else python), TORCHRUN=torchrun,
#   START_DATE (default: today)

set -euo pipefail

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPTS_DIR")"

# Quote one word for display so that the printed line can be pasted back into a shell.
_quote() {
    local word=$1
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
        printf '%s' "$word"
    else
        printf "'%s'" "${word//\'/\'\\\'\'}"
    fi
}

# Print a command line (CUDA_VISIBLE_DEVICES=... words...) on stdout.
_print_command() {
    printf 'CUDA_VISIBLE_DEVICES=%s' "$(_quote "$GPU")"
    local word
    for word in "$@"; do
        printf ' %s' "$(_quote "$word")"
    done
    printf '\n'
}

# Run (or, with DRY_RUN=1, print) one run.py invocation under torchrun.
_run_torch() {
    local cmd=("$TORCHRUN" --master_port "$PORT" --nproc_per_node "$NB_GPU" run.py "$@")
    if [[ $DRY_RUN == 1 ]]; then
        _print_command "${cmd[@]}"
    else
        echo "+ $(_print_command "${cmd[@]}")" >&2
        CUDA_VISIBLE_DEVICES="$GPU" "${cmd[@]}"
    fi
}

# The method's step-0 family, the method that trains it, and the authors' per-dataset values
# (epochs, learning rates, extra options), from the method registry (methods/).
_method_settings() {
    local info
    info=$(cd "$REPO_ROOT" && "$PYTHON" scripts/method_info.py "$METHOD" "$DATASET" "$TASK") || return 1
    eval "$info"
}

_configure() {
    : "${METHOD:?the sweep script must set METHOD}" "${DATASET:?set DATASET}" "${TASK:?set TASK}"
    DRY_RUN=${DRY_RUN:-0}
    if [[ -z ${PYTHON:-} && -x $REPO_ROOT/.venv/bin/python ]]; then PYTHON=$REPO_ROOT/.venv/bin/python; fi
    PYTHON=${PYTHON:-python}
    TORCHRUN=${TORCHRUN:-torchrun}
    GPU=${GPU:-0}
    local ids
    IFS=, read -r -a ids <<< "$GPU"
    NB_GPU=${NB_GPU:-${#ids[@]}}
    PORT=${PORT:-$((9000 + RANDOM % 1000))}
    DATA_ROOT=${DATA_ROOT:-data}
    NAME=${NAME:-$METHOD}
    MODEL=${MODEL:-segformer_b2}
    BATCH_SIZE=${BATCH_SIZE:-$((24 / NB_GPU))}
    if ((BATCH_SIZE < 1)); then
        echo "BATCH_SIZE must be >= 1 (got $BATCH_SIZE with NB_GPU=$NB_GPU)" >&2
        return 1
    fi
    _method_settings
    EPOCHS=${EPOCHS:-$DEFAULT_EPOCHS}
    INITIAL_EPOCHS=${INITIAL_EPOCHS:-$DEFAULT_EPOCHS}
    LR0=${LR0:-$DEFAULT_LR0}
    LR=${LR:-$DEFAULT_LR}
    OPT_LEVEL=${OPT_LEVEL:-O1}
    CROP_VAL=${CROP_VAL:-1}
    CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/step}
    STEP0_PREFIX=${STEP0_PREFIX:-step0}
    RESUME=${RESUME:-0}
    START_DATE=${START_DATE:-$(date +%Y-%m-%d)}
    read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

    STEP0_NAME="${STEP0_PREFIX}-${STEP0_FAMILY}-${MODEL}"
    # a step 0 trained at another rate (e.g. NeST's 0.02) is another model: another file
    if [[ $LR0 != 0.01 ]]; then STEP0_NAME+="-lr${LR0}"; fi
    STEP0_CKPT="${CHECKPOINT_DIR}/${TASK}-${DATASET}_${STEP0_NAME}_0.pth"
    RESULTS_FILE="results/${START_DATE}_${DATASET}_${TASK}_${NAME}.csv"
    local count_steps="import sys, tasks; print(tasks.get_num_steps(sys.argv[1], sys.argv[2]))"
    NUM_STEPS=$(cd "$REPO_ROOT" && "$PYTHON" -c "$count_steps" "$DATASET" "$TASK")
}

# Options shared by every command of the sweep.
_common_args() {
    COMMON=(--date "$START_DATE" --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK"
        --overlap --model "$MODEL" --batch_size "$BATCH_SIZE" --opt_level "$OPT_LEVEL"
        --checkpoint "$CHECKPOINT_DIR")
    if [[ $CROP_VAL == 1 ]]; then COMMON+=(--crop_val); fi
    if [[ -n ${PRETRAINED:-} ]]; then COMMON+=(--pretrained "$PRETRAINED"); fi
}

_train_shared_step0() {
    local args=("${COMMON[@]}" --name "$STEP0_NAME" --step 0 --lr "$LR0" --epochs "$INITIAL_EPOCHS"
        --method "$STEP0_METHOD" "${STEP0_ARGS[@]}" "${EXTRA[@]}" "$@")
    if [[ -f $STEP0_CKPT ]]; then
        echo "step 0: reusing $STEP0_CKPT" >&2
        return 0
    fi
    if [[ $DRY_RUN == 1 ]] || ! command -v flock > /dev/null; then
        _run_torch "${args[@]}"
        return 0
    fi
    # Two sweeps started together must not train the same step 0 twice: the second one waits.
    mkdir -p "$CHECKPOINT_DIR"
    (
        flock 9
        if [[ -f $STEP0_CKPT ]]; then
            echo "step 0: $STEP0_CKPT appeared while waiting; reusing it" >&2
        else
            _run_torch "${args[@]}"
        fi
    ) 9> "${STEP0_CKPT}.lock"
}

# The method's own step-0 row: test the shared model with this sweep's name and protocol.
_test_step0() {
    _run_torch "${COMMON[@]}" --name "$NAME" --step 0 --method "$METHOD" --test \
        --ckpt "$STEP0_CKPT" "${EXTRA[@]}" "$@"
}

_train_step() {
    local step=$1
    shift
    local args=("${COMMON[@]}" --name "$NAME" --step "$step" --lr "$LR" --epochs "$EPOCHS"
        --method "$METHOD" "${METHOD_ARGS[@]}")
    if ((step == 1)); then args+=(--step_ckpt "$STEP0_CKPT"); fi
    local own="${CHECKPOINT_DIR}/${TASK}-${DATASET}_${NAME}_${step}.pth"
    if [[ $RESUME == 1 && -f $own ]]; then args+=(--ckpt "$own"); fi
    _run_torch "${args[@]}" "${EXTRA[@]}" "$@"
}

_sweep_one_task() {
    _configure
    cd "$REPO_ROOT"
    _common_args
    echo "${METHOD} on ${DATASET} ${TASK}: ${NUM_STEPS} steps on GPUs ${GPU}," \
        "results in ${RESULTS_FILE}" >&2
    if [[ $DRY_RUN != 1 ]]; then
        mkdir -p results "$CHECKPOINT_DIR"
        if [[ $RESUME != 1 ]]; then rm -f "$RESULTS_FILE"; fi
    fi
    _train_shared_step0 "$@"
    _test_step0 "$@"
    local step
    for ((step = 1; step < NUM_STEPS; step++)); do
        _train_step "$step" "$@"
    done
    SWEEP_RESULTS+=("$RESULTS_FILE")
}

run_sweep() {
    local start=$SECONDS task
    local orders=(${ORDERS:-$TASK})
    SWEEP_RESULTS=()
    for task in "${orders[@]}"; do
        TASK=$task
        _sweep_one_task "$@"
    done
    local summary=("$PYTHON" average_csv.py "${SWEEP_RESULTS[@]}" --dataset "$DATASET" --task "${orders[0]}")
    if [[ $DRY_RUN == 1 ]]; then
        echo "${summary[*]}"
    else
        "${summary[@]}"
        echo "${METHOD} on ${DATASET} ${orders[*]} done in $((SECONDS - start)) s" >&2
    fi
}
