"""Offline face detectors: BlazeFace (mediapipe, default) and OpenCV Haar cascades (fallback).

Both run without network access: the BlazeFace graphs and ``.tflite`` weights ship inside the
``mediapipe`` wheel, the Haar cascades inside ``opencv-python``.  Every detector returns
:class:`Detection` objects in pixel ``xyxy`` coordinates, clipped to the image, with faces smaller
than ``min_face_size`` dropped and at most ``max_faces`` kept (largest first), so the rest of the
pipeline never sees degenerate boxes and the batch size stays bounded.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

__all__ = [
    "DETECTORS",
    "BlazeFaceDetector",
    "Detection",
    "DetectorError",
    "FaceDetector",
    "HaarDetector",
    "make_detector",
]

_LOG = logging.getLogger(__name__)


class DetectorError(RuntimeError):
    """A detector cannot be created or used (bad option, missing backend); one-line message."""


@dataclass
class Detection:
    """One detected face: ``box`` = float32 ``[x1, y1, x2, y2]`` in pixels, ``keypoints`` (K, 2) pixels."""

    box: np.ndarray
    score: float
    keypoints: np.ndarray | None = None

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@runtime_checkable
class FaceDetector(Protocol):
    """Anything with ``detect(rgb) -> list[Detection]`` (RGB ``uint8`` ``(H, W, 3)``)."""

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Contiguous RGB uint8 (detectors' native code wants contiguous memory)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise DetectorError(f"detector needs a non-empty uint8 image, not {image.dtype} {image.shape}")
    if image.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGBA2RGB)
    if image.shape[2] != 3:
        raise DetectorError(f"detector input must have 1, 3 or 4 channels, got shape {image.shape}")
    return np.ascontiguousarray(image)


def finalize_detections(
    detections: list[Detection], image_shape: tuple[int, ...], min_face_size: float, max_faces: int
) -> list[Detection]:
    """Clip to the image, drop boxes whose shorter side is below ``min_face_size``, keep the largest."""
    height, width = image_shape[:2]
    kept: list[Detection] = []
    for det in detections:
        box = np.asarray(det.box, dtype=np.float32).copy()
        if not np.all(np.isfinite(box)):
            continue
        box[[0, 2]] = np.clip(box[[0, 2]], 0, width)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, height)
        clipped = Detection(box=box, score=float(det.score), keypoints=det.keypoints)
        if min(clipped.width, clipped.height) < max(min_face_size, 1.0):
            continue
        kept.append(clipped)
    kept.sort(key=lambda d: d.area, reverse=True)
    return kept[: max(int(max_faces), 0)]


class BlazeFaceDetector:
    """MediaPipe BlazeFace: ``model="short"`` (faces within ~2 m) or ``"full"`` (up to ~5 m).

    Uses the ``mediapipe.solutions.face_detection`` graph, whose weights are packaged in the wheel,
    so it needs no download.  One graph per detector; calls are serialised with a lock because the
    graph is not re-entrant (the node may detect from several callback threads).
    """

    name = "blazeface"

    def __init__(
        self,
        min_score: float = 0.6,
        model: str = "short",
        *,
        min_face_size: float = 20.0,
        max_faces: int = 10,
    ) -> None:
        if model not in ("short", "full"):
            raise DetectorError(f"BlazeFace model must be 'short' or 'full', got {model!r}")
        if not 0.0 <= float(min_score) <= 1.0:
            raise DetectorError(f"min_score must be in [0, 1], got {min_score}")
        os.environ.setdefault("GLOG_minloglevel", "2")  # keep mediapipe's C++ logging quiet
        try:
            from mediapipe.python.solutions import face_detection
        except Exception as exc:  # ImportError, or a broken native extension
            raise DetectorError(
                f"mediapipe is not usable ({type(exc).__name__}: {exc}); "
                "use the OpenCV fallback detector 'haar' instead"
            ) from None
        self.model = model
        self.min_score = float(min_score)
        self.min_face_size = float(min_face_size)
        self.max_faces = int(max_faces)
        self._lock = threading.Lock()
        self._graph = face_detection.FaceDetection(
            model_selection=0 if model == "short" else 1, min_detection_confidence=self.min_score
        )

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB frame, largest first."""
        image = _as_rgb(rgb)
        height, width = image.shape[:2]
        with self._lock:
            if self._graph is None:
                raise DetectorError("BlazeFaceDetector is closed")
            result = self._graph.process(image)
        detections: list[Detection] = []
        scale = np.array([width, height], dtype=np.float32)
        for det in result.detections or []:
            rel = det.location_data.relative_bounding_box
            box = np.array(
                [rel.xmin * width, rel.ymin * height, (rel.xmin + rel.width) * width,
                 (rel.ymin + rel.height) * height],
                dtype=np.float32,
            )
            points = det.location_data.relative_keypoints
            keypoints = (
                np.array([[p.x, p.y] for p in points], dtype=np.float32) * scale if len(points) else None
            )
            detections.append(Detection(box=box, score=float(det.score[0]), keypoints=keypoints))
        return finalize_detections(detections, image.shape, self.min_face_size, self.max_faces)

    def close(self) -> None:
        """Release the mediapipe graph (also done at garbage collection)."""
        with self._lock:
            if self._graph is not None:
                self._graph.close()
                self._graph = None

    def __enter__(self) -> BlazeFaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HaarDetector:
    """OpenCV frontal-face Haar cascade: slower and less accurate than BlazeFace, but always available.

    ``score`` is a heuristic in (0, 1): ``n / (n + min_neighbors)`` for ``n`` merged neighbour
    detections, so a box that just passes ``min_neighbors`` scores 0.5.  Frames are searched at
    most ``max_side`` pixels wide/high (downscaled first) to bound the cost.
    """

    name = "haar"

    def __init__(
        self,
        min_score: float = 0.5,
        *,
        cascade: str = "haarcascade_frontalface_default.xml",
        scale_factor: float = 1.1,
        min_neighbors: int = 8,
        min_face_size: float = 20.0,
        max_faces: int = 10,
        max_side: int = 320,
    ) -> None:
        path = cascade if os.path.isabs(cascade) else os.path.join(cv2.data.haarcascades, cascade)
        if not os.path.isfile(path):
            raise DetectorError(f"Haar cascade not found: {path}")
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():
            raise DetectorError(f"Haar cascade could not be loaded: {path}")
        if scale_factor <= 1.0:
            raise DetectorError(f"scale_factor must be > 1, got {scale_factor}")
        self._classifier = classifier
        self._lock = threading.Lock()
        self.min_score = float(min_score)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_face_size = float(min_face_size)
        self.max_faces = int(max_faces)
        self.max_side = int(max_side)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB frame, largest first."""
        image = _as_rgb(rgb)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.max_side / max(grey.shape))
        if scale < 1.0:
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        min_side = max(int(self.min_face_size * scale), 8)
        with self._lock:  # CascadeClassifier is not documented as thread-safe
            boxes, neighbours = self._classifier.detectMultiScale2(
                grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                minSize=(min_side, min_side),
            )
        detections = []
        for (x, y, w, h), n in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(neighbours).reshape(-1),
                                   strict=True):
            score = float(n) / (float(n) + max(self.min_neighbors, 1))
            if score < self.min_score:
                continue
            box = np.array([x, y, x + w, y + h], dtype=np.float32) / scale
            detections.append(Detection(box=box, score=score, keypoints=None))
        return finalize_detections(detections, image.shape, self.min_face_size, self.max_faces)

    def close(self) -> None:
        """Nothing to release; present so every detector can be closed the same way."""


#: Names accepted by :func:`make_detector`.
DETECTORS = ("blazeface", "blazeface_full", "haar", "auto")


def make_detector(name: str = "blazeface", **kwargs: object) -> FaceDetector:
    """Build a detector by name.

    ``"blazeface"`` (short range), ``"blazeface_full"`` (full range), ``"haar"`` (OpenCV), or
    ``"auto"`` (BlazeFace, falling back to Haar with a warning when mediapipe is unusable).
    Keyword arguments go to the detector (``min_score``, ``min_face_size``, ``max_faces``, ...).
    """
    key = (name or "").strip().lower()
    try:
        if key in ("blazeface", "mediapipe", "blazeface_short"):
            return BlazeFaceDetector(**kwargs)  # type: ignore[arg-type]
        if key == "blazeface_full":
            return BlazeFaceDetector(**{"model": "full", **kwargs})  # type: ignore[arg-type]
        if key in ("haar", "opencv"):
            kwargs.pop("model", None)
            return HaarDetector(**kwargs)  # type: ignore[arg-type]
        if key == "auto":
            try:
                return BlazeFaceDetector(**kwargs)  # type: ignore[arg-type]
            except DetectorError as exc:
                _LOG.warning("%s; falling back to the Haar detector", exc)
                kwargs.pop("model", None)
                return HaarDetector(**kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DetectorError(f"bad option for detector {name!r}: {exc}") from None
    raise DetectorError(f"unknown detector {name!r} (choose from {', '.join(DETECTORS)})")
