"""PNG figures for training and evaluation (matplotlib, headless Agg backend).

Every function takes plain data (lists, numpy arrays, the dataclasses of ``evaluation``) and a
path, writes the PNG atomically and returns the path. Figures are created with the object API
(no pyplot global state), so plotting from a training thread is safe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import numpy as np
from matplotlib.figure import Figure

from facial_perception.core.evaluation import Calibration, OpenSetResult, SubgroupTable
from facial_perception.core.fileio import atomic_path

PathLike = str | os.PathLike[str]


def _save(fig: Figure, path: PathLike, dpi: int = 110) -> Path:
    """Save atomically, so readers never see half a PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(path)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is None or value == "":
            continue
        value = float(value)
        if math.isnan(value):
            continue
        xs.append(float(row.get("epoch", i + 1)))
        ys.append(value)
    return xs, ys


def plot_learning_curves(
    history: Sequence[Mapping[str, Any]], path: PathLike, title: str = "learning curves"
) -> Path:
    """Loss (left) and accuracy (right) per epoch, train and validation.

    ``history`` is a list of per-epoch dicts with any of ``epoch, train_loss, val_loss,
    train_acc, val_acc`` (the rows of the training CSV).
    """
    fig = Figure(figsize=(9, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, style in (("train_loss", "-o"), ("val_loss", "--s")):
        xs, ys = _series(history, key)
        if xs:
            ax_loss.plot(xs, ys, style, markersize=3, label=key.replace("_", " "))
    for key, style in (("train_acc", "-o"), ("val_acc", "--s")):
        xs, ys = _series(history, key)
        if xs:
            ax_acc.plot(xs, [100 * y for y in ys], style, markersize=3, label=key.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: Any,
    labels: Sequence[str],
    path: PathLike,
    normalize: bool = True,
    title: str = "confusion matrix",
) -> Path:
    """Confusion matrix with rows = true class; row-normalised (recall per cell) by default.

    Counts are annotated when there are few classes; with many (identity) only colours are shown.
    """
    cm = np.asarray(matrix, dtype=np.float64)
    n = cm.shape[0]
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    side = min(max(4.0, 0.45 * n + 2.0), 24.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(n)
    fontsize = 8 if n <= 20 else 5
    ax.set_xticks(ticks, labels=list(labels), rotation=60, ha="right", fontsize=fontsize)
    ax.set_yticks(ticks, labels=list(labels), fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true", title=title + (" (row-normalised)" if normalize else ""))
    if n <= 16:
        for i in range(n):
            for j in range(n):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                color = "white" if shown[i, j] > (0.5 if normalize else shown.max() / 2) else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=7)
    return _save(fig, path)


def plot_reliability(calib: Calibration, path: PathLike, title: str = "reliability diagram") -> Path:
    """Accuracy against confidence per bin, the diagonal of perfect calibration, and bin counts."""
    fig = Figure(figsize=(4.8, 5.4))
    ax, ax_hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    edges = np.asarray(calib.bin_edges)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.nan_to_num(np.asarray(calib.bin_accuracy, dtype=np.float64), nan=0.0)
    ax.bar(centers, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title} (ECE {calib.ece:.3f})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax_hist.bar(centers, calib.bin_count, width=width * 0.95, color="tab:gray")
    ax_hist.set(xlabel="confidence", ylabel="samples")
    return _save(fig, path)


def plot_open_set(result: OpenSetResult, path: PathLike, title: str | None = None) -> Path:
    """DIR and FAR against the gallery threshold (left) and DIR against FAR (right, log scale)."""
    fig = Figure(figsize=(9, 3.6))
    ax_t, ax_roc = fig.subplots(1, 2)
    t = np.asarray(result.thresholds)
    dir_ = 100 * np.asarray(result.dir)
    far = 100 * np.asarray(result.far)
    ax_t.plot(t, dir_, "-", label="DIR: enrolled faces named right")
    ax_t.plot(t, far, "--", label="FAR: strangers named")
    ax_t.axvline(result.threshold, color="grey", lw=0.8)
    moving = np.flatnonzero((far < far.max()) | (dir_ < dir_.max()))
    low = float(t[moving[0]]) - 0.1 if moving.size else float(t.min())
    ax_t.set(xlabel="threshold (cosine similarity)", ylabel="%")
    ax_t.set_xlim(max(float(t.min()), low), float(t.max()))
    keep = far > 0
    ax_roc.plot(far[keep], dir_[keep], "-")
    d, f = result.at(result.threshold)
    if f > 0:
        ax_roc.plot([100 * f], [100 * d], "o", label=f"threshold {result.threshold:.2f}")
        ax_roc.legend()
    ax_roc.set(xscale="log", xlabel="FAR (%)", ylabel="DIR (%)", title="open-set identification")
    for ax in (ax_t, ax_roc):
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    n = result.stranger_people
    who = f"{result.enrolled_people} enrolled ({result.shots} photos each); {n} strangers"
    fig.suptitle(title or who)
    return _save(fig, path)


def plot_group_accuracy(table: SubgroupTable, path: PathLike, title: str | None = None) -> Path:
    """Horizontal bars of accuracy per group with sample counts; best and worst highlighted."""
    rows = table.rows
    fig = Figure(figsize=(6.5, max(2.5, 0.32 * len(rows) + 1.2)))
    ax = fig.subplots()
    names = [" / ".join(r.group) for r in rows]
    values = [100 * r.accuracy for r in rows]
    colors = []
    for r in rows:
        best, worst = r.group == table.best_group, r.group == table.worst_group
        colors.append("tab:green" if best else "tab:red" if worst else "tab:blue")
    y = np.arange(len(rows))
    ax.barh(y, values, color=colors)
    for yi, r, v in zip(y, rows, values, strict=True):
        ax.text(min(v + 1, 101), yi, f"{v:.1f}% (n={r.count})", va="center", fontsize=7)
    ax.set_yticks(y, labels=names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 115)
    gap = "" if math.isnan(table.largest_gap) else f", largest gap {100 * table.largest_gap:.1f} pts"
    ax.set(xlabel="accuracy (%)", title=(title or "accuracy per " + " x ".join(table.attributes)) + gap)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_curve_comparison(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: PathLike,
    ylabel: str = "validation accuracy (%)",
    title: str = "learning curves",
    scale: float = 100.0,
) -> Path:
    """Mean ± std over runs of one metric per epoch, one line per configuration (Fig. 5 style).

    ``curves`` maps a configuration name to a list of runs, each a list of per-epoch values.
    Runs of different length (early stopping) are averaged over the runs still going.
    """
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name, runs in curves.items():
        runs = [list(r) for r in runs if len(r)]
        if not runs:
            continue
        length = max(len(r) for r in runs)
        padded = np.full((len(runs), length), np.nan)
        for i, r in enumerate(runs):
            padded[i, : len(r)] = np.asarray(r, dtype=np.float64) * scale
        mean = np.nanmean(padded, axis=0)
        std = np.nanstd(padded, axis=0)
        epochs = np.arange(1, length + 1)
        (line,) = ax.plot(epochs, mean, "-o", markersize=3, label=f"{name} (n={len(runs)})")
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_training_log(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], path: PathLike, title: str = "training"
) -> Path:
    """One panel per key against ``step`` (BEGAN: loss_d, loss_g, k, m_global)."""
    fig = Figure(figsize=(3.2 * len(keys), 3.0))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    steps = [float(r.get("step", i)) for i, r in enumerate(rows)]
    for ax, key in zip(axes, keys, strict=True):
        ys = [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]
        ax.plot(steps, ys, linewidth=1)
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def save_image_grid(images: Any, path: PathLike, columns: int = 8) -> Path:
    """Tile images in ``[-1, 1]`` of shape (N, 1|3, H, W) or (N, H, W) into one PNG (no axes)."""
    from PIL import Image

    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"expected images of shape (N, C, H, W), got {arr.shape}")
    n, c, h, w = arr.shape
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    pixels = np.clip((arr + 1.0) * 127.5, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = pixels[i]
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
    return Path(path)
