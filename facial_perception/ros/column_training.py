"""Background training of a new task column while the robot keeps perceiving.

The perception node hands a request (name, labels, dataset, lateral sources, epochs) to
:class:`ColumnTrainer`.  The request is checked synchronously -- a bad one changes nothing and
gets one clear line back -- and training then runs on a *copy* of the live model in a daemon
thread (``core.training.train_column``: every existing part frozen, only the new column learns),
so inference never waits for it.  On success the trained copy is written atomically to
``columns_dir/current.safetensors`` (temporary file + ``os.replace`` inside ``save_model``; a kill
mid-training leaves the previous file untouched) and only then handed to ``on_success`` for the
hot swap.  Progress is a :class:`TrainingState` snapshot, pushed to ``on_status`` on every change.

This module is ROS-free on purpose: the node adapts it to the action, topic and service.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from facial_perception.core.datasets import DatasetError, FaceDataset, open_dataset, stratified_split
from facial_perception.core.progressive import ModelError, ProgressiveNet, TaskSpec
from facial_perception.core.training import TrainingError, save_model_checkpoint, train_column

__all__ = [
    "CURRENT_MODEL_NAME",
    "ColumnRequest",
    "ColumnRequestError",
    "ColumnTrainer",
    "TrainingState",
    "current_model_path",
]

#: File name of the persisted model (all columns, including runtime-added ones) in ``columns_dir``.
CURRENT_MODEL_NAME = "current.safetensors"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

IDLE, RUNNING, SUCCEEDED, FAILED, CANCELED = "idle", "running", "succeeded", "failed", "canceled"


class ColumnRequestError(ValueError):
    """A request that cannot be trained (bad name, labels, sources or dataset); nothing was changed."""


def current_model_path(columns_dir: str | Path) -> Path:
    """Where the model with the runtime-added columns is persisted."""
    return Path(columns_dir).expanduser() / CURRENT_MODEL_NAME


@dataclass
class ColumnRequest:
    """What the operator asked for (mirrors the ``AddTaskColumn`` goal)."""

    name: str
    labels: list[str]
    dataset_path: str
    lateral_sources: list[str] = field(default_factory=list)
    epochs: int = 0
    init_from: str = ""  # fine-tune from this column ("" = a fresh column)

    def __post_init__(self) -> None:
        self.init_from = str(self.init_from).strip()


@dataclass(frozen=True)
class TrainingState:
    """A snapshot of the current (or last) training; field names match ``msg/TrainingStatus``."""

    task: str = ""
    state: str = IDLE
    epoch: int = 0
    epochs: int = 0
    progress: float = 0.0
    train_loss: float = math.nan
    val_accuracy: float = math.nan
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def finished(self) -> bool:
        return self.state in (SUCCEEDED, FAILED, CANCELED)


class ColumnTrainer:
    """Validates requests and trains one column at a time in a background thread."""

    def __init__(
        self,
        columns_dir: str | Path,
        *,
        device: str = "cpu",
        default_epochs: int = 5,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        on_status: Callable[[TrainingState], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.columns_dir = Path(columns_dir).expanduser()
        self.device = device
        self.default_epochs = int(default_epochs)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self._on_status = on_status
        self._log = log or (lambda _text: None)
        self._lock = threading.Lock()
        self._state = TrainingState()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- state
    @property
    def status(self) -> TrainingState:
        with self._lock:
            return self._state

    @property
    def busy(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._state = replace(self._state, **changes)
            state = self._state
        if self._on_status is not None:
            try:
                self._on_status(state)
            except Exception as exc:  # a failing status publisher must not kill training
                self._log(f"status callback failed: {exc}")

    # ------------------------------------------------------------------------------------- checks
    def validate(self, request: ColumnRequest, model: ProgressiveNet) -> tuple[TaskSpec, FaceDataset]:
        """The column spec and the dataset of a request; :class:`ColumnRequestError` when it is bad."""
        name = str(request.name).strip()
        if not _NAME_RE.match(name):
            raise ColumnRequestError(f"task name {request.name!r} must match [a-z][a-z0-9_]*")
        if name in model.specs:
            raise ColumnRequestError(f"a column named {name!r} already exists (columns: {model.task_names})")
        labels = [str(label).strip() for label in request.labels]
        if len(labels) < 2:
            raise ColumnRequestError(f"task {name!r} needs at least 2 labels, got {len(labels)}")
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise ColumnRequestError(f"labels must be non-empty and distinct, got {labels}")
        unknown = [s for s in request.lateral_sources if s not in model.specs]
        if unknown:
            raise ColumnRequestError(
                f"unknown lateral source column(s) {unknown}; existing: {model.task_names}"
            )
        if int(request.epochs) < 0 or int(request.epochs) > 1000:
            raise ColumnRequestError(f"epochs must be in 0..1000 (0 = default), got {request.epochs}")
        laterals, kind = list(request.lateral_sources), "classification"
        source = request.init_from
        if source:  # fine-tuning: the new column has the source's inputs, kind and layout
            if source not in model.specs:
                raise ColumnRequestError(
                    f"init_from: no column {source!r} to start from (columns: {model.task_names})"
                )
            kind = model.specs[source].kind
            wanted = list(model.specs[source].laterals)
            if laterals and laterals != wanted:
                raise ColumnRequestError(
                    f"a column started from {source!r} keeps its lateral sources {wanted}, not {laterals}"
                )
            laterals = wanted
        try:
            spec = TaskSpec(name, labels, laterals, kind)
        except ModelError as exc:
            raise ColumnRequestError(str(exc)) from None
        dataset = self._open_dataset(request.dataset_path, spec, model.config.input_size)
        return spec, dataset

    @staticmethod
    def _open_dataset(path_text: str, spec: TaskSpec, size: int) -> FaceDataset:
        if not str(path_text).strip():
            raise ColumnRequestError("dataset_path is empty")
        path = Path(path_text).expanduser()
        if not path.exists():
            raise ColumnRequestError(f"dataset not found: {path}")
        try:
            try:  # layouts with several targets (UTKFace: age/gender/race) pick the one named like the task
                dataset = open_dataset(path, task=spec.name, size=size, label_names=spec.labels)
            except DatasetError as first:
                if "task" not in str(first):
                    raise
                dataset = open_dataset(path, task=None, size=size, label_names=spec.labels)
        except (DatasetError, OSError) as exc:
            raise ColumnRequestError(f"cannot use dataset {path}: {str(exc).splitlines()[0]}") from None
        if dataset.task == "unlabeled" or len(dataset) == 0:
            raise ColumnRequestError(f"dataset {path} has no labelled images")
        counts = dataset.class_counts()
        empty = [label for label in spec.labels if counts.get(label, 0) == 0]
        if empty:
            present = sorted(label for label, count in counts.items() if count)
            raise ColumnRequestError(f"labels {empty} have no images in {path} (dataset classes: {present})")
        if len(dataset) < 4:
            raise ColumnRequestError(f"dataset {path} has only {len(dataset)} images; need at least 4")
        return dataset

    # ------------------------------------------------------------------------------------- run
    def start(
        self,
        request: ColumnRequest,
        model: ProgressiveNet,
        on_success: Callable[[ProgressiveNet, TaskSpec, TrainingState], None],
    ) -> TrainingState:
        """Check ``request`` and start training on a copy of ``model``; raises :class:`ColumnRequestError`."""
        if self.busy:
            raise ColumnRequestError(
                f"column {self.status.task!r} is still training; try again when it is done"
            )
        spec, dataset = self.validate(request, model)
        epochs = int(request.epochs) or self.default_epochs
        self._cancel.clear()
        with self._lock:
            self._state = TrainingState(task=spec.name, state=RUNNING, epochs=epochs, message="starting")
        self._set(message=f"loading {len(dataset)} images")
        self._thread = threading.Thread(
            target=self._run,
            args=(spec, dataset, epochs, model, on_success, request.init_from or None),
            name=f"train-{spec.name}",
            daemon=True,
        )
        self._thread.start()
        return self.status

    def cancel(self) -> bool:
        """Ask the running training to stop after the current batch; False when nothing runs."""
        if not self.busy:
            return False
        self._cancel.set()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the training thread ends (or ``timeout``); True when nothing is running."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel and join (node cleanup); the persisted model is untouched by a cancel."""
        self.cancel()
        self.wait(timeout)

    def _run(
        self,
        spec: TaskSpec,
        dataset: FaceDataset,
        epochs: int,
        model: ProgressiveNet,
        on_success: Callable[[ProgressiveNet, TaskSpec, TrainingState], None],
        init_from: str | None = None,
    ) -> None:
        work_dir = self.columns_dir / "training" / spec.name
        try:
            shutil.rmtree(work_dir, ignore_errors=True)  # a stale run of the same name must not be resumed
            work_dir.mkdir(parents=True, exist_ok=True)
            train_set, val_set = stratified_split(dataset, self.val_fraction, seed=0)
            if len(val_set) == 0 or len(train_set) == 0:
                raise ColumnRequestError("the dataset is too small for a train/validation split")
            work = copy.deepcopy(model).float()  # the live model keeps serving inference untouched
            started = time.monotonic()

            def progress(epoch: int, total: int, train_loss: float, val_acc: float) -> None:
                self._set(
                    epoch=epoch,
                    epochs=total,
                    progress=min(epoch / max(total, 1), 1.0),
                    train_loss=float(train_loss),
                    val_accuracy=float(val_acc),
                    message=f"epoch {epoch}/{total} done ({time.monotonic() - started:.0f} s)",
                )

            self._set(message=f"training on {len(train_set)} images, validating on {len(val_set)}")
            result = train_column(
                work,
                spec,
                train_set,
                val_set,
                work_dir,
                epochs=epochs,
                batch_size=self.batch_size,
                early_stopping=None,
                init_from=init_from,
                device=self.device,
                resume=False,
                workers=0,
                callback=progress,
                cancel=self._cancel,
                checkpoint_path=work_dir / f"{spec.name}.safetensors",
                progress=False,
                plots=False,
            )
            if result.cancelled or self._cancel.is_set():
                self._set(state=CANCELED, message="training canceled; the model is unchanged")
                return
            if result.epochs_run == 0:
                raise ColumnRequestError("no epoch finished")
            work.cpu().eval()
            trained_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
            meta = {
                spec.name: {
                    **work.training_meta.get(spec.name, {}),
                    "trained_at": trained_at,
                    "dataset": str(dataset.root or ""),
                    "val_accuracy": result.best_val_acc,
                }
            }
            self.columns_dir.mkdir(parents=True, exist_ok=True)
            save_model_checkpoint(work, current_model_path(self.columns_dir), meta)  # atomic
            final = replace(
                self.status,
                state=SUCCEEDED,
                progress=1.0,
                val_accuracy=result.best_val_acc,
                message=f"column {spec.name!r} trained (val accuracy {result.best_val_acc:.3f})"
                f" and saved to {current_model_path(self.columns_dir)}",
            )
            on_success(work, spec, final)
            self._set(**{k: v for k, v in final.to_dict().items() if k != "task"})
        except (ColumnRequestError, TrainingError, DatasetError, ModelError) as exc:
            self._set(state=FAILED, message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except Exception as exc:  # never let a training bug take the node down; report it instead
            self._log("column training crashed:\n" + traceback.format_exc())
            self._set(
                state=FAILED, message=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        finally:  # the cached encoder maps of the training images are not kept
            shutil.rmtree(work_dir / "feature_cache", ignore_errors=True)


def describe_request(request: ColumnRequest) -> str:
    """One log line for a request."""
    sources: Sequence[str] = request.lateral_sources or ["none"]
    return (
        f"add column {request.name!r} labels={list(request.labels)} dataset={request.dataset_path} "
        f"laterals={list(sources)} epochs={request.epochs or 'default'}"
        + (f" init_from={request.init_from!r}" if request.init_from else "")
    )
