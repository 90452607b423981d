"""Training loops: the unsupervised BEGAN encoder and one supervised task column at a time.

Both loops share the habits the issue asks for: seeded and repeatable, resumable from a state
file written atomically after every epoch (columns) or every N steps (encoder), CSV logs and PNG
plots, tqdm bars with live loss/accuracy, ``device="auto"|"cpu"|"cuda"``, and torchrun support
through :mod:`facial_perception.core.distributed` (a single process is the 1-rank special case).

Column training follows the paper: Adam 1e-4, batch 32, 35 epochs, the learning rate halved when
the validation loss has not improved for two epochs; plus early stopping on validation accuracy.
The best validation-accuracy weights are restored at the end and saved with
``checkpoint.save_model`` as one ``.safetensors`` file holding the whole ProgressiveNet.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facial_perception.core import distributed as fdist
from facial_perception.core.features import FeatureSet, cached_features, images_to_tensor
from facial_perception.core.preprocess import Augment, normalise_tensor
from facial_perception.core.progressive import column_members

PathLike = str | os.PathLike[str]
ProgressCallback = Callable[[int, int, float, float], None]
STATE_FORMAT = 1


class TrainingError(ValueError):
    """A user mistake that prevents training (empty data, labels out of range, mismatched resume)."""


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class ColumnData:
    """In-memory labelled faces for one column: uint8 grey images (N, S, S) and int labels (N,).

    ``soft_labels`` (N, C) are optional label distributions (FER+ votes); ``attributes`` maps an
    attribute name (race, gender, ...) to per-sample values for subgroup evaluation.
    """

    images: np.ndarray
    labels: np.ndarray
    soft_labels: np.ndarray | None = None
    attributes: dict[str, list[Any]] = field(default_factory=dict)
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.images = images_to_tensor(self.images).squeeze(1).numpy()
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.labels.shape[0] != self.images.shape[0]:
            raise TrainingError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.soft_labels is not None:
            self.soft_labels = np.asarray(self.soft_labels, dtype=np.float32)
            if self.soft_labels.ndim != 2 or self.soft_labels.shape[0] != self.labels.shape[0]:
                raise TrainingError(f"soft labels must have shape (N, C), got {self.soft_labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ColumnData:
        idx = np.asarray(indices, dtype=np.int64)
        return ColumnData(
            self.images[idx],
            self.labels[idx],
            None if self.soft_labels is None else self.soft_labels[idx],
            {k: [v[i] for i in idx] for k, v in self.attributes.items()},
            self.label_names,
        )


def as_column_data(data: Any, size: int | None = None, workers: int = 2, progress: bool = True) -> ColumnData:
    """Accept a :class:`ColumnData`, an ``(images, labels)`` tuple or a ``datasets.FaceDataset``.

    A FaceDataset is decoded into memory once (``datasets.load_images``); unreadable files are
    skipped and counted there. Its samples' attributes become subgroup attributes.
    """
    if isinstance(data, ColumnData):
        if size is not None and data.size != size:
            raise TrainingError(f"images are {data.size}px but the model needs {size}px")
        return data
    if isinstance(data, tuple) and len(data) in (2, 3):
        return ColumnData(*data)
    from facial_perception.core.datasets import FaceDataset, load_images

    if not isinstance(data, FaceDataset):
        raise TrainingError(f"cannot train on {type(data).__name__}: give a FaceDataset or (images, labels)")
    size = data.size if size is None else int(size)
    if data.images is not None and data.size == size:
        images, kept = data.images, np.arange(len(data))
        labels = data.labels()
    else:
        images, labels, kept = load_images(data, size=size, workers=workers, progress=progress)
    samples = [data.samples[int(i)] for i in kept]
    soft = data.soft_labels()
    keys = sorted({k for s in samples for k in s.attributes})
    attributes = {k: [s.attributes.get(k) for s in samples] for k in keys}
    if len(labels) and labels.min() < 0:
        raise TrainingError(f"dataset {data.root} has unlabeled images; a column needs labels")
    return ColumnData(
        images, labels, None if soft is None else soft[kept], attributes, list(data.label_names)
    )


LAYOUTS = ("auto", "ferplus", "utkface", "identity", "folders", "fer2013", "adience")
_UTK_TARGET_OF_TASK = {"age": "age8", "age8": "age8", "age7": "age7", "gender": "gender", "race": "race"}


def open_task_dataset(
    path: PathLike,
    task: str,
    layout: str = "auto",
    target: str | None = None,
    size: int = 64,
    label_names: Sequence[str] | None = None,
    split: str | None = None,
) -> Any:
    """Open a labelled dataset for ``task`` in one of :data:`LAYOUTS` (``auto`` detects it).

    ``target`` picks the label where a layout has several (UTKFace ``age8|age7|gender|race``,
    default from the task name; FER+ ``majority|distribution``; Adience ``age8|gender``).
    ``label_names`` re-indexes labels to an existing column's order. A missing path raises
    ``DatasetError("dataset not found: PATH")``.
    """
    from facial_perception.core import datasets as ds

    root = Path(path).expanduser()
    if not root.exists():
        raise ds.DatasetError(f"dataset not found: {path}")
    if layout not in LAYOUTS:
        raise ds.DatasetError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        hint = {"majority": "emotion", "distribution": "emotion_distribution"}.get(
            target or "", target or task
        )
        known = {"age", "age8", "age7", "gender", "race", "emotion", "emotion_distribution", "identity"}
        dataset = ds.open_dataset(root, task=hint if hint in known else None, size=size)
        if dataset.task == "unlabeled":
            raise ds.DatasetError(
                f"{path} holds no labels for task {task!r} (use --layout to choose a reader)"
            )
    elif layout == "ferplus":
        fer_target = {"distribution": "distribution", "emotion_distribution": "distribution"}.get(
            target or "", "majority"
        )
        dataset = ds.read_ferplus(root, split=split or "FER2013Train", target=fer_target, size=size)
    elif layout == "utkface":
        utk = target or _UTK_TARGET_OF_TASK.get(task)
        if utk is None:
            raise ds.DatasetError(f"UTKFace needs --target age8|age7|gender|race for task {task!r}")
        dataset = ds.read_utkface(root, target=utk, size=size)
    elif layout == "identity":
        dataset = ds.read_identity_folders(root, size=size)
    elif layout == "fer2013":
        dataset = ds.read_fer2013_folders(root, split=split, size=size)
    elif layout == "adience":
        dataset = ds.read_adience_folds(root, root, target=target or "age8", size=size)
    else:
        dataset = ds.read_class_folders(root, label_names=None, task=task, size=size)
    if label_names is not None:
        dataset = dataset.remap_labels(list(label_names))
    return dataset


def load_task_split(
    path: PathLike,
    task: str,
    size: int,
    *,
    layout: str = "auto",
    target: str | None = None,
    label_names: Sequence[str] | None = None,
    val_path: PathLike | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    max_images: int | None = None,
    holdout_people: float = 0.0,
    workers: int = 2,
    image_cache: PathLike | None = None,
    progress: bool = True,
) -> tuple[ColumnData, ColumnData]:
    """Open a dataset, carve a stratified validation split (or open ``val_path``), decode into memory.

    The split is stratified by label (so per person for identity folders) and depends only on
    ``split_seed``, so runs with different training seeds see the same validation images.
    ``max_images`` keeps a stratified subset of that many training images (quick experiments).
    ``holdout_people`` (identity folders) leaves that fraction of the people out of training
    altogether (``datasets.split_people`` with ``split_seed``), for few-shot tests on them.
    """
    from facial_perception.core import datasets as ds

    dataset = open_task_dataset(path, task, layout, target, size, label_names)
    if holdout_people > 0:
        known, _held = ds.split_people(dataset, holdout_people, seed=split_seed)
        people = sorted({known.label_names[int(i)] for i in known.labels()}, key=known.label_names.index)
        dataset = known.remap_labels(people)
    names = list(dataset.label_names)
    if val_path is not None:
        train_set = dataset
        if holdout_people > 0:  # the held-out people stay unseen in validation too
            val_all = open_task_dataset(val_path, task, layout, target, size)
            known = set(names)
            keep = [
                i
                for i, s in enumerate(val_all.samples)
                if s.label is not None and val_all.label_names[s.label] in known
            ]
            val_set = val_all.subset(keep).remap_labels(names)
        else:
            val_set = open_task_dataset(val_path, task, layout, target, size, names)
    else:
        if not 0.0 < val_fraction < 1.0:
            raise TrainingError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        train_set, val_set = ds.stratified_split(dataset, val_fraction, seed=split_seed)
        if len(val_set) == 0 or len(train_set) == 0:
            raise TrainingError(f"{path}: too few images ({len(dataset)}) for a validation split")
    if max_images is not None and 0 < max_images < len(train_set):
        train_set, _ = ds.stratified_split(train_set, 1.0 - max_images / len(train_set), seed=split_seed)
    show = progress
    train = as_column_data(ds.load_into_memory(train_set, size, workers, image_cache, show), size)
    val = as_column_data(ds.load_into_memory(val_set, size, workers, image_cache, show), size)
    train.label_names = val.label_names = names
    return train, val


# --------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank) for dropout/augmentation."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**62


def _device(device: str | torch.device) -> torch.device:
    from facial_perception.core.devices import resolve_device

    return resolve_device(device) if isinstance(device, str) else torch.device(device)


def save_state(
    path: PathLike, kind: str, state: Mapping[str, Any], optimizer: Any, scheduler: Any = None
) -> None:
    """``checkpoint.save_training_state`` (atomic, RNG included) with our resume payload in ``extra``."""
    from facial_perception.core.checkpoint import save_training_state

    save_training_state(
        path,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=int(state.get("epoch", 0)),
        step=int(state.get("step", 0)),
        extra={"format": STATE_FORMAT, "kind": kind, **state},
    )


def load_state(path: PathLike, kind: str) -> dict[str, Any]:
    """Load a state written by :func:`save_state` (``weights_only``: no pickled code is run)."""
    from facial_perception.core.checkpoint import load_training_state

    payload = load_training_state(path)
    extra = payload.get("extra") or {}
    if extra.get("format") != STATE_FORMAT or extra.get("kind") != kind:
        raise TrainingError(f"cannot resume from {path}: not a {kind} training state of this version")
    return {
        **extra,
        "optimizer": payload["optimizer"],
        "scheduler": payload["scheduler"],
        "rng": payload["rng"],
    }


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite the whole log atomically (resume-safe: the file always matches the state)."""
    target = Path(path)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in keys})
    from facial_perception.core.fileio import atomic_write_text

    atomic_write_text(target, text.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _progress(total: int, desc: str, enabled: bool, unit: str = "batch"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Column training
# --------------------------------------------------------------------------------------------------


@dataclass
class ColumnResult:
    """What :func:`train_column` did; ``model`` already holds the best weights."""

    task: str
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    best_state: dict[str, torch.Tensor]
    epochs_run: int
    stopped_early: bool = False
    cancelled: bool = False
    checkpoint: Path | None = None
    confusion: list[list[int]] | None = None
    files: dict[str, str] = field(default_factory=dict)


class _TaskForward(nn.Module):
    """The trainable parts of a ProgressiveNet as one module, so DDP wraps only those.

    The new column (and the encoder when it is re-trained) are registered submodules; the whole
    network is held as a plain attribute, so frozen columns are invisible to DDP (no broadcast,
    no all-reduce), while the forward still runs through them for the lateral activations.
    """

    def __init__(self, model: nn.Module, task: str, train_encoder: bool) -> None:
        super().__init__()
        self.column = model.columns[task]
        if train_encoder:
            self.encoder = model.encoder
        object.__setattr__(self, "net", model)
        self.task = task

    def forward(self, inputs: torch.Tensor, from_features: bool) -> torch.Tensor:
        net = self.net
        out = net.forward_features(inputs, [self.task]) if from_features else net(inputs, [self.task])
        return out[self.task].logits


def _trainable_state(model: nn.Module, task: str, train_encoder: bool) -> dict[str, torch.Tensor]:
    """State of what this run changes: the column (and encoder), detached CPU copies."""
    state = {
        f"columns.{task}.{k}": v.detach().cpu().clone() for k, v in model.columns[task].state_dict().items()
    }
    if train_encoder:
        state.update(
            {f"encoder.{k}": v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
        )
    return state


class _ColumnAverage:
    """Exponential moving average of one column (weights and BatchNorm statistics), swappable into
    the network for validation: the laterals into and out of the column keep working."""

    def __init__(self, model: nn.Module, task: str, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.model, self.task = model, task
        ema = get_ema_multi_avg_fn(decay)

        @torch.no_grad()
        def average(averaged: list[torch.Tensor], current: list[torch.Tensor], count: torch.Tensor) -> None:
            if averaged[0].is_floating_point():
                ema(averaged, current, count)
            else:  # integer buffers (BatchNorm's batch counter, the adapters' channel counts) are copied:
                for a, c in zip(averaged, current, strict=True):  # torch's EMA would truncate them
                    a.copy_(c)

        self.average = AveragedModel(model.columns[task], multi_avg_fn=average, use_buffers=True)

    def update(self) -> None:
        self.average.update_parameters(self.model.columns[self.task])

    @contextlib.contextmanager
    def in_place(self) -> Iterator[None]:
        """The averaged column stands in for the trained one inside the block."""
        trained = self.model.columns[self.task]
        self.model.columns[self.task] = self.average.module.eval()
        try:
            yield
        finally:
            self.model.columns[self.task] = trained

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.average.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.average.load_state_dict(dict(state))


def _load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    missing = model.load_state_dict(dict(state), strict=False)
    if missing.unexpected_keys:
        raise TrainingError(f"saved weights do not fit the model: {missing.unexpected_keys[:3]}")


def prepare_column(model: nn.Module, spec: Any, train_encoder: bool, allow_existing: bool = False) -> None:
    """Add ``spec``'s column (unless it exists and ``allow_existing``) and set what is frozen."""
    existing = model.specs.get(spec.name)
    if getattr(spec, "members", 1) != 1 or (existing is not None and existing.members != 1):
        raise TrainingError(
            f"column {spec.name!r}: an ensemble is trained one member at a time (train-task with other "
            "seeds), then joined with `facial-perception columns --ensemble`"
        )
    if spec.name in model.columns:
        if not allow_existing:
            raise TrainingError(
                f"the model already has a column {spec.name!r}; pick another task name or resume its training"
            )
        if list(model.specs[spec.name].labels) != list(spec.labels):
            raise TrainingError(f"column {spec.name!r} exists with other labels")
    else:
        try:
            model.add_column(spec, train_encoder=train_encoder)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
    for name in model.task_names:
        if name != spec.name:
            model.freeze(name)
    model.unfreeze(spec.name)
    if train_encoder:
        model.unfreeze("encoder")
    else:
        model.freeze("encoder")


def init_column_from(model: nn.Module, task: str, source: str) -> list[str]:
    """Start column ``task`` from the weights of column ``source`` (fine-tuning); returns what stays new.

    Why: a column that already solves a related task (the shipped emotion column, for a robot's own
    users and light) starts near a good answer, so few labels and epochs adapt it. The source stays
    frozen and unchanged, so the tasks that use it keep their answers. Both columns must have the same
    lateral sources; every layer is copied, the output layer (and the lateral into it) only when the
    label lists are the same: other labels get a fresh output layer. From an ensemble, its first member
    (the one that feeds later columns' laterals) is copied.
    """
    if source == task:
        raise TrainingError(f"column {task!r} cannot start from itself")
    if source not in model.columns:
        raise TrainingError(f"no column {source!r} to start {task!r} from (columns: {model.task_names})")
    target_spec, source_spec = model.specs[task], model.specs[source]
    if list(target_spec.laterals) != list(source_spec.laterals):
        raise TrainingError(
            f"column {task!r} starts from {source!r}, so it needs its lateral sources "
            f"{list(source_spec.laterals)}, not {list(target_spec.laterals)}"
        )
    target = model.columns[task]
    weights = column_members(model.columns[source])[0].state_dict()
    same_labels = list(target_spec.labels) == list(source_spec.labels)
    head = (f"laterals.{len(target.convs) + 1}.", "out.")
    fresh: list[str] = []
    copied: dict[str, torch.Tensor] = {}
    for key, value in target.state_dict().items():
        source_value = weights.get(key)
        if (
            source_value is None
            or source_value.shape != value.shape
            or (not same_labels and key.startswith(head))
        ):
            fresh.append(key)
        else:
            copied[key] = source_value
    target.load_state_dict(copied, strict=False)
    return fresh


class _Inputs:
    """Batches of model inputs from cached features or raw images, with cheap augmentation."""

    def __init__(
        self,
        data: ColumnData,
        features: FeatureSet | None,
        augment: Augment | None,
        device: torch.device,
        soft: bool,
    ) -> None:
        self.images = torch.from_numpy(data.images)
        self.labels = torch.from_numpy(data.labels)
        self.soft = torch.from_numpy(data.soft_labels) if soft and data.soft_labels is not None else None
        self.features = features
        self.augment = augment
        self.device = device

    @property
    def from_features(self) -> bool:
        return self.features is not None

    def batch(
        self, idx: torch.Tensor, generator: torch.Generator | None, train: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        y = self.labels[idx].to(self.device)
        soft = self.soft[idx].to(self.device) if (self.soft is not None and train) else None
        if self.features is not None:
            flip = view = None
            if train and self.features.flipped is not None:
                flip = torch.rand(idx.shape[0], generator=generator) < 0.5
            if train and self.features.num_views:
                # each sample: its own maps (or the mirror's) or one of the augmented copies, equally likely
                plain = 2 if self.features.flipped is not None else 1
                choices = plain + self.features.num_views
                view = torch.randint(0, choices, (idx.shape[0],), generator=generator) - plain
            return self.features.batch(idx, flip, view).to(self.device), y, soft
        x = normalise_tensor(self.images[idx].unsqueeze(1).to(self.device))
        if train and self.augment is not None:
            x = self.augment(x, generator=generator)
        return x, y, soft


def _batches(indices: torch.Tensor, batch_size: int, workers: int) -> Any:
    """Index batches, through a DataLoader when worker processes are asked for."""
    chunks = list(torch.split(indices, batch_size))
    if workers <= 0:
        return chunks
    from torch.utils.data import DataLoader

    return DataLoader(chunks, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False)


@torch.inference_mode()
def predict_logits(
    view: nn.Module, inputs: _Inputs, indices: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels of ``indices`` in eval mode."""
    outs, labels = [], []
    for idx in torch.split(indices, batch_size):
        x, y, _ = inputs.batch(idx, None, train=False)
        outs.append(view(x, inputs.from_features).float().cpu())
        labels.append(y.cpu())
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


def group_balance_weights(data: Any, attributes: Sequence[str]) -> torch.Tensor:
    """Per-sample loss weights so that every (attribute values, label) cell counts the same.

    Why: UTKFace has 3x more White than Indian or Other faces, and the gender column's accuracy
    differed by up to 9 points between race groups; re-weighting the loss by inverse cell frequency
    is the simplest fairness baseline (weights average to 1 over the training set).
    """
    missing = [a for a in attributes if a not in data.attributes]
    if missing:
        known = ", ".join(sorted(data.attributes)) or "none"
        raise TrainingError(f"cannot balance by {missing}: the training data has attributes {known}")
    labels = [int(v) for v in data.labels.tolist()]
    cells = [(*(str(data.attributes[a][i]) for a in attributes), labels[i]) for i in range(len(labels))]
    counts = Counter(cells)
    weights = torch.tensor([len(cells) / (len(counts) * counts[c]) for c in cells], dtype=torch.float32)
    return weights


def train_column(
    model: nn.Module,
    spec: Any,
    train_data: Any,
    val_data: Any,
    out_dir: PathLike,
    *,
    epochs: int = 35,
    batch_size: int = 32,
    lr: float = 1e-4,
    patience_lr: int = 2,
    lr_factor: float = 0.5,
    min_lr: float = 1e-6,
    early_stopping: int | None = 8,
    train_encoder: bool = False,
    use_feature_cache: bool = True,
    cache_dir: PathLike | None = None,
    augment: bool = True,
    soft_targets: bool = False,
    balance_by: Sequence[str] = (),
    weight_decay: float = 0.0,
    ema_decay: float | None = None,
    augmented_views: int = 0,
    init_from: str | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    resume: bool = True,
    workers: int = 0,
    callback: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    checkpoint_path: PathLike | None = None,
    progress: bool = True,
    plots: bool = True,
    save_checkpoint: bool = True,
    eval_batch_size: int = 256,
) -> ColumnResult:
    """Train the column for ``spec`` on ``model`` (a ProgressiveNet); returns history and best state.

    - The column is added if missing; every other column (and the encoder unless
      ``train_encoder``) is frozen.
    - With a frozen encoder and ``use_feature_cache``, encoder maps are computed once (also for
      the mirrored images when ``augment``; random flips then cost nothing) and cached in
      ``cache_dir`` (default ``out_dir/feature_cache``). Otherwise images pass the encoder every
      step, with :class:`preprocess.Augment` when ``augment``.
    - ``augmented_views`` (feature cache only): the cache also holds that many augmented copies of
      every training image (shifted, scaled, rotated, brightened, flipped: :class:`preprocess.Augment`);
      each training sample is then its own maps, its mirror's or one of the copies, equally likely. The
      columns learn off-centre faces for ``augmented_views`` encoder passes once.
    - Validation loss drives ``ReduceLROnPlateau`` (factor ``lr_factor`` after ``patience_lr``
      epochs without improvement, floor ``min_lr``); validation accuracy drives early stopping
      (``early_stopping`` epochs without a new best) and the best weights that are restored.
    - ``soft_targets`` trains on the label distributions of ``train_data`` (FER+ votes).
    - ``ema_decay`` (e.g. 0.999; frozen encoder only): an exponential moving average of the column's
      weights and BatchNorm statistics (``torch.optim.swa_utils``) is kept beside the trained ones;
      validation, the best epoch and the saved column use the average. Why: the plain column's
      validation accuracy jumps by a point between epochs, the average's curve is smooth, so the best
      epoch is less a lucky pick (on the shipped encoder it did not raise the best accuracy).
    - ``init_from`` (fine-tuning): the new column starts from that column's weights
      (:func:`init_column_from`) and its validation accuracy before the first epoch is the first to beat:
      if no epoch beats it, the starting weights are saved ("best epoch 0").
    - Files in ``out_dir``: ``<task>_log.csv``, ``<task>_state.pt`` (resume), and at the end
      ``<task>_curves.png``, ``<task>_confusion.png`` and the checkpoint (``checkpoint_path``,
      default ``out_dir/<task>.safetensors``; skipped with ``save_checkpoint=False``).
    - ``callback(epoch, epochs, train_loss, val_acc)`` after every epoch (rank 0); setting
      ``cancel`` stops after the current batch, keeping the best weights so far.
    - Under torchrun every process runs this function; ``batch_size`` is per process.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise TrainingError("epochs and batch size must be >= 1 and the learning rate > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    ctx = fdist.init_distributed(dev)
    dev = fdist.rank_device(dev, ctx)
    task = spec.name
    state_path = out / f"{task}_state.pt"
    saved = load_state(state_path, "column") if resume and state_path.is_file() else None
    if saved is not None:
        _check_resume(saved, spec, train_encoder, state_path)
        if saved.get("init_from") != init_from:
            raise TrainingError(
                f"cannot resume from {state_path}: it started from column {saved.get('init_from')!r}, "
                f"not {init_from!r}"
            )

    train = as_column_data(train_data, model.config.input_size, workers, progress and ctx.is_main)
    val = as_column_data(val_data, model.config.input_size, workers, progress and ctx.is_main)
    for name, part in (("training", train), ("validation", val)):
        if len(part) == 0:
            raise TrainingError(f"the {name} set is empty")
        if part.labels.min() < 0 or part.labels.max() >= len(spec.labels):
            raise TrainingError(f"{name} labels must be in 0..{len(spec.labels) - 1} for task {task!r}")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise TrainingError(f"the EMA decay must be in (0, 1), not {ema_decay}")
    if ema_decay is not None and train_encoder:
        raise TrainingError("weight averaging (EMA) needs a frozen encoder (no train_encoder)")
    if augmented_views < 0:
        raise TrainingError(f"augmented_views must be >= 0, not {augmented_views}")
    if augmented_views and (train_encoder or not use_feature_cache or not augment):
        raise TrainingError(
            "augmented views are cached encoder maps: they need the feature cache, a frozen encoder and "
            "augmentation on (without the cache every step is augmented anyway)"
        )
    if soft_targets and (train.soft_labels is None or train.soft_labels.shape[1] != len(spec.labels)):
        raise TrainingError(f"soft targets need label distributions with {len(spec.labels)} columns")
    sample_weights = group_balance_weights(train, balance_by) if balance_by else None

    seed_everything(seed)
    prepare_column(model, spec, train_encoder, allow_existing=saved is not None)
    if init_from is not None and saved is None:  # a resumed run loads its own weights below
        fresh = init_column_from(model, task, init_from)
        if ctx.is_main and progress:
            kept = "all layers" if not fresh else "all layers but the output layer"
            print(f"{task}: starts from column {init_from!r} ({kept})")
    model.to(dev)
    # Every rank must run the same frozen parts (and features); DDP itself only syncs the trainable view.
    fdist.broadcast_parameters(model, ctx)
    cached = use_feature_cache and not train_encoder
    train_feats = val_feats = None
    if cached:
        folder = Path(cache_dir) if cache_dir is not None else out / "feature_cache"
        flip = bool(augment)
        for first in (True, False):  # rank 0 writes the cache, the others then read it
            if ctx.is_main == first:
                train_feats = cached_features(
                    model.encoder,
                    train.images,
                    folder,
                    flip,
                    eval_batch_size,
                    dev,
                    progress,
                    write=ctx.is_main,
                    views=augmented_views,
                )
                val_feats = cached_features(
                    model.encoder,
                    val.images,
                    folder,
                    False,
                    eval_batch_size,
                    dev,
                    progress,
                    write=ctx.is_main,
                )
            ctx.barrier()
    augmenter = Augment() if (augment and not cached) else None
    train_in = _Inputs(train, train_feats, augmenter, dev, soft_targets)
    val_in = _Inputs(val, val_feats, None, dev, False)

    view = _TaskForward(model, task, train_encoder)
    ddp_view = fdist.wrap_ddp(view, ctx, dev)
    params = [p for p in view.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=lr_factor, patience=max(0, patience_lr - 1), min_lr=min_lr
    )

    averaged = _ColumnAverage(model, task, ema_decay) if ema_decay is not None else None
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "val_acc": -math.inf, "val_loss": math.inf}
    best_state = _trainable_state(model, task, train_encoder)
    bad_epochs, start_epoch = 0, 0
    best_before: float | None = None  # fine-tuning: validation accuracy of the starting weights
    if saved is not None:
        if (saved.get("ema") is None) != (averaged is None) or (
            averaged is not None and saved.get("ema_decay") != ema_decay
        ):
            raise TrainingError(
                f"cannot resume from {state_path}: it was trained with EMA decay {saved.get('ema_decay')}, "
                f"not {ema_decay}"
            )
        _load_trainable_state(model, saved["trainable"])
        if averaged is not None:
            averaged.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, best, best_state = list(saved["history"]), dict(saved["best"]), dict(saved["best_state"])
        bad_epochs, start_epoch = int(saved["bad_epochs"]), int(saved["epoch"])
        best_before = saved.get("val_acc_before")
        if ctx.is_main and progress:
            print(f"resuming {task} from epoch {start_epoch} ({state_path})")
    elif init_from is not None:  # fine-tuning: the starting weights are the first best, at epoch 0
        model.eval()
        logits, labels = predict_logits(view, val_in, fdist.shard(len(val), ctx), eval_batch_size)
        vloss = float(F.cross_entropy(logits, labels, reduction="sum")) if len(labels) else 0.0
        vcorrect = float((logits.argmax(1) == labels).sum()) if len(labels) else 0.0
        totals = ctx.all_reduce_sum([vloss, vcorrect, float(len(labels))])
        best = {"epoch": 0, "val_acc": totals[1] / totals[2], "val_loss": totals[0] / totals[2]}
        best_before = float(best["val_acc"])
        if ctx.is_main and progress:
            print(
                f"{task} before fine-tuning: val loss {best['val_loss']:.4f} acc {100 * best['val_acc']:.1f}%"
            )

    files = {"log": str(out / f"{task}_log.csv"), "state": str(state_path)}
    stopped_early = cancelled = False
    val_idx = fdist.shard(len(val), ctx)
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        if early_stopping is not None and bad_epochs >= early_stopping:
            stopped_early = True
            break
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(seed, epoch, ctx.rank))
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch, ctx.rank))
        order = fdist.epoch_permutation(len(train), seed, epoch, ctx)
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
        bar = _progress(
            math.ceil(len(order) / batch_size), f"{task} {epoch + 1}/{epochs}", progress and ctx.is_main
        )
        for idx in _batches(order, batch_size, workers):
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            x, y, soft = train_in.batch(idx, generator, train=True)
            logits = ddp_view(x, train_in.from_features)
            if sample_weights is None:
                loss = F.cross_entropy(logits, soft if soft is not None else y)
            else:  # each (group, label) cell weighs the same in expectation
                w = sample_weights[idx].to(logits.device)
                per_sample = F.cross_entropy(logits, soft if soft is not None else y, reduction="none")
                loss = (per_sample * w).sum() / w.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update()
            n = y.shape[0]
            sums += torch.tensor(
                [float(loss.detach()) * n, float((logits.argmax(1) == y).sum()), n], dtype=torch.float64
            )
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{100 * sums[1] / sums[2]:.1f}%")
        bar.close()
        cancelled = bool(ctx.broadcast_object(cancelled))
        if cancelled:
            break
        model.eval()
        with averaged.in_place() if averaged is not None else contextlib.nullcontext():
            logits, labels = predict_logits(view, val_in, val_idx, eval_batch_size)
            evaluated_state = _trainable_state(model, task, train_encoder)
        vloss = float(F.cross_entropy(logits, labels, reduction="sum")) if len(labels) else 0.0
        vcorrect = float((logits.argmax(1) == labels).sum()) if len(labels) else 0.0
        totals = ctx.all_reduce_sum([*sums.tolist(), vloss, vcorrect, float(len(labels))])
        train_loss, train_acc = float(totals[0] / totals[2]), float(totals[1] / totals[2])
        val_loss, val_acc = float(totals[3] / totals[5]), float(totals[4] / totals[5])
        scheduler.step(val_loss)
        improved = val_acc > best["val_acc"] + 1e-12 or (
            abs(val_acc - best["val_acc"]) <= 1e-12 and val_loss < best["val_loss"]
        )
        if improved:
            best = {"epoch": epoch + 1, "val_acc": val_acc, "val_loss": val_loss}
            best_state = evaluated_state
            bad_epochs = 0
        else:
            bad_epochs += 1
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
            "best": int(improved),
        }
        history.append(row)
        if ctx.is_main:
            write_csv(files["log"], history)
            save_state(
                state_path,
                "column",
                {
                    "task": spec.to_dict(),
                    "train_encoder": bool(train_encoder),
                    "epoch": epoch + 1,
                    "trainable": _trainable_state(model, task, train_encoder),
                    "history": history,
                    "best": best,
                    "best_state": best_state,
                    "bad_epochs": bad_epochs,
                    "seed": seed,
                    "world_size": ctx.world_size,
                    "ema_decay": ema_decay,
                    "ema": averaged.state_dict() if averaged is not None else None,
                    "init_from": init_from,
                    "val_acc_before": best_before,
                },
                optimizer,
                scheduler,
            )
            if progress:
                print(
                    f"{task} epoch {epoch + 1}/{epochs}: "
                    f"train loss {train_loss:.4f} acc {100 * train_acc:.1f}% | "
                    f"val loss {val_loss:.4f} acc {100 * val_acc:.1f}% | lr {row['lr']:.2g}"
                    + (" *" if improved else "")
                )
            if callback is not None:
                callback(epoch + 1, epochs, train_loss, val_acc)
        ctx.barrier()
    else:
        epoch = epochs

    _load_trainable_state(model, best_state)
    model.eval()
    result = ColumnResult(
        task=task,
        history=history,
        best_epoch=int(best["epoch"]),
        best_val_acc=float(best["val_acc"]) if history else math.nan,
        best_val_loss=float(best["val_loss"]) if history else math.nan,
        best_state=best_state,
        epochs_run=len(history),
        stopped_early=stopped_early,
        cancelled=cancelled,
        files=files,
    )
    if ctx.is_main and history:
        target = checkpoint_path if save_checkpoint else False
        _finish_column(model, spec, view, val_in, val, out, result, target, plots, eval_batch_size, {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "patience_lr": patience_lr,
            "early_stopping": early_stopping, "train_encoder": bool(train_encoder), "augment": bool(augment),
            "soft_targets": bool(soft_targets), "balance_by": list(balance_by), "seed": seed,
            "ema_decay": ema_decay, "augmented_views": augmented_views, "init_from": init_from,
            "val_acc_before": best_before,
            "world_size": ctx.world_size,
            "train_samples": len(train), "val_samples": len(val),
        })  # fmt: skip
    ctx.barrier()
    return result


def _check_resume(saved: Mapping[str, Any], spec: Any, train_encoder: bool, path: Path) -> None:
    if saved.get("kind") != "column":
        raise TrainingError(f"cannot resume from {path}: it is not a column training state")
    task = saved.get("task", {})
    if task.get("name") != spec.name or list(task.get("labels", [])) != list(spec.labels):
        raise TrainingError(
            f"cannot resume from {path}: it trains task {task.get('name')!r} with other labels"
        )
    if list(task.get("laterals", [])) != list(spec.laterals):
        raise TrainingError(f"cannot resume from {path}: it used laterals {task.get('laterals')}")
    if bool(saved.get("train_encoder")) != bool(train_encoder):
        raise TrainingError(f"cannot resume from {path}: --train-encoder differs from the saved run")


def _finish_column(
    model: nn.Module,
    spec: Any,
    view: nn.Module,
    val_in: _Inputs,
    val: ColumnData,
    out: Path,
    result: ColumnResult,
    checkpoint_path: PathLike | bool | None,
    plots: bool,
    eval_batch_size: int,
    settings: dict[str, Any],
) -> None:
    """Rank 0 after training: confusion matrix of the best weights, plots, checkpoint."""
    from facial_perception.core.evaluation import confusion_matrix

    logits, labels = predict_logits(view, val_in, torch.arange(len(val)), eval_batch_size)
    cm = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), len(spec.labels))
    result.confusion = cm.tolist()
    if plots:
        from facial_perception.core import plots as fplots

        result.files["curves"] = str(
            fplots.plot_learning_curves(
                result.history, out / f"{spec.name}_curves.png", f"{spec.name} column"
            )
        )
        result.files["confusion"] = str(
            fplots.plot_confusion_matrix(cm, spec.labels, out / f"{spec.name}_confusion.png", title=spec.name)
        )
    if checkpoint_path is False:
        return
    target = Path(checkpoint_path) if checkpoint_path else out / f"{spec.name}.safetensors"
    training = {
        spec.name: {
            **settings,
            "best_epoch": result.best_epoch,
            "best_val_acc": result.best_val_acc,
            "best_val_loss": result.best_val_loss,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "cancelled": result.cancelled,
        }
    }
    save_model_checkpoint(model, target, training)
    result.checkpoint = target
    result.files["checkpoint"] = str(target)


def save_model_checkpoint(model: nn.Module, path: PathLike, training: Mapping[str, Any]) -> None:
    """``checkpoint.save_model`` keeping the training metadata of earlier columns."""
    from facial_perception.core import checkpoint as ckpt

    merged = dict(getattr(model, "training_meta", {}) or {})
    merged.update(training)
    model.training_meta = merged
    ckpt.save_model(path, model, merged)


# --------------------------------------------------------------------------------------------------
# Encoder (BEGAN) training
# --------------------------------------------------------------------------------------------------


@dataclass
class EncoderResult:
    """What :func:`train_encoder` did."""

    checkpoint: Path
    steps: int
    k: float
    m_global: float
    log: Path
    cancelled: bool = False
    samples: list[str] = field(default_factory=list)


@dataclass
class _LrPlateau:
    """Halve the BEGAN learning rate when windowed mean M_global stops improving, with a floor."""

    window: int
    patience: int = 2
    factor: float = 0.5
    min_lr: float = 1e-5
    threshold: float = 0.01
    best: float = math.inf
    bad: int = 0
    acc_sum: float = 0.0
    acc_n: int = 0

    def update(self, m_global: float, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        self.acc_sum += m_global
        self.acc_n += 1
        if self.acc_n < self.window:
            return False
        mean, self.acc_sum, self.acc_n = self.acc_sum / self.acc_n, 0.0, 0
        if mean < self.best * (1 - self.threshold):
            self.best, self.bad = mean, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            return False
        self.bad = 0
        changed = False
        for opt in optimizers:
            for group in opt.param_groups:
                new = max(group["lr"] * self.factor, self.min_lr)
                changed |= new < group["lr"]
                group["lr"] = new
        return changed


def train_encoder(
    config: Any,
    images: np.ndarray | torch.Tensor,
    out_dir: PathLike,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    min_lr: float = 1e-5,
    lr_window: int | None = None,
    gamma: float = 0.5,
    lambda_k: float = 0.001,
    flip: bool = True,
    device: str | torch.device = "auto",
    resume: bool = True,
    seed: int = 0,
    workers: int = 0,
    log_every: int = 50,
    sample_every: int = 500,
    checkpoint_every: int = 500,
    progress: bool = True,
    callback: Callable[[int, int, dict[str, float]], None] | None = None,
    cancel: threading.Event | None = None,
) -> EncoderResult:
    """Unsupervised BEGAN training on uint8 grey faces (N, S, S) at ``config.input_size``.

    - ``steps`` (or ``epochs`` passes over the images) optimizer steps of both D and G with Adam
      (beta1 = 0.5); the learning rate halves when the mean M_global over ``lr_window`` steps
      (default: one epoch, at most 1000 steps) fails to improve by 1 % twice, down to ``min_lr``.
    - Every ``log_every`` steps a row (step, epoch, loss_d, loss_g, k, m_global, lr) goes to
      ``began_log.csv``; every ``sample_every`` steps generated faces and reconstructions go to
      ``samples/step_NNNNNNN.png``.
    - Every ``checkpoint_every`` steps and at the end: ``began.safetensors`` (the BEGAN, usable by
      ``ProgressiveNet.from_began``) and ``began_state.pt`` (weights, optimizers, k, step, RNG,
      schedule) - both atomic. ``resume`` continues from ``began_state.pt`` exactly.
    - Under torchrun gradients are averaged across processes and k_t is the mean of the ranks'.
    """
    from facial_perception.core.began import BEGAN, BEGANState, began_step, make_began_optimizers
    from facial_perception.core.config import get_config

    cfg = get_config(config)
    data = images_to_tensor(images)
    if data.shape[0] == 0:
        raise TrainingError("no images to train the encoder on")
    if data.shape[-1] != cfg.input_size:
        raise TrainingError(f"images are {data.shape[-1]}px but config {cfg.name!r} needs {cfg.input_size}px")
    if (epochs is None) == (steps is None):
        raise TrainingError("give exactly one of epochs or steps")
    if batch_size < 1 or lr <= 0:
        raise TrainingError("batch size must be >= 1 and the learning rate > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    ctx = fdist.init_distributed(dev)
    dev = fdist.rank_device(dev, ctx)

    n = data.shape[0]
    per_rank = math.ceil(n / ctx.world_size)
    steps_per_epoch = max(1, per_rank // batch_size) if per_rank >= batch_size else 1
    total = int(steps) if steps is not None else int(epochs) * steps_per_epoch
    if total < 1:
        raise TrainingError("the number of steps must be >= 1")
    window = lr_window or min(steps_per_epoch, 1000)

    seed_everything(seed)
    model = BEGAN(cfg).to(dev)
    opt_d, opt_g = make_began_optimizers(model, lr=lr)
    state = BEGANState()
    plateau = _LrPlateau(window=window, min_lr=min_lr)
    log_rows: list[dict[str, Any]] = []
    state_path, ckpt_path, log_path = out / "began_state.pt", out / "began.safetensors", out / "began_log.csv"
    if resume and state_path.is_file():
        saved = load_state(state_path, "began")
        if saved.get("config") != cfg.to_dict():
            raise TrainingError(f"cannot resume from {state_path}: it trains another configuration")
        model.load_state_dict(saved["model"])
        opt_d.load_state_dict(saved["optimizer"])
        opt_g.load_state_dict(saved["opt_g"])
        state = BEGANState(k=float(saved["k"]), m_global=float(saved["m_global"]), step=int(saved["step"]))
        for key, value in saved["plateau"].items():
            setattr(plateau, key, value)
        log_rows = list(saved["log"])
        if int(saved.get("world_size", 1)) == ctx.world_size and saved.get("rng"):
            from facial_perception.core.checkpoint import restore_rng_state

            restore_rng_state(saved["rng"])
        if ctx.is_main and progress:
            print(f"resuming BEGAN from step {state.step} ({state_path})")
    fdist.broadcast_parameters(model, ctx)
    hooks = fdist.average_gradients_hooks(model.parameters(), ctx)

    fixed = torch.Generator().manual_seed(seed + 12345)
    sample_z = model.sample_z(min(32, max(8, batch_size)), "cpu", fixed).to(dev)
    sample_real = normalise_tensor(data[torch.randperm(n, generator=fixed)[:8]]).to(dev)
    step_rng = torch.Generator(device=dev) if dev.type == "cuda" else torch.Generator()
    samples: list[str] = []

    def checkpoint() -> None:
        if not ctx.is_main:
            return
        from facial_perception.core import checkpoint as ckpt

        meta = {
            "steps": state.step, "k": state.k, "m_global": _finite(state.m_global), "gamma": gamma,
            "lambda_k": lambda_k, "lr": opt_d.param_groups[0]["lr"], "batch_size": batch_size,
            "images": n, "seed": seed, "world_size": ctx.world_size,
        }  # fmt: skip
        ckpt.save_began(ckpt_path, model, state, meta)
        save_state(
            state_path,
            "began",
            {
                "config": cfg.to_dict(),
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "opt_g": opt_g.state_dict(),
                "k": state.k,
                "m_global": state.m_global,
                "step": state.step,
                "plateau": {
                    k: v for k, v in asdict(plateau).items() if k in ("best", "bad", "acc_sum", "acc_n")
                },
                "log": log_rows,
                "world_size": ctx.world_size,
            },
            opt_d,
        )
        write_csv(log_path, log_rows)

    def save_samples() -> None:
        if not ctx.is_main:
            return
        from facial_perception.core.plots import save_image_grid

        model.eval()
        with torch.inference_mode():
            fake = model.generator(sample_z)
            recon = model.reconstruct(sample_real)
        model.train()
        grid = torch.cat([fake, sample_real, recon]).float().cpu().numpy()
        path = save_image_grid(grid, out / "samples" / f"step_{state.step:07d}.png", columns=8)
        samples.append(str(path))

    cancelled = False
    bar = _progress(total, "BEGAN", progress and ctx.is_main, unit="step")
    bar.update(state.step)
    model.train()
    try:
        while state.step < total:
            epoch, offset = divmod(state.step, steps_per_epoch)
            order = fdist.epoch_permutation(n, seed, epoch, ctx)
            batches = list(torch.split(order, batch_size))[offset:steps_per_epoch]
            for idx in _batches(torch.cat(batches), batch_size, workers) if batches else []:
                if state.step >= total:
                    break
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
                real = normalise_tensor(data[idx].to(dev))
                step_rng.manual_seed(_epoch_seed(seed, state.step, ctx.rank))  # resume-exact noise
                if flip:
                    mask = torch.rand(real.shape[0], generator=step_rng, device=real.device) < 0.5
                    real = torch.where(mask.view(-1, 1, 1, 1), torch.flip(real, dims=[3]), real)
                metrics = began_step(model, real, opt_d, opt_g, state, gamma, lambda_k, step_rng)
                if ctx.enabled:  # every rank moved k by its own balance: use the mean, as if one batch
                    mean = ctx.all_reduce_mean(
                        [state.k, state.m_global, metrics["loss_d"], metrics["loss_g"]]
                    )
                    state.k, state.m_global = float(mean[0]), float(mean[1])
                    metrics.update(
                        k=state.k, m_global=state.m_global, loss_d=float(mean[2]), loss_g=float(mean[3])
                    )
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise TrainingError(f"BEGAN diverged at step {state.step} (non-finite loss); lower --lr")
                plateau.update(state.m_global, (opt_d, opt_g))
                lr_now = opt_d.param_groups[0]["lr"]
                bar.update(1)
                bar.set_postfix(k=f"{state.k:.4f}", M=f"{state.m_global:.4f}", lr=f"{lr_now:.1e}")
                if state.step % log_every == 0 or state.step == total:
                    log_rows.append({"step": state.step, "epoch": epoch + 1, **metrics, "lr": lr_now})
                    if callback is not None and ctx.is_main:
                        callback(state.step, total, metrics)
                if sample_every and state.step % sample_every == 0:
                    save_samples()
                if checkpoint_every and state.step % checkpoint_every == 0 and state.step < total:
                    checkpoint()
                    ctx.barrier()
            cancelled = bool(ctx.broadcast_object(cancelled))
            if cancelled:
                break
    finally:
        bar.close()
        for handle in hooks:
            handle.remove()
    if not log_rows or log_rows[-1]["step"] != state.step:
        log_rows.append({"step": state.step, "epoch": state.step // steps_per_epoch + 1, "k": state.k,
                         "m_global": state.m_global, "lr": opt_d.param_groups[0]["lr"]})  # fmt: skip
    if not samples or not samples[-1].endswith(f"{state.step:07d}.png"):
        save_samples()
    checkpoint()
    if ctx.is_main and len(log_rows) > 1:
        from facial_perception.core.plots import plot_training_log

        keys = [k for k in ("loss_d", "loss_g", "k", "m_global") if any(k in r for r in log_rows)]
        plot_training_log(log_rows, keys, out / "began_curves.png", "BEGAN")
    ctx.barrier()
    return EncoderResult(ckpt_path, state.step, state.k, state.m_global, log_path, cancelled, samples)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (ablation runs start from the same trained columns)."""
    return copy.deepcopy(model)
