"""Per-track temporal smoothing of class probabilities and identity embeddings.

Single-frame predictions flicker (blinks, motion blur, a detector box that jitters by a few
pixels).  Faces are tracked, so each track's outputs are averaged over time with an exponential
moving average: ``smoothed = alpha * new + (1 - alpha) * previous`` (``alpha = 1`` disables it).
State is keyed by ``(track_id, task)`` and restarts whenever the task's label list changes (a
column was hot-swapped) or the vector length changes; the state of removed tracks is dropped so
memory stays bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["PredictionSmoother", "SmootherError"]


class SmootherError(ValueError):
    """Invalid smoother input (bad alpha, probability/label length mismatch); one line."""


class PredictionSmoother:
    """Exponential moving averages per track: probabilities per task, and the identity embedding.

    Smoothed probability vectors are renormalised to sum to 1; smoothed embeddings to unit L2
    norm (so cosine matching in the gallery stays meaningful).  ``embedding_alpha`` defaults to
    ``alpha``.
    """

    def __init__(self, alpha: float = 0.6, embedding_alpha: float | None = None) -> None:
        for name, value in (("alpha", alpha), ("embedding_alpha", embedding_alpha)):
            if value is not None and not 0.0 < float(value) <= 1.0:
                raise SmootherError(f"{name} must be in (0, 1], got {value}")
        self.alpha = float(alpha)
        self.embedding_alpha = float(embedding_alpha) if embedding_alpha is not None else self.alpha
        self._probs: dict[tuple[int, str], tuple[tuple[str, ...], np.ndarray]] = {}
        self._embeddings: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def smooth(
        self, track_id: int, task: str, labels: Sequence[str], probabilities: np.ndarray
    ) -> np.ndarray:
        """Blend this frame's probabilities into the track's running average and return it (float32)."""
        probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
        key_labels = tuple(str(label) for label in labels)
        if probs.size != len(key_labels) or probs.size == 0:
            raise SmootherError(f"task {task!r}: {probs.size} probabilities for {len(key_labels)} labels")
        if not np.all(np.isfinite(probs)):
            raise SmootherError(f"task {task!r}: probabilities contain NaN or infinity")
        key = (int(track_id), str(task))
        with self._lock:
            previous = self._probs.get(key)
            if previous is not None and previous[0] == key_labels:
                probs = self.alpha * probs + (1.0 - self.alpha) * previous[1]
            total = probs.sum()
            if total > 0:
                probs = probs / total
            self._probs[key] = (key_labels, probs)
        return probs.astype(np.float32)

    def smooth_embedding(self, track_id: int, embedding: np.ndarray) -> np.ndarray:
        """Running average of the track's L2-normalised identity embeddings (unit norm, float32)."""
        vec = np.asarray(embedding, dtype=np.float64).reshape(-1)
        if vec.size == 0 or not np.all(np.isfinite(vec)):
            raise SmootherError("embedding is empty or contains NaN/infinity")
        norm = np.linalg.norm(vec)
        vec = vec / norm if norm > 0 else vec
        key = int(track_id)
        with self._lock:
            previous = self._embeddings.get(key)
            if previous is not None and previous.shape == vec.shape:
                vec = self.embedding_alpha * vec + (1.0 - self.embedding_alpha) * previous
                norm = np.linalg.norm(vec)
                vec = vec / norm if norm > 0 else vec
            self._embeddings[key] = vec
        return vec.astype(np.float32)

    def drop(self, track_ids: Iterable[int]) -> None:
        """Forget the state of these tracks (call with the tracker's removed ids)."""
        gone = {int(t) for t in track_ids}
        if not gone:
            return
        with self._lock:
            self._probs = {k: v for k, v in self._probs.items() if k[0] not in gone}
            for track_id in gone:
                self._embeddings.pop(track_id, None)

    def retain(self, track_ids: Iterable[int]) -> None:
        """Keep only the state of these tracks (a safety net against leaks if removals are missed)."""
        keep = {int(t) for t in track_ids}
        with self._lock:
            self._probs = {k: v for k, v in self._probs.items() if k[0] in keep}
            self._embeddings = {k: v for k, v in self._embeddings.items() if k in keep}

    def reset(self) -> None:
        """Forget everything (after a model swap whose embeddings are not comparable)."""
        with self._lock:
            self._probs.clear()
            self._embeddings.clear()

    @property
    def tracked_ids(self) -> set[int]:
        """Track ids that currently hold smoothing state."""
        with self._lock:
            return {k[0] for k in self._probs} | set(self._embeddings)
