"""Re-train the shared encoder on several labelled tasks at once (one column per task).

Why: re-training the encoder with the first task (the paper's "re-trained encoder") tunes it to
that task only; with emotion first, the frozen encoder then capped gender and identity (a wider
column, laterals or augmentation moved neither; docs/MODEL_CARD.md). Here every optimiser step
takes one batch of each task, sums their losses and updates the encoder with all columns, so the
encoder learns what all known tasks need. Afterwards the encoder is frozen as usual and new tasks
are added as progressive columns; the joint columns can be kept or dropped and re-trained on the
frozen encoder (``facial-perception columns --drop``).

Single process (CPU or one GPU); resumable after every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facial_perception.core.preprocess import Augment
from facial_perception.core.training import (
    ColumnData,
    TrainingError,
    _device,
    _epoch_seed,
    _Inputs,
    _progress,
    load_state,
    predict_logits,
    save_model_checkpoint,
    save_state,
    seed_everything,
    write_csv,
)

PathLike = str | Path


@dataclass
class JointTask:
    """One task of a joint run: its column spec, data, and the weight of its loss."""

    spec: Any
    train: ColumnData
    val: ColumnData
    soft_targets: bool = False
    weight: float = 1.0


@dataclass
class JointResult:
    """What :func:`train_jointly` did; the model already holds the best weights."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float
    best_val_acc: dict[str, float]
    epochs_run: int
    stopped_early: bool = False
    checkpoint: Path | None = None
    files: dict[str, str] = field(default_factory=dict)


class _JointForward(nn.Module):
    """Encoder + the joint columns as one module (so the optimiser sees exactly these)."""

    def __init__(self, model: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.columns = nn.ModuleDict({t: model.columns[t] for t in tasks})
        object.__setattr__(self, "net", model)

    def task_view(self, task: str) -> nn.Module:
        return _TaskLogits(self.net, task)


class _TaskLogits(nn.Module):
    """``predict_logits`` adapter: images -> one task's logits."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        object.__setattr__(self, "net", model)
        self.task = task

    def forward(self, inputs: torch.Tensor, from_features: bool) -> torch.Tensor:
        return self.net(inputs, [self.task])[self.task].logits


def _state(view: _JointForward) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the encoder and joint columns, keyed as in the model's state dict."""
    state = {f"encoder.{k}": v.detach().cpu().clone() for k, v in view.encoder.state_dict().items()}
    for name, column in view.columns.items():
        state.update(
            {f"columns.{name}.{k}": v.detach().cpu().clone() for k, v in column.state_dict().items()}
        )
    return state


def _check_tasks(model: nn.Module, tasks: Sequence[JointTask], resuming: bool) -> None:
    if len(tasks) < 1:
        raise TrainingError("a joint run needs at least one task")
    names = [t.spec.name for t in tasks]
    if len(set(names)) != len(names):
        raise TrainingError(f"task names repeat: {names}")
    others = [n for n in model.task_names if not (resuming and n in names)]
    if others:
        raise TrainingError(
            f"the model already has columns {others}: re-training the encoder would change the features "
            "they were trained on; start from an encoder or drop them (facial-perception columns --drop)"
        )
    for task in tasks:
        name = task.spec.name
        for part, data in (("training", task.train), ("validation", task.val)):
            if len(data) == 0:
                raise TrainingError(f"{name}: the {part} set is empty")
            if data.size != model.config.input_size:
                raise TrainingError(
                    f"{name}: images are {data.size}px but the model needs {model.config.input_size}px"
                )
            if data.labels.min() < 0 or data.labels.max() >= len(task.spec.labels):
                raise TrainingError(f"{name}: {part} labels must be in 0..{len(task.spec.labels) - 1}")
        if task.soft_targets and (
            task.train.soft_labels is None or task.train.soft_labels.shape[1] != len(task.spec.labels)
        ):
            raise TrainingError(
                f"{name}: soft targets need label distributions with {len(task.spec.labels)} columns"
            )
        if not task.weight > 0:
            raise TrainingError(f"{name}: the loss weight must be > 0, got {task.weight}")


def train_jointly(
    model: nn.Module,
    tasks: Sequence[JointTask],
    out_dir: PathLike,
    *,
    epochs: int = 20,
    steps_per_epoch: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    patience_lr: int = 2,
    lr_factor: float = 0.5,
    min_lr: float = 1e-6,
    early_stopping: int | None = 6,
    augment: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    resume: bool = True,
    checkpoint_path: PathLike | None = None,
    progress: bool = True,
    plots: bool = True,
    eval_batch_size: int = 256,
) -> JointResult:
    """Train the encoder and one new column per task together; returns history and the best epoch.

    - Each step draws one batch of ``batch_size`` from every task (smaller datasets cycle through
      fresh permutations) and minimises the weighted sum of their cross-entropies.
    - An epoch is ``steps_per_epoch`` steps (default: one pass over the largest training set).
    - The score of an epoch is the mean validation accuracy over the tasks: it selects the best
      weights (restored at the end), drives early stopping (``early_stopping`` epochs without a
      better score) and, through the summed validation loss, ``ReduceLROnPlateau``.
    - Files in ``out_dir``: ``joint_log.csv``, ``joint_state.pt`` (resume), at the end
      ``joint_curves.png``, ``<task>_confusion.png`` and the checkpoint (``checkpoint_path``,
      default ``out_dir/joint.safetensors``).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or (steps_per_epoch is not None and steps_per_epoch < 1):
        raise TrainingError("epochs, steps per epoch and batch size must be >= 1 and the learning rate > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "joint_state.pt"
    saved = load_state(state_path, "joint") if resume and state_path.is_file() else None
    names = [t.spec.name for t in tasks]
    if saved is not None and list(saved.get("tasks", [])) != names:
        raise TrainingError(
            f"cannot resume from {state_path}: it trains tasks {saved.get('tasks')}, not {names}"
        )
    _check_tasks(model, tasks, resuming=saved is not None)

    dev = _device(device)
    seed_everything(seed)
    for task in tasks:
        if task.spec.name not in model.columns:
            try:
                model.add_column(task.spec, train_encoder=True)
            except ValueError as exc:
                raise TrainingError(str(exc)) from None
    for name in [*names, "encoder"]:  # add_column froze the earlier ones; there are no others
        model.unfreeze(name)
    model.to(dev)

    augmenter = Augment() if augment else None
    train_in = {t.spec.name: _Inputs(t.train, None, augmenter, dev, t.soft_targets) for t in tasks}
    val_in = {t.spec.name: _Inputs(t.val, None, None, dev, False) for t in tasks}
    view = _JointForward(model, names)
    optimizer = torch.optim.Adam([p for p in view.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=lr_factor, patience=max(0, patience_lr - 1), min_lr=min_lr
    )
    steps = steps_per_epoch or math.ceil(max(len(t.train) for t in tasks) / batch_size)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "score": -math.inf, "val_acc": {}}
    best_state = _state(view)
    bad_epochs = start_epoch = 0
    if saved is not None:
        model.load_state_dict(dict(saved["trainable"]), strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, best, best_state = list(saved["history"]), dict(saved["best"]), dict(saved["best_state"])
        bad_epochs, start_epoch = int(saved["bad_epochs"]), int(saved["epoch"])
        if progress:
            print(f"resuming joint training of {', '.join(names)} from epoch {start_epoch} ({state_path})")

    files = {"log": str(out / "joint_log.csv"), "state": str(state_path)}
    stopped_early = False
    for epoch in range(start_epoch, epochs):
        if early_stopping is not None and bad_epochs >= early_stopping:
            stopped_early = True
            break
        t0 = time.perf_counter()
        epoch_seed = _epoch_seed(seed, epoch, 0)
        torch.manual_seed(epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        streams = {t.spec.name: _IndexStream(len(t.train), batch_size, generator) for t in tasks}
        model.train()
        sums = {name: torch.zeros(3, dtype=torch.float64) for name in names}  # loss * n, correct, n
        bar = _progress(steps, f"joint {epoch + 1}/{epochs}", progress, unit="step")
        for _step in range(steps):
            total = torch.zeros((), device=dev)
            for task in tasks:
                name = task.spec.name
                idx = streams[name].next()
                x, y, soft = train_in[name].batch(idx, generator, train=True)
                logits = model(x, [name])[name].logits
                loss = F.cross_entropy(logits, soft if soft is not None else y)
                total = total + task.weight * loss
                n = y.shape[0]
                sums[name] += torch.tensor(
                    [float(loss.detach()) * n, float((logits.argmax(1) == y).sum()), n], dtype=torch.float64
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            bar.update(1)
        bar.close()

        model.eval()
        row: dict[str, Any] = {"epoch": epoch + 1}
        val_loss_sum, accs = 0.0, {}
        for name in names:
            logits, labels = predict_logits(
                view.task_view(name), val_in[name], torch.arange(len(val_in[name].labels)), eval_batch_size
            )
            vloss = float(F.cross_entropy(logits, labels))
            accs[name] = float((logits.argmax(1) == labels).float().mean())
            val_loss_sum += vloss
            s = sums[name]
            row.update({
                f"{name}_train_loss": float(s[0] / s[2]), f"{name}_train_acc": float(s[1] / s[2]),
                f"{name}_val_loss": vloss, f"{name}_val_acc": accs[name],
            })  # fmt: skip
        score = sum(accs.values()) / len(accs)
        scheduler.step(val_loss_sum)
        improved = score > best["score"] + 1e-12
        if improved:
            best = {"epoch": epoch + 1, "score": score, "val_acc": dict(accs)}
            best_state = _state(view)
            bad_epochs = 0
        else:
            bad_epochs += 1
        # the generic column names let plots.plot_learning_curves draw the mean over tasks
        row.update({
            "train_loss": sum(row[f"{n}_train_loss"] for n in names) / len(names),
            "train_acc": sum(row[f"{n}_train_acc"] for n in names) / len(names),
            "val_loss": val_loss_sum / len(names), "val_acc": score,
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, "best": int(improved),
        })  # fmt: skip
        history.append(row)
        write_csv(files["log"], history)
        save_state(
            state_path,
            "joint",
            {
                "tasks": names,
                "epoch": epoch + 1,
                "trainable": _state(view),
                "history": history,
                "best": best,
                "best_state": best_state,
                "bad_epochs": bad_epochs,
                "seed": seed,
            },
            optimizer,
            scheduler,
        )
        if progress:
            per_task = ", ".join(f"{n} {100 * accs[n]:.1f}%" for n in names)
            print(
                f"joint epoch {epoch + 1}/{epochs}: val {per_task} | mean {100 * score:.2f}% | "
                f"lr {row['lr']:.2g}" + (" *" if improved else "")
            )
    model.load_state_dict(best_state, strict=False)
    for name in [*names, "encoder"]:
        model.freeze(name)
    model.eval()
    result = JointResult(
        history=history,
        best_epoch=int(best["epoch"]),
        best_score=float(best["score"]) if history else math.nan,
        best_val_acc={k: float(v) for k, v in best["val_acc"].items()},
        epochs_run=len(history),
        stopped_early=stopped_early,
        files=files,
    )
    if history:
        _finish(model, tasks, view, val_in, out, result, checkpoint_path, plots, eval_batch_size, {
            "epochs": epochs, "steps_per_epoch": steps, "batch_size": batch_size, "lr": lr,
            "patience_lr": patience_lr, "early_stopping": early_stopping, "augment": bool(augment),
            "seed": seed, "joint_tasks": names,
        })  # fmt: skip
    return result


class _IndexStream:
    """Endless batches of indices: a fresh permutation each time the data runs out."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        parts, need = [], min(self.batch_size, self.n)
        while need > 0:
            if self.pos >= self.n:
                self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
            take = self.order[self.pos : self.pos + need]
            parts.append(take)
            self.pos += take.shape[0]
            need -= take.shape[0]
        return torch.cat(parts)


def _finish(
    model: nn.Module,
    tasks: Sequence[JointTask],
    view: _JointForward,
    val_in: dict[str, _Inputs],
    out: Path,
    result: JointResult,
    checkpoint_path: PathLike | None,
    plots: bool,
    eval_batch_size: int,
    settings: dict[str, Any],
) -> None:
    """Confusion matrices of the best weights, plots, and the checkpoint with per-task metadata."""
    from facial_perception.core.evaluation import confusion_matrix

    if plots:
        from facial_perception.core import plots as fplots

        result.files["curves"] = str(
            fplots.plot_learning_curves(result.history, out / "joint_curves.png", "joint (mean over tasks)")
        )
    for task in tasks:
        name = task.spec.name
        if plots:
            logits, labels = predict_logits(
                view.task_view(name), val_in[name], torch.arange(len(task.val)), eval_batch_size
            )
            cm = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), len(task.spec.labels))
            result.files[f"{name}_confusion"] = str(
                fplots.plot_confusion_matrix(cm, task.spec.labels, out / f"{name}_confusion.png", title=name)
            )
    target = Path(checkpoint_path) if checkpoint_path else out / "joint.safetensors"
    training = {
        task.spec.name: {
            **settings,
            "train_encoder": True,
            "soft_targets": bool(task.soft_targets),
            "loss_weight": task.weight,
            "best_epoch": result.best_epoch,
            "best_val_acc": result.best_val_acc.get(task.spec.name),
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "train_samples": len(task.train),
            "val_samples": len(task.val),
        }
        for task in tasks
    }
    save_model_checkpoint(model, target, training)
    result.checkpoint = target
    result.files["checkpoint"] = str(target)
