"""One camera frame -> per-face results: detect, track, crop, ONE model batch, smooth, identify.

This is the ROS-free heart shared by the perception node and the offline bag evaluator, so both
measure exactly the same thing.  Per frame:

1. ``detector.detect`` -> boxes (largest first, at most ``max_faces``);
2. ``tracker.update`` -> stable track ids (state of removed tracks is dropped from the smoother);
3. ``crop_face`` + ``preprocess_batch`` -> one ``(N, 1, S, S)`` tensor for all faces of the frame,
   framed like the training crops for this detector (``pipeline.framing``); where the identity
   columns' training crops were framed otherwise (LFW), a second tensor framed for them;
4. ``predictor.predict`` -> per-face task probabilities and the identity embedding (one forward
   per framing);
5. ``smoother`` -> per-track moving averages of probabilities and embeddings;
6. ``gallery.match`` on the smoothed embeddings -> name or ``"unknown"`` (``""`` when identity
   recognition is off, i.e. no gallery, or the model has no identity column).

Enrolment ("the next N frames of this face") is an :class:`EnrolmentCollector` fed by
:meth:`FramePipeline.process`; the predictor can be hot-swapped with :meth:`FramePipeline.set_predictor`.
"""

from __future__ import annotations

import colorsys
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import cv2
import numpy as np

from facial_perception.core.preprocess import crop_face, preprocess_batch
from facial_perception.pipeline.detection import Detection, FaceDetector
from facial_perception.pipeline.framing import CropFramings, Framing, framings_for
from facial_perception.pipeline.gallery import UNKNOWN, GalleryError, IdentityGallery
from facial_perception.pipeline.smoothing import PredictionSmoother
from facial_perception.pipeline.tracking import FaceTracker, Track

__all__ = [
    "IDENTITY_TASK",
    "STANDARD_TASKS",
    "EnrolmentCollector",
    "FacePipelineError",
    "FaceResult",
    "FramePipeline",
    "FrameResult",
    "PreparedFrame",
    "TaskResult",
    "draw_annotations",
    "overlapped",
]

IDENTITY_TASK = "identity"
_T = TypeVar("_T")
_U = TypeVar("_U")

STANDARD_TASKS = ("identity", "age", "gender", "emotion")
#: A track's held standalone members give way when its column's probabilities have moved by more than
#: this share of their mass since the members ran (``standalone_every``: another person in the track).
#: A change of answer alone also caught borderline faces that only flicker
#: (docs/ros_benchmark_runs/standalone_every.md).
MEMBERS_GIVE_WAY = 0.5


class FacePipelineError(ValueError):
    """A frame or request the pipeline cannot handle (bad image, bad enrolment request); one line."""


class _Predictor(Protocol):
    """The part of ``core.inference.FacePredictor`` the pipeline uses (see docs/ARCHITECTURE.md).

    With two framings (:class:`CropFramings`) it also uses ``task_names``, ``model.specs`` and
    ``predict(batch, tasks)``; a predictor without them gets one crop for every column.
    """

    def predict(self, batch: Any) -> list[Any]: ...


@dataclass
class TaskResult:
    """One task's (smoothed) prediction for one face."""

    label: str
    index: int
    confidence: float
    labels: list[str]
    probabilities: np.ndarray


@dataclass
class FaceResult:
    """Everything known about one face in one frame."""

    track_id: int
    box: np.ndarray  # float32 xyxy pixels
    box_normalized: np.ndarray  # float32 xyxy in [0, 1] of width/height
    detection_score: float
    identity: str  # enrolled name, "unknown", or "" when identity recognition is off
    identity_confidence: float
    tasks: dict[str, TaskResult]
    embedding: np.ndarray | None  # smoothed, unit-norm identity embedding
    keypoints: np.ndarray | None = None
    # False: the identity columns did not run on this frame's crop, the track's last identity
    # prediction and embedding stand (``identity_every``)
    identity_fresh: bool = True
    # False: the standalone members did not run on this frame's crop, their last probabilities for
    # the track stand in the mix (``standalone_every``)
    members_fresh: bool = True
    # False: the face columns (every column but the identity ones that have a crop of their own) did
    # not run on this frame's crop, the track's last predictions stand (``attributes_every``)
    attributes_fresh: bool = True


@dataclass
class FrameResult:
    """All faces of a frame plus per-stage timings in milliseconds."""

    faces: list[FaceResult]
    timings: dict[str, float]
    stamp: float | None = None
    width: int = 0
    height: int = 0


@dataclass
class PreparedFrame:
    """A frame after :meth:`FramePipeline.prepare`: what :meth:`FramePipeline.complete` needs.

    ``frame`` may be dropped (None) to send the rest to another process: the later stages only
    use its size.
    """

    frame: np.ndarray | None
    tracks: list[Track]
    removed_ids: list[int]
    crops: list[np.ndarray]
    batch: Any  # (N, 1, S, S) tensor, None without faces
    input_size: int
    timings: dict[str, float]
    stamp: float | None
    started: float  # perf_counter() when prepare began
    encoded: Any = None  # the predictor's encoder output (FramePipeline.encode), None before
    encoded_by: Any = None  # the predictor that made ``encoded``
    width: int = 0  # of the frame, pixels
    height: int = 0
    # the faces framed for the identity columns, when that framing differs (else None: ``crops``)
    identity_crops: list[np.ndarray] | None = None
    identity_batch: Any = None
    # per face, whether its identity is due this frame (``identity_every``); None: every face
    identity_due: list[bool] | None = None
    # per face, whether the standalone members are due this frame (``standalone_every``); None: every face
    members_due: list[bool] | None = None
    # the faces whose standalone members ``encoded`` ran on (None: every face; with ``attribute_rows``,
    # indices among those rows)
    member_rows: list[int] | None = None
    # per face, whether the face columns are due this frame (``attributes_every``); None: every face
    attributes_due: list[bool] | None = None
    # the faces ``encoded`` holds the face columns' encoding of (None: every face)
    attribute_rows: list[int] | None = None


@dataclass
class EnrolmentCollector:
    """Collects the per-frame identity embeddings of one face for enrolment.

    With ``track_id=None`` the largest face of the first frame that has one is chosen and then
    followed by its track id.  Collection fails if that track disappears, or after ``timeout_s``
    seconds (checked as frames arrive; callers also bound their :meth:`wait`).  When ``frames``
    embeddings are collected, the pipeline enrols them in its gallery; :attr:`count` is then the
    person's number of stored embeddings, or :attr:`error` says what went wrong.
    """

    name: str
    frames: int
    track_id: int | None = None
    timeout_s: float | None = 10.0
    embeddings: list[np.ndarray] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    error: str | None = None
    count: int | None = None
    started: float = field(default_factory=time.monotonic)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def done(self) -> bool:
        """True once finished, successfully or not."""
        return self._done.is_set()

    @property
    def ok(self) -> bool:
        return self.done and self.error is None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (or ``timeout`` seconds); True when finished."""
        return self._done.wait(timeout)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop collecting (no-op when already finished, and waits for an enrolment in progress)."""
        with self._lock:
            self._finish(error=reason)

    def _finish(self, error: str | None = None, count: int | None = None) -> None:
        if self._done.is_set():
            return
        self.error, self.count = error, count
        self._done.set()


def _timed(timings: dict[str, float], key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + (now - start) * 1000.0
    return now


class FramePipeline:
    """Detect -> track -> batch -> model -> smooth -> identify, for one frame at a time.

    ``predictor`` follows the ``FacePredictor`` contract (``predict(tensor) -> list[FacePrediction]``
    with ``.tasks[name].probabilities/.labels`` and ``.embedding``).  ``input_size`` defaults to the
    predictor's model input size.  :meth:`process` is meant to be called from one thread at a
    time; :meth:`set_predictor`, :meth:`start_enrolment` and the gallery may be used from others.
    A pipeline that only runs :meth:`prepare` (e.g. in a worker process) may have no predictor
    (``None``, with ``input_size``).
    """

    def __init__(
        self,
        predictor: _Predictor | None,
        detector: FaceDetector,
        tracker: FaceTracker | None = None,
        smoother: PredictionSmoother | None = None,
        gallery: IdentityGallery | None = None,
        input_size: int | None = None,
        framings: CropFramings | Framing | None = None,
        max_faces: int = 5,
        known_identity_threshold: float = 1.01,
        detect_every: int = 1,
        identity_every: int = 1,
        standalone_every: int = 1,
        attributes_every: int = 1,
    ) -> None:
        if max_faces < 1:
            raise FacePipelineError(f"max_faces must be >= 1, got {max_faces}")
        if detect_every < 1:
            raise FacePipelineError(f"detect_every must be >= 1, got {detect_every}")
        if identity_every < 1:
            raise FacePipelineError(f"identity_every must be >= 1, got {identity_every}")
        if standalone_every < 1:
            raise FacePipelineError(f"standalone_every must be >= 1, got {standalone_every}")
        if attributes_every < 1:
            raise FacePipelineError(f"attributes_every must be >= 1, got {attributes_every}")
        self.detector = detector
        self.tracker = tracker if tracker is not None else FaceTracker()
        # No smoother means no smoothing (alpha = 1 keeps only the newest frame), not a default one.
        self.smoother = smoother if smoother is not None else PredictionSmoother(alpha=1.0)
        self.gallery = gallery
        # Each detector boxes a face its own way: the margin and offset that reproduce the framing of
        # the training crops were measured per detector (pipeline.framing, docs/DATA.md). A single
        # Framing crops every column alike.
        if framings is None:
            framings = framings_for(detector)
        elif isinstance(framings, Framing):
            framings = CropFramings(framings, framings)
        elif not isinstance(framings, CropFramings):
            raise FacePipelineError(
                f"framings must be a CropFramings or a Framing, got {type(framings).__name__}"
            )
        self.framings = framings
        # Faces the gallery does not know may still be one of the people the identity column was
        # trained on ("known identities"); only a confident classification counts (> 1 disables it).
        self.known_identity_threshold = float(known_identity_threshold)
        self.max_faces = int(max_faces)
        # Run the detector on every n-th frame only; in between, the faces of the last frame move on
        # along their tracks' constant-velocity prediction (saves detector CPU; a face that appears
        # is found up to n - 1 frames late, one that leaves is reported as long).
        self.detect_every = int(detect_every)
        self._frames_since_detection = self.detect_every  # the first frame is always detected
        # With a crop of its own, the identity columns run on a track's first frame and then on every
        # ``identity_every``-th: a person does not change between frames, the smoother averages the
        # embedding anyway, and it saves most of that second encoder pass. In between, the track's last
        # identity prediction stands in (per track id: (predictor, prediction)).
        self.identity_every = int(identity_every)
        self._identity_cache: dict[int, tuple[Any, Any]] = {}
        # Likewise the columns' standalone members (each its own encoder pass per face: as much again
        # as the shared encoder) run on a track's first frame and every ``standalone_every``-th; in
        # between their last probabilities for the track are mixed with the columns' fresh ones (per
        # track id: _HeldMembers).
        self.standalone_every = int(standalone_every)
        self._member_cache: dict[int, _HeldMembers] = {}
        # And the face columns as a whole (the shared encoder, every column but the identity ones with
        # a crop of their own, and their members) on a track's first frame and every
        # ``attributes_every``-th: age, gender and emotion change slowly next to 30 frames/s, and the
        # smoother averages over frames anyway. In between the track's last face predictions stand
        # (per track id: (predictor, prediction)).
        self.attributes_every = int(attributes_every)
        self._attribute_cache: dict[int, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self._collectors: list[EnrolmentCollector] = []
        self._predictor = predictor
        self.input_size = int(input_size) if input_size is not None else _input_size_of(predictor)
        _check_gallery_fits(gallery, predictor)

    # -- configuration -------------------------------------------------------------------------
    @property
    def predictor(self) -> _Predictor:
        return self._predictor

    def set_predictor(self, predictor: _Predictor, input_size: int | None = None) -> None:
        """Hot-swap the model; the next frame uses it.  Smoothing state restarts (labels may differ)."""
        size = int(input_size) if input_size is not None else _input_size_of(predictor)
        _check_gallery_fits(self.gallery, predictor)
        with self._lock:
            self._predictor = predictor
            self.input_size = size
            self.smoother.reset()
            self._identity_cache = {}
            self._member_cache = {}
            self._attribute_cache = {}

    def reset(self) -> None:
        """Forget tracks and smoothing state (e.g. between bag sequences)."""
        self.tracker.reset()
        self.smoother.reset()
        self._identity_cache = {}
        self._member_cache = {}
        self._attribute_cache = {}
        self._frames_since_detection = self.detect_every

    def _detect_or_predict(self, frame: np.ndarray) -> list[Detection]:
        """The faces of this frame: the detector runs on every ``detect_every``-th frame; in between,
        the faces of the previous frame move on along their tracks' constant-velocity prediction
        (clipped to the frame)."""
        if self._frames_since_detection + 1 < self.detect_every:
            self._frames_since_detection += 1
            height, width = frame.shape[:2]
            limits = np.array([width, height, width, height], dtype=np.float32)
            faces = []
            for track in self.tracker.tracks:
                if track.missed or track.hits < self.tracker.min_hits:
                    continue  # only faces seen in the previous frame go on
                box = np.minimum(np.maximum(track.predicted_box(), 0.0), limits).astype(np.float32)
                if box[2] - box[0] < 2 or box[3] - box[1] < 2:  # moved out of the frame
                    continue
                shift = (box[:2] + box[2:]) / 2 - (track.box[:2] + track.box[2:]) / 2
                points = None if track.keypoints is None else (track.keypoints + shift).astype(np.float32)
                faces.append(Detection(box=box, score=track.score, keypoints=points))
            return faces
        self._frames_since_detection = 0
        detections = self.detector.detect(frame)
        return sorted(detections, key=lambda d: d.area, reverse=True)[: self.max_faces]

    def crop(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The face crop fed to the face-attribute columns, framed like their training images."""
        framing = self.framings.faces
        return crop_face(frame, box, framing.margin, square=True, offset_y=framing.offset_y)

    def crop_identity(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The face crop fed to the identity columns, framed like theirs (LFW: looser)."""
        framing = self.framings.identity
        return crop_face(frame, box, framing.margin, square=True, offset_y=framing.offset_y)

    def _task_split(self, predictor: Any) -> tuple[list[str], list[str]] | None:
        """(columns on the faces crop, identity columns on the identity crop); None: one crop for all
        (one framing, no identity column, or a predictor that cannot run a subset of its tasks)."""
        if self.framings.single or predictor is None:
            return None
        try:
            names = list(predictor.task_names)
            specs = predictor.model.specs
        except AttributeError:
            return None
        identity = [name for name in names if specs[name].kind == "identity"]
        if not identity:
            return None
        return [name for name in names if name not in identity], identity

    def run_model(
        self,
        batch: Any,
        identity_batch: Any = None,
        identity_rows: int | None = None,
        member_rows: int | None = None,
    ) -> list[Any]:
        """The model on one frame's preprocessed faces as :meth:`complete` runs it: one forward, or one
        per framing (``identity_batch``: the identity crops; default ``batch``). For warm-ups and
        benchmarks, which must do the same work as a frame.

        ``identity_rows``: with two framings, the identity columns run on the first this many faces only
        (a frame where the other faces' identity is not due, ``identity_every``); those others get the
        face columns' predictions alone. ``member_rows``: the standalone members run on the first this
        many faces only (``standalone_every``); the others mix in uniform probabilities where a frame
        would mix in their track's last ones (the same work, not the same answers). Default: every face.
        """
        with self._lock:
            predictor = self._predictor
        split = self._task_split(predictor)
        identity_batch = batch if identity_batch is None else identity_batch
        count = batch.shape[0]
        rows = count if identity_rows is None else identity_rows
        if not 0 <= rows <= count:
            raise FacePipelineError(f"identity_rows must be within 0..{count}, got {identity_rows}")
        members = count if member_rows is None else member_rows
        if not 0 <= members <= count:
            raise FacePipelineError(f"member_rows must be within 0..{count}, got {member_rows}")
        plan = None if members == count else _uniform_members(predictor, members, count)
        if split is None:
            return self._predict_faces(predictor, batch, None, plan)
        faces, identity = split
        predictions = self._predict_faces(predictor, batch, faces, plan) if faces else [None] * count
        if rows:
            named = predictor.predict(identity_batch[:rows], identity)
            predictions[:rows] = named if not faces else _merged(predictions[:rows], named)
        return predictions

    @staticmethod
    def _predict_faces(
        predictor: Any, batch: Any, tasks: list[str] | None, plan: tuple[list[int], dict] | None
    ) -> list[Any]:
        """``predictor.predict`` on the face crops; ``plan``: (faces whose standalone members run, the
        others' held member probabilities), None: the members run on every face."""
        if plan is None:
            return predictor.predict(batch) if tasks is None else predictor.predict(batch, tasks)
        return predictor.predict(batch, tasks, standalone_rows=plan[0], held_members=plan[1])

    def _face_predictions(
        self, predictor: Any, encoded: Any, batch: Any, tasks: list[str] | None, plan: Any
    ) -> list[Any]:
        """The face crops' columns: on the encoder stage's output when there is one, else from ``batch``
        (``plan``: see :meth:`_predict_faces`)."""
        if encoded is None:
            return self._predict_faces(predictor, batch, tasks, plan)
        return (
            predictor.predict_encoded(encoded)
            if plan is None
            else predictor.predict_encoded(encoded, plan[1])
        )

    def _member_plan(
        self, prepared: PreparedFrame, maker: Any, rows: list[int] | None = None
    ) -> tuple[list[int], dict[int, dict[str, np.ndarray]]] | None:
        """(the faces whose standalone members run this frame, the held member probabilities of the
        others); None: every face's (``standalone_every`` 1). With ``rows`` (what the encode stage
        ran them on), only the held part, or None when a face lacks it (the cache was reset since)."""
        if prepared.members_due is None:
            return None
        cache = self._member_cache
        planned: list[int] = []
        held: dict[int, dict[str, np.ndarray]] = {}
        for i, (track, due) in enumerate(zip(prepared.tracks, prepared.members_due, strict=True)):
            cached = cache.get(track.track_id)
            usable = cached is not None and cached.model is maker
            if (rows is None and (due or not usable or cached.refresh)) or (rows is not None and i in rows):
                planned.append(i)
            elif usable:
                held[i] = cached.members
            else:
                return None
        return planned, held

    def _face_part(
        self,
        predictor: Any,
        view: PreparedFrame,
        batch: Any,
        tasks: list[str] | None,
        encoded: Any,
        maker: Any,
    ) -> tuple[list[Any], list[bool]]:
        """The face columns (``tasks``; None: all) on the faces of ``view`` with their standalone members
        (run now or held, ``standalone_every``): predictions and, per face, whether the members ran."""
        plan = None
        if encoded is not None and view.member_rows is not None:
            plan = self._member_plan(view, maker, view.member_rows)
            if plan is None:
                encoded = None  # a track's held members are gone (model swapped): encode again
        if encoded is None:
            plan = self._member_plan(view, maker)
        members_fresh = [plan is None or i in plan[0] for i in range(len(view.tracks))]
        predictions = self._face_predictions(predictor, encoded, batch, tasks, plan)
        return self._hold_members(view, maker, predictions, members_fresh), members_fresh

    def _face_predictions_held(
        self,
        predictor: Any,
        prepared: PreparedFrame,
        batch: Any,
        tasks: list[str] | None,
        encoded: Any,
        maker: Any,
    ) -> tuple[list[Any], list[bool], list[bool]]:
        """:meth:`_face_part` on the faces whose face columns are due (``attributes_every``: by the
        schedule, or where the track's held predictions are gone); the track's last predictions for
        the others. Returns predictions, members run now, face columns run now (per face)."""
        count = len(prepared.tracks)
        if prepared.attributes_due is None:
            predictions, members_fresh = self._face_part(predictor, prepared, batch, tasks, encoded, maker)
            return predictions, members_fresh, [True] * count
        cache = self._attribute_cache
        rows = [
            i
            for i, (track, due) in enumerate(zip(prepared.tracks, prepared.attributes_due, strict=True))
            if due or cache.get(track.track_id, (None,))[0] is not maker
        ]
        if encoded is not None and prepared.attribute_rows != rows:
            encoded = None  # the encode stage planned other faces (held predictions gone): run them again
        ran: dict[int, tuple[Any, bool]] = {}
        if rows:
            view = _face_rows(prepared, rows, prepared.member_rows if encoded is not None else None)
            predictions, members_fresh = self._face_part(predictor, view, batch[rows], tasks, encoded, maker)
            ran = dict(zip(rows, zip(predictions, members_fresh, strict=True), strict=True))
        out, members, fresh = [], [], []
        for i, track in enumerate(prepared.tracks):
            if i in ran:
                prediction, members_ran = ran[i]
                cache[track.track_id] = (maker, prediction)
            else:
                prediction, members_ran = cache[track.track_id][1], False
            out.append(prediction)
            members.append(members_ran)
            fresh.append(i in ran)
        return out, members, fresh

    def _frame_predictions(
        self,
        predictor: Any,
        prepared: PreparedFrame,
        batch: Any,
        identity_batch: Any,
        split: Any,
        encoded: Any,
    ) -> tuple[list[Any], list[bool], list[bool], list[bool]]:
        """The predictions of one frame's faces and, per face, whether its identity was computed now
        (False: the track's last identity prediction, see ``identity_every``), whether its
        standalone members ran now (False: the track's last ones, ``standalone_every``) and whether
        its face columns ran now (False: the track's last predictions, ``attributes_every``)."""
        count = len(prepared.tracks)
        maker = getattr(predictor, "model", predictor)  # a cached answer of another model is not reused
        if split is None:
            plain, members_fresh, attributes_fresh = self._face_predictions_held(
                predictor, prepared, batch, None, encoded, maker
            )
            # one crop for every column: the identity ran with the others
            return plain, attributes_fresh, members_fresh, attributes_fresh
        faces, identity = split
        cache = self._identity_cache  # set_predictor/reset replace it: this frame keeps a consistent one
        due = set(range(count)) if prepared.identity_due is None else set(_due_rows(prepared))
        for i, track in enumerate(prepared.tracks):
            cached = cache.get(track.track_id)
            if cached is None or cached[0] is not maker:
                due.add(i)
        named: dict[int, Any] = {}
        if encoded is not None and encoded.identity is not None:
            named.update(zip(encoded.rows, predictor.predict_encoded(encoded.identity), strict=True))
        rest = sorted(due - set(named))
        if rest:
            named.update(zip(rest, predictor.predict(identity_batch[rest], identity), strict=True))
        fresh = [i in named for i in range(count)]
        for i, track in enumerate(prepared.tracks):
            if i in named:
                cache[track.track_id] = (maker, named[i])
            else:
                named[i] = cache[track.track_id][1]
        ordered = [named[i] for i in range(count)]
        if not faces:
            return ordered, fresh, [True] * count, [True] * count
        faces_encoded = encoded.faces if encoded is not None else None
        face_predictions, members_fresh, attributes_fresh = self._face_predictions_held(
            predictor, prepared, batch, faces, faces_encoded, maker
        )
        return _merged(face_predictions, ordered), fresh, members_fresh, attributes_fresh

    def _hold_members(
        self, prepared: PreparedFrame, maker: Any, predictions: list[Any], fresh: list[bool]
    ) -> list[Any]:
        """Keep each track's fresh standalone members' probabilities for its next frames; check the
        held ones against the column's fresh answer.

        A track can go on with another person (one leaves, another steps into the same place within
        ``track_max_missed`` frames). When a column's own probabilities have moved by more than half
        their mass (total variation > ``MEMBERS_GIVE_WAY``) since the members last ran, the held
        members may describe someone else: that frame gets the column alone, and the members run again
        on the track's next encoded frame. A borderline face whose answer only flickers keeps them."""
        if prepared.members_due is None:
            return predictions
        checked = list(predictions)
        for i, (track, prediction, is_fresh) in enumerate(
            zip(prepared.tracks, predictions, fresh, strict=True)
        ):
            tasks = prediction.tasks
            if is_fresh:
                mixed = {n: t for n, t in tasks.items() if getattr(t, "members", None) is not None}
                self._member_cache[track.track_id] = _HeldMembers(
                    maker,
                    {n: t.members for n, t in mixed.items()},
                    {
                        n: np.asarray(t.column)
                        for n, t in mixed.items()
                        if getattr(t, "column", None) is not None
                    },
                )
                continue
            held = self._member_cache.get(track.track_id)
            if held is None:
                continue
            changed = {
                name: _column_alone(tasks[name])
                for name, then in held.columns.items()
                if name in tasks
                and getattr(tasks[name], "column", None) is not None
                and _total_variation(tasks[name].column, then) > MEMBERS_GIVE_WAY
            }
            if changed:
                held.refresh = True
                checked[i] = dataclasses.replace(prediction, tasks={**tasks, **changed})
        return checked

    # -- per frame -----------------------------------------------------------------------------
    def process(
        self, rgb: np.ndarray, stamp: float | None = None, decode_ms: float | None = None
    ) -> FrameResult:
        """Run the whole pipeline on an RGB ``uint8`` frame; ``decode_ms`` is recorded when given."""
        return self.complete(self.prepare(rgb, stamp, decode_ms))

    def prepare(
        self, rgb: np.ndarray, stamp: float | None = None, decode_ms: float | None = None
    ) -> PreparedFrame:
        """First stage: detect, track, crop and preprocess (no model).

        Split from :meth:`complete` so that the next frame can be detected while the model runs on
        this one (:func:`overlapped`, the node's ``overlap_stages``): on CPU, detection and the lite
        model cost about the same.  Call it for frames in order, from one thread (the tracker).
        """
        t_start = time.perf_counter()
        frame = _check_frame(rgb)
        timings: dict[str, float] = {}
        if decode_ms is not None:
            timings["decode"] = float(decode_ms)
        with self._lock:
            input_size = self.input_size

        t = time.perf_counter()
        detections = self._detect_or_predict(frame)
        t = _timed(timings, "detect", t)

        # Snapshots: the tracker updates its Track objects in place on the next frame, which may be
        # prepared while this one is still in the model stage.
        tracks = [
            dataclasses.replace(
                track,
                box=np.array(track.box, dtype=np.float32),
                keypoints=None if track.keypoints is None else np.array(track.keypoints),
                velocity=np.array(track.velocity),
            )
            for track in self.tracker.update(detections)
        ]
        removed = list(self.tracker.removed_ids)
        t = _timed(timings, "track", t)

        crops = [self.crop(frame, track.box) for track in tracks]
        batch = preprocess_batch(crops, input_size) if crops else None
        identity_crops = identity_batch = identity_due = None
        if not self.framings.single:
            identity_crops = [self.crop_identity(frame, track.box) for track in tracks]
            identity_batch = preprocess_batch(identity_crops, input_size) if identity_crops else None
            if self.identity_every > 1:
                identity_due = [(track.age - 1) % self.identity_every == 0 for track in tracks]
        members_due = None
        if self.standalone_every > 1:
            members_due = [(track.age - 1) % self.standalone_every == 0 for track in tracks]
        attributes_due = None
        if self.attributes_every > 1:
            attributes_due = [(track.age - 1) % self.attributes_every == 0 for track in tracks]
        _timed(timings, "preprocess", t)
        height, width = frame.shape[:2]
        return PreparedFrame(
            frame,
            tracks,
            removed,
            crops,
            batch,
            input_size,
            timings,
            stamp,
            t_start,
            width=width,
            height=height,
            identity_crops=identity_crops,
            identity_batch=identity_batch,
            identity_due=identity_due,
            members_due=members_due,
            attributes_due=attributes_due,
        )

    def encode(self, prepared: PreparedFrame) -> PreparedFrame:
        """Optional middle stage: the predictor's encoder on the frame's faces (no-op without faces, or
        for a predictor without ``encode``/``predict_encoded``).

        With :meth:`prepare` in one thread, this in a second and :meth:`complete` (the columns) in a
        third, the model's work is split over two threads: on CPU the encoder costs about as much
        as the columns, so a frame waits for the slowest third instead of the whole model. With two
        framings only the face-attribute columns' crop is encoded here (the identity crop in
        :meth:`complete`), unless every column is an identity column.
        """
        with self._lock:
            predictor, input_size = self._predictor, self.input_size
        batch = prepared.batch
        if batch is None or input_size != prepared.input_size or not hasattr(predictor, "predict_encoded"):
            return prepared
        t = time.perf_counter()
        split = self._task_split(predictor)
        # by the schedule alone: the held probabilities of the other faces come from frames whose columns
        # may still be running; complete() runs frames in order, so they are there by then (or it
        # encodes the frame again)
        view = prepared
        if prepared.attributes_due is not None and (split is None or split[0]):
            due = [i for i, is_due in enumerate(prepared.attributes_due) if is_due]
            prepared.attribute_rows = due
            if not due:
                return prepared  # no face's columns due: nothing to encode
            view, batch = _face_rows(prepared, due), batch[due]
        rows = None
        if view.members_due is not None:
            cache = self._member_cache
            rows = [
                i
                for i, (track, due) in enumerate(zip(view.tracks, view.members_due, strict=True))
                if due or getattr(cache.get(track.track_id), "refresh", False)
            ]
        if split is None:
            encoded: Any = predictor.encode(batch) if rows is None else predictor.encode(batch, None, rows)
            prepared.member_rows = rows
        elif prepared.identity_batch is None:
            return prepared  # prepared by a pipeline with one framing: complete() crops again
        else:
            faces, identity = split
            if faces:
                # the identity columns then run in complete(): this stage already holds the face crops'
                # encoder passes (standalone members too), and the stages stay balanced
                # (docs/ros_benchmark_runs/identity_stage.md)
                face_encoding = (
                    predictor.encode(batch, faces) if rows is None else predictor.encode(batch, faces, rows)
                )
                encoded = _SplitEncoding(face_encoding, None, [])
                prepared.member_rows = rows
            else:
                rows = _due_rows(prepared)
                named = predictor.encode(prepared.identity_batch[rows], identity) if rows else None
                encoded = _SplitEncoding(None, named, rows)
        prepared.encoded, prepared.encoded_by = encoded, predictor
        _timed(prepared.timings, "encode", t)
        return prepared

    def complete(self, prepared: PreparedFrame) -> FrameResult:
        """Second stage: one model batch, smoothing, identification, enrolment; frames in order."""
        tracks, crops, timings = prepared.tracks, prepared.crops, prepared.timings
        height, width = prepared.height, prepared.width
        with self._lock:
            predictor, input_size = self._predictor, self.input_size
        self.smoother.drop(prepared.removed_ids)
        for track_id in prepared.removed_ids:
            self._identity_cache.pop(track_id, None)
            self._member_cache.pop(track_id, None)
            self._attribute_cache.pop(track_id, None)
        faces: list[FaceResult] = []
        raw_embeddings: list[np.ndarray | None] = []
        fresh: list[bool] = []
        t = time.perf_counter()
        identity_crops = prepared.identity_crops if prepared.identity_crops is not None else crops
        if tracks:
            batch, identity_batch = prepared.batch, prepared.identity_batch
            encoded = prepared.encoded if prepared.encoded_by is predictor else None
            if encoded is None and (batch is None or input_size != prepared.input_size):  # model swapped
                batch = preprocess_batch(crops, input_size)
                identity_batch = None
            split = self._task_split(predictor)
            if split is not None and identity_batch is None:
                identity_batch = preprocess_batch(identity_crops, input_size)
            if encoded is not None and (split is not None) != isinstance(encoded, _SplitEncoding):
                encoded = None  # encoded for another arrangement of crops (the model changed in between)
            predictions, fresh, members_fresh, attributes_fresh = self._frame_predictions(
                predictor, prepared, batch, identity_batch, split, encoded
            )
            if len(predictions) != len(tracks):
                got, want = len(predictions), len(tracks)
                raise FacePipelineError(f"predictor returned {got} results for {want} faces")
            t = _timed(timings, "model", t)
            for track, prediction, is_fresh, members_ran, attributes_ran in zip(
                tracks, predictions, fresh, members_fresh, attributes_fresh, strict=True
            ):
                face, raw = self._smooth_face(track, prediction, width, height)
                face.identity_fresh, face.members_fresh = is_fresh, members_ran
                face.attributes_fresh = attributes_ran
                faces.append(face)
                raw_embeddings.append(raw)
            t = _timed(timings, "smooth", t)
            self._identify(faces)
            t = _timed(timings, "identify", t)
        self._feed_collectors(tracks, raw_embeddings, identity_crops, fresh)
        timings["total"] = (time.perf_counter() - prepared.started) * 1000.0 + timings.get("decode", 0.0)
        return FrameResult(faces=faces, timings=timings, stamp=prepared.stamp, width=width, height=height)

    def _smooth_face(
        self, track: Track, prediction: Any, width: int, height: int
    ) -> tuple[FaceResult, np.ndarray | None]:
        tasks: dict[str, TaskResult] = {}
        for name, task in prediction.tasks.items():
            labels = [str(label) for label in task.labels]
            probs = self.smoother.smooth(track.track_id, name, labels, np.asarray(task.probabilities))
            index = int(np.argmax(probs))
            tasks[name] = TaskResult(
                label=labels[index],
                index=index,
                confidence=float(probs[index]),
                labels=labels,
                probabilities=probs,
            )
        raw = getattr(prediction, "embedding", None)
        raw = None if raw is None else np.asarray(raw, dtype=np.float32).reshape(-1)
        embedding = self.smoother.smooth_embedding(track.track_id, raw) if raw is not None else None
        scale = np.array([width, height, width, height], dtype=np.float32)
        box = np.asarray(track.box, dtype=np.float32).copy()
        face = FaceResult(
            track_id=track.track_id,
            box=box,
            box_normalized=np.clip(box / scale, 0.0, 1.0),
            detection_score=float(track.score),
            identity="",
            identity_confidence=0.0,
            tasks=tasks,
            embedding=embedding,
            keypoints=track.keypoints,
        )
        return face, raw

    def _identify(self, faces: list[FaceResult]) -> None:
        """Gallery match first (enrolled people); else a confident identity-column class; else unknown."""
        if self.gallery is None:
            return
        indexed = [(i, f.embedding) for i, f in enumerate(faces) if f.embedding is not None]
        if not indexed:
            return
        matches = self.gallery.match(np.stack([e for _, e in indexed]))
        for (i, _), (name, confidence) in zip(indexed, matches, strict=True):
            known = faces[i].tasks.get(IDENTITY_TASK)
            if name == UNKNOWN and known is not None and known.confidence >= self.known_identity_threshold:
                name, confidence = known.label, known.confidence
            faces[i].identity, faces[i].identity_confidence = name, float(confidence)

    # -- enrolment -----------------------------------------------------------------------------
    def start_enrolment(
        self, name: str, frames: int = 10, track_id: int | None = None, timeout_s: float | None = 10.0
    ) -> EnrolmentCollector:
        """Collect the next ``frames`` embeddings of ``track_id`` (or the largest face) and enrol them."""
        if self.gallery is None:
            raise FacePipelineError("identity recognition is disabled (no gallery): cannot enrol")
        if not isinstance(name, str) or not name.strip():
            raise FacePipelineError("enrolment needs a non-empty name")
        if not 1 <= int(frames) <= 1000:
            raise FacePipelineError(f"frames must be between 1 and 1000, got {frames}")
        if track_id is not None and track_id < 1:
            raise FacePipelineError(f"track ids start at 1, got {track_id}")
        collector = EnrolmentCollector(
            name=name.strip(), frames=int(frames), track_id=track_id, timeout_s=timeout_s
        )
        with self._lock:
            self._collectors.append(collector)
        return collector

    def cancel_enrolments(self, reason: str) -> int:
        """Fail every enrolment still collecting, so its waiter returns now; returns how many.

        Why: an enrolment only ends as frames arrive; when the camera stops (node deactivated or
        shutting down) nothing would wake a waiting service call until its timeout.
        """
        with self._lock:
            pending, self._collectors = [c for c in self._collectors if not c.done], []
        for collector in pending:
            collector.cancel(reason)
        return len(pending)

    def _feed_collectors(
        self,
        tracks: Sequence[Track],
        embeddings: Sequence[np.ndarray | None],
        crops: Sequence[np.ndarray],
        fresh: Sequence[bool],
    ) -> None:
        with self._lock:
            collectors = [c for c in self._collectors if not c.done]
            self._collectors = collectors
        if not collectors:
            return
        live_ids = {t.track_id for t in self.tracker.tracks}
        by_id = {t.track_id: i for i, t in enumerate(tracks)}
        now = time.monotonic()
        for collector in collectors:
            if collector.timeout_s is not None and now - collector.started > collector.timeout_s:
                got = f"{len(collector.embeddings)}/{collector.frames}"
                collector._finish(error=f"timed out after {collector.timeout_s:g} s with {got} frames")
                continue
            if collector.track_id is None:
                if not tracks:
                    continue
                largest = max(range(len(tracks)), key=lambda i: _area(tracks[i].box))
                collector.track_id = tracks[largest].track_id
            elif collector.track_id not in live_ids:
                collector._finish(error=f"track {collector.track_id} is not (or no longer) in view")
                continue
            index = by_id.get(collector.track_id)
            if index is None or not fresh[index]:
                continue  # coasting through a missed detection, or its identity was not computed now
            if embeddings[index] is None:
                collector._finish(error="the model has no identity column: nothing to enrol")
                continue
            collector.embeddings.append(embeddings[index])
            collector.crops.append(crops[index])
            if len(collector.embeddings) >= collector.frames:
                self._commit(collector)

    def _commit(self, collector: EnrolmentCollector) -> None:
        # Under the collector's lock so that a concurrent cancel() cannot report failure for an
        # enrolment that is being written.
        with collector._lock:
            if collector.done:
                return
            gallery = self.gallery
            if gallery is None:
                collector._finish(error="identity recognition is disabled (no gallery)")
                return
            try:
                count = self._enrol_in(
                    gallery, collector.name, np.stack(collector.embeddings), collector.crops
                )
            except GalleryError as exc:
                collector._finish(error=str(exc))
                return
            collector._finish(count=count)

    def enrol(self, name: str, embeddings: np.ndarray, crops: Sequence[np.ndarray] | None = None) -> int:
        """Store embeddings this pipeline's model made (e.g. by :meth:`embed_faces`) in its gallery,
        tagged with the model's fingerprint; returns the person's number of samples."""
        if self.gallery is None:
            raise FacePipelineError("identity recognition is disabled (no gallery): cannot enrol")
        return self._enrol_in(self.gallery, name, embeddings, crops)

    def _enrol_in(
        self, gallery: IdentityGallery, name: str, embeddings: np.ndarray, crops: Sequence[np.ndarray] | None
    ) -> int:
        fingerprint = getattr(self.predictor, "embedding_fingerprint", None)
        return gallery.enrol(name, embeddings, images=crops, fingerprint=fingerprint)

    def embed_faces(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Identity embeddings ``(K, D)`` of the largest face in each image (enrolment from files).

        Raises :class:`FacePipelineError` naming the first image without a face, or when the model
        has no identity column.  Does not touch tracking or smoothing state.
        """
        if not images:
            raise FacePipelineError("no images given")
        crops: list[np.ndarray] = []
        for i, image in enumerate(images):
            frame = _check_frame(image)
            detections: list[Detection] = self.detector.detect(frame)
            if not detections:
                # tight dataset crops (LFW, UTKFace, FER) give the detector too little context
                frame = _pad_for_detection(frame)
                detections = self.detector.detect(frame)
            if detections:
                largest = max(detections, key=lambda d: d.area)
                crops.append(self.crop_identity(frame, largest.box))
            else:
                raise FacePipelineError(f"no face found in image {i}")
        with self._lock:
            predictor, input_size = self._predictor, self.input_size
        split = self._task_split(predictor)
        batch = preprocess_batch(crops, input_size)
        predictions = predictor.predict(batch) if split is None else predictor.predict(batch, split[1])
        embeddings = [getattr(p, "embedding", None) for p in predictions]
        if any(e is None for e in embeddings):
            raise FacePipelineError("the model has no identity column: no embeddings to enrol")
        return np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings]), crops


@dataclass
class _SplitEncoding:
    """:meth:`FramePipeline.encode`'s result with two framings: each crop's encoding for its columns."""

    faces: Any  # None when every column is an identity column
    identity: Any  # None when no face's identity is due this frame, or it is left to complete()
    rows: list[int]  # the faces ``identity`` holds, by index in the frame


def _face_rows(
    prepared: PreparedFrame, rows: list[int], member_rows: list[int] | None = None
) -> PreparedFrame:
    """The faces ``rows`` of a frame (those whose face columns run, ``attributes_every``) as the face
    columns' planning reads them: their tracks and member schedule. The caller slices the batch; the
    crops and the identity framing stay with the whole frame."""
    return dataclasses.replace(
        prepared,
        tracks=[prepared.tracks[i] for i in rows],
        crops=[],
        batch=None,
        identity_crops=None,
        identity_batch=None,
        identity_due=None,
        members_due=None if prepared.members_due is None else [prepared.members_due[i] for i in rows],
        attributes_due=None,
        encoded=None,
        encoded_by=None,
        member_rows=member_rows,
        attribute_rows=None,
    )


def _due_rows(prepared: PreparedFrame) -> list[int]:
    """The faces whose identity is due this frame (all without ``identity_due``)."""
    if prepared.identity_due is None:
        return list(range(len(prepared.tracks)))
    return [i for i, due in enumerate(prepared.identity_due) if due]


@dataclass
class _HeldMembers:
    """A track's standalone members' probabilities, held for its next frames (``standalone_every``)."""

    model: Any  # the predictor's model that made them: another model's are not reused
    members: dict[str, np.ndarray]  # task -> the members' mean probabilities
    columns: dict[str, np.ndarray]  # task -> the column's own probabilities on that frame
    refresh: bool = False  # the column's answer changed since: run the members on the next frame


def _total_variation(p: Any, q: Any) -> float:
    """Half the L1 distance of two probability vectors: the share of the mass that moved (0..1)."""
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def _column_alone(task: Any) -> Any:
    """A task prediction with the column's own probabilities instead of its mix with the members."""
    column = np.asarray(task.column)
    index = int(np.argmax(column))
    return dataclasses.replace(
        task, label=task.labels[index], index=index, confidence=float(column[index]), probabilities=column
    )


def _uniform_members(
    predictor: Any, rows: int, count: int
) -> tuple[list[int], dict[int, dict[str, np.ndarray]]]:
    """A member plan for :meth:`FramePipeline.run_model`: the members run on the first ``rows`` faces,
    the others hold uniform probabilities."""
    model = predictor.model
    tasks = list(getattr(model, "standalone", {}))
    held = {
        i: {
            name: np.full(len(model.specs[name].labels), 1.0 / len(model.specs[name].labels), np.float32)
            for name in tasks
        }
        for i in range(rows, count)
    }
    return list(range(rows)), held


def _merged(faces: Sequence[Any], named: Sequence[Any]) -> list[Any]:
    """Per face, the face-attribute columns' predictions with the identity columns' and their embedding."""
    if len(faces) != len(named):
        raise FacePipelineError(f"predictor returned {len(faces)} and {len(named)} results for one frame")
    return [
        dataclasses.replace(face, tasks={**face.tasks, **other.tasks}, embedding=other.embedding)
        for face, other in zip(faces, named, strict=True)
    ]


def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))


def _check_frame(rgb: np.ndarray) -> np.ndarray:
    frame = np.asarray(rgb)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.size == 0:
        raise FacePipelineError(
            f"frame must be a non-empty RGB uint8 (H, W, 3) array, got {frame.dtype} {frame.shape}"
        )
    return frame


def _check_gallery_fits(gallery: IdentityGallery | None, predictor: Any) -> None:
    """A gallery enrolled with another model (other embedding length or weights) is one clear error up
    front, not a failed match, or worse a wrong name, on every frame."""
    if gallery is not None:
        gallery.check_model(
            getattr(predictor, "embedding_dim", None), getattr(predictor, "embedding_fingerprint", None)
        )


def _input_size_of(predictor: Any) -> int:
    """The model input size from the predictor (``input_size`` or ``model.config.input_size``)."""
    for getter in (
        lambda p: p.input_size,
        lambda p: p.model.config.input_size,
    ):
        try:
            size = getter(predictor)
        except AttributeError:
            continue
        if isinstance(size, int | np.integer) and size > 0:
            return int(size)
    raise FacePipelineError("cannot tell the model input size from the predictor: pass input_size")


# -- debug drawing ----------------------------------------------------------------------------
def _track_colour(track_id: int) -> tuple[int, int, int]:
    hue = (track_id * 0.61803398875) % 1.0  # golden-ratio hues: neighbouring ids look different
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _face_lines(face: FaceResult, order: Sequence[str]) -> list[str]:
    head = f"#{face.track_id}"
    if face.identity:
        head += f" {face.identity} {face.identity_confidence:.2f}"
    names = [n for n in order if n in face.tasks and n != IDENTITY_TASK]
    names += [n for n in face.tasks if n not in names and n != IDENTITY_TASK]
    return [head] + [f"{n}: {face.tasks[n].label} {face.tasks[n].confidence:.2f}" for n in names]


def draw_annotations(
    rgb: np.ndarray,
    frame_result: FrameResult,
    task_order: Sequence[str] = ("gender", "age", "emotion"),
    line_formatter: Callable[[FaceResult], list[str]] | None = None,
) -> np.ndarray:
    """A copy of the frame with each face's box, key-points (colour per track) and labels drawn on it."""
    canvas = np.array(_check_frame(rgb), dtype=np.uint8, copy=True, order="C")
    height, width = canvas.shape[:2]
    scale = float(np.clip(min(width, height) / 800.0, 0.35, 1.2))
    thickness = max(1, round(scale * 2))
    for face in frame_result.faces:
        colour = _track_colour(face.track_id)
        x1, y1, x2, y2 = (round(float(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        for px, py in [] if face.keypoints is None else np.asarray(face.keypoints).reshape(-1, 2):
            if np.isfinite(px) and np.isfinite(py):
                cv2.circle(canvas, (round(float(px)), round(float(py))), thickness + 1, colour, -1)
        lines = line_formatter(face) if line_formatter else _face_lines(face, task_order)
        (_, text_h), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        step = text_h + base + 2
        y = y2 + step if y2 + step * len(lines) < height else max(step, y1 - step * (len(lines) - 1) - 4)
        for line in lines:
            (text_w, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            x = int(np.clip(x1, 0, max(width - text_w, 0)))
            cv2.rectangle(canvas, (x, y - text_h - 2), (x + text_w + 2, y + base), (0, 0, 0), -1)
            cv2.putText(canvas, line, (x + 1, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
            y += step
    return canvas


def _pad_for_detection(image: np.ndarray) -> np.ndarray:
    """Half the size again on every side, replicated: a tight face crop becomes a detectable face."""
    height, width = image.shape[:2]
    return cv2.copyMakeBorder(image, height // 2, height // 2, width // 2, width // 2, cv2.BORDER_REPLICATE)


# ------------------------------------------------------------------------------------ overlapped stages
_END = object()


def overlapped(
    items: Iterable[_T], first_stage: Callable[[_T], _U], depth: int = 1
) -> Iterator[tuple[_T, _U]]:
    """Yield ``(item, first_stage(item))`` in order, computing the next ones in a background thread.

    With ``first_stage`` = decode + :meth:`FramePipeline.prepare` and the caller running
    :meth:`FramePipeline.complete`, detection of frame t+1 overlaps the model on frame t (native
    code in both releases the GIL).  At most ``depth`` prepared items wait, so memory stays bounded.
    An exception of ``first_stage`` is raised here, at its item's turn; stopping early (``break``,
    an exception in the caller) stops the thread.
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(entry: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                try:
                    entry: Any = (item, first_stage(item), None)
                except Exception as exc:  # handed to the consumer, raised at this item's turn
                    entry = (item, None, exc)
                if not put(entry) or entry[2] is not None:
                    return
        except Exception as exc:  # the iterator itself failed (e.g. a corrupt file)
            put((None, None, exc))
            return
        finally:
            put(_END)

    worker = threading.Thread(target=produce, name="pipeline-first-stage", daemon=True)
    worker.start()
    try:
        while True:
            entry = handoff.get()
            if entry is _END:
                return
            item, value, error = entry
            if error is not None:
                raise error
            yield item, value
    finally:
        stop.set()
        worker.join(timeout=5.0)
