#!/usr/bin/env bash
# Every figure of docs/MODEL_CARD.md, from the shipped checkpoint and the validation splits that
# scripts/train_default_models.sh carved out of the training data (same seeds), with the package's own
# `facial-perception evaluate` / `fewshot` commands. Writes JSON + PNG to docs/model_card/.
#
# env: DATA (../shared/datasets), RUNS (./runs), MODEL (the shipped default), FEWSHOT_MODEL (identity column
#      trained without 20 % of the people; made here when missing), FEWSHOT_MEMBER_SEEDS (1 3 4 5: the seeds
#      of its ensemble members besides COLUMN_SEED 2, as the shipped identity column), OUT (docs/model_card),
#      SHIFT_PX (4), COLUMN_VIEWS (0: augmented views of the few-shot columns, as scripts/train_default_models.sh)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$(realpath "${DATA:-$REPO/../shared/datasets}")
RUNS=$(realpath -m "${RUNS:-$REPO/runs}")
MODEL=${MODEL:-$REPO/facial_perception/models/default.safetensors}
FEWSHOT_MODEL=${FEWSHOT_MODEL:-$RUNS/default/fewshot_identity.safetensors}
OUT=${OUT:-$REPO/docs/model_card}
FP=(python -m facial_perception.core.cli)
COMMON=(--workers 2 --image-cache "$RUNS/cache")
# every task also on its faces shifted 4 px (of 64) each way: how much a label depends on the crop's alignment
SHIFT=(--shift-test "${SHIFT_PX:-4}")
set +u; . "${FP_VENV:-$REPO/.venv}/bin/ros_env.sh"; set -u
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
# the validation splits the training script trained around (made here when missing, in seconds)
. "$REPO/scripts/make_splits.sh"

"${FP[@]}" evaluate --checkpoint "$MODEL" --task emotion --data "$DATA/ferplus/FER2013Valid" \
  --out-json "$OUT/emotion.json" --plots "$OUT" "${SHIFT[@]}" "${COMMON[@]}" -q | tee "$OUT/emotion.md"
"${FP[@]}" evaluate --checkpoint "$MODEL" --task gender --target gender --data "$RUNS/splits/utkface/val" \
  --subgroups race,gender --out-json "$OUT/gender.json" --plots "$OUT" "${SHIFT[@]}" "${COMMON[@]}" -q | tee "$OUT/gender.md"
"${FP[@]}" evaluate --checkpoint "$MODEL" --task age --target age8 --data "$RUNS/splits/utkface/val" \
  --subgroups race,gender --out-json "$OUT/age.json" --plots "$OUT" "${SHIFT[@]}" "${COMMON[@]}" -q | tee "$OUT/age.md"
"${FP[@]}" evaluate --checkpoint "$MODEL" --task identity --data "$RUNS/splits/lfw_identity/val" \
  --out-json "$OUT/identity.json" --plots "$OUT" "${SHIFT[@]}" "${COMMON[@]}" -q | tee "$OUT/identity.md"

# few-shot: an identity column trained on 80 % of the 62 people, joined by members of other seeds as the
# shipped identity column is (an ensemble: its embedding is the members' unit embeddings side by side, what the
# node's gallery stores), then 5 photos of each unseen person enrolled and the rest of their photos identified
# (nearest enrolled mean, cosine). Each part is trained once and kept (re-runs only evaluate).
FEWSHOT_SEEDS=${FEWSHOT_MEMBER_SEEDS-1 3 4 5}
if [ ! -f "$FEWSHOT_MODEL" ]; then
  fewshot_column() {  # fewshot_column SEED NAME: NAME.safetensors, one identity column without the held-out people
    "${FP[@]}" train-task --checkpoint "$FEWSHOT_MODEL.base.safetensors" --task identity \
      --data "$RUNS/splits/lfw_identity/train" --holdout-people 0.2 --epochs 80 --lr 1e-3 --lr-patience 3 --patience 12 \
      --augmented-views "${COLUMN_VIEWS:-0}" --out "$2.safetensors" --work-dir "$2" --seed "$1" "${COMMON[@]}" -q
  }
  MEMBERS_DIR=${FEWSHOT_MODEL%.safetensors}_members
  mkdir -p "$MEMBERS_DIR"
  [ -f "$FEWSHOT_MODEL.base.safetensors" ] \
    || "${FP[@]}" columns --checkpoint "$MODEL" --drop identity --out "$FEWSHOT_MODEL.base.safetensors" -q
  for seed in "${COLUMN_SEED:-2}" $FEWSHOT_SEEDS; do
    [ -f "$MEMBERS_DIR/identity_s$seed.safetensors" ] || fewshot_column "$seed" "$MEMBERS_DIR/identity_s$seed"
  done
  FIRST=$MEMBERS_DIR/identity_s${COLUMN_SEED:-2}.safetensors
  MEMBER_FILES=()
  for seed in $FEWSHOT_SEEDS; do MEMBER_FILES+=("$MEMBERS_DIR/identity_s$seed.safetensors"); done
  JOINED=${FEWSHOT_MODEL%.safetensors}_joined.safetensors
  if [ ${#MEMBER_FILES[@]} = 0 ]; then cp "$FIRST" "$JOINED"
  else "${FP[@]}" columns --checkpoint "$FIRST" --ensemble identity "${MEMBER_FILES[@]}" --out "$JOINED" -q; fi
  # whitened as the shipped identity embedding is, on the faces of the people the column was trained on
  "${FP[@]}" whiten --checkpoint "$JOINED" --data "$RUNS/splits/lfw_identity/train" --holdout-fraction 0.2 \
    --out "$FEWSHOT_MODEL" "${COMMON[@]}" -q
fi
"${FP[@]}" fewshot --checkpoint "$FEWSHOT_MODEL" --data "$RUNS/splits/lfw_identity/train" --holdout-fraction 0.2 \
  --shots 5 --trials 10 --out-json "$OUT/fewshot.json" "${COMMON[@]}" -q | tee "$OUT/fewshot.md"

# strangers: the shipped model on people it never saw (lfw_unlabeled), N of them enrolled with 5 photos each and
# everyone else a stranger: how many strangers each gallery threshold names, how many enrolled faces it still names
for n in 10 20 50; do
  plot=(); [ "$n" != 20 ] || plot=(--plot "$OUT/open_set.png")
  "${FP[@]}" fewshot --checkpoint "$MODEL" --data "$DATA/lfw_unlabeled" --open-set "$n" --shots 5 --trials 10 \
    --out-json "$OUT/open_set_$n.json" "${plot[@]}" "${COMMON[@]}" -q | tee "$OUT/open_set_$n.md"
done
echo "figures in $OUT"
