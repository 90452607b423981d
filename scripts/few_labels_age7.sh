#!/usr/bin/env bash
# A new task from few labels on the shipped model (docs/TRAINING.md, "Fine-tune"): UTKFace age7 (7 age groups,
# other boundaries than the shipped age column's 8) trained on N labelled faces of the training split, from
# scratch, with laterals from the age column, or fine-tuned from it (--init-from age, lr 1e-3 and 1e-4);
# validated on the whole UTKFace validation split. ~30 s per run on 2 CPU cores; resumable (finished runs skip).
# env: RUNS (./runs; needs $RUNS/splits from scripts/make_splits.sh), NS ("300 1000"), SEEDS ("1 2")
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=$(realpath -m "${RUNS:-$REPO/runs}")
OUT=$RUNS/few_labels_age7
set +u; . "${FP_VENV:-$REPO/.venv}/bin/ros_env.sh"; set -u
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
CK=$REPO/facial_perception/models/default.safetensors
D=$RUNS/splits/utkface
[ -d "$D/train" ] || { echo "few_labels_age7: no $D/train: run scripts/make_splits.sh first" >&2; exit 2; }
mkdir -p "$OUT"
for n in ${NS:-300 1000}; do for seed in ${SEEDS:-1 2}; do
  for mode in scratch laterals init init_lr1e-4; do
    out=$OUT/${mode}_n${n}_s${seed}.safetensors
    [ -f "$out" ] && continue
    extra=(--lr 1e-3)
    case $mode in
      laterals) extra+=(--laterals age) ;;
      init) extra+=(--init-from age) ;;
      init_lr1e-4) extra=(--lr 1e-4 --init-from age) ;;
    esac
    python -m facial_perception.core.cli train-task --checkpoint "$CK" --task age7 --target age7 \
      --data "$D/train" --val-data "$D/val" --max-images "$n" --epochs 40 --lr-patience 3 --patience 12 \
      --seed "$seed" --feature-cache "$OUT/cache" --image-cache "$RUNS/cache" -q --out "$out" "${extra[@]}"
  done
done; done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from safetensors import safe_open
rows = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        meta = json.loads(h.metadata()["facial_perception"])
    mode, n, seed = f.stem.rsplit("_", 2)
    rows.setdefault((mode, n), []).append(100 * meta["training"]["age7"]["best_val_acc"])
for (mode, n), accs in sorted(rows.items()):
    print(f"{mode:12s} {n:6s} " + " / ".join(f"{a:.2f}" for a in accs))
PY
