"""Multi-face tracking: stable ids from frame to frame (IoU + centre distance, Hungarian assignment).

Why: smoothing, enrolment ("the next N frames of this face") and id-switch metrics all key on a
track id that stays the same while a face stays in view.  Faces on a robot move slowly relative to
the frame rate, so a SORT-like tracker without appearance features is enough: each track keeps a
constant-velocity prediction of its box; detections are assigned to predicted boxes by
``scipy.optimize.linear_sum_assignment`` on ``(1 - IoU) + centre_weight * centre distance``, and a
pair is only allowed when IoU >= ``iou_threshold`` or the centres are within ``max_center_distance``
box sizes (fast motion can make IoU zero between frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from facial_perception.pipeline.detection import Detection

__all__ = ["FaceTracker", "Track", "TrackerError", "iou_matrix"]

_FORBIDDEN = 1e6


class TrackerError(ValueError):
    """Invalid tracker settings; one-line message."""


@dataclass
class Track:
    """A face followed over frames.  ``box`` is the latest detection (float32 ``xyxy`` pixels).

    ``hits``: frames with a matching detection; ``missed``: consecutive frames without one;
    ``age``: frames since creation; ``detection_index``: index into this frame's detections, or
    ``None`` when the track was not seen in this frame.
    """

    track_id: int
    box: np.ndarray
    score: float
    hits: int = 1
    missed: int = 0
    age: int = 1
    keypoints: np.ndarray | None = None
    detection_index: int | None = None
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.float32))

    def predicted_box(self) -> np.ndarray:
        """Where the box should be in the next frame (constant velocity over the missed frames)."""
        return self.box + self.velocity * (self.missed + 1)


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise intersection-over-union of two ``(N, 4)``/``(M, 4)`` xyxy arrays -> ``(N, M)``."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _center_distance(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Centre distance in units of the mean box size of each pair (scale invariant)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    size_a = np.sqrt(np.clip((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), 1e-6, None))
    size_b = np.sqrt(np.clip((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6, None))
    dist = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2)
    return dist / ((size_a[:, None] + size_b[None, :]) / 2)


class FaceTracker:
    """Assigns detections to tracks; ids start at 1 and are never reused by this tracker.

    A track that misses more than ``max_missed`` consecutive frames is removed.  A new track is
    *tentative* until it has ``min_hits`` hits; tentative tracks are dropped on their first miss
    and are not returned by :meth:`update` (with ``min_hits=1`` every detection is reported at once).
    """

    def __init__(
        self,
        iou_threshold: float = 0.3,
        max_missed: int = 4,
        min_hits: int = 1,
        *,
        max_center_distance: float = 1.0,
        center_weight: float = 0.5,
        velocity_smoothing: float = 0.5,
    ) -> None:
        if not 0.0 <= iou_threshold <= 1.0:
            raise TrackerError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        if max_missed < 0 or min_hits < 1:
            raise TrackerError(f"need max_missed >= 0 and min_hits >= 1, got {max_missed}, {min_hits}")
        if not 0.0 <= velocity_smoothing <= 1.0:
            raise TrackerError(f"velocity_smoothing must be in [0, 1], got {velocity_smoothing}")
        self.iou_threshold = float(iou_threshold)
        self.max_missed = int(max_missed)
        self.min_hits = int(min_hits)
        self.max_center_distance = float(max_center_distance)
        self.center_weight = float(center_weight)
        self.velocity_smoothing = float(velocity_smoothing)
        self._tracks: list[Track] = []
        self._next_id = 1
        self.removed_ids: list[int] = []

    @property
    def tracks(self) -> list[Track]:
        """All live tracks, including those coasting through missed frames and tentative ones."""
        return list(self._tracks)

    def reset(self) -> None:
        """Forget all tracks (ids keep increasing, so old ids never come back)."""
        self.removed_ids = [t.track_id for t in self._tracks]
        self._tracks = []

    def _assign(self, detections: Sequence[Detection]) -> list[tuple[int, int]]:
        if not self._tracks or not detections:
            return []
        predicted = np.stack([t.predicted_box() for t in self._tracks])
        boxes = np.stack([np.asarray(d.box, dtype=np.float32) for d in detections])
        iou = iou_matrix(predicted, boxes)
        dist = _center_distance(predicted, boxes)
        allowed = (iou >= self.iou_threshold) | (dist <= self.max_center_distance)
        cost = np.where(allowed, (1.0 - iou) + self.center_weight * dist, _FORBIDDEN)
        rows, cols = linear_sum_assignment(cost)
        return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if allowed[r, c]]

    def update(self, detections: Sequence[Detection]) -> list[Track]:
        """Advance one frame; returns the confirmed tracks seen in this frame, in detection order.

        Ids of tracks removed in this call are in :attr:`removed_ids` (the smoother drops their state).
        """
        self.removed_ids = []
        matches = self._assign(detections)
        matched_tracks = {r for r, _ in matches}
        matched_dets = {c for _, c in matches}
        for track in self._tracks:
            track.age += 1
            track.detection_index = None
        for r, c in matches:
            track, det = self._tracks[r], detections[c]
            new_box = np.asarray(det.box, dtype=np.float32).copy()
            step = (new_box - track.box) / (track.missed + 1)
            a = self.velocity_smoothing
            track.velocity = (a * step + (1 - a) * track.velocity).astype(np.float32)
            track.box, track.score, track.keypoints = new_box, float(det.score), det.keypoints
            track.hits += 1
            track.missed = 0
            track.detection_index = c
        survivors: list[Track] = []
        for i, track in enumerate(self._tracks):
            if i not in matched_tracks:
                track.missed += 1
                tentative = track.hits < self.min_hits
                if tentative or track.missed > self.max_missed:
                    self.removed_ids.append(track.track_id)
                    continue
            survivors.append(track)
        for c, det in enumerate(detections):
            if c in matched_dets:
                continue
            survivors.append(
                Track(
                    track_id=self._next_id,
                    box=np.asarray(det.box, dtype=np.float32).copy(),
                    score=float(det.score),
                    keypoints=det.keypoints,
                    detection_index=c,
                )
            )
            self._next_id += 1
        self._tracks = survivors
        seen = [t for t in self._tracks if t.detection_index is not None and t.hits >= self.min_hits]
        return sorted(seen, key=lambda t: t.detection_index if t.detection_index is not None else -1)
