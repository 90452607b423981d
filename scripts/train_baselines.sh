#!/usr/bin/env bash
# Plain task-specific CNNs, the reference the default model must beat (issue: "a plain task-specific CNN,
# about 1 M parameters, grey 48-64 px, trained 10-20 minutes per task on 2 cores, no pre-training"):
# for each task, a randomly initialised encoder + one column (no BEGAN, no other task, no laterals),
# trained together end to end (train-task --config lite|mid --train-encoder) with the usual augmentation, on the
# same training and validation splits as the default model, then evaluated with the same command.
# Resumable (re-run after a stop); results in $RUNS/baselines/<task>.{safetensors,json,md}
# ($RUNS/baselines_<CONFIG>/ for another CONFIG than lite).
#
#   nohup bash scripts/train_baselines.sh > runs/baselines.log 2>&1 &
#
# env: DATA, RUNS, CONFIG (lite: encoder + gender column 0.49 M parameters; mid: 0.92 M), TASKS (default:
#      gender age emotion identity), SEED (1), THREADS (2), WORKERS (2), and
#      epochs per task: GENDER_EPOCHS (15), AGE_EPOCHS (15), EMOTION_EPOCHS (12), IDENTITY_EPOCHS (100),
#      sized to ~20 minutes each on the 2-core CPU of docs/MODEL_CARD.md.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$(realpath "${DATA:-$REPO/../shared/datasets}")
RUNS=$(realpath -m "${RUNS:-$REPO/runs}")
TASKS=${TASKS:-gender age emotion identity}
SEED=${SEED:-1}
CONFIG=${CONFIG:-lite}
OUT=$RUNS/baselines
[ "$CONFIG" = lite ] || OUT=$RUNS/baselines_$CONFIG
FP=(python -m facial_perception.core.cli)
COMMON=(--threads "${THREADS:-2}" --workers "${WORKERS:-2}" --image-cache "$RUNS/cache" --seed "$SEED")
set +u; . "${FP_VENV:-$REPO/.venv}/bin/ros_env.sh"; set -u
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
. "$REPO/scripts/make_splits.sh"

baseline() {  # task target(- = the dataset's only label) epochs train val
  local task=$1 target=$2 epochs=$3 train=$4 val=$5
  [ -f "$OUT/$task.json" ] && { echo "$task: done ($OUT/$task.json)"; return; }
  printf '\n=== %s  baseline %s (%s epochs)\n' "$(date -u +%H:%M:%S)" "$task" "$epochs"
  local start=$SECONDS tgt=()
  [ "$target" = - ] || tgt=(--target "$target")
  "${FP[@]}" train-task --config "$CONFIG" --train-encoder --task "$task" "${tgt[@]}" --data "$train" \
    --val-data "$val" --epochs "$epochs" --lr 1e-3 --lr-patience 3 --patience 8 --out "$OUT/$task.safetensors" \
    --work-dir "$OUT/$task" "${COMMON[@]}" -q
  echo "$task: trained in $(( (SECONDS - start) / 60 )) min (this run)"
  "${FP[@]}" evaluate --checkpoint "$OUT/$task.safetensors" --task "$task" "${tgt[@]}" --data "$val" \
    --image-cache "$RUNS/cache" --out-json "$OUT/$task.json" -q > "$OUT/$task.md"
  grep -E '^\| accuracy|Largest gap \(race\)' "$OUT/$task.md" || true
}

for task in $TASKS; do
  case $task in
    gender) baseline gender gender "${GENDER_EPOCHS:-15}" "$RUNS/splits/utkface/train" "$RUNS/splits/utkface/val" ;;
    age) baseline age age8 "${AGE_EPOCHS:-15}" "$RUNS/splits/utkface/train" "$RUNS/splits/utkface/val" ;;
    emotion) baseline emotion - "${EMOTION_EPOCHS:-12}" "$DATA/ferplus/FER2013Train" "$DATA/ferplus/FER2013Valid" ;;
    identity) baseline identity - "${IDENTITY_EPOCHS:-100}" "$RUNS/splits/lfw_identity/train" "$RUNS/splits/lfw_identity/val" ;;
    *) echo "unknown task: $task" >&2; exit 2 ;;
  esac
done
