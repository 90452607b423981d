"""Batched inference API used by the pipeline and the ROS node.

A batch of aligned face crops goes in; per face and per task come out the label, the class
probabilities and (for the identity column) an L2-normalised embedding.  One forward pass per
batch under ``torch.inference_mode``; fp16 on CUDA by default; channels-last memory on CPU.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facial_perception.core.devices import resolve_device
from facial_perception.core.fused_columns import FusedColumns
from facial_perception.core.progressive import EncodedFaces, ProgressiveNet


class InferenceError(ValueError):
    """Bad input to the predictor (wrong shape, unknown task, ...), as one line."""


@dataclass
class TaskPrediction:
    """One task's answer for one face."""

    label: str
    index: int
    confidence: float
    probabilities: np.ndarray
    labels: list[str]
    # the mean of the column's standalone members' probabilities (included in ``probabilities``),
    # which a caller may hold for the face's next frames (FacePredictor.predict's held_members)
    members: np.ndarray | None = None
    # the column's own probabilities, when members were mixed in
    column: np.ndarray | None = None


@dataclass
class FacePrediction:
    """All tasks for one face; ``embedding`` is None when no identity column was run."""

    tasks: dict[str, TaskPrediction] = field(default_factory=dict)
    embedding: np.ndarray | None = None


@dataclass
class EncodedBatch:
    """:meth:`FacePredictor.encode`'s result: per chunk the faces' features and the model that made them.

    With fused columns (``columns`` set) the features have been through the columns' first layer
    (:meth:`FusedColumns.stem`) too, and :meth:`FacePredictor.predict_encoded` runs the rest.
    """

    model: ProgressiveNet
    chunks: list[EncodedFaces]
    columns: FusedColumns | None = None

    @property
    def count(self) -> int:
        """Number of faces (mirror images not counted)."""
        return sum(chunk.count for chunk in self.chunks)


class FacePredictor:
    """Thread-safe batched predictor around a :class:`ProgressiveNet`.

    The predictor works on its own copy of the model (moved to ``device``, eval mode, fp16 when
    ``half``), so the caller's model is never modified; :meth:`set_model` swaps in a new model
    atomically while other threads keep predicting with the old one until their call ends.

    ``fuse_columns`` (default): the frozen columns run as one stack of wide layers
    (:class:`FusedColumns`: the same results, far fewer tensor ops per batch); False runs them one
    by one as in training. ``standalone_members`` False: columns with standalone members
    (:meth:`ProgressiveNet.add_standalone`) answer alone, without their members' encoder passes.
    """

    def __init__(
        self,
        model: ProgressiveNet,
        device: str | torch.device = "auto",
        half: bool | None = None,
        tasks: Iterable[str] | None = None,
        max_batch: int = 64,
        mirror_average: bool = True,
        fuse_columns: bool = True,
        standalone_members: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.fuse_columns = bool(fuse_columns)
        self.standalone_members = bool(standalone_members)
        # False: ignore the columns' mirror averaging (each face once through the network: faster)
        self.mirror_average = bool(mirror_average)
        self.half = self.device.type == "cuda" if half is None else bool(half)
        if self.half and self.device.type != "cuda":
            raise InferenceError("half precision inference needs a CUDA device; use half=False on CPU")
        if max_batch < 1:
            raise InferenceError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._tasks = list(tasks) if tasks is not None else None
        self._lock = threading.Lock()
        self.metadata: dict[str, Any] = {}
        self._model, self._columns, self._fingerprint = self._prepare(model)
        # fused columns of task subsets (predict(..., tasks=...)), built on first use per model
        self._subset_columns: dict[tuple[str, ...], FusedColumns] = {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        half: bool | None = None,
        tasks: Iterable[str] | None = None,
        max_batch: int = 64,
        mirror_average: bool = True,
        fuse_columns: bool = True,
        standalone_members: bool = True,
    ) -> FacePredictor:
        """Load a ``.safetensors`` model (raises ``CheckpointError`` on a bad file)."""
        from facial_perception.core.checkpoint import load_model

        model, meta = load_model(path)
        predictor = cls(
            model,
            device=device,
            half=half,
            tasks=tasks,
            max_batch=max_batch,
            mirror_average=mirror_average,
            fuse_columns=fuse_columns,
            standalone_members=standalone_members,
        )
        predictor.metadata = {k: v for k, v in meta.items() if k != "extra_tensors"}
        return predictor

    def _prepare(self, model: ProgressiveNet) -> tuple[ProgressiveNet, FusedColumns | None, str | None]:
        if not isinstance(model, ProgressiveNet):
            raise InferenceError(f"FacePredictor needs a ProgressiveNet, got {type(model).__name__}")
        if not model.task_names:
            raise InferenceError("the model has no task columns to predict with")
        if self._tasks is not None:
            unknown = [t for t in self._tasks if t not in model.columns]
            if unknown:
                raise InferenceError(f"unknown task(s) {unknown}; the model has {model.task_names}")
        identity = _identity_column(model, self._tasks or model.task_names)
        fingerprint = model.embedding_fingerprint(identity) if identity is not None else None
        prepared = copy.deepcopy(model).eval().requires_grad_(False)
        prepared.to(self.device)
        if self.half:
            prepared.half()
        if self.device.type == "cpu":
            # oneDNN convolutions are several times faster on NHWC tensors.
            prepared.to(memory_format=torch.channels_last)
        columns = None
        if self.fuse_columns:
            with torch.no_grad():
                columns = FusedColumns(prepared, self._tasks)
            if self.device.type == "cpu":
                columns.to(memory_format=torch.channels_last)
        return prepared, columns, fingerprint

    def set_model(self, model: ProgressiveNet) -> None:
        """Hot-swap the model (prepared outside the lock; the swap itself is atomic)."""
        prepared, columns, fingerprint = self._prepare(model)
        with self._lock:
            self._model, self._columns, self._fingerprint = prepared, columns, fingerprint
            self._subset_columns = {}

    @property
    def model(self) -> ProgressiveNet:
        with self._lock:
            return self._model

    @property
    def input_size(self) -> int:
        return self.model.config.input_size

    @property
    def embedding_dim(self) -> int | None:
        """Length of the identity embeddings this model gives the gallery (None: no identity column)."""
        model = self.model
        identity = _identity_column(model, self.task_names)
        return model.embedding_dim(identity) if identity is not None else None

    @property
    def embedding_fingerprint(self) -> str | None:
        """Hash of the weights behind those embeddings (:meth:`ProgressiveNet.embedding_fingerprint`),
        which a gallery keeps to refuse another model's embeddings (None: no identity column)."""
        with self._lock:
            return self._fingerprint

    @property
    def task_names(self) -> list[str]:
        model = self.model
        return list(self._tasks) if self._tasks is not None else model.task_names

    def predict(
        self,
        batch: torch.Tensor,
        tasks: Sequence[str] | None = None,
        standalone_rows: Sequence[int] | None = None,
        held_members: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    ) -> list[FacePrediction]:
        """``batch``: float tensor (N, C, S, S) in [-1, 1] as made by ``preprocess_batch``; ``tasks``: only
        these of :attr:`task_names` (e.g. the identity column on a crop framed for it), default all.

        ``standalone_rows``: the standalone members run on these faces only (default all); every other
        face needs ``held_members[face][task]``, its members' probabilities of an earlier frame
        (:attr:`TaskPrediction.members`)."""
        return self.predict_encoded(self.encode(batch, tasks, standalone_rows), held_members)

    def _model_and_columns(
        self, tasks: Sequence[str] | None
    ) -> tuple[ProgressiveNet, FusedColumns | None, tuple[str, ...] | None]:
        """The model, the fused columns for ``tasks`` (built once per subset and model) and the subset."""
        with self._lock:
            model, columns, cache = self._model, self._columns, self._subset_columns
        if tasks is None:
            return model, columns, None
        subset = tuple(dict.fromkeys(tasks))
        allowed = self.task_names
        unknown = [t for t in subset if t not in allowed]
        if unknown or not subset:
            raise InferenceError(f"unknown task(s) {unknown or list(subset)}; this predictor runs {allowed}")
        if subset == tuple(allowed):
            return model, columns, None
        if not self.fuse_columns:
            return model, None, subset
        if subset not in cache:
            with torch.no_grad():
                fused = FusedColumns(model, subset)
            if self.device.type == "cpu":
                fused.to(memory_format=torch.channels_last)
            cache[subset] = fused  # a racing thread may build it too: same weights, either wins
        return model, cache[subset], subset

    def encode(
        self,
        batch: torch.Tensor,
        tasks: Sequence[str] | None = None,
        standalone_rows: Sequence[int] | None = None,
    ) -> EncodedBatch:
        """First half of :meth:`predict`: the encoder (on the faces and, where asked, their mirror images)
        and, with fused columns, their first layer.

        A pipeline runs it in one thread while :meth:`predict_encoded` runs the columns of the
        previous batch in another; the result keeps the model it was made with, so a hot swap in
        between cannot mix two models. The columns' first layer is here because with ensemble
        columns the columns cost more than the encoder: this evens the two halves out.
        """
        model, columns, subset = self._model_and_columns(tasks)
        if not isinstance(batch, torch.Tensor):
            raise InferenceError(f"predict expects a torch.Tensor, got {type(batch).__name__}")
        if batch.ndim != 4:
            raise InferenceError(f"predict expects a (N, C, H, W) batch, got shape {tuple(batch.shape)}")
        size, channels = model.config.input_size, model.config.in_channels
        if batch.shape[0] and tuple(batch.shape[1:]) != (channels, size, size):
            raise InferenceError(
                f"batch has shape {tuple(batch.shape)}, the model expects (N, {channels}, {size}, {size})"
            )
        dtype = torch.float16 if self.half else torch.float32
        rows = None if standalone_rows is None else sorted({int(row) for row in standalone_rows})
        if rows and (rows[0] < 0 or rows[-1] >= batch.shape[0]):
            raise InferenceError(f"standalone_rows must be within 0..{batch.shape[0] - 1}, got {rows}")
        chunks: list[EncodedFaces] = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], self.max_batch):
                x = batch[start : start + self.max_batch].to(self.device, dtype=dtype, non_blocking=True)
                if self.device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                encoded = model.encode(
                    x,
                    subset if subset is not None else self._tasks,
                    mirror=self.mirror_average,
                    standalone=self.standalone_members,
                    standalone_rows=None
                    if rows is None
                    else [row - start for row in rows if start <= row < start + x.shape[0]],
                )
                if columns is not None:
                    encoded = encoded._replace(features=columns.stem(encoded.features))
                chunks.append(encoded)
        return EncodedBatch(model, chunks, columns)

    def predict_encoded(
        self, encoded: EncodedBatch, held_members: Mapping[int, Mapping[str, np.ndarray]] | None = None
    ) -> list[FacePrediction]:
        """Second half of :meth:`predict`: the columns on :meth:`encode`'s features (``held_members``:
        see :meth:`predict`)."""
        results: list[FacePrediction] = []
        start = 0
        for chunk in encoded.chunks:
            results.extend(self._predict_chunk(encoded.model, chunk, encoded.columns, held_members, start))
            start += chunk.count
        return results

    def _predict_chunk(
        self,
        model: ProgressiveNet,
        encoded: EncodedFaces,
        columns: FusedColumns | None,
        held_members: Mapping[int, Mapping[str, np.ndarray]] | None,
        start: int,
    ) -> list[FacePrediction]:
        held = _held_tensors(model, encoded, held_members, start)
        with torch.inference_mode():
            outputs = model.predict_encoded(encoded, columns.finish if columns is not None else None, held)
            probabilities = {n: o.probabilities.cpu().numpy() for n, o in outputs.items()}
            members = {n: o.members.cpu().numpy() for n, o in outputs.items() if o.members is not None}
            alone = {n: o.column.cpu().numpy() for n, o in outputs.items() if o.column is not None}
            identity = _identity_column(model, outputs)
            embeddings = (
                F.normalize(outputs[identity].embedding.float(), dim=1).cpu().numpy() if identity else None
            )
        faces: list[FacePrediction] = []
        for row in range(encoded.count):
            per_task: dict[str, TaskPrediction] = {}
            for name, probs in probabilities.items():
                labels = model.specs[name].labels
                p = probs[row]
                index = int(p.argmax())
                held = members[name][row] if name in members else None
                own = alone[name][row] if name in alone else None
                per_task[name] = TaskPrediction(
                    labels[index], index, float(p[index]), p, list(labels), held, own
                )
            faces.append(FacePrediction(per_task, embeddings[row] if embeddings is not None else None))
        return faces

    def predict_images(self, images: Sequence[np.ndarray]) -> list[FacePrediction]:
        """uint8 RGB (H, W, 3) or grey (H, W) face crops -> predictions (shared preprocessing)."""
        if len(images) == 0:
            return []
        from facial_perception.core.preprocess import preprocess_batch

        return self.predict(preprocess_batch(images, self.input_size))


def _held_tensors(
    model: ProgressiveNet,
    encoded: EncodedFaces,
    held_members: Mapping[int, Mapping[str, np.ndarray]] | None,
    start: int,
) -> dict[str, torch.Tensor] | None:
    """Per column with standalone members, the (count, C) tensor of the chunk's held member
    probabilities (zeros where the members ran now); None when they ran on every face."""
    rows = encoded.standalone_rows
    if rows is None or encoded.standalone is None:
        return None
    fresh = set(rows)
    held: dict[str, torch.Tensor] = {}
    for name in encoded.standalone:
        table = np.zeros((encoded.count, len(model.specs[name].labels)), dtype=np.float32)
        for row in range(encoded.count):
            if row in fresh:
                continue
            face = held_members.get(start + row) if held_members is not None else None
            values = face.get(name) if face is not None else None
            if values is None or np.shape(values) != table.shape[1:]:
                raise InferenceError(
                    f"face {start + row}: its {name!r} standalone members did not run (standalone_rows)"
                    f" and held_members gives no {table.shape[1]} probabilities for it"
                )
            table[row] = values
        held[name] = torch.from_numpy(table)
    return held


def _identity_column(model: ProgressiveNet, tasks: Iterable[str]) -> str | None:
    """The first identity column among ``tasks``: the one whose embeddings a gallery holds."""
    return next((name for name in tasks if model.specs[name].kind == "identity"), None)
