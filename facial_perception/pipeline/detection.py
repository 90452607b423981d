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
    "BLAZEFACE_BACKENDS",
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


@dataclass(frozen=True)
class _BlazeFaceModel:
    """One BlazeFace variant as mediapipe's graph runs it (face_detection_*_range.pbtxt)."""

    file: str
    size: int  # square input, pixels
    strides: tuple[int, ...]  # SSD anchor layers; layers of equal stride share a grid
    interpolated_anchors: bool  # a second anchor per layer (interpolated_scale_aspect_ratio 1.0)


_BLAZEFACE_MODELS = {
    "short": _BlazeFaceModel("face_detection_short_range.tflite", 128, (8, 16, 16, 16), True),
    "full": _BlazeFaceModel("face_detection_full_range_sparse.tflite", 192, (4,), False),
}
_NMS_IOU = 0.3  # min_suppression_threshold of both graphs


def _ssd_anchor_centres(model: _BlazeFaceModel) -> np.ndarray:
    """(A, 2) anchor centres in [0, 1]: every anchor of these graphs is square with size 1 (fixed)."""
    centres = []
    layer = 0
    while layer < len(model.strides):
        stride, repeats = model.strides[layer], 0
        while layer < len(model.strides) and model.strides[layer] == stride:
            repeats += 1 + int(model.interpolated_anchors)
            layer += 1
        grid = int(np.ceil(model.size / stride))
        ys, xs = np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cells, repeats, axis=0))
    return np.concatenate(centres).astype(np.float32)


def _weighted_nms(boxes: np.ndarray, points: np.ndarray, scores: np.ndarray, iou: float) -> list[tuple]:
    """mediapipe's WEIGHTED non-maximum suppression: each kept face is the score-weighted mean of
    the candidates that overlap the best remaining one by more than ``iou``; it keeps that score."""
    order = np.argsort(-scores)
    boxes, points, scores = boxes[order], points[order], scores[order]
    alive = np.ones(len(scores), dtype=bool)
    kept = []
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    for i in range(len(scores)):
        if not alive[i]:
            continue
        x1 = np.maximum(boxes[i, 0], boxes[:, 0])
        y1 = np.maximum(boxes[i, 1], boxes[:, 1])
        x2 = np.minimum(boxes[i, 2], boxes[:, 2])
        y2 = np.minimum(boxes[i, 3], boxes[:, 3])
        inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
        overlap = inter / np.maximum(areas[i] + areas - inter, 1e-12)
        cluster = alive & (overlap > iou)
        cluster[i] = True
        weights = scores[cluster][:, None]
        box = (boxes[cluster] * weights).sum(0) / weights.sum()
        pts = (points[cluster] * weights[:, :, None]).sum(0) / weights.sum()
        kept.append((box, pts, float(scores[i])))
        alive &= ~cluster
    return kept


class _LiteRTBlazeFace:
    """BlazeFace on its ``.tflite`` weights (from the mediapipe wheel) in the LiteRT interpreter.

    Why: the mediapipe graph spends about as long around the network (image packets, protobuf
    detections, Python conversions) as in it; this does the graph's work in numpy: letterbox to the
    square input in [-1, 1], run, decode the SSD anchors, sigmoid scores, weighted NMS, undo the
    letterbox.  Same weights and post-processing, so the same faces (a test compares both).
    """

    def __init__(self, model: str, min_score: float, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        spec = _BLAZEFACE_MODELS[model]
        path = _mediapipe_model_file(spec.file)
        self.spec = spec
        self.min_score = float(min_score)
        self._interpreter = Interpreter(model_path=path, num_threads=max(1, int(threads)))
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        outputs = sorted(self._interpreter.get_output_details(), key=lambda o: int(o["shape"][-1]))
        self._scores, self._regressors = outputs[0]["index"], outputs[1]["index"]
        self._anchors = _ssd_anchor_centres(spec)

    def __call__(self, image: np.ndarray) -> list[Detection]:
        size = self.spec.size
        height, width = image.shape[:2]
        scale = size / max(height, width)
        new_w, new_h = width * scale, height * scale  # the image, centred in the square input
        left, top = (size - new_w) / 2.0, (size - new_h) / 2.0
        # as mediapipe's ImageToTensorCalculator: corners map to corners (pixel (x, y) -> s * (x, y)
        # + offset, not pixel centres as cv2.resize: a 1-2 pixel shift of every box at 640 px),
        # bilinear, zero (black) padding, then [0, 255] -> [-1, 1]
        warp = np.array([[scale, 0.0, left], [0.0, scale, top]], dtype=np.float64)
        square = cv2.warpAffine(
            image, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        tensor = (square.astype(np.float32) * (2.0 / 255.0) - 1.0)[None]
        self._interpreter.set_tensor(self._input, tensor)
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._regressors)[0]
        logits = self._interpreter.get_tensor(self._scores)[0, :, 0]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -100.0, 100.0)))
        keep = scores >= self.min_score
        if not np.any(keep):
            return []
        raw, scores, anchors = raw[keep], scores[keep], self._anchors[keep]
        centres = raw[:, :2] / size + anchors
        half = raw[:, 2:4] / size / 2.0
        boxes = np.concatenate([centres - half, centres + half], axis=1)
        points = raw[:, 4:16].reshape(-1, 6, 2) / size + anchors[:, None, :]
        # tensor [0, 1] -> image pixels (undo the letterbox)
        offset = np.array([left, top], dtype=np.float32) / size
        content = np.array([new_w, new_h], dtype=np.float32) / size
        pixels = np.array([width, height], dtype=np.float32)
        detections = []
        for box, pts, score in _weighted_nms(boxes, points, scores, _NMS_IOU):
            corners = ((box.reshape(2, 2) - offset) / content * pixels).reshape(4)
            keypoints = ((pts - offset) / content * pixels).astype(np.float32)  # as the graph's
            detections.append(Detection(box=corners.astype(np.float32), score=score, keypoints=keypoints))
        return detections

    def close(self) -> None:
        self._interpreter = None


def _mediapipe_model_file(name: str) -> str:
    """Path of a BlazeFace ``.tflite`` inside the installed mediapipe wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("mediapipe")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = os.path.join(root, "modules", "face_detection", name)
        if os.path.isfile(path):
            return path
    raise DetectorError(f"BlazeFace weights {name} not found (they come with the mediapipe wheel)")


#: BlazeFace back-ends: the LiteRT interpreter on the weights, or mediapipe's own graph.
BLAZEFACE_BACKENDS = ("auto", "litert", "mediapipe")


class BlazeFaceDetector:
    """MediaPipe BlazeFace: ``model="short"`` (faces within ~2 m) or ``"full"`` (up to ~5 m).

    The weights are packaged in the mediapipe wheel, so it needs no download.  ``backend``:
    ``"litert"`` runs them in the LiteRT interpreter with the graph's pre- and post-processing
    done here in numpy (faster: see :class:`_LiteRTBlazeFace`), ``"mediapipe"`` runs the
    ``mediapipe.solutions.face_detection`` graph, ``"auto"`` (default) LiteRT when installed.
    Calls are serialised with a lock (neither is re-entrant; the node may detect from several
    callback threads).
    """

    name = "blazeface"

    def __init__(
        self,
        min_score: float = 0.6,
        model: str = "short",
        *,
        min_face_size: float = 20.0,
        max_faces: int = 10,
        backend: str = "auto",
    ) -> None:
        if model not in ("short", "full"):
            raise DetectorError(f"BlazeFace model must be 'short' or 'full', got {model!r}")
        if not 0.0 <= float(min_score) <= 1.0:
            raise DetectorError(f"min_score must be in [0, 1], got {min_score}")
        if backend not in BLAZEFACE_BACKENDS:
            raise DetectorError(
                f"BlazeFace backend must be one of {', '.join(BLAZEFACE_BACKENDS)}, got {backend!r}"
            )
        self.model = model
        self.min_score = float(min_score)
        self.min_face_size = float(min_face_size)
        self.max_faces = int(max_faces)
        self._lock = threading.Lock()
        self._graph = None
        self._litert: _LiteRTBlazeFace | None = None
        if backend in ("auto", "litert"):
            try:
                self._litert = _LiteRTBlazeFace(model, self.min_score)
            except Exception as exc:  # not installed, or built for another numpy: use the graph
                if backend == "litert":
                    raise DetectorError(
                        f"ai-edge-litert is not usable ({exc}); use backend 'mediapipe'"
                    ) from None
        if self._litert is None:
            self._graph = self._mediapipe_graph(model)
        self.backend = "litert" if self._litert is not None else "mediapipe"

    def _mediapipe_graph(self, model: str) -> object:
        os.environ.setdefault("GLOG_minloglevel", "2")  # keep mediapipe's C++ logging quiet
        try:
            from mediapipe.python.solutions import face_detection
        except Exception as exc:  # ImportError, or a broken native extension
            raise DetectorError(
                f"mediapipe is not usable ({type(exc).__name__}: {exc}); "
                "use the OpenCV fallback detector 'haar' instead"
            ) from None
        return face_detection.FaceDetection(
            model_selection=0 if model == "short" else 1, min_detection_confidence=self.min_score
        )

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB frame, largest first."""
        image = _as_rgb(rgb)
        height, width = image.shape[:2]
        with self._lock:
            if self._litert is not None:
                found = self._litert(image)
                return finalize_detections(found, image.shape, self.min_face_size, self.max_faces)
            if self._graph is None:
                raise DetectorError("BlazeFaceDetector is closed")
            result = self._graph.process(image)
        detections: list[Detection] = []
        scale = np.array([width, height], dtype=np.float32)
        for det in result.detections or []:
            rel = det.location_data.relative_bounding_box
            box = np.array(
                [
                    rel.xmin * width,
                    rel.ymin * height,
                    (rel.xmin + rel.width) * width,
                    (rel.ymin + rel.height) * height,
                ],
                dtype=np.float32,
            )
            points = det.location_data.relative_keypoints
            keypoints = (
                np.array([[p.x, p.y] for p in points], dtype=np.float32) * scale if len(points) else None
            )
            detections.append(Detection(box=box, score=float(det.score[0]), keypoints=keypoints))
        return finalize_detections(detections, image.shape, self.min_face_size, self.max_faces)

    def close(self) -> None:
        """Release the interpreter or mediapipe graph (also done at garbage collection)."""
        with self._lock:
            self._litert = None
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
                grey,
                scaleFactor=self.scale_factor,
                minNeighbors=self.min_neighbors,
                minSize=(min_side, min_side),
            )
        detections = []
        for (x, y, w, h), n in zip(
            np.asarray(boxes).reshape(-1, 4), np.asarray(neighbours).reshape(-1), strict=True
        ):
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
