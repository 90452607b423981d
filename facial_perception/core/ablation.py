"""The paper's experiments on any datasets: Table IV, Table V and Fig. 5.

- :func:`frozen_vs_retrained` — one column per task on the pre-trained encoder, frozen or
  re-trained with the column (Table IV).
- :func:`lateral_subsets` — a target task with lateral connections from every subset of the other
  columns, the empty subset included (Table V).
- :func:`lateral_curves` — validation accuracy per epoch of each task without and with laterals
  from all other columns (Fig. 5).

Every setting is trained ``runs`` times with seeds ``seed, seed + 1, ...`` on the same
train/validation split; results are reported as mean ± std of the best validation accuracy in
Markdown and CSV. Runs live in their own folders with resumable state, so an interrupted
ablation picks up where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from facial_perception.core.fileio import atomic_write_text
from facial_perception.core.training import ColumnData, TrainingError, train_column

PathLike = str | os.PathLike[str]


class AblationError(ValueError):
    """An ablation that cannot run as asked (unknown target task, too few tasks, bad run count)."""


@dataclass
class TaskData:
    """One task of an ablation: its name, label names, kind and in-memory train/validation data."""

    name: str
    labels: list[str]
    train: ColumnData
    val: ColumnData
    kind: str = "classification"


@dataclass
class RunRecord:
    """One training run: which setting, which seed, what it reached and its curves."""

    experiment: str
    task: str
    setting: str
    run: int
    seed: int
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    val_acc_curve: list[float] = field(default_factory=list)
    train_loss_curve: list[float] = field(default_factory=list)


@dataclass
class AblationResult:
    """All runs of one experiment, with summary tables and the files written."""

    experiment: str
    records: list[RunRecord]
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """Per (task, setting): runs, mean/std/min/max best validation accuracy, mean best epoch."""
        groups: dict[tuple[str, str], list[RunRecord]] = {}
        for record in self.records:
            groups.setdefault((record.task, record.setting), []).append(record)
        rows = []
        for (task, setting), recs in groups.items():
            acc = np.array([r.best_val_acc for r in recs], dtype=np.float64)
            rows.append(
                {
                    "task": task,
                    "setting": setting,
                    "runs": len(recs),
                    "mean_acc": float(acc.mean()),
                    "std_acc": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    "min_acc": float(acc.min()),
                    "max_acc": float(acc.max()),
                    "mean_best_epoch": float(np.mean([r.best_epoch for r in recs])),
                    "mean_epochs_run": float(np.mean([r.epochs_run for r in recs])),
                }
            )
        return rows

    def to_markdown(self) -> str:
        """Settings down, tasks across; cells ``mean ± std`` of best validation accuracy in %."""
        rows = self.summary()
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        cell = {(r["task"], r["setting"]): r for r in rows}
        runs = sorted({r["runs"] for r in rows})
        lines = [
            f"### {self.experiment}: best validation accuracy (%), mean ± std over "
            f"{'/'.join(map(str, runs))} runs",
            "",
            "| setting | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for setting in settings:
            cells = []
            for task in tasks:
                r = cell.get((task, setting))
                cells.append("-" if r is None else f"{100 * r['mean_acc']:.2f} ± {100 * r['std_acc']:.2f}")
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: PathLike) -> dict[str, str]:
        """``<experiment>_runs.csv``, ``<experiment>_summary.csv`` and ``<experiment>.md`` (atomic)."""
        out = Path(out_dir)
        runs = io.StringIO()
        writer = csv.writer(runs, lineterminator="\n")
        writer.writerow(
            ["experiment", "task", "setting", "run", "seed", "best_val_acc", "best_epoch", "epochs_run"]
        )
        for r in self.records:
            writer.writerow(
                [
                    r.experiment,
                    r.task,
                    r.setting,
                    r.run,
                    r.seed,
                    f"{r.best_val_acc:.6f}",
                    r.best_epoch,
                    r.epochs_run,
                ]
            )
        summary = io.StringIO()
        rows = self.summary()
        writer = csv.DictWriter(summary, fieldnames=list(rows[0]) if rows else ["task"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
        files = {
            "runs_csv": out / f"{self.experiment}_runs.csv",
            "summary_csv": out / f"{self.experiment}_summary.csv",
            "markdown": out / f"{self.experiment}.md",
        }
        atomic_write_text(files["runs_csv"], runs.getvalue())
        atomic_write_text(files["summary_csv"], summary.getvalue())
        atomic_write_text(files["markdown"], self.to_markdown())
        self.files.update({k: str(v) for k, v in files.items()})
        return self.files


def _check_runs(runs: int) -> None:
    if runs < 1:
        raise AblationError(f"runs must be >= 1, got {runs}")


def _fresh_model(base: nn.Module) -> nn.Module:
    """A ProgressiveNet with ``base``'s config and encoder weights and no columns."""
    from facial_perception.core.progressive import ProgressiveNet

    model = ProgressiveNet(base.config)
    model.init_encoder_from(base.encoder.state_dict())
    return model


def _column_name(task: str, model: nn.Module) -> str:
    """The target's column name: the task name unless the model already has such a column."""
    name, i = task, 1
    while name in model.columns:
        name = f"{task}_ablation{i if i > 1 else ''}"
        i += 1
    return name


def _run(
    experiment: str,
    model: nn.Module,
    task: TaskData,
    laterals: Sequence[str],
    setting: str,
    run: int,
    seed: int,
    run_dir: Path,
    train_kwargs: dict[str, Any],
) -> RunRecord:
    from facial_perception.core.progressive import TaskSpec

    spec = TaskSpec(_column_name(task.name, model), task.labels, list(laterals), task.kind)
    result = train_column(
        model, spec, task.train, task.val, run_dir, seed=seed, save_checkpoint=False, **train_kwargs
    )
    return RunRecord(
        experiment,
        task.name,
        setting,
        run,
        seed,
        result.best_val_acc,
        result.best_epoch,
        result.epochs_run,
        [float(h["val_acc"]) for h in result.history],
        [float(h["train_loss"]) for h in result.history],
    )


def _train_kwargs(out: Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = {"cache_dir": out / "feature_cache", "plots": False}
    merged.update(kwargs)
    forbidden = {"seed", "save_checkpoint", "train_encoder"} & set(kwargs)
    if forbidden:
        raise AblationError(f"ablation sets {sorted(forbidden)} itself")
    return merged


def frozen_vs_retrained(
    base: nn.Module,
    tasks: Sequence[TaskData],
    out_dir: PathLike,
    runs: int = 3,
    seed: int = 0,
    **train_kwargs: Any,
) -> AblationResult:
    """Table IV: each task's column (no laterals) on the encoder of ``base``, frozen vs re-trained."""
    _check_runs(runs)
    if not tasks:
        raise AblationError("frozen-vs-retrained needs at least one task")
    out = Path(out_dir)
    kwargs = _train_kwargs(out, train_kwargs)
    records = []
    for task in tasks:
        for setting, retrain in (("frozen encoder", False), ("re-trained encoder", True)):
            for run in range(runs):
                model = _fresh_model(base)
                run_dir = out / "encoder" / task.name / ("retrained" if retrain else "frozen") / f"run{run}"
                records.append(
                    _run(
                        "frozen_vs_retrained",
                        model,
                        task,
                        [],
                        setting,
                        run,
                        seed + run,
                        run_dir,
                        {**kwargs, "train_encoder": retrain},
                    )
                )
    result = AblationResult("frozen_vs_retrained", records)
    result.write(out)
    return result


def ensure_columns(
    model: nn.Module,
    tasks: Sequence[TaskData],
    out_dir: PathLike,
    seed: int = 0,
    **train_kwargs: Any,
) -> nn.Module:
    """Make sure ``model`` has a column per task, training missing ones (frozen encoder, no laterals)."""
    out = Path(out_dir)
    kwargs = _train_kwargs(out, train_kwargs)
    from facial_perception.core.progressive import TaskSpec

    for task in tasks:
        if task.name in model.columns:
            if list(model.specs[task.name].labels) != list(task.labels):
                raise AblationError(f"the model's column {task.name!r} has other labels than its dataset")
            continue
        spec = TaskSpec(task.name, task.labels, [], task.kind)
        train_column(
            model,
            spec,
            task.train,
            task.val,
            out / "sources" / task.name,
            seed=seed,
            save_checkpoint=False,
            train_encoder=False,
            **kwargs,
        )
    return model


def _subset_name(subset: Sequence[str]) -> str:
    return " + ".join(subset) if subset else "no laterals"


def lateral_subsets(
    base: nn.Module,
    target: TaskData,
    sources: Sequence[TaskData],
    out_dir: PathLike,
    runs: int = 3,
    seed: int = 0,
    max_sources: int | None = None,
    **train_kwargs: Any,
) -> AblationResult:
    """Table V: ``target``'s column with laterals from every subset of the ``sources`` columns.

    Source columns missing from ``base`` are trained first (once, seed ``seed``). Subsets hold at
    most ``max_sources`` columns (default: all sizes, the empty subset included).
    """
    _check_runs(runs)
    names = [s.name for s in sources]
    if target.name in names:
        raise AblationError(f"the target task {target.name!r} cannot be its own lateral source")
    out = Path(out_dir)
    kwargs = _train_kwargs(out, train_kwargs)
    model = ensure_columns(copy.deepcopy(base), sources, out, seed, **train_kwargs)
    limit = len(names) if max_sources is None else min(max_sources, len(names))
    subsets = [c for k in range(limit + 1) for c in itertools.combinations(names, k)]
    records = []
    for subset in subsets:
        folder = "_".join(subset) or "none"
        for run in range(runs):
            run_dir = out / "laterals" / target.name / folder / f"run{run}"
            records.append(
                _run(
                    f"laterals_{target.name}",
                    copy.deepcopy(model),
                    target,
                    list(subset),
                    _subset_name(subset),
                    run,
                    seed + run,
                    run_dir,
                    {**kwargs, "train_encoder": False},
                )
            )
    result = AblationResult(f"laterals_{target.name}", records)
    result.write(out)
    return result


def lateral_curves(
    base: nn.Module,
    tasks: Sequence[TaskData],
    out_dir: PathLike,
    runs: int = 3,
    seed: int = 0,
    **train_kwargs: Any,
) -> AblationResult:
    """Fig. 5: each task's validation-accuracy curve without laterals and with all other columns."""
    from facial_perception.core.plots import plot_curve_comparison

    _check_runs(runs)
    if len(tasks) < 2:
        raise AblationError("learning curves with laterals need at least two tasks")
    out = Path(out_dir)
    kwargs = _train_kwargs(out, train_kwargs)
    model = ensure_columns(copy.deepcopy(base), tasks, out, seed, **train_kwargs)
    records: list[RunRecord] = []
    files: dict[str, str] = {}
    for task in tasks:
        others = [t.name for t in tasks if t.name != task.name]
        settings = (("no laterals", []), (f"laterals from {' + '.join(others)}", others))
        curves: dict[str, list[list[float]]] = {}
        for setting, laterals in settings:
            for run in range(runs):
                folder = "with" if laterals else "without"
                run_dir = out / "curves" / task.name / folder / f"run{run}"
                record = _run(
                    "lateral_curves",
                    copy.deepcopy(model),
                    task,
                    laterals,
                    setting,
                    run,
                    seed + run,
                    run_dir,
                    {**kwargs, "train_encoder": False},
                )
                records.append(record)
                curves.setdefault(setting, []).append(record.val_acc_curve)
        png = plot_curve_comparison(
            curves, out / f"curves_{task.name}.png", title=f"{task.name}: validation accuracy"
        )
        files[f"curves_{task.name}"] = str(png)
    result = AblationResult("lateral_curves", records, files)
    result.write(out)
    return result


def format_mean_std(values: Sequence[float]) -> str:
    """``"83.66 ± 1.20"`` (percent) for a list of accuracies in [0, 1]."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return "-"
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return f"{100 * float(arr.mean()):.2f} ± {100 * std:.2f}"


def task_data_from_split(name: str, train: ColumnData, val: ColumnData, kind: str | None = None) -> TaskData:
    """Wrap a train/validation pair; identity kind for tasks named ``identity*``."""
    labels = train.label_names
    if labels is None:
        count = int(max(train.labels.max(), val.labels.max())) + 1
        labels = [str(i) for i in range(count)]
    if len(labels) < 2:
        raise TrainingError(f"task {name!r} needs at least two labels")
    kind = kind or ("identity" if name.startswith("identity") else "classification")
    return TaskData(name, list(labels), train, val, kind)


__all__ = [
    "AblationError",
    "AblationResult",
    "RunRecord",
    "TaskData",
    "ensure_columns",
    "format_mean_std",
    "frozen_vs_retrained",
    "lateral_curves",
    "lateral_subsets",
    "task_data_from_split",
]
