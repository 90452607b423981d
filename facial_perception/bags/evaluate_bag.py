"""Evaluate a bag: offline through the node's FramePipeline, or live through DDS against the node.

Both modes feed one :class:`BagEvaluator`, so their reports have the same structure:

- per-task accuracy of the faces matched to ground truth (IoU >= ``iou_threshold``, Hungarian
  matching on IoU), the confusion matrices, and per-subgroup accuracy with the largest gap;
- detection recall and precision against the ground-truth boxes;
- track-id stability: id switches per ground-truth track (a pasted face kept for several frames);
- latency distribution, throughput and dropped frames;
- for unlabelled bags (recorded on a robot): throughput, latency and prediction statistics only.

Offline mode reads frames straight from the bag as fast as possible.  Live mode publishes the
bag's raw CDR bytes (never re-encoded) with the original relative timing, or at ``rate`` times it,
together with ``/clock``, and matches the node's ``FaceArray`` results to frames by header stamp.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facial_perception.bags.bag_io import (
    ATTRIBUTE_TRACK,
    CLOCK_TYPE,
    FACE_ARRAY_TYPE,
    FACES_TOPIC,
    BagError,
    BagImage,
    BagReader,
    BagWriter,
    GroundTruthFrame,
    decode_bag_image,
    get_typestore,
    make_header,
    stamp_to_ns,
)
from facial_perception.bags.prepare_worker import FirstStageJob, FirstStageProcess, FrameRef
from facial_perception.core.checkpoint import DEFAULT_MODEL
from facial_perception.pipeline.face_images import normalized_points

__all__ = [
    "BagEvaluation",
    "BagEvaluator",
    "PipelineSettings",
    "PredictedFace",
    "activate_lifecycle_node",
    "benchmark_offline",
    "build_pipeline",
    "evaluate_live",
    "evaluate_offline",
    "face_array_msg",
    "faces_from_face_array",
    "faces_from_frame_result",
    "iou_matrix",
    "load_predictor",
    "match_faces",
]

#: Tasks whose names differ between datasets and model columns.
_TASK_ALIASES = {"age": ("age", "age_group", "age8"), "age_group": ("age_group", "age", "age8")}
#: Face message fields that mirror the built-in columns (same as ros.conversions.BUILTIN_FIELDS).
_BUILTIN_FIELDS = {
    "age": ("age_group", "age_confidence"),
    "age_group": ("age_group", "age_confidence"),
    "gender": ("gender", "gender_confidence"),
    "emotion": ("emotion", "emotion_confidence"),
}
#: Attributes with more distinct values than this are not subgroup attributes (ages in years, names).
MAX_GROUPS = 20


# --------------------------------------------------------------------------------------------------
# Predictions in one form for both modes
# --------------------------------------------------------------------------------------------------


@dataclass
class PredictedFace:
    """One face the pipeline/node reported: track id, ``xyxy`` box, score and label per task."""

    track_id: int
    box: tuple[float, float, float, float]
    score: float
    labels: dict[str, str] = field(default_factory=dict)
    confidences: dict[str, float] = field(default_factory=dict)


def faces_from_frame_result(result: Any) -> list[PredictedFace]:
    """``pipeline.FrameResult`` -> faces.  Identity: the gallery's name, else the identity column."""
    faces = []
    for face in result.faces:
        labels = {name: task.label for name, task in face.tasks.items()}
        confidences = {name: float(task.confidence) for name, task in face.tasks.items()}
        if face.identity:
            labels["identity"], confidences["identity"] = face.identity, float(face.identity_confidence)
        box = tuple(float(v) for v in np.asarray(face.box).reshape(-1)[:4])
        faces.append(PredictedFace(int(face.track_id), box, float(face.detection_score), labels, confidences))  # type: ignore[arg-type]
    return faces


def faces_from_face_array(msg: Any) -> list[PredictedFace]:
    """A deserialized ``facial_perception/FaceArray`` (rosbags object) -> faces."""
    faces = []
    for face in msg.faces:
        roi = face.roi
        box = (
            float(roi.x_offset),
            float(roi.y_offset),
            float(roi.x_offset + roi.width),
            float(roi.y_offset + roi.height),
        )
        labels = {p.task: p.label for p in face.predictions if p.label}
        confidences = {p.task: float(p.confidence) for p in face.predictions if p.label}
        for task, (label_field, conf_field) in _BUILTIN_FIELDS.items():
            value = getattr(face, label_field, "")
            if value and task not in labels and task != "age_group":
                labels[task], confidences[task] = value, float(getattr(face, conf_field, 0.0))
        if face.identity:
            labels["identity"], confidences["identity"] = face.identity, float(face.identity_confidence)
        faces.append(PredictedFace(int(face.track_id), box, float(face.detection_score), labels, confidences))
    return faces


def face_array_msg(result: Any, stamp_ns: int, frame_id: str, latency_ms: float, seq: int) -> Any:
    """A rosbags ``FaceArray`` for a ``FrameResult`` (offline ``--output-bag``), as the node builds it."""
    store = get_typestore()
    types = store.types
    faces = []
    for face in result.faces:
        x0, y0, x1, y1 = (float(v) for v in np.asarray(face.box).reshape(-1)[:4])
        w, h = max(result.width, 1), max(result.height, 1)
        x0, x1 = sorted((min(max(x0, 0.0), w), min(max(x1, 0.0), w)))
        y0, y1 = sorted((min(max(y0, 0.0), h), min(max(y1, 0.0), h)))
        roi = types["sensor_msgs/msg/RegionOfInterest"](
            x_offset=math.floor(x0),
            y_offset=math.floor(y0),
            width=max(math.ceil(x1) - math.floor(x0), 0),
            height=max(math.ceil(y1) - math.floor(y0), 0),
            do_rectify=False,
        )
        norm = types["facial_perception/msg/NormalizedRoi"](
            x_min=x0 / w, y_min=y0 / h, x_max=x1 / w, y_max=y1 / h
        )
        fields: dict[str, Any] = {
            "age_group": "",
            "age_confidence": 0.0,
            "gender": "",
            "gender_confidence": 0.0,
            "emotion": "",
            "emotion_confidence": 0.0,
        }
        predictions = []
        for name, task in face.tasks.items():
            if name == "identity":
                continue
            probs = np.asarray(task.probabilities, dtype=np.float32).reshape(-1)
            predictions.append(
                types["facial_perception/msg/TaskPrediction"](
                    task=name,
                    label=task.label,
                    confidence=float(task.confidence),
                    label_names=list(task.labels),
                    probabilities=probs,
                )
            )
            if name in _BUILTIN_FIELDS:
                label_field, conf_field = _BUILTIN_FIELDS[name]
                fields[label_field], fields[conf_field] = task.label, float(task.confidence)
        faces.append(
            types["facial_perception/msg/Face"](
                track_id=int(face.track_id),
                roi=roi,
                roi_normalized=norm,
                detection_score=float(face.detection_score),
                keypoints=[
                    types["facial_perception/msg/NormalizedPoint"](x=x, y=y)
                    for x, y in normalized_points(face.keypoints, w, h)
                ],
                identity=face.identity,
                identity_confidence=float(face.identity_confidence),
                predictions=predictions,
                **fields,
            )
        )
    return types[FACE_ARRAY_TYPE](
        header=make_header(stamp_ns, frame_id),
        image_width=int(result.width),
        image_height=int(result.height),
        faces=faces,
        latency_ms=float(latency_ms),
        frame_seq=seq & 0xFFFFFFFF,
    )


# --------------------------------------------------------------------------------------------------
# Matching and metrics
# --------------------------------------------------------------------------------------------------


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """Pairwise IoU of ``xyxy`` boxes, shape ``(len(a), len(b))``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    aa, bb = np.asarray(a, dtype=np.float64)[:, None, :], np.asarray(b, dtype=np.float64)[None, :, :]
    iw = np.clip(np.minimum(aa[..., 2], bb[..., 2]) - np.maximum(aa[..., 0], bb[..., 0]), 0, None)
    ih = np.clip(np.minimum(aa[..., 3], bb[..., 3]) - np.maximum(aa[..., 1], bb[..., 1]), 0, None)
    inter = iw * ih
    area_a = (aa[..., 2] - aa[..., 0]) * (aa[..., 3] - aa[..., 1])
    area_b = (bb[..., 2] - bb[..., 0]) * (bb[..., 3] - bb[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def match_faces(
    gt_boxes: Sequence[Sequence[float]], pred_boxes: Sequence[Sequence[float]], threshold: float
) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(gt index, prediction index, IoU)`` maximising total IoU, IoU >= threshold."""
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(gt_boxes, pred_boxes)
    if iou.size == 0:
        return []
    rows, cols = linear_sum_assignment(-iou)
    return [
        (int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= threshold
    ]


def _resolve_task(task: str, labels: Mapping[str, str]) -> str | None:
    for name in _TASK_ALIASES.get(task, (task,)):
        if name in labels:
            return labels[name]
    return None


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


@dataclass
class BagEvaluation:
    """Everything a report needs: the JSON-able ``summary`` and the arrays behind the plots."""

    summary: dict[str, Any]
    confusions: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)
    subgroups: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> attribute -> SubgroupTable
    latencies_ms: list[float] = field(default_factory=list)
    matches: list[dict[str, Any]] = field(default_factory=list)  # one row per ground-truth face


class BagEvaluator:
    """Accumulates frames (ground truth, predictions, latency) and computes every metric at the end."""

    def __init__(
        self,
        iou_threshold: float = 0.5,
        label_names: Mapping[str, Sequence[str]] | None = None,
        min_group: int = 5,
    ) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise BagError(f"IoU threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.label_names = {k: list(v) for k, v in (label_names or {}).items()}
        self.min_group = min_group
        self.frames = 0
        self.labelled_frames = 0
        self.dropped = 0
        self.latencies: list[float] = []
        self.node_latencies: list[float] = []
        self.stage_ms: dict[str, list[float]] = defaultdict(list)
        self.gt_faces = self.true_positives = self.predicted_faces = 0
        self.faces_per_frame: Counter[int] = Counter()
        self.label_histograms: dict[str, Counter[str]] = defaultdict(Counter)
        self.pred_tracks: dict[int, int] = Counter()
        self.gt_track_ids: dict[str, list[int]] = defaultdict(list)
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        stamp_ns: int,
        gt: GroundTruthFrame | None,
        faces: list[PredictedFace] | None,
        latency_ms: float | None = None,
        stages: Mapping[str, float] | None = None,
        node_latency_ms: float | None = None,
    ) -> None:
        """One frame; ``faces=None`` means no result arrived (a dropped frame)."""
        self.frames += 1
        if faces is None:
            self.dropped += 1
            faces_seen: list[PredictedFace] = []
        else:
            faces_seen = faces
            if latency_ms is not None:
                self.latencies.append(float(latency_ms))
            if node_latency_ms is not None:
                self.node_latencies.append(float(node_latency_ms))
            for key, value in (stages or {}).items():
                self.stage_ms[key].append(float(value))
            self.faces_per_frame[len(faces)] += 1
            self.predicted_faces += len(faces)
            for face in faces:
                self.pred_tracks[face.track_id] += 1
                for task, label in face.labels.items():
                    self.label_histograms[task][label] += 1
        if gt is None:
            return
        self.labelled_frames += 1
        if faces is None:
            return  # reported as dropped; detection and accuracy are measured on processed frames
        self.gt_faces += len(gt.faces)
        matches = match_faces([f.box for f in gt.faces], [f.box for f in faces_seen], self.iou_threshold)
        by_gt = {g: (p, iou) for g, p, iou in matches}
        self.true_positives += len(matches)
        for g, gt_face in enumerate(gt.faces):
            pred = faces_seen[by_gt[g][0]] if g in by_gt else None
            row: dict[str, Any] = {
                "stamp_ns": stamp_ns,
                "gt_track": gt_face.track,
                "pred_track": pred.track_id if pred else None,
                "iou": round(by_gt[g][1], 4) if g in by_gt else None,
                "dropped": faces is None,
                "labels": {},
                "attributes": {k: v for k, v in gt_face.attributes.items() if k != ATTRIBUTE_TRACK},
            }
            for task, truth in gt_face.labels.items():
                predicted = _resolve_task(task, pred.labels) if pred else None
                row["labels"][task] = {"true": truth, "pred": predicted}
            self.rows.append(row)
            if gt_face.track is not None and pred is not None:
                self.gt_track_ids[gt_face.track].append(pred.track_id)
            elif gt_face.track is not None:
                self.gt_track_ids.setdefault(gt_face.track, [])

    # ---- results ---------------------------------------------------------------------------------
    def result(self, info: Mapping[str, Any], elapsed_s: float) -> BagEvaluation:
        """Compute every metric; ``info`` (bag, mode, ...) is copied into the summary."""
        from facial_perception.core.evaluation import confusion_matrix, subgroup_table

        processed = self.frames - self.dropped
        summary: dict[str, Any] = dict(info)
        summary["frames"] = {
            "total": self.frames,
            "processed": processed,
            "dropped": self.dropped,
            "dropped_fraction": self.dropped / self.frames if self.frames else 0.0,
            "labelled": self.labelled_frames,
        }
        summary["throughput_fps"] = processed / elapsed_s if elapsed_s > 0 else None
        summary["elapsed_s"] = elapsed_s
        summary["latency_ms"] = _percentiles(self.latencies)
        if self.node_latencies:
            summary["node_reported_latency_ms"] = _percentiles(self.node_latencies)
        summary["stage_ms_mean"] = {k: float(np.mean(v)) for k, v in self.stage_ms.items() if v}
        summary["predictions"] = {
            "faces": self.predicted_faces,
            "faces_per_frame": {str(k): v for k, v in sorted(self.faces_per_frame.items())},
            "tracks": len(self.pred_tracks),
            "mean_track_length": float(np.mean(list(self.pred_tracks.values()))) if self.pred_tracks else 0.0,
            "label_histograms": {t: dict(c.most_common()) for t, c in sorted(self.label_histograms.items())},
        }
        evaluation = BagEvaluation(summary=summary, latencies_ms=list(self.latencies), matches=self.rows)
        summary["labelled"] = self.labelled_frames > 0
        if not self.labelled_frames:
            return evaluation
        summary["detection"] = {
            "gt_faces": self.gt_faces,
            "matched": self.true_positives,
            "recall": self.true_positives / self.gt_faces if self.gt_faces else None,
            "precision": self.true_positives / self.predicted_faces if self.predicted_faces else None,
            "iou_threshold": self.iou_threshold,
            "mean_iou": float(np.mean([r["iou"] for r in self.rows if r["iou"] is not None]))
            if self.true_positives
            else None,
        }
        summary["tracking"] = self._track_stability()
        summary["tasks"], warnings = {}, []
        tasks = sorted({t for r in self.rows for t in r["labels"]})
        for task in tasks:
            rows = [r for r in self.rows if task in r["labels"]]
            scored = [r for r in rows if r["labels"][task]["pred"] is not None]
            vocab = list(self.label_names.get(task, []))
            for r in rows:
                for key in ("true", "pred"):
                    value = r["labels"][task][key]
                    if value is not None and value not in vocab:
                        vocab.append(value)
            index = {label: i for i, label in enumerate(vocab)}
            y_true = np.array([index[r["labels"][task]["true"]] for r in scored], dtype=np.int64)
            y_pred = np.array([index[r["labels"][task]["pred"]] for r in scored], dtype=np.int64)
            correct = int((y_true == y_pred).sum())
            entry: dict[str, Any] = {
                "gt_faces": len(rows),
                "evaluated": len(scored),
                "correct": correct,
                "accuracy": correct / len(scored) if scored else None,
                "accuracy_end_to_end": correct / len(rows) if rows else None,
                "labels": vocab,
            }
            if not scored and any(r["pred_track"] is not None for r in rows):
                warnings.append(
                    f"the model reported no '{task}' prediction for any matched face (no such column?)"
                )
            known = set(self.label_names.get(task, [])) or {r["labels"][task]["true"] for r in rows}
            unknown = sorted({r["labels"][task]["pred"] for r in scored} - known)
            if scored and len(unknown) == len({r["labels"][task]["pred"] for r in scored}):
                warnings.append(
                    f"no '{task}' label of the model occurs in the ground truth "
                    f"(model labels {unknown[:5]}): different label vocabularies?"
                )
            if scored:
                evaluation.confusions[task] = (confusion_matrix(y_true, y_pred, len(vocab)), vocab)
                entry["subgroups"] = {}
                groups = self._group_columns(scored, task)
                for attribute, values in groups.items():
                    table = subgroup_table(
                        y_true, y_pred, {attribute: values}, attribute, min_count=self.min_group
                    )
                    if len(table.rows) < 2:
                        continue
                    evaluation.subgroups.setdefault(task, {})[attribute] = table
                    entry["subgroups"][attribute] = table.to_dict()
                gaps = [
                    (a, t.largest_gap)
                    for a, t in evaluation.subgroups.get(task, {}).items()
                    if not math.isnan(t.largest_gap)
                ]
                if gaps:
                    attribute, gap = max(gaps, key=lambda x: x[1])
                    table = evaluation.subgroups[task][attribute]
                    entry["largest_gap"] = {
                        "attribute": attribute,
                        "gap": gap,
                        "gap_ci95": list(table.gap_ci) if table.gap_ci is not None else None,
                        "best": list(table.best_group or ()),
                        "worst": list(table.worst_group or ()),
                    }
            summary["tasks"][task] = entry
        summary["warnings"] = warnings
        return evaluation

    def _group_columns(self, rows: Sequence[dict[str, Any]], task: str) -> dict[str, list[str | None]]:
        """Attributes usable as subgroups: 2..MAX_GROUPS distinct values among the evaluated faces.

        An attribute that only repeats the task's own label (``person`` for identity) is skipped:
        its "groups" would be the classes, already shown by the confusion matrix.
        """
        names = sorted({a for r in rows for a in r["attributes"]})
        truth = [r["labels"][task]["true"] for r in rows]
        columns = {}
        for name in names:
            values = [r["attributes"].get(name) for r in rows]
            distinct = {v for v in values if v}
            if 2 <= len(distinct) <= MAX_GROUPS and values != truth:
                columns[name] = values
        return columns

    def _track_stability(self) -> dict[str, Any]:
        switches, covered, fragments = [], [], 0
        for ids in self.gt_track_ids.values():
            switches.append(sum(1 for a, b in itertools.pairwise(ids) if a != b))
            covered.append(len(ids))
            fragments += len(set(ids))
        n = len(switches)
        return {
            "gt_tracks": n,
            "id_switches": int(sum(switches)),
            "id_switches_per_track": float(np.mean(switches)) if n else None,
            "tracks_without_switch": sum(1 for s in switches if s == 0) / n if n else None,
            "predicted_ids_per_gt_track": fragments / n if n else None,
            "tracks_never_detected": sum(1 for c in covered if c == 0),
        }


# --------------------------------------------------------------------------------------------------
# Offline
# --------------------------------------------------------------------------------------------------


@dataclass
class PipelineSettings:
    """The node's defaults (config/perception.yaml), so offline numbers match the live node."""

    checkpoint: str | None = None  # None/"" = the shipped default model
    detector: str = "blazeface_full"
    detection_threshold: float = 0.6
    max_faces: int = 10
    min_face_size: int = 24
    tracker_iou: float = 0.3
    track_max_missed: int = 4
    smoothing: float = 0.6
    # >= 0: one framing for every column (the node's crop_margin / crop_offset_y); < 0: per detector
    crop_margin: float = -1.0
    crop_offset_y: float = 0.0
    device: str = "cpu"
    gallery: str | None = None  # an identity gallery (SQLite) for identity labels
    # detect (and decode, track, crop) frame t+1 in a second thread while the model runs on frame t
    overlap: bool = True
    # with overlap: the model's encoder in a third thread, its columns in the caller's (the node's parameter)
    encoder_stage: bool = True
    # with overlap: the first stage (read, decode, detect, track, crop) in a worker process rather than
    # a thread (offline only; its Python then does not share the model threads' GIL)
    first_stage_process: bool = True
    cpu_threads: int = 1  # torch threads while evaluating on CPU (0 = torch's default); the node's default
    mirror_average: bool = True  # the columns' mirror averaging (the node's parameter of the same name)
    detect_every: int = 1  # run the detector on every n-th frame, track in between (the node's parameter)
    identity_every: int = 3  # identity columns on a track's 1st frame, then every n-th (the node's parameter)
    fuse_columns: bool = True  # the columns as one stack of wide layers (FusedColumns; the node's parameter)
    standalone_members: bool = True  # columns averaged with their standalone members (the node's parameter)
    standalone_every: int = 3  # those members on a track's 1st frame, then every n-th (the node's parameter)
    attributes_every: int = 1  # the face columns on a 1st frame, then every n-th (the node's parameter)


#: The trained default model shipped inside the package (the node uses the same file).


def load_predictor(settings: PipelineSettings | None = None) -> tuple[Any, str]:
    """``(FacePredictor, where it came from)``, chosen like the node chooses its model.

    ``settings.checkpoint`` if set, else the shipped ``models/default.safetensors``, else an
    untrained ``lite`` model with the default task columns (the report then warns that labels are
    meaningless: detection, tracking and speed are still measured).
    """
    settings = settings or PipelineSettings()
    try:
        from facial_perception.core.inference import FacePredictor

        path = Path(settings.checkpoint).expanduser() if settings.checkpoint else None
        if path is None and DEFAULT_MODEL.is_file():
            path = DEFAULT_MODEL
        if path is not None:
            if not path.is_file():
                raise BagError(f"checkpoint not found: {path}")
            predictor = FacePredictor.from_checkpoint(
                path,
                device=settings.device,
                mirror_average=settings.mirror_average,
                fuse_columns=settings.fuse_columns,
                standalone_members=settings.standalone_members,
            )
            return predictor, str(path)
        from facial_perception.core.config import get_config
        from facial_perception.core.progressive import ProgressiveNet, default_task_specs

        model = ProgressiveNet(get_config("lite"), default_task_specs()).eval()
        return FacePredictor(model, device=settings.device, fuse_columns=settings.fuse_columns), UNTRAINED
    except BagError:
        raise
    except Exception as exc:  # CheckpointError, device errors...: one line for the user
        raise BagError(f"cannot load the model: {exc}") from None


#: Model source of an untrained model (no checkpoint and no shipped default).
UNTRAINED = "untrained lite model (no checkpoint, no shipped default): labels are meaningless"


def build_pipeline(settings: PipelineSettings | None = None, predictor: Any = None) -> Any:
    """A ``FramePipeline`` configured like the node (same detector, tracker, smoothing parameters)."""
    settings = settings or PipelineSettings()
    if predictor is None:
        predictor, _ = load_predictor(settings)
    if not 0.0 <= settings.smoothing < 1.0:
        raise BagError(f"smoothing must be in [0, 1), got {settings.smoothing}")
    if settings.detect_every < 1:
        raise BagError(f"detect_every must be >= 1, got {settings.detect_every}")
    if settings.identity_every < 1:
        raise BagError(f"identity_every must be >= 1, got {settings.identity_every}")
    if settings.standalone_every < 1:
        raise BagError(f"standalone_every must be >= 1, got {settings.standalone_every}")
    if settings.attributes_every < 1:
        raise BagError(f"attributes_every must be >= 1, got {settings.attributes_every}")
    detector = _detector_of(settings)
    gallery = None
    if not settings.gallery:
        return _pipeline_with(settings, predictor, detector, None)
    from facial_perception.pipeline.gallery import GalleryError, IdentityGallery

    try:
        gallery = IdentityGallery(settings.gallery)
        return _pipeline_with(settings, predictor, detector, gallery)
    except GalleryError as exc:  # not a gallery, or one enrolled with another model
        if gallery is not None:
            gallery.close()
        raise BagError(f"gallery: {exc}") from None


def _pipeline_with(settings: PipelineSettings, predictor: Any, detector: Any, gallery: Any) -> Any:
    from facial_perception.pipeline.frame_pipeline import FramePipeline
    from facial_perception.pipeline.smoothing import PredictionSmoother
    from facial_perception.pipeline.tracking import FaceTracker

    return FramePipeline(
        predictor,
        detector,
        tracker=FaceTracker(iou_threshold=settings.tracker_iou, max_missed=settings.track_max_missed),
        smoother=PredictionSmoother(alpha=1.0 - settings.smoothing),  # the node's mapping
        gallery=gallery,
        max_faces=settings.max_faces,
        detect_every=settings.detect_every,
        identity_every=settings.identity_every,
        standalone_every=settings.standalone_every,
        attributes_every=settings.attributes_every,
        framings=_framing_of(settings),
    )


def _framing_of(settings: PipelineSettings) -> Any:
    """The node's rule: ``crop_margin`` >= 0 crops every column alike; else the detector's framings."""
    from facial_perception.pipeline.framing import Framing, FramingError

    if settings.crop_margin < 0:
        return None
    try:
        return Framing(settings.crop_margin, settings.crop_offset_y)
    except FramingError as exc:
        raise BagError(str(exc)) from None


def _detector_of(settings: PipelineSettings) -> Any:
    from facial_perception.pipeline.detection import DetectorError, make_detector

    try:
        return make_detector(
            settings.detector,
            min_score=settings.detection_threshold,
            min_face_size=settings.min_face_size,
            max_faces=settings.max_faces,
        )
    except DetectorError as exc:
        raise BagError(str(exc)) from None


def build_first_stage(settings: PipelineSettings, input_size: int) -> Any:
    """The first stage of :func:`build_pipeline`'s pipeline alone (detector, tracker; no model), for
    :meth:`FramePipeline.prepare` in a worker process (:mod:`facial_perception.bags.prepare_worker`)."""
    from facial_perception.pipeline.frame_pipeline import FramePipeline
    from facial_perception.pipeline.tracking import FaceTracker

    return FramePipeline(
        None,
        _detector_of(settings),
        tracker=FaceTracker(iou_threshold=settings.tracker_iou, max_missed=settings.track_max_missed),
        input_size=input_size,
        max_faces=settings.max_faces,
        detect_every=settings.detect_every,
        identity_every=settings.identity_every,
        standalone_every=settings.standalone_every,
        attributes_every=settings.attributes_every,
        framings=_framing_of(settings),
    )


def _bag_label_names(reader: BagReader) -> dict[str, list[str]]:
    import json

    raw = reader.custom_data.get("facial_perception.make_bag")
    if not raw:
        return {}
    try:
        return {k: list(v) for k, v in json.loads(raw).get("label_names", {}).items()}
    except (ValueError, AttributeError):
        return {}


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch intra-op threads = ``count`` inside the block (0: unchanged), restored afterwards."""
    if count <= 0:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_offline(
    bag: str | os.PathLike[str],
    pipeline: Any = None,
    *,
    settings: PipelineSettings | None = None,
    topic: str | None = None,
    storage: str | None = None,
    iou_threshold: float = 0.5,
    max_frames: int | None = None,
    output_bag: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_frame: Callable[[int, Any], None] | None = None,
    predictor: Any = None,
) -> BagEvaluation:
    """Run ``pipeline`` (default: :func:`build_pipeline`) on every frame of the bag, as fast as possible.

    ``predictor``: without ``pipeline``, the model to build it around (default: loaded as
    ``settings`` say).

    With ``settings.overlap`` (default) the first stage (decode, detect, track, crop) of the next
    frame runs in a second thread while the model runs on this one, and torch uses
    ``settings.cpu_threads`` threads on CPU, like the node (``overlap_stages``, ``cpu_threads``).
    With ``settings.first_stage_process`` too (default) and no caller-supplied ``pipeline``, that
    first stage runs in a worker process instead (:mod:`facial_perception.bags.prepare_worker`);
    the clock starts once the worker is ready, as it starts after the model has been loaded.

    ``output_bag`` (optional) receives the results as ``FaceArray`` on ``/facial_perception/faces``,
    stamped like the images, written atomically.  ``on_frame(index, FrameResult)`` is for callers
    that want the raw results (benchmarks).
    """
    from tqdm import tqdm

    from facial_perception.pipeline.frame_pipeline import overlapped

    with BagReader(bag, storage) as reader:
        image_topic = reader.image_topic(topic)
        ground_truth = reader.read_ground_truth()
        evaluator = BagEvaluator(iou_threshold, _bag_label_names(reader))
        total = reader.message_count(image_topic)
        if max_frames is not None:
            total = min(total, max_frames)
        model_source = "caller-supplied pipeline"
        settings = settings or PipelineSettings()
        overlap = settings.overlap
        in_process = overlap and settings.first_stage_process and pipeline is None
        if pipeline is None:
            if predictor is None:
                predictor, model_source = load_predictor(settings)
            else:
                model_source = "caller-supplied predictor"
            pipeline = build_pipeline(settings, predictor)
        pipeline.reset()
        writer = (
            BagWriter(output_bag, "mcap" if str(output_bag).endswith(".mcap") else reader.storage)
            if output_bag
            else None
        )
        info = {
            "mode": "offline",
            "bag": str(bag),
            "storage": reader.storage,
            "image_topic": image_topic,
            "image_type": reader.topics[image_topic],
            "bag_duration_s": reader.duration_s,
            "model": model_source,
        }
        bar = tqdm(total=total, desc="evaluate (offline)", unit="frame", disable=not progress)
        threads = settings.cpu_threads if settings.device == "cpu" else 0
        worker: FirstStageProcess | None = None
        try:
            if writer:
                writer.__enter__()
                writer.add_topic(FACES_TOPIC, FACE_ARRAY_TYPE)
            first: Iterator[tuple[FrameRef, Any]]
            if in_process:
                info["first_stage"] = "worker process"
                size = pipeline.input_size
                worker = FirstStageProcess(
                    FirstStageJob(str(bag), reader.storage, image_topic, max_frames, settings, size)
                )
                first = iter(worker)
            else:
                images = itertools.islice(reader.images(image_topic), max_frames)

                def prepare(image: BagImage) -> tuple[FrameRef, Any]:  # decode, detect, track, crop
                    t0 = time.perf_counter()
                    rgb = decode_bag_image(image)
                    decode_ms = (time.perf_counter() - t0) * 1000.0
                    frame_id = getattr(image.message.header, "frame_id", "")
                    prepared = pipeline.prepare(rgb, stamp=image.stamp_ns / 1e9, decode_ms=decode_ms)
                    return FrameRef(image.log_time_ns, image.stamp_ns, frame_id), prepared

                if overlap:
                    info["first_stage"] = "thread"
                    first = (pair for _image, pair in overlapped(images, prepare))
                else:
                    first = (prepare(image) for image in images)
            if overlap and settings.encoder_stage:  # the encoder of frame t+1 beside the columns of t
                stages: Iterator[tuple[FrameRef, Any]] = (
                    (ref, encoded)
                    for (ref, _), encoded in overlapped(first, lambda pair: pipeline.encode(pair[1]))
                )
            else:
                stages = first
            start = time.perf_counter()
            with _torch_threads(threads), contextlib.closing(stages):
                for index, (image, prepared) in enumerate(stages):
                    result = pipeline.complete(prepared)  # second stage: model, smoothing, identity
                    latency = result.timings.get("total", 0.0)
                    evaluator.add(
                        image.stamp_ns,
                        ground_truth.get(image.stamp_ns),
                        faces_from_frame_result(result),
                        latency,
                        result.timings,
                    )
                    if writer:
                        writer.write(
                            FACES_TOPIC,
                            image.log_time_ns + int(latency * 1e6),
                            face_array_msg(result, image.stamp_ns, image.frame_id, latency, index + 1),
                        )
                    if on_frame:
                        on_frame(index, result)
                    bar.update(1)
            elapsed = time.perf_counter() - start
        except BaseException as exc:
            if writer:
                writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            bar.close()
            if worker is not None:
                worker.close()
        if writer:
            writer.__exit__(None, None, None)
            info["output_bag"] = str(output_bag)
        if ground_truth and evaluator.labelled_frames == 0:
            raise BagError(f"{bag}: no ground-truth stamp matches an image stamp on {image_topic}")
    return evaluator.result(info, elapsed)


# --------------------------------------------------------------------------------------------------
# Live
# --------------------------------------------------------------------------------------------------


def _ros_class(msgtype: str) -> Any:
    package, _, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{package}.msg"), name)
    except (ImportError, AttributeError):
        hint = " (build the package: bash scripts/setup.sh)" if package == "facial_perception" else ""
        raise BagError(f"ROS message type {msgtype} is not importable{hint}") from None


@dataclass
class _Received:
    raw: bytes
    monotonic: float


def evaluate_live(
    bag: str | os.PathLike[str],
    *,
    rate: float = 1.0,
    topic: str | None = None,
    publish_topic: str | None = None,
    faces_topic: str = FACES_TOPIC,
    storage: str | None = None,
    clock: bool = True,
    wait_for_node: float = 30.0,
    drain: float = 5.0,
    iou_threshold: float = 0.5,
    max_frames: int | None = None,
    output_bag: str | os.PathLike[str] | None = None,
    progress: bool = True,
    activate: str | None = None,
    clock_hz: float = 100.0,
) -> BagEvaluation:
    """Replay the bag through DDS to a running perception node and evaluate its ``FaceArray`` output.

    Images are published as the bag's raw CDR bytes on ``publish_topic`` (default: the bag topic)
    with the original spacing divided by ``rate``; ``/clock`` (``rosgraph_msgs/Clock``) carries the
    bag time of each frame, so a node started with ``use_sim_time:=true`` stamps and times like on
    the robot.  Results are matched to frames by header stamp; a frame without a result within
    ``drain`` seconds after the last one counts as dropped.  Latency is measured here, from the
    publication of a frame to the reception of its result (same host clock).

    ``activate`` names a lifecycle node (e.g. ``/facial_perception``) to configure and activate
    first when it is not active yet (there is no ``ros2 lifecycle set`` without ros2cli).
    """
    from tqdm import tqdm

    if not (rate > 0 and math.isfinite(rate)):
        raise BagError(f"rate must be a positive factor, got {rate}")
    if not 1.0 <= clock_hz <= 1000.0:
        raise BagError(f"clock rate must be within 1..1000 Hz, got {clock_hz}")
    try:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
    except ImportError as exc:
        raise BagError(f"live mode needs rclpy ({exc}); source the ROS environment") from None

    store = get_typestore()
    with BagReader(bag, storage) as reader:
        image_topic = reader.image_topic(topic)
        msgtype = reader.topics[image_topic]
        ground_truth = reader.read_ground_truth()
        label_names = _bag_label_names(reader)
        frames: list[BagImage] = []
        for image in reader.images(image_topic):
            if max_frames is not None and len(frames) >= max_frames:
                break
            frames.append(BagImage(image.log_time_ns, image.stamp_ns, image.msgtype, image.raw, None))
        info = {
            "mode": "live",
            "bag": str(bag),
            "storage": reader.storage,
            "image_topic": image_topic,
            "image_type": msgtype,
            "bag_duration_s": reader.duration_s,
            "rate": rate,
        }
    if not frames:
        raise BagError(f"{bag}: no frames on {image_topic}")
    image_cls, face_cls = _ros_class(msgtype), _ros_class(FACE_ARRAY_TYPE)
    clock_cls = _ros_class(CLOCK_TYPE) if clock else None
    out_topic = publish_topic or image_topic

    context = rclpy.Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    received: dict[int, _Received] = {}
    published: dict[int, float] = {}
    lock = threading.Lock()
    all_done = threading.Event()
    expected = {f.stamp_ns for f in frames}

    def on_result(raw: bytes) -> None:
        now = time.monotonic()
        try:
            msg = store.deserialize_cdr(raw, FACE_ARRAY_TYPE)
        except Exception:  # a foreign publisher on the topic; not ours to judge
            return
        stamp = stamp_to_ns(msg.header.stamp)
        with lock:
            if stamp in expected and stamp not in received:
                received[stamp] = _Received(bytes(raw), now)
                if len(received) == len(expected):
                    all_done.set()

    node = None
    spinner = None
    try:
        node = rclpy.create_node("facial_perception_bag_player", context=context)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        image_pub = node.create_publisher(image_cls, out_topic, reliable)
        clock_pub = node.create_publisher(clock_cls, "/clock", QoSProfile(depth=1)) if clock_cls else None
        sub_qos = QoSProfile(
            depth=max(100, len(frames)), reliability=_publisher_reliability(node, faces_topic)
        )
        node.create_subscription(face_cls, faces_topic, on_result, sub_qos, raw=True)
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, name="bag-player-spin", daemon=True)
        spinner.start()
        if activate:
            activate_lifecycle_node(node, activate, wait_for_node)
        _wait_for_peers(node, image_pub, faces_topic, out_topic, wait_for_node)

        first_log = frames[0].log_time_ns
        lead_in = 0.3 if clock_pub is not None else 0.0  # the node's clock starts before the first frame
        start = time.monotonic() + lead_in
        stop_clock = threading.Event()
        clock_thread = None
        if clock_pub is not None:
            clock_thread = threading.Thread(
                target=_run_clock,
                args=(clock_pub, clock_cls, first_log, start, rate, clock_hz, stop_clock),
                name="bag-player-clock",
                daemon=True,
            )
            clock_thread.start()
        bar = tqdm(total=len(frames), desc=f"replay x{rate:g}", unit="frame", disable=not progress)
        try:
            for frame in frames:
                target = start + (frame.log_time_ns - first_log) / 1e9 / rate
                delay = target - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                with lock:
                    published[frame.stamp_ns] = time.monotonic()
                image_pub.publish(frame.raw)
                bar.update(1)
            all_done.wait(drain)
        finally:
            bar.close()
            stop_clock.set()
            if clock_thread is not None:
                clock_thread.join(timeout=1.0)
        elapsed = time.monotonic() - start
    finally:
        executor.shutdown(timeout_sec=1.0)
        if node is not None:
            node.destroy_node()
        context.try_shutdown()
        if spinner is not None:
            spinner.join(timeout=2.0)

    evaluator = BagEvaluator(iou_threshold, label_names)
    with lock:
        results = dict(received)
    outputs: list[tuple[int, bytes]] = []
    for frame in frames:
        got = results.get(frame.stamp_ns)
        gt = ground_truth.get(frame.stamp_ns)
        if got is None:
            evaluator.add(frame.stamp_ns, gt, None)
            continue
        msg = store.deserialize_cdr(got.raw, FACE_ARRAY_TYPE)
        latency = (got.monotonic - published[frame.stamp_ns]) * 1000.0
        evaluator.add(frame.stamp_ns, gt, faces_from_face_array(msg), latency, None, float(msg.latency_ms))
        outputs.append((frame.log_time_ns + int(latency * 1e6), got.raw))
    if output_bag:
        with BagWriter(
            output_bag, "mcap" if str(output_bag).endswith(".mcap") else info["storage"]
        ) as writer:
            writer.add_topic(faces_topic, FACE_ARRAY_TYPE)
            for timestamp, raw in sorted(outputs):
                writer.write_raw(faces_topic, timestamp, raw)
        info["output_bag"] = str(output_bag)
    if not results:
        info["warning"] = (
            f"no result arrived on {faces_topic}: is the node subscribed to {out_topic} "
            f"with a matching input_type?"
        )
    return evaluator.result(info, elapsed)


def activate_lifecycle_node(node: Any, name: str, timeout: float = 30.0) -> str:
    """Bring lifecycle node ``name`` to *active* (configure, then activate, as needed).

    Returns the final state label; a node that does not answer, or refuses a transition, is a
    :class:`BagError` naming the state it is stuck in.
    """
    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    name = "/" + name.strip("/")
    get_state = node.create_client(GetState, f"{name}/get_state")
    change = node.create_client(ChangeState, f"{name}/change_state")
    deadline = time.monotonic() + timeout

    def call(client: Any, request: Any) -> Any:
        while not client.wait_for_service(timeout_sec=0.2):
            if time.monotonic() > deadline:
                raise BagError(f"lifecycle node {name} not found within {timeout:g} s: is it running?")
        future = client.call_async(request)
        while not future.done():
            if time.monotonic() > deadline + 60.0:  # configure loads the model: allow extra time
                raise BagError(f"lifecycle node {name} did not answer {type(request).__name__}")
            time.sleep(0.02)
        return future.result()

    try:
        for _ in range(3):
            state = call(get_state, GetState.Request()).current_state
            if state.id == State.PRIMARY_STATE_ACTIVE:
                return state.label
            transition = {
                State.PRIMARY_STATE_UNCONFIGURED: Transition.TRANSITION_CONFIGURE,
                State.PRIMARY_STATE_INACTIVE: Transition.TRANSITION_ACTIVATE,
            }.get(state.id)
            if transition is None:
                raise BagError(f"lifecycle node {name} is in state '{state.label}', cannot activate it")
            request = ChangeState.Request()
            request.transition.id = transition
            if not call(change, request).success:
                raise BagError(f"lifecycle node {name} refused the transition from '{state.label}'")
        raise BagError(f"lifecycle node {name} did not become active")
    finally:
        node.destroy_client(get_state)
        node.destroy_client(change)


def _publisher_reliability(node: Any, topic: str) -> Any:
    """Reliable unless the node publishes best effort (a reliable reader would not match it)."""
    from rclpy.qos import ReliabilityPolicy

    for info in node.get_publishers_info_by_topic(topic):
        if info.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT:
            return ReliabilityPolicy.BEST_EFFORT
    return ReliabilityPolicy.RELIABLE


def _wait_for_peers(node: Any, image_pub: Any, faces_topic: str, image_topic: str, timeout: float) -> None:
    """Block until the node subscribes to the images and publishes results (discovery takes ~2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if image_pub.get_subscription_count() > 0 and node.count_publishers(faces_topic) > 0:
            time.sleep(0.5)  # let the matched endpoints finish their handshake
            return
        time.sleep(0.05)
    raise BagError(
        f"no perception node found within {timeout:g} s (nothing subscribes to {image_topic} "
        f"and publishes {faces_topic}): start `python -m facial_perception.ros.perception_node`"
    )


def _run_clock(
    pub: Any, cls: Any, first_ns: int, start: float, rate: float, hz: float, stop: threading.Event
) -> None:
    """Publish bag time on ``/clock`` at ``hz`` (like ``ros2 bag play --clock``) until ``stop``.

    A clock that only ticked with each frame would freeze the node's sim time between frames and
    make its own ``latency_ms`` read zero; a steady clock keeps it meaningful at 1/hz resolution.
    """
    period = 1.0 / hz
    while not stop.is_set():
        elapsed = max(time.monotonic() - start, 0.0)
        pub.publish(_clock_msg(cls, first_ns + int(elapsed * rate * 1e9)))
        stop.wait(period)


def _clock_msg(cls: Any, stamp_ns: int) -> Any:
    from builtin_interfaces.msg import Time

    msg = cls()
    msg.clock = Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    return msg


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------


def _count_faces_into(counts: list[tuple[int, int, int]]) -> Callable[[int, Any], None]:
    """An ``on_frame`` callback that appends each frame's (faces, faces whose identity ran, faces whose
    standalone members ran) to ``counts``."""

    def count(_index: int, result: Any) -> None:
        faces = result.faces
        counts.append(
            (
                len(faces),
                sum(bool(face.identity_fresh) for face in faces),
                sum(bool(face.members_fresh) for face in faces),
            )
        )

    return count


def benchmark_offline(
    bag: str | os.PathLike[str],
    settings: PipelineSettings | None = None,
    *,
    progress: bool = True,
    repeats: int = 3,
) -> dict[str, Any]:
    """Offline evaluation throughput vs model-only throughput at the same batch sizes, in one run.

    ``repeats`` times, one right after the other (so that a change of the machine's speed during
    the run hits both alike; shared virtual machines drift by tens of percent within minutes):

    1. :func:`evaluate_offline` on the bag as configured (default: three overlapped stages, torch
       ``cpu_threads`` = 1): read, decode, detect, track, crop, batch, model, smooth, score;
    2. ``FacePredictor.predict`` alone on preprocessed real face crops, with the same sequence of
       batch sizes (faces per frame), with torch's default threads (all cores).

    The ratio is the median of the paired ratios (1) / (2): the pipeline's efficiency (1.0 = no
    overhead beyond the model); the throughputs are the medians of each. Then once:

    3. the same evaluation with one stage after the other on one thread (no overlap, torch
       ``cpu_threads``): its time per frame is the CPU work per frame, so ``cores / work`` bounds
       what any schedule of the stages could reach on this machine (``bound_fps``, ``bound_ratio``).
    """
    return benchmark_offline_configs(
        bag, [settings or PipelineSettings()], progress=progress, repeats=repeats
    )[0]


@dataclass
class _BenchmarkRun:
    """One configuration of :func:`benchmark_offline_configs` and what was measured of it."""

    settings: PipelineSettings
    predictor: Any
    source: str
    pipeline: Any  # FramePipeline
    pool: Any  # preprocessed real face crops for the model-only passes
    identity_pool: Any  # the same faces framed for the identity columns (``pool`` with one framing)
    offline_runs: list[float] = field(default_factory=list)  # frames/s of each evaluation
    model_passes: list[float] = field(default_factory=list)  # seconds per model-only pass
    # per frame: faces, identities run, faces the standalone members ran on
    batch_sizes: list[tuple[int, int, int]] = field(default_factory=list)
    evaluation: BagEvaluation | None = None


def benchmark_offline_configs(
    bag: str | os.PathLike[str],
    configurations: Sequence[PipelineSettings],
    *,
    progress: bool = True,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """:func:`benchmark_offline` for several configurations, interleaved: every round measures each
    configuration once (evaluation, then its model-only pass) before the next round starts, so a
    drift of the machine's speed hits all configurations alike and their comparison holds."""
    runs = [_benchmark_setup(bag, settings) for settings in configurations]
    for _ in range(max(1, repeats)):
        for run in runs:
            run.batch_sizes = []
            run.evaluation = evaluate_offline(
                bag,
                settings=run.settings,
                predictor=run.predictor,
                progress=progress,
                on_frame=_count_faces_into(run.batch_sizes),
            )
            run.offline_runs.append(len(run.batch_sizes) / run.evaluation.summary["elapsed_s"])
            start = time.perf_counter()
            for b, named, members in run.batch_sizes:
                if b:  # the frame's work: one forward per framing, identity and members where they were due
                    run.pipeline.run_model(
                        run.pool[:b], run.identity_pool[:b], identity_rows=named, member_rows=members
                    )
            run.model_passes.append(time.perf_counter() - start)
    return [_benchmark_result(bag, run, progress) for run in runs]


def _benchmark_setup(bag: str | os.PathLike[str], settings: PipelineSettings) -> _BenchmarkRun:
    """Model, pipeline and a pool of real face crops (from the bag's first frames) for one configuration."""
    from facial_perception.core.preprocess import preprocess_batch

    predictor, source = load_predictor(settings)
    pipeline = build_pipeline(settings, predictor)
    crops: list[np.ndarray] = []
    identity_crops: list[np.ndarray] = []
    with BagReader(bag) as reader:  # real face crops for the model-only calls
        for image in reader.images(reader.image_topic()):
            rgb = decode_bag_image(image)
            boxes = [d.box for d in pipeline.detector.detect(rgb)]
            crops += [pipeline.crop(rgb, box) for box in boxes]
            identity_crops += [pipeline.crop_identity(rgb, box) for box in boxes]
            if len(crops) >= settings.max_faces:
                break
    if not crops:
        raise BagError(f"{bag}: no face detected in the first frames, nothing to benchmark")
    size, picks = pipeline.input_size, [i % len(crops) for i in range(settings.max_faces)]
    pool = preprocess_batch([crops[i] for i in picks], size)
    identity_pool = preprocess_batch([identity_crops[i] for i in picks], size)
    for b in range(1, 4):  # warm up every common batch shape once, for both measurements
        pipeline.run_model(pool[:b], identity_pool[:b])
        pipeline.run_model(pool[:b], identity_pool[:b], identity_rows=b - 1, member_rows=b - 1)
    return _BenchmarkRun(settings, predictor, source, pipeline, pool, identity_pool)


def _benchmark_result(bag: str | os.PathLike[str], run: _BenchmarkRun, progress: bool) -> dict[str, Any]:
    import dataclasses

    import torch

    settings, pipeline, evaluation = run.settings, run.pipeline, run.evaluation
    assert evaluation is not None
    offline_runs, model_passes, batch_sizes, source = (
        run.offline_runs,
        run.model_passes,
        run.batch_sizes,
        run.source,
    )
    s = evaluation.summary
    frames = len(batch_sizes)
    identities_run = sum(named for _faces, named, _members in batch_sizes)
    members_run = sum(members for _faces, _named, members in batch_sizes)
    batch_sizes = [faces for faces, _named, _members in batch_sizes]
    ratios = [fps * t / frames for fps, t in zip(offline_runs, model_passes, strict=True)]
    offline_fps = float(np.median(offline_runs))
    model_s = float(np.median(model_passes))
    model_fps = frames / model_s if model_s > 0 else float("inf")

    sequential = dataclasses.replace(settings, overlap=False)
    seq_eval = evaluate_offline(bag, pipeline, settings=sequential, progress=progress)
    sequential_fps = seq_eval.summary["throughput_fps"] or 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    bound_fps = cores * sequential_fps
    return {
        "bag": str(bag),
        "frames": frames,
        "image_type": s["image_type"],
        "storage": s["storage"],
        "model": source,
        "device": settings.device,
        "overlap": settings.overlap,
        "encoder_stage": settings.overlap and settings.encoder_stage,
        "first_stage_process": settings.overlap and settings.first_stage_process,
        "fuse_columns": settings.fuse_columns,
        "detector": settings.detector,
        "detector_backend": getattr(pipeline.detector, "backend", type(pipeline.detector).__name__),
        "pipeline_torch_threads": settings.cpu_threads or torch.get_num_threads(),
        "model_only_torch_threads": torch.get_num_threads(),
        "faces_per_frame": {str(k): batch_sizes.count(k) for k in sorted(set(batch_sizes))},
        "identity_faces_run": identities_run,  # faces the identity columns ran on (identity_every)
        "identity_every": settings.identity_every,
        "member_faces_run": members_run,  # faces the standalone members ran on (standalone_every)
        "standalone_every": settings.standalone_every,
        "crop_margin": settings.crop_margin,
        "repeats": len(offline_runs),
        "offline_fps": offline_fps,
        "offline_runs_fps": offline_runs,
        "model_only_fps": model_fps,
        "model_only_passes_s": model_passes,
        "paired_ratios": ratios,
        "ratio": float(np.median(ratios)),
        "sequential_fps": sequential_fps,
        "sequential_ratio": sequential_fps / model_fps,
        "sequential_stage_ms_mean": seq_eval.summary["stage_ms_mean"],
        "cpu_work_ms_per_frame": 1000.0 / sequential_fps if sequential_fps else None,
        "cores": cores,
        "bound_fps": bound_fps,
        "bound_ratio": bound_fps / model_fps,
        "target_ratio": 0.7,
        "stage_ms_mean": s["stage_ms_mean"],
        "latency_ms": s["latency_ms"],
        "detection_recall": s.get("detection", {}).get("recall"),
        "detection_precision": s.get("detection", {}).get("precision"),
    }
