#!/usr/bin/env bash
# The ablation behind the shipped model's lateral sources (docs/MODEL_CARD.md): for a target column,
# every subset of the other columns as lateral sources (the paper's Table V), N runs each, on the
# validation share carved out of the training splits. Needs the checkpoints that
# scripts/train_default_models.sh leaves in $RUNS/default (after_emotion, after_age).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$(realpath "${DATA:-$REPO/../shared/datasets}")
RUNS=$(realpath -m "${RUNS:-$REPO/runs}")
RUNS_PER_SETTING=${RUNS_PER_SETTING:-2}
EPOCHS=${EPOCHS:-8}
FP=(python -m facial_perception.core.cli)
COMMON=(--workers 2 --image-cache "$RUNS/cache" --runs "$RUNS_PER_SETTING" --epochs "$EPOCHS" -q)
set +u; . "${FP_VENV:-$REPO/.venv}/bin/ros_env.sh"; set -u
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
UTK=$RUNS/splits/utkface/train

# age group: laterals from {}, {emotion}, {gender}, {emotion, gender}
"${FP[@]}" ablation laterals --checkpoint "$RUNS/default/after_emotion.safetensors" --target age \
  --data emotion="$DATA/ferplus/FER2013Train" gender="$UTK:gender" age="$UTK:age8" \
  --max-images 6000 --out "$RUNS/ablation/age" "${COMMON[@]}"
# identity: laterals from every subset of {emotion, gender, age}
"${FP[@]}" ablation laterals --checkpoint "$RUNS/default/after_age.safetensors" --target identity \
  --data emotion="$DATA/ferplus/FER2013Train" gender="$UTK:gender" age="$UTK:age8" \
  identity="$RUNS/splits/lfw_identity/train" --out "$RUNS/ablation/identity" "${COMMON[@]}"
mkdir -p "$REPO/docs/model_card"
cp "$RUNS"/ablation/*/laterals_*.md "$REPO/docs/model_card/" 2>/dev/null || true
