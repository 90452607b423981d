"""Classification metrics, per-subgroup tables, calibration and checkpoint evaluation.

The metric functions are plain numpy so they work on predictions from anywhere (the core
predictor, ROS bags, a spreadsheet). ``evaluate_checkpoint`` glues them to a checkpoint and a
dataset folder; it is what ``facial-perception evaluate`` runs, so every number in the model card
comes out of this file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facial_perception.core.fileio import atomic_write_text, jsonable


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (shape mismatch, unknown task, labels the model lacks)."""


# --------------------------------------------------------------------------------------------------
# Basic metrics
# --------------------------------------------------------------------------------------------------


def _as_labels(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise EvaluationError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise EvaluationError(f"{name} must hold integer class indices")
        arr = arr.astype(np.int64)
    return arr.astype(np.int64, copy=False)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise EvaluationError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    return t, p


def _num_classes(num_classes: int | None, *arrays: np.ndarray) -> int:
    seen = max((int(a.max()) + 1 for a in arrays if a.size), default=0)
    if num_classes is None:
        return seen
    if seen > num_classes:
        raise EvaluationError(f"class index {seen - 1} out of range for {num_classes} classes")
    return num_classes


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of exact matches; NaN for empty inputs (nothing to measure, not 0 %)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p)) if t.size else math.nan


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Counts ``C[i, j]`` of samples with true class ``i`` predicted as ``j`` (int64)."""
    t, p = _pair(y_true, y_pred)
    if t.size and (t.min() < 0 or p.min() < 0):
        raise EvaluationError("class indices must be >= 0")
    n = _num_classes(num_classes, t, p)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def per_class_recall(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Recall of each class (diagonal / row sum); NaN for classes without samples."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def per_class_precision(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Precision of each class (diagonal / column sum); NaN for classes never predicted."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    predicted = cm.sum(axis=0)
    return np.where(predicted > 0, np.diag(cm) / np.maximum(predicted, 1), np.nan)


def per_class_f1(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """F1 per class; 0 for a class that has samples or predictions but no hit, NaN if neither."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def macro_f1(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Unweighted mean of F1 over classes that occur in ``y_true`` or ``y_pred``.

    Classes absent from both are skipped, so evaluating on a subset of classes is not punished
    for classes nobody asked about.
    """
    f1 = per_class_f1(y_true, y_pred, num_classes)
    f1 = f1[~np.isnan(f1)]
    return float(f1.mean()) if f1.size else math.nan


def within_k_accuracy(y_true: Any, y_pred: Any, k: int = 1) -> float:
    """Ordinal accuracy: prediction at most ``k`` classes away ("within one age group")."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(t - p) <= k)) if t.size else math.nan


def top_k_accuracy(y_true: Any, probabilities: Any, k: int = 2) -> float:
    """Fraction of samples whose true class is among the ``k`` most probable ones."""
    t = _as_labels(y_true, "y_true")
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != t.size:
        raise EvaluationError(f"probabilities must have shape (N, C) with N={t.size}, got {probs.shape}")
    if not t.size:
        return math.nan
    k = max(1, min(k, probs.shape[1]))
    top = np.argpartition(-probs, kth=k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == t[:, None], axis=1)))


# --------------------------------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------------------------------


@dataclass
class SubgroupRow:
    """Accuracy of one group (one value per attribute, e.g. ``("Black", "female")``)."""

    group: tuple[str, ...]
    count: int
    correct: int
    accuracy: float
    ci_low: float = math.nan  # 95 % Wilson interval of the accuracy
    ci_high: float = math.nan


@dataclass
class SubgroupTable:
    """Per-group accuracy for one attribute or a pair of attributes, with the largest gap.

    ``largest_gap`` is the difference between the best and the worst group that has at least
    ``min_count`` samples (groups below it are listed but do not define the gap: one image is
    not evidence of bias). ``gap_ci`` is its 95 % bootstrap interval (:func:`gap_interval`): with a
    few hundred faces per group the gap moves by points from one sample of faces to the next.
    """

    attributes: tuple[str, ...]
    rows: list[SubgroupRow]
    largest_gap: float
    best_group: tuple[str, ...] | None
    worst_group: tuple[str, ...] | None
    min_count: int = 1
    gap_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tuples become lists, NaN becomes null)."""
        return jsonable(asdict(self))

    def to_markdown(self) -> str:
        """A Markdown table; for two attributes a grid (first attribute down, second across)."""
        title = " x ".join(self.attributes)
        lines: list[str] = []
        if len(self.attributes) == 2:
            rows = sorted({r.group[0] for r in self.rows}, key=_natural_key)
            cols = sorted({r.group[1] for r in self.rows}, key=_natural_key)
            cell = {r.group: r for r in self.rows}
            lines.append(f"| {self.attributes[0]} \\ {self.attributes[1]} | " + " | ".join(cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            for a in rows:
                cells = []
                for b in cols:
                    r = cell.get((a, b))
                    cells.append("-" if r is None else f"{_pct(r.accuracy)} (n={r.count})")
                lines.append(f"| {a} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"| {title} | accuracy | 95% interval | n |")
            lines.append("|---|---|---|---|")
            for r in self.rows:
                interval = f"{_pct(r.ci_low)}-{_pct(r.ci_high)}" if not math.isnan(r.ci_low) else "-"
                lines.append(f"| {' / '.join(r.group)} | {_pct(r.accuracy)} | {interval} | {r.count} |")
        if self.best_group is not None and self.worst_group is not None:
            lines.append("")
            interval = (
                f" (95% bootstrap interval {100 * self.gap_ci[0]:.1f}-{100 * self.gap_ci[1]:.1f})"
                if self.gap_ci is not None
                else ""
            )
            lines.append(
                f"Largest gap ({title}): {100 * self.largest_gap:.1f} points{interval}, "
                f"best {' / '.join(self.best_group)}, worst {' / '.join(self.worst_group)}"
                + (f" (groups with n >= {self.min_count})" if self.min_count > 1 else "")
            )
        return "\n".join(lines)


def _natural_key(value: str) -> tuple[tuple[int, float | str], ...]:
    """Numbers inside group names compare as numbers: '0-2' < '4-6' < '15-20' < '60+', 'a2' < 'a10'."""
    try:
        return ((0, float(value)),)
    except ValueError:
        parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
        return tuple((0, float(p)) if i % 2 else (1, p) for i, p in enumerate(parts) if p or i % 2)


def subgroup_table(
    y_true: Any,
    y_pred: Any,
    groups: Mapping[str, Any],
    pair: Sequence[str] | str = ("race", "gender"),
    min_count: int = 1,
) -> SubgroupTable:
    """Accuracy per combination of the attributes in ``pair`` (one name or several).

    ``groups`` maps attribute name -> per-sample values (any hashable; printed with ``str``).
    Samples whose value is ``None`` or empty for any of the attributes are left out.
    """
    t, p = _pair(y_true, y_pred)
    attrs = (pair,) if isinstance(pair, str) else tuple(pair)
    if not attrs:
        raise EvaluationError("subgroup_table needs at least one attribute")
    columns = []
    for name in attrs:
        if name not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise EvaluationError(f"attribute {name!r} not available (known: {known})")
        values = list(groups[name])
        if len(values) != t.size:
            raise EvaluationError(f"attribute {name!r} has {len(values)} values for {t.size} samples")
        columns.append(values)
    stats: dict[tuple[str, ...], list[int]] = {}
    for i in range(t.size):
        key_values = [col[i] for col in columns]
        if any(v is None or (isinstance(v, str) and not v) for v in key_values):
            continue
        key = tuple(str(v) for v in key_values)
        entry = stats.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += int(t[i] == p[i])
    rows = [
        SubgroupRow(group=key, count=n, correct=c, accuracy=c / n, ci_low=low, ci_high=high)
        for key, (n, c) in sorted(stats.items(), key=lambda kv: tuple(_natural_key(v) for v in kv[0]))
        for low, high in [wilson_interval(c, n)]
    ]
    eligible = [r for r in rows if r.count >= min_count]
    if eligible:
        best = max(eligible, key=lambda r: r.accuracy)
        worst = min(eligible, key=lambda r: r.accuracy)
        gap, best_g, worst_g = best.accuracy - worst.accuracy, best.group, worst.group
    else:
        gap, best_g, worst_g = math.nan, None, None
    gap_ci = None
    if len(eligible) > 1:
        gap_ci = gap_interval([r.correct for r in eligible], [r.count for r in eligible])
    return SubgroupTable(attrs, rows, gap, best_g, worst_g, min_count, gap_ci)


def wilson_interval(correct: int, count: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % (``z``) Wilson score interval of a proportion ``correct / count`` (NaN for no samples)."""
    if count <= 0:
        return math.nan, math.nan
    p = correct / count
    denominator = 1.0 + z * z / count
    centre = (p + z * z / (2 * count)) / denominator
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / denominator
    low = 0.0 if correct <= 0 else max(0.0, centre - half)  # exact ends (no float rounding past them)
    high = 1.0 if correct >= count else min(1.0, centre + half)
    return low, high


def gap_interval(
    correct: Sequence[int], counts: Sequence[int], draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the largest accuracy gap between groups.

    Each draw resamples every group's faces with replacement (its number of correct answers is
    binomial with the group's size and accuracy) and takes best minus worst; fixed ``seed``, so a
    report is reproducible. The gap of a draw is a maximum over noisy groups, so the interval sits
    a little above the true gap when the groups are equally good.
    """
    n = np.asarray(counts, dtype=np.int64)
    accuracy_ = np.asarray(correct, dtype=np.float64) / n
    rng = np.random.default_rng(seed)
    resampled = rng.binomial(n, accuracy_, size=(draws, n.size)) / n
    gaps = resampled.max(axis=1) - resampled.min(axis=1)
    low, high = np.percentile(gaps, [2.5, 97.5])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Expected calibration error and the data of a reliability diagram (equal-width bins)."""

    ece: float
    mce: float
    bin_edges: list[float]
    bin_confidence: list[float]
    bin_accuracy: list[float]
    bin_count: list[int]
    mean_confidence: float
    brier: float

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def calibration(probabilities: Any, y_true: Any, n_bins: int = 15) -> Calibration:
    """ECE/MCE of the top-class confidence over ``n_bins`` equal-width bins, and the Brier score.

    Empty bins get NaN confidence/accuracy and do not contribute to the ECE.
    """
    t = _as_labels(y_true, "y_true")
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != t.size:
        raise EvaluationError(f"probabilities must have shape (N, C) with N={t.size}, got {probs.shape}")
    if n_bins < 1:
        raise EvaluationError("n_bins must be >= 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if not t.size:
        nan = [math.nan] * n_bins
        return Calibration(math.nan, math.nan, edges.tolist(), nan, nan, [0] * n_bins, math.nan, math.nan)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == t).astype(np.float64)
    # Bin i holds (edges[i], edges[i+1]]; confidence 0 goes to the first bin.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        bin_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    gaps = np.abs(bin_acc - bin_conf)
    filled = count > 0
    ece = float(np.sum(gaps[filled] * count[filled]) / t.size)
    mce = float(np.max(gaps[filled]))
    onehot = np.zeros_like(probs)
    onehot[np.arange(t.size), t] = 1.0
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    return Calibration(
        ece,
        mce,
        edges.tolist(),
        bin_conf.tolist(),
        bin_acc.tolist(),
        count.astype(int).tolist(),
        float(conf.mean()),
        brier,
    )


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """Everything measured for one task on one dataset; serialises to JSON and Markdown."""

    task: str
    labels: list[str]
    num_samples: int
    accuracy: float
    macro_f1: float
    per_class_recall: dict[str, float]
    per_class_support: dict[str, int]
    confusion_matrix: list[list[int]]
    within_one: float | None = None
    top2: float | None = None
    calibration: Calibration | None = None
    subgroups: list[SubgroupTable] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    accuracy_ci: tuple[float, float] | None = None  # 95 % Wilson interval
    shift: ShiftRobustness | None = None  # the same faces shifted by a few pixels (evaluate --shift-test)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("calibration", "subgroups", "shift")}
        data["calibration"] = self.calibration.to_dict() if self.calibration else None
        data["shift"] = asdict(self.shift) if self.shift else None
        data["subgroups"] = [s.to_dict() for s in self.subgroups]
        return jsonable(data)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as JSON text; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    def to_markdown(self) -> str:
        """Human-readable summary: headline metrics, per-class recall, subgroup tables."""
        lines = [f"### {self.task}: {self.num_samples} samples", ""]
        lines.append("| metric | value |")
        lines.append("|---|---|")
        interval = ""
        if self.accuracy_ci is not None:
            interval = f" (95% interval {_pct(self.accuracy_ci[0])}-{_pct(self.accuracy_ci[1])})"
        lines.append(f"| accuracy | {_pct(self.accuracy)}{interval} |")
        lines.append(f"| macro-F1 | {_pct(self.macro_f1)} |")
        if self.within_one is not None:
            lines.append(f"| within one group | {_pct(self.within_one)} |")
        if self.top2 is not None:
            lines.append(f"| top-2 | {_pct(self.top2)} |")
        if self.calibration is not None:
            lines.append(f"| ECE ({len(self.calibration.bin_count)} bins) | {self.calibration.ece:.3f} |")
            lines.append(f"| mean confidence | {_pct(self.calibration.mean_confidence)} |")
        if self.shift is not None:
            px, shifted = self.shift.pixels, self.shift.accuracy
            lines.append(
                f"| accuracy, faces shifted {px} px right / left / down / up | "
                + " / ".join(_pct(shifted[k]) for k in SHIFT_DIRECTIONS)
                + " |"
            )
            lines.append(f"| label unchanged by every {px} px shift | {_pct(self.shift.unchanged)} |")
        lines += ["", "| class | recall | n |", "|---|---|---|"]
        for name in self.labels:
            recall = _pct(self.per_class_recall.get(name))
            lines.append(f"| {name} | {recall} | {self.per_class_support.get(name, 0)} |")
        for table in self.subgroups:
            lines += ["", f"#### accuracy per {' x '.join(table.attributes)}", "", table.to_markdown()]
        return "\n".join(lines) + "\n"


#: The four shifts of ``evaluate --shift-test``: (dx, dy) per pixel of shift.
SHIFT_DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "left": (-1, 0),
    "down": (0, 1),
    "up": (0, -1),
}


@dataclass
class ShiftRobustness:
    """How much a task's answers depend on where exactly the face sits in the crop.

    A live detector's crops never align faces exactly as the dataset's crops do: the same faces
    shifted by ``pixels`` (at the model's input size, borders replicated) in each direction, the
    accuracy of each shift, and the share of faces whose label is the same in all five versions.
    """

    pixels: int
    accuracy: dict[str, float]
    unchanged: float


def shift_images(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """uint8 faces (N, S, S) moved by (dx, dy) pixels (content moves right/down for positive values),
    the uncovered border filled by replicating the edge row/column."""
    h, w = images.shape[-2:]
    pad = max(abs(dx), abs(dy))
    if pad == 0:
        return images.copy()
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    return np.ascontiguousarray(padded[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w])


def shift_robustness(
    model: Any,
    task: str,
    images: np.ndarray,
    labels: np.ndarray,
    pixels: int,
    base_probs: np.ndarray,
    device: Any = "cpu",
    batch_size: int = 128,
    progress: bool = False,
) -> ShiftRobustness:
    """:class:`ShiftRobustness` of ``task`` on ``images`` (``base_probs``: the unshifted answers)."""
    if pixels < 1 or pixels >= images.shape[-1] // 2:
        raise EvaluationError(f"the shift must be 1..{images.shape[-1] // 2 - 1} pixels, got {pixels}")
    base = base_probs.argmax(axis=1)
    unchanged = np.ones(len(base), dtype=bool)
    accuracy: dict[str, float] = {}
    for name, (dx, dy) in SHIFT_DIRECTIONS.items():
        moved = shift_images(images, dx * pixels, dy * pixels)
        pred = predict_probabilities(model, task, moved, device, batch_size, progress).argmax(axis=1)
        accuracy[name] = float((pred == labels).mean())
        unchanged &= pred == base
    return ShiftRobustness(int(pixels), accuracy, float(unchanged.mean()))  # fmt: skip


def evaluate_predictions(
    task: str,
    labels: Sequence[str],
    y_true: Any,
    probabilities: Any,
    groups: Mapping[str, Any] | None = None,
    subgroup_sets: Sequence[Sequence[str]] = (),
    ordinal: bool = False,
    n_bins: int = 15,
    min_group_count: int = 1,
    meta: Mapping[str, Any] | None = None,
) -> EvaluationReport:
    """Build an :class:`EvaluationReport` from true indices and predicted probabilities.

    ``subgroup_sets`` lists attribute combinations, e.g. ``[("race", "gender"), ("race",)]``.
    ``ordinal`` adds "within one group" accuracy (for age groups).
    """
    t = _as_labels(y_true, "y_true")
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = list(labels)
    if probs.ndim != 2 or probs.shape != (t.size, len(labels)):
        raise EvaluationError(f"probabilities must have shape ({t.size}, {len(labels)}), got {probs.shape}")
    pred = probs.argmax(axis=1) if t.size else np.zeros(0, dtype=np.int64)
    n = len(labels)
    cm = confusion_matrix(t, pred, n)
    recall = per_class_recall(t, pred, n)
    tables = [subgroup_table(t, pred, groups or {}, s, min_group_count) for s in subgroup_sets]
    return EvaluationReport(
        task=task,
        labels=labels,
        num_samples=int(t.size),
        accuracy=accuracy(t, pred),
        macro_f1=macro_f1(t, pred, n),
        per_class_recall={name: float(r) for name, r in zip(labels, recall, strict=True)},
        per_class_support={name: int(s) for name, s in zip(labels, cm.sum(axis=1), strict=True)},
        confusion_matrix=cm.tolist(),
        within_one=within_k_accuracy(t, pred, 1) if ordinal else None,
        top2=top_k_accuracy(t, probs, 2) if n > 2 else None,
        calibration=calibration(probs, t, n_bins),
        subgroups=tables,
        meta=dict(meta or {}),
        accuracy_ci=wilson_interval(int(np.sum(t == pred)), int(t.size)) if t.size else None,
    )


def parse_subgroups(spec: str | Sequence[str] | None) -> list[tuple[str, ...]]:
    """``"race,gender"`` -> ``[("race", "gender"), ("race",), ("gender",)]``.

    Several specs can be separated by ``;``. The combined table comes first, then one table per
    single attribute (that is where "gap between race groups" is read).
    """
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[tuple[str, ...]] = []
    for item in itertools.chain.from_iterable(s.split(";") for s in specs):
        attrs = tuple(a.strip() for a in item.split(",") if a.strip())
        if not attrs:
            continue
        for combo in [attrs] + ([(a,) for a in attrs] if len(attrs) > 1 else []):
            if combo not in out:
                out.append(combo)
    return out


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%"


# --------------------------------------------------------------------------------------------------
# Checkpoint evaluation (the `evaluate` command)
# --------------------------------------------------------------------------------------------------


def predict_probabilities(
    model: Any,
    task: str,
    images: np.ndarray,
    device: Any = "cpu",
    batch_size: int = 128,
    progress: bool = False,
) -> np.ndarray:
    """Probabilities (N, C) of ``task`` for uint8 grey faces (N, S, S), in batches, exactly as the
    node computes them (:meth:`ProgressiveNet.predict`: with the column's mirror averaging)."""
    import torch

    from facial_perception.core.preprocess import normalise_tensor

    model.eval()
    out = np.zeros((len(images), len(model.specs[task].labels)), dtype=np.float64)
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=f"evaluating {task}", disable=not progress,
                          leave=False, unit="batch"):  # fmt: skip
            x = normalise_tensor(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
            probs = model.predict(x.unsqueeze(1).to(device), [task])[task].probabilities
            out[start : start + len(x)] = probs.cpu().numpy()
    return out


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    task: str,
    dataset_path: str | os.PathLike[str],
    out_json: str | os.PathLike[str] | None = None,
    *,
    layout: str = "auto",
    target: str | None = None,
    split: str | None = None,
    subgroups: str | Sequence[str] | None = "auto",
    plots_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 128,
    workers: int = 2,
    image_cache: str | os.PathLike[str] | None = None,
    ordinal: bool | None = None,
    n_bins: int = 15,
    min_group_count: int = 1,
    shift_pixels: int = 0,
    progress: bool = True,
) -> EvaluationReport:
    """Evaluate one task of a checkpoint on a dataset folder; optionally write JSON and PNGs.

    Labels of the dataset are matched to the column's label names (a label the column does not
    know is an error). ``subgroups="auto"`` reports race x gender, race and gender when the
    dataset carries those attributes (UTKFace); ``"race,gender"`` asks for them explicitly;
    ``None`` skips subgroup tables. ``ordinal`` (default: tasks named ``age*``) adds
    within-one-group accuracy. ``shift_pixels`` > 0 adds :class:`ShiftRobustness` (four more passes).
    """
    from facial_perception.core.checkpoint import load_model
    from facial_perception.core.datasets import load_images
    from facial_perception.core.devices import resolve_device
    from facial_perception.core.training import open_task_dataset

    model, meta = load_model(checkpoint)
    if task not in model.specs:
        raise EvaluationError(
            f"checkpoint {checkpoint} has no column {task!r} (columns: {', '.join(model.specs)})"
        )
    spec = model.specs[task]
    size = model.config.input_size
    dataset = open_task_dataset(dataset_path, task, layout, target, size, spec.labels, split)
    images, labels, kept = load_images(
        dataset, size=size, workers=workers, cache=image_cache, progress=progress
    )
    if len(labels) == 0:
        raise EvaluationError(f"no readable labelled images in {dataset_path}")
    samples = [dataset.samples[int(i)] for i in kept]
    keys = sorted({k for s in samples for k in s.attributes})
    groups = {k: [s.attributes.get(k) for s in samples] for k in keys}
    if subgroups == "auto":
        sets = parse_subgroups("race,gender") if {"race", "gender"} <= set(keys) else []
    else:
        sets = parse_subgroups(subgroups)
        missing = sorted({a for s in sets for a in s} - set(keys))
        if missing:
            raise EvaluationError(
                f"dataset {dataset_path} has no attribute(s) {missing} for subgroups"
                f" (available: {keys or 'none'})"
            )
    dev = resolve_device(device)
    model.to(dev)
    probs = predict_probabilities(model, task, images, dev, batch_size, progress)
    report = evaluate_predictions(
        task,
        spec.labels,
        labels,
        probs,
        groups,
        sets,
        ordinal=task.startswith("age") if ordinal is None else ordinal,
        n_bins=n_bins,
        min_group_count=min_group_count,
        meta={
            "checkpoint": str(checkpoint),
            "dataset": str(dataset_path),
            "layout": layout,
            "target": target,
            "config": model.config.name,
            "input_size": size,
            "skipped": dict(dataset.skipped),
            "unreadable": int(len(dataset) - len(kept)),
            "training": (meta.get("training") or {}).get(task) if isinstance(meta, Mapping) else None,
        },
    )
    if shift_pixels:
        report.shift = shift_robustness(
            model, task, images, labels, shift_pixels, probs, dev, batch_size, progress
        )
    if out_json is not None:
        report.to_json(out_json)
    if plots_dir is not None:
        write_report_plots(report, plots_dir)
    return report


def write_report_plots(report: EvaluationReport, folder: str | os.PathLike[str]) -> list[Path]:
    """Confusion matrix, reliability diagram and one bar chart per subgroup table, as PNGs."""
    from facial_perception.core import plots

    out = Path(folder)
    paths = [
        plots.plot_confusion_matrix(
            report.confusion_matrix, report.labels, out / f"{report.task}_confusion.png", title=report.task
        )
    ]
    if report.calibration is not None and report.num_samples:
        paths.append(
            plots.plot_reliability(report.calibration, out / f"{report.task}_reliability.png", report.task)
        )
    for table in report.subgroups:
        name = "_".join(table.attributes)
        paths.append(
            plots.plot_group_accuracy(table, out / f"{report.task}_by_{name}.png", f"{report.task} accuracy")
        )
    return paths


# --------------------------------------------------------------------------------------------------
# Few-shot identification (enrol K photos per unseen person, identify the rest)
# --------------------------------------------------------------------------------------------------


@dataclass
class FewShotResult:
    """Rank-1/rank-5 identification of people enrolled with ``shots`` photos each."""

    shots: int
    people: int
    queries: int
    trials: int
    rank1: float
    rank1_std: float
    rank5: float
    per_trial_rank1: list[float]
    skipped_people: int
    meta: dict[str, Any] = field(default_factory=dict)
    #: strangers in view as well (``fewshot --open-set``), else None
    open_set: OpenSetResult | None = None

    def to_dict(self) -> dict[str, Any]:
        out = jsonable(asdict(self))
        out["open_set"] = self.open_set.to_dict() if self.open_set is not None else None
        return out

    def to_markdown(self) -> str:
        text = (
            f"| shots | people | queries/trial | trials | rank-1 | rank-5 |\n|---|---|---|---|---|---|\n"
            f"| {self.shots} | {self.people} | {self.queries} | {self.trials} | "
            f"{_pct(self.rank1)} ± {100 * self.rank1_std:.1f} | {_pct(self.rank5)} |\n"
        )
        return text + ("\n" + self.open_set.to_markdown() if self.open_set is not None else "")


def _photos_by_person(embeddings: Any, person: Sequence[str]) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Unit-norm rows of ``embeddings`` (N, D) and each person's row indices."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(person):
        raise EvaluationError(f"embeddings must be (N, D) with N={len(person)}, got {emb.shape}")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    by_person: dict[str, list[int]] = {}
    for i, p in enumerate(person):
        by_person.setdefault(str(p), []).append(i)
    return emb, by_person


def _enrol(
    emb: np.ndarray, by_person: Mapping[str, list[int]], people: Sequence[str], shots: int, rng: Any
) -> tuple[np.ndarray, list[int], list[int]]:
    """Enrol ``shots`` random photos of each person as the gallery does (unit mean): (templates (P, D),
    indices of their other photos, the index in ``people`` of each of those photos' owner)."""
    templates, query_idx, query_label = [], [], []
    for label, p in enumerate(people):
        idx = rng.permutation(by_person[p])
        template = emb[idx[:shots]].mean(axis=0)
        templates.append(template / max(np.linalg.norm(template), 1e-12))
        query_idx.extend(idx[shots:].tolist())
        query_label.extend([label] * (len(idx) - shots))
    return np.stack(templates), query_idx, query_label


def fewshot_identification(
    embeddings: Any, person: Sequence[str], shots: int = 5, trials: int = 10, seed: int = 0
) -> FewShotResult:
    """Nearest class-mean (cosine) identification of unseen people.

    Per trial and person, ``shots`` random photos are enrolled (their L2-normalised embeddings
    averaged into one template) and every other photo of that person is a query against all
    templates. People with fewer than ``shots + 1`` photos are skipped.
    """
    emb, by_person = _photos_by_person(embeddings, person)
    if shots < 1 or trials < 1:
        raise EvaluationError("shots and trials must be >= 1")
    eligible = sorted(p for p, idx in by_person.items() if len(idx) > shots)
    if len(eligible) < 2:
        raise EvaluationError(
            f"few-shot identification needs at least 2 people with more than {shots} photos,"
            f" found {len(eligible)}"
        )
    rng = np.random.default_rng(seed)
    rank1, rank5, queries = [], [], 0
    for _ in range(trials):
        templates, query_idx, query_label = _enrol(emb, by_person, eligible, shots, rng)
        scores = emb[query_idx] @ templates.T
        truth = np.asarray(query_label)
        rank1.append(float(np.mean(scores.argmax(axis=1) == truth)))
        rank5.append(top_k_accuracy(truth, scores, k=5))
        queries = len(query_idx)
    return FewShotResult(
        shots=shots,
        people=len(eligible),
        queries=queries,
        trials=trials,
        rank1=float(np.mean(rank1)),
        rank1_std=float(np.std(rank1, ddof=1)) if trials > 1 else 0.0,
        rank5=float(np.mean(rank5)),
        per_trial_rank1=rank1,
        skipped_people=len(by_person) - len(eligible),
    )


#: The identity gallery's default open-set threshold (cosine similarity of a face to an enrolled
#: person's mean embedding, with the shipped model's whitened embeddings): the lowest that let at most
#: 5 % of strangers through with 20 people enrolled, in `fewshot --open-set 20` on people the shipped
#: model never saw (docs/MODEL_CARD.md, "Strangers"); the node's ``identity_threshold`` starts here.
DEFAULT_IDENTITY_THRESHOLD = 0.33

#: The false-accept rates whose thresholds ``OpenSetResult`` reports.
OPEN_SET_FARS = (0.01, 0.05, 0.10)


@dataclass
class OpenSetResult:
    """Open-set identification: some people enrolled, the others strangers who must stay unknown.

    ``dir`` (detection and identification rate) is the share of the enrolled people's other photos
    named correctly with a similarity >= the threshold; ``far`` (false accept rate) the share of the
    strangers' photos that reach the threshold against anyone in the gallery. Both are means over
    trials, one value per entry of ``thresholds``.
    """

    shots: int
    enrolled_people: int
    stranger_people: int
    known_queries: int
    stranger_queries: int
    trials: int
    rank1: float
    thresholds: list[float]
    dir: list[float]
    far: list[float]
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)

    def at(self, threshold: float) -> tuple[float, float]:
        """(DIR, FAR) at the grid threshold nearest to ``threshold``."""
        i = int(np.argmin(np.abs(np.asarray(self.thresholds) - threshold)))
        return self.dir[i], self.far[i]

    def for_far(self, far: float) -> tuple[float, float, float]:
        """(threshold, DIR, FAR) of the lowest grid threshold whose FAR is <= ``far``."""
        for t, d, f in zip(self.thresholds, self.dir, self.far, strict=True):
            if f <= far:
                return t, d, f
        return self.thresholds[-1], self.dir[-1], self.far[-1]

    def to_dict(self) -> dict[str, Any]:
        out = jsonable(asdict(self))
        d, f = self.at(self.threshold)
        out["at_threshold"] = {"threshold": self.threshold, "dir": d, "far": f}
        out["operating_points"] = [
            {"max_far": target, "threshold": t, "dir": dd, "far": ff}
            for target in OPEN_SET_FARS
            for t, dd, ff in [self.for_far(target)]
        ]
        return out

    def to_markdown(self) -> str:
        given_dir, given_far = self.at(self.threshold)
        rows = [f"| {self.threshold:.2f} (given) | {_pct(given_dir)} | {_pct(given_far)} |"]
        for target in OPEN_SET_FARS:
            t, d, f = self.for_far(target)
            rows.append(f"| {t:.2f} (FAR <= {100 * target:.0f} %) | {_pct(d)} | {_pct(f)} |")
        return (
            f"Open set: {self.enrolled_people} people enrolled with {self.shots} photos each, "
            f"{self.stranger_people} strangers; per trial {self.known_queries} photos of enrolled people, "
            f"{self.stranger_queries} of strangers; {self.trials} trials; rank-1 among the enrolled "
            f"(no threshold) {_pct(self.rank1)}.\n\n"
            "| threshold | DIR (named right, above threshold) | FAR (strangers named) |\n|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )


def open_set_identification(
    embeddings: Any,
    person: Sequence[str],
    enrol_people: int,
    shots: int = 5,
    trials: int = 10,
    seed: int = 0,
    threshold: float = DEFAULT_IDENTITY_THRESHOLD,
    grid: Sequence[float] | None = None,
) -> OpenSetResult:
    """Gallery matching as the node does it, with strangers in view.

    Per trial, ``enrol_people`` random people with more than ``shots`` photos are enrolled (mean of
    ``shots`` unit embeddings, as ``IdentityGallery`` with ``match_mode="mean"``); their other photos
    must be named right and every photo of everyone else (people with too few photos included) must
    stay below the threshold. A stranger counts as accepted when their best similarity to any
    enrolled person reaches it, whoever that is.
    """
    emb, by_person = _photos_by_person(embeddings, person)
    if shots < 1 or trials < 1 or enrol_people < 1:
        raise EvaluationError("shots, trials and enrolled people must be >= 1")
    eligible = sorted(p for p, idx in by_person.items() if len(idx) > shots)
    if len(eligible) < enrol_people or len(by_person) <= enrol_people:
        raise EvaluationError(
            f"an open-set test with {enrol_people} enrolled people needs {enrol_people} people with more than"
            f" {shots} photos ({len(eligible)} found) and at least one more person as a stranger"
            f" ({len(by_person)} people in all)"
        )
    thresholds = np.round(np.arange(-1.0, 1.0 + 1e-9, 0.01), 2) if grid is None else np.asarray(grid, float)
    rng = np.random.default_rng(seed)
    dirs, fars, rank1 = [], [], []
    known_queries = stranger_queries = 0
    for _ in range(trials):
        enrolled = [eligible[i] for i in rng.choice(len(eligible), enrol_people, replace=False)]
        gallery, query_idx, query_label = _enrol(emb, by_person, enrolled, shots, rng)
        chosen = set(enrolled)
        strangers = [i for p, idx in by_person.items() if p not in chosen for i in idx]
        known_scores = emb[query_idx] @ gallery.T
        named_right = known_scores.argmax(axis=1) == np.asarray(query_label)
        known_best = known_scores.max(axis=1)
        stranger_best = (emb[strangers] @ gallery.T).max(axis=1)
        rank1.append(float(named_right.mean()))
        dirs.append([float(np.mean(named_right & (known_best >= t))) for t in thresholds])
        fars.append([float(np.mean(stranger_best >= t)) for t in thresholds])
        known_queries, stranger_queries = len(query_idx), len(strangers)
    return OpenSetResult(
        shots=shots,
        enrolled_people=enrol_people,
        stranger_people=len(by_person) - enrol_people,
        known_queries=known_queries,
        stranger_queries=stranger_queries,
        trials=trials,
        rank1=float(np.mean(rank1)),
        thresholds=[float(t) for t in thresholds],
        dir=np.mean(dirs, axis=0).tolist(),
        far=np.mean(fars, axis=0).tolist(),
        threshold=float(threshold),
    )


def embed_images(
    model: Any,
    task: str,
    images: np.ndarray,
    device: Any = "cpu",
    batch_size: int = 128,
    raw: bool = False,
) -> np.ndarray:
    """Embeddings (N, D) of ``task``'s column for uint8 grey faces (N, S, S), as the gallery gets them
    (whitened where the column has a whitening); ``raw``: the column's penultimate layer itself."""
    import torch

    from facial_perception.core.preprocess import normalise_tensor

    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalise_tensor(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
            x = x.unsqueeze(1).to(device)
            if raw:
                out = model(x, [task])[task].embedding
            else:
                out = model.predict(x, [task], mirror=False, standalone=False)[task].embedding
            chunks.append(out.float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


#: ``fit_embedding_whitening``'s default ridge, relative to the largest variance: measured on people
#: the shipped model never saw (lfw_unlabeled), 1e-3 let the fewest strangers through for as many
#: enrolled faces named (docs/MODEL_CARD.md, "Strangers").
WHITENING_SHRINKAGE = 1e-3


def fit_embedding_whitening(
    embeddings: Any, shrinkage: float = WHITENING_SHRINKAGE, floor: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), projection (D, K)) that centre embeddings and give them unit variance along
    their principal axes, each axis divided by ``sqrt(variance + shrinkage * largest variance)``.

    Axes whose variance is below ``floor`` times the largest (dead ReLU units, a rank below D) are
    dropped, so K <= D. Fit on the faces the column was trained on, never on evaluation faces.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
        raise EvaluationError(f"whitening needs at least 2 embeddings (N, D), got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise EvaluationError("whitening needs finite embeddings")
    if shrinkage < 0.0 or not 0.0 < floor < 1.0:
        raise EvaluationError(f"shrinkage must be >= 0 and floor in (0, 1), got {shrinkage} and {floor}")
    mean = emb.mean(axis=0)
    _, singular, axes = np.linalg.svd(emb - mean, full_matrices=False)
    variance = singular**2 / len(emb)
    if variance[0] <= 0:
        raise EvaluationError("whitening needs embeddings that differ from each other")
    keep = variance > floor * variance[0]
    projection = axes[keep].T / np.sqrt(variance[keep] + shrinkage * variance[0])
    return mean.astype(np.float32), projection.astype(np.float32)


def whiten_checkpoint(
    checkpoint: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    task: str | None = None,
    shrinkage: float = WHITENING_SHRINKAGE,
    holdout_fraction: float | None = None,
    split_seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    image_cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit an :class:`EmbeddingWhitening` for the identity column on the identity folders it was
    trained on and write the model with it to ``out`` (``facial-perception whiten``).

    ``holdout_fraction``: leave out the people ``train-task --holdout-people`` left out (same
    fraction and ``split_seed``), so a few-shot test on them stays fair. Returns a summary.
    """
    import torch

    from facial_perception.core import datasets as ds
    from facial_perception.core.checkpoint import load_model, save_model
    from facial_perception.core.devices import resolve_device
    from facial_perception.core.training import open_task_dataset

    model, meta = load_model(checkpoint)
    task = _identity_task(model, checkpoint, task)
    size = model.config.input_size
    dataset = open_task_dataset(data_path, "identity", "identity", None, size)
    if holdout_fraction:
        dataset, _held_out = ds.split_people(dataset, holdout_fraction, seed=split_seed)
    images, labels, _kept = ds.load_images(
        dataset, size=size, workers=workers, cache=image_cache, progress=progress
    )
    dev = resolve_device(device)
    model.to(dev)
    raw = embed_images(model, task, images, dev, raw=True)
    mean, projection = fit_embedding_whitening(raw, shrinkage=shrinkage)
    model.set_whitening(task, torch.from_numpy(mean), torch.from_numpy(projection))
    people = len(set(int(label) for label in labels))
    summary = {
        "task": task,
        "faces": len(raw),
        "people": people,
        "in_dim": int(mean.shape[0]),
        "out_dim": int(projection.shape[1]),
        "shrinkage": float(shrinkage),
        "dataset": str(data_path),
    }
    training = dict(meta.get("training") or {})
    entry = training.get(task)
    training[task] = dict(entry if isinstance(entry, dict) else {}, embedding_whitening=summary)
    save_model(out, model.cpu(), training)
    return summary


def _identity_task(model: Any, checkpoint: str | os.PathLike[str], task: str | None) -> str:
    """``task``, or the checkpoint's last identity-kind column; one-line errors otherwise."""
    if task is None:
        kinds = [name for name, spec in model.specs.items() if spec.kind == "identity"]
        if not kinds:
            raise EvaluationError(f"checkpoint {checkpoint} has no identity column; pass --task")
        return kinds[-1]
    if task not in model.specs:
        raise EvaluationError(
            f"checkpoint {checkpoint} has no column {task!r} (columns: {', '.join(model.specs)})"
        )
    return task


def fewshot_checkpoint(
    checkpoint: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    task: str | None = None,
    shots: int = 5,
    trials: int = 10,
    holdout_fraction: float | None = None,
    split_seed: int = 0,
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    image_cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    open_set_people: int | None = None,
    threshold: float = DEFAULT_IDENTITY_THRESHOLD,
) -> FewShotResult:
    """Few-shot rank-1 of a checkpoint's identity column on people it was not trained on.

    The people come from identity folders at ``data_path``: with ``holdout_fraction`` the
    people that ``train-task --holdout-people`` left out (same fraction and ``split_seed``);
    otherwise every person whose name is not among the column's labels. ``open_set_people``:
    also enrol that many of them and treat the rest as strangers (``open_set_identification``).
    """
    from facial_perception.core import datasets as ds
    from facial_perception.core.checkpoint import load_model
    from facial_perception.core.devices import resolve_device
    from facial_perception.core.training import open_task_dataset

    model, _meta = load_model(checkpoint)
    task = _identity_task(model, checkpoint, task)
    size = model.config.input_size
    dataset = open_task_dataset(data_path, "identity", "identity", None, size)
    if holdout_fraction:
        _known, dataset = ds.split_people(dataset, holdout_fraction, seed=split_seed)
        selection = f"people held out with fraction {holdout_fraction} (split seed {split_seed})"
    else:
        trained = set(model.specs[task].labels)
        keep = [i for i, s in enumerate(dataset.samples) if dataset.label_names[s.label] not in trained]
        if not keep:
            raise EvaluationError(
                f"every person in {data_path} is known to column {task!r}; "
                "pass --holdout-fraction as used with train-task --holdout-people"
            )
        dataset = dataset.subset(keep)
        selection = "people unknown to the column"
    images, labels, _kept = ds.load_images(
        dataset, size=size, workers=workers, cache=image_cache, progress=progress
    )
    dev = resolve_device(device)
    model.to(dev)
    emb = embed_images(model, task, images, dev)
    names = [dataset.label_names[int(i)] for i in labels]
    result = fewshot_identification(emb, names, shots, trials, seed)
    if open_set_people:
        result.open_set = open_set_identification(
            emb, names, open_set_people, shots=shots, trials=trials, seed=seed, threshold=threshold
        )
    result.meta = {
        "checkpoint": str(checkpoint),
        "dataset": str(data_path),
        "task": task,
        "people": selection,
    }
    return result
