#!/usr/bin/env bash
# The shipped model through the node's own pipeline (detector -> crop -> model), not on the datasets'
# aligned crops: docs/MODEL_CARD.md, "Through the node's pipeline". Makes one labelled bag per validation
# split (every face once, pasted at 112-200 px into a 640x480 photo, JPEG) and evaluates it offline with the
# node's defaults, smoothing off and identity and standalone members on every frame (one frame per face:
# smoothing would blend a face into the next one placed where it was, and a track's identity or members'
# probabilities would stand for the next face). ~6 min on 2 cores. Writes reports to $OUT/<split>/ (report.md, report.json, PNGs).
#
# env: DATA (../shared/datasets), RUNS (./runs), MODEL (the shipped default), OUT ($RUNS/pipeline_eval),
#      EVAL_ARGS (more `facial-perception-bag evaluate` options, e.g. "--crop-margin 0.1 --crop-offset-y -0.08")
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$(realpath "${DATA:-$REPO/../shared/datasets}")
RUNS=$(realpath -m "${RUNS:-$REPO/runs}")
MODEL=${MODEL:-$REPO/facial_perception/models/default.safetensors}
OUT=$(realpath -m "${OUT:-$RUNS/pipeline_eval}")
FP=(python -m facial_perception.core.cli)
BAG=(python -m facial_perception.bags.cli)
set +u; . "${FP_VENV:-$REPO/.venv}/bin/ros_env.sh"; set -u
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
. "$REPO/scripts/make_splits.sh"
mkdir -p "$RUNS/bags" "$OUT"
make_bag() {  # name, dataset folder, task...
  local name=$1 folder=$2; shift 2
  local tasks=(); for t in "$@"; do tasks+=(--task "$t"); done
  [ -d "$RUNS/bags/$name" ] || "${BAG[@]}" make "$folder" "$RUNS/bags/$name" "${tasks[@]}" --image-type compressed \
    --background photo --max-samples 100000 --seed 0 --no-progress
}
make_bag utkface_val "$RUNS/splits/utkface/val" gender age
make_bag lfw_identity_val "$RUNS/splits/lfw_identity/val" identity
make_bag ferplus_val "$DATA/ferplus/FER2013Valid" emotion
for name in utkface_val lfw_identity_val ferplus_val; do
  # shellcheck disable=SC2086
  "${BAG[@]}" evaluate "$RUNS/bags/$name" --checkpoint "$MODEL" --smoothing 0 --identity-every 1 --standalone-every 1 --report "$OUT/$name" \
    --no-progress ${EVAL_ARGS:-} 2>&1 | grep -v "^INFO:"
done
