#!/usr/bin/env bash
# The deterministic validation splits carved out of the training data (FER+ keeps its own FER2013Valid):
# UTKFace 10 % stratified, lfw_identity 20 % of each person's photos. One definition for the training and the
# evaluation scripts, which source this file: the model card's figures hold only on these exact files.
# Needs DATA, RUNS and FP (the facial-perception command as an array) set by the caller; seconds to run.
[ -d "$RUNS/splits/utkface/val" ] || "${FP[@]}" split --data "$DATA/utkface" --out "$RUNS/splits/utkface" \
  --val-fraction 0.1 --seed 0
[ -d "$RUNS/splits/lfw_identity/val" ] || "${FP[@]}" split --data "$DATA/lfw_identity" --out "$RUNS/splits/lfw_identity" \
  --val-fraction 0.2 --by-person --seed 0
