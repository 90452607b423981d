"""ROS messages <-> library types.  The node only adapts: every decision lives in ``pipeline``/``core``.

No ``cv_bridge`` (a ROS 2 one is not installable from PyPI): raw and compressed buffers are decoded by
:mod:`facial_perception.pipeline.images`, which validates every declared size against the real buffer
before touching the pixels and raises :class:`ImageDecodeError` with one line for any malformed frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header

from facial_perception.msg import (
    Face,
    FaceArray,
    NormalizedPoint,
    NormalizedRoi,
    TaskInfo,
    TaskPrediction,
    TrainingStatus,
)
from facial_perception.pipeline.face_images import normalized_points
from facial_perception.pipeline.frame_pipeline import FaceResult, FrameResult, TaskResult
from facial_perception.pipeline.images import (
    DEFAULT_MAX_SIZE,
    ImageDecodeError,
    decode_compressed,
    decode_raw,
    encode_compressed,
)

__all__ = [
    "BUILTIN_FIELDS",
    "ImageDecodeError",
    "compressed_msg_to_rgb",
    "face_array_from_result",
    "image_msg_to_rgb",
    "rgb_to_compressed_msg",
    "rgb_to_image_msg",
    "stamp_to_ns",
    "task_info_msg",
    "training_status_msg",
]

#: Built-in task column -> the convenience fields of ``Face`` that mirror it.
BUILTIN_FIELDS: dict[str, tuple[str, str]] = {
    "age": ("age_group", "age_confidence"),
    "age_group": ("age_group", "age_confidence"),
    "gender": ("gender", "gender_confidence"),
    "emotion": ("emotion", "emotion_confidence"),
}


# ----------------------------------------------------------------------------------------------- images
def image_msg_to_rgb(msg: Image, *, max_size: int = DEFAULT_MAX_SIZE) -> np.ndarray:
    """``sensor_msgs/Image`` -> RGB ``uint8 (H, W, 3)``; raises :class:`ImageDecodeError` for a bad frame."""
    return decode_raw(
        msg.data, msg.width, msg.height, msg.step, msg.encoding, msg.is_bigendian, max_size=max_size
    )


def compressed_msg_to_rgb(msg: CompressedImage, *, max_size: int = DEFAULT_MAX_SIZE) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` -> RGB ``uint8``; raises :class:`ImageDecodeError` for bad data."""
    return decode_compressed(msg.data, msg.format, max_size=max_size)


def rgb_to_image_msg(rgb: np.ndarray, header: Header | None = None) -> Image:
    """RGB ``uint8 (H, W, 3)`` -> ``sensor_msgs/Image`` ``rgb8`` (unpadded rows)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageDecodeError(f"rgb_to_image_msg needs an (H, W, 3) image, got shape {rgb.shape}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = rgb.tobytes()
    return msg


def rgb_to_compressed_msg(
    rgb: np.ndarray, header: Header | None = None, fmt: str = "jpeg"
) -> CompressedImage:
    """RGB ``uint8`` -> ``sensor_msgs/CompressedImage`` (JPEG by default, as image_transport would send)."""
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = fmt
    msg.data = encode_compressed(rgb, fmt)
    return msg


def stamp_to_ns(stamp: Time) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds (for latency: receipt time minus stamp)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# ----------------------------------------------------------------------------------------------- results
def _unit(value: Any) -> float:
    """A finite float in [0, 1] (NaN/None -> 0), so messages never carry garbage confidences."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(max(number, 0.0), 1.0) if math.isfinite(number) else 0.0


def _task_prediction_msg(task: str, prediction: TaskResult) -> TaskPrediction:
    """``pipeline.TaskResult`` (smoothed) -> ``facial_perception/TaskPrediction``."""
    labels = [str(label) for label in prediction.labels]
    probabilities = np.asarray(prediction.probabilities, dtype=np.float64).reshape(-1)
    probabilities = np.nan_to_num(probabilities, nan=0.0, posinf=0.0, neginf=0.0)
    msg = TaskPrediction()
    msg.task = str(task)
    msg.label = str(prediction.label)
    msg.confidence = _unit(prediction.confidence)
    msg.label_names = labels
    msg.probabilities = [float(p) for p in probabilities[: len(labels)]] if labels else []
    return msg


def _area(box: Iterable[float]) -> float:
    x1, y1, x2, y2 = (float(v) for v in list(box)[:4])
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def _roi_msgs(box: Iterable[float], width: int, height: int) -> tuple[RegionOfInterest, NormalizedRoi]:
    """Pixel ``xyxy`` box -> (``RegionOfInterest`` clipped to the image, ``NormalizedRoi`` in [0, 1])."""
    x1, y1, x2, y2 = (float(v) for v in list(box)[:4])
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    roi = RegionOfInterest()
    roi.x_offset, roi.y_offset = math.floor(x1), math.floor(y1)
    roi.width = max(math.ceil(x2) - roi.x_offset, 0)
    roi.height = max(math.ceil(y2) - roi.y_offset, 0)
    roi.do_rectify = False
    norm = NormalizedRoi()
    norm.x_min, norm.x_max = x1 / max(width, 1), x2 / max(width, 1)
    norm.y_min, norm.y_max = y1 / max(height, 1), y2 / max(height, 1)
    return roi, norm


def _face_msg(
    face: FaceResult, width: int, height: int, kinds: Mapping[str, str], identity_enabled: bool
) -> Face:
    """One ``pipeline.FaceResult`` -> ``Face`` (ROI, score, identity, built-in fields, all predictions)."""
    msg = Face()
    msg.track_id = int(face.track_id)
    msg.roi, msg.roi_normalized = _roi_msgs(face.box, width, height)
    msg.detection_score = _unit(face.detection_score)
    msg.keypoints = [NormalizedPoint(x=x, y=y) for x, y in normalized_points(face.keypoints, width, height)]
    if identity_enabled:
        msg.identity = str(face.identity)
        msg.identity_confidence = _unit(face.identity_confidence)
    for task, prediction in face.tasks.items():
        if kinds.get(task, "classification") != "classification":
            continue  # identity columns are reported through the gallery, not as a label of training people
        task_msg = _task_prediction_msg(task, prediction)
        msg.predictions.append(task_msg)
        if task in BUILTIN_FIELDS:
            label_field, confidence_field = BUILTIN_FIELDS[task]
            setattr(msg, label_field, task_msg.label)
            setattr(msg, confidence_field, task_msg.confidence)
    return msg


def face_array_from_result(
    result: FrameResult,
    header: Header,
    width: int,
    height: int,
    *,
    kinds: Mapping[str, str] | None = None,
    identity_enabled: bool = True,
    latency_ms: float = 0.0,
    frame_seq: int = 0,
) -> FaceArray:
    """A ``pipeline.FrameResult`` -> ``FaceArray`` with the image's header.

    ``kinds`` maps task name -> ``TaskSpec.kind``; only classification columns go to ``predictions``.
    """
    faces = sorted(result.faces, key=lambda f: _area(f.box), reverse=True)  # largest first, as documented
    msg = FaceArray()
    msg.header = header
    msg.image_width, msg.image_height = int(width), int(height)
    msg.faces = [_face_msg(face, width, height, kinds or {}, identity_enabled) for face in faces]
    msg.latency_ms = float(latency_ms) if math.isfinite(float(latency_ms)) else 0.0
    msg.frame_seq = int(frame_seq) & 0xFFFFFFFF
    return msg


# ----------------------------------------------------------------------------------------------- services
def task_info_msg(spec: Any, training: Mapping[str, Any] | None = None) -> TaskInfo:
    """``core.progressive.TaskSpec`` (+ the checkpoint's per-column training metadata) -> ``TaskInfo``."""
    training = training or {}
    msg = TaskInfo()
    msg.name = str(spec.name)
    msg.kind = str(getattr(spec, "kind", "classification"))
    msg.labels = [] if msg.kind == "identity" else [str(label) for label in spec.labels]
    msg.laterals = [str(source) for source in getattr(spec, "laterals", [])]
    accuracy = training.get("val_accuracy")
    msg.val_accuracy = float(accuracy) if isinstance(accuracy, (int, float)) else math.nan
    msg.trained_at = str(training.get("trained_at", "") or "")
    return msg


def training_status_msg(status: Mapping[str, Any]) -> TrainingStatus:
    """A plain status dict (see ``column_training.TrainingState``) -> ``TrainingStatus``."""
    msg = TrainingStatus()
    msg.task = str(status.get("task", ""))
    msg.state = str(status.get("state", TrainingStatus.IDLE))
    msg.epoch = int(status.get("epoch", 0))
    msg.epochs = int(status.get("epochs", 0))
    msg.progress = float(status.get("progress", 0.0))
    msg.train_loss = float(status.get("train_loss", math.nan))
    msg.val_accuracy = float(status.get("val_accuracy", math.nan))
    msg.message = str(status.get("message", ""))
    return msg
