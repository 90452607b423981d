"""The ``facial_perception`` lifecycle node: camera images in, ``FaceArray`` out.

The node only adapts ROS to the library: :class:`pipeline.FramePipeline` does the work
(detect -> track -> one model batch -> smooth -> identify), :class:`ColumnTrainer` trains new
columns in the background, :class:`pipeline.IdentityGallery` stores enrolled people.

Lifecycle:
  * configure  -- load the model (``model_path``, else ``columns_dir/current.safetensors``, else the
    shipped ``models/default.safetensors``, else an *untrained* lite model with a loud warning), the
    detector, tracker, smoother and gallery; create publishers, services and the action server.
  * activate   -- subscribe to the camera (SensorDataQoS, reliability from ``image_reliability``) and
    start the worker thread; publishers go live.
  * deactivate -- unsubscribe, stop the worker, answer live enrolments still waiting for frames;
    nothing is published while inactive.
  * cleanup    -- drop everything and free the model (and the CUDA cache).

Only the newest frame is processed: the subscription callback puts each message into a one-slot
buffer (overwriting, and counting, the frame that was still waiting), and a worker thread takes
from it.  No queue can grow, and a slow model means skipped frames, never growing latency.

    python -m facial_perception.ros.perception_node --ros-args --params-file config/perception.yaml
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import Executor, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CompressedImage, Image

from facial_perception.action import AddTaskColumn
from facial_perception.core.checkpoint import DEFAULT_MODEL
from facial_perception.core.preprocess import preprocess_batch
from facial_perception.msg import FaceArray, TrainingStatus
from facial_perception.pipeline.detection import DetectorError, make_detector
from facial_perception.pipeline.frame_pipeline import FacePipelineError, FramePipeline, draw_annotations
from facial_perception.pipeline.framing import Framing
from facial_perception.pipeline.gallery import DEFAULT_IDENTITY_THRESHOLD, GalleryError, IdentityGallery
from facial_perception.pipeline.images import ImageDecodeError
from facial_perception.pipeline.smoothing import PredictionSmoother, SmootherError
from facial_perception.pipeline.tracking import FaceTracker, TrackerError
from facial_perception.ros.column_training import (
    ColumnRequest,
    ColumnRequestError,
    ColumnTrainer,
    TrainingState,
    current_model_path,
    describe_request,
)
from facial_perception.ros.conversions import (
    compressed_msg_to_rgb,
    face_array_from_result,
    image_msg_to_rgb,
    rgb_to_image_msg,
    stamp_to_ns,
    task_info_msg,
    training_status_msg,
)
from facial_perception.ros.demo_camera import compressed_topic
from facial_perception.ros.executors import PooledExecutor
from facial_perception.ros.spinning import spin_until_shutdown
from facial_perception.srv import EnrolIdentity, ForgetIdentity, GetTrainingStatus, ListIdentities, ListTasks

__all__ = ["NODE_NAME", "LatestFrame", "ModelSource", "PerceptionNode", "main", "select_model"]

NODE_NAME = "facial_perception"
#: The trained default model shipped inside the package (written by the training pipeline).
UNTRAINED_WARNING = (
    "weights are untrained: no trained model found (model_path unset, no {current}, no {default}); "
    "using a randomly initialised 'lite' model -- faces are detected and tracked, but identity/age/gender/"
    "emotion labels are meaningless until a trained checkpoint is installed"
)


# ------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class _Param:
    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None
    dynamic: bool = False  # may change while configured (else: only in the unconfigured state)


PARAMETERS: tuple[_Param, ...] = (
    _Param(
        "image_topic", "/camera/image_raw", "Camera topic (raw Image; '<topic>/compressed' when compressed)"
    ),
    _Param("input_type", "raw", "raw (sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage)"),
    _Param("image_reliability", "best_effort", "Image subscription reliability: best_effort or reliable"),
    _Param(
        "processing_rate",
        0.0,
        "Max processed frames per second; 0 = as fast as frames arrive",
        (0.0, 1000.0),
        dynamic=True,
    ),
    _Param("device", "auto", "Inference device: auto, cpu, cuda or cuda:N"),
    _Param("half", "auto", "fp16 inference: auto (on CUDA), true or false"),
    _Param(
        "mirror_average",
        True,
        "Average a column's probabilities over the face and its mirror image where the model asks for it "
        "(v4: emotion, gender, age; v5, v6: none; about twice the model's time per face); false: faces only",
    ),
    _Param(
        "standalone_members",
        True,
        "Average a column with its standalone members (own encoder; shipped model: gender, +0.8 points "
        "on validation for one more encoder pass per face, ~30 % fewer frames/s); false: the columns alone",
    ),
    _Param(
        "fuse_columns",
        True,
        "Run the frozen task columns as one stack of wide layers (same results, fewer tensor ops: "
        "docs/PIPELINE.md); false: one column after the other, as in training",
    ),
    _Param(
        "overlap_stages",
        True,
        "Detect the next frame while the model runs on this one (worker threads per stage; see "
        "encoder_stage); false: one after the other",
    ),
    _Param(
        "encoder_stage",
        True,
        "With overlap_stages: the model's encoder in a third worker thread, its columns in the second, so "
        "up to three frames are in flight (max_frames_in_flight); false: the whole model in one thread",
    ),
    _Param(
        "max_frames_in_flight",
        2,
        "With overlap_stages: most frames between taking a camera frame and publishing its faces; the "
        "first stage takes the newest frame only when one finishes, so when the model is slower than "
        "the camera frames are skipped at the input instead of waiting between stages (lower latency); "
        "0 = as many as the stages and their hand-over slots hold (up to 5)",
        (0, 5),
    ),
    _Param(
        "cpu_threads",
        1,
        "torch threads for CPU inference (0 = torch's default, all cores); 1 leaves the other cores to "
        "detection, DDS and the camera driver",
        (0, 256),
    ),
    _Param(
        "model_path",
        "",
        "Checkpoint (.safetensors); '' = columns_dir/current.safetensors or the shipped model",
    ),
    _Param(
        "columns_dir",
        "~/.local/share/facial_perception/models",
        "Folder where the model with runtime-added columns is persisted",
    ),
    _Param("detector", "blazeface_full", "Face detector: blazeface_full, blazeface (near), haar, auto"),
    _Param("detection_threshold", 0.6, "Minimum detector score", (0.0, 1.0)),
    _Param(
        "detect_every",
        1,
        "Run the detector on every n-th processed frame; in between, faces follow their tracks' "
        "motion (less CPU; new faces found up to n-1 frames late)",
        (1, 30),
    ),
    _Param("max_faces", 10, "Most faces per frame (largest first)", (1, 64)),
    _Param(
        "identity_every",
        3,
        "Run the identity columns, on their own crop, on a track's first frame and then every n-th; in "
        "between its last identity stands (saves most of the second encoder pass)",
        (1, 30),
    ),
    _Param(
        "standalone_every",
        3,
        "Run the columns' standalone members (their own encoder each) on a track's first frame and then "
        "every n-th; in between their last probabilities for the track stay in the mix",
        (1, 30),
    ),
    _Param(
        "attributes_every",
        1,
        "Run the face columns (shared encoder, every column but the identity ones on their own crop, "
        "and their standalone members) on a track's first frame and then every n-th; in between the "
        "track's last predictions stand (less CPU per frame; labels refresh every n frames)",
        (1, 30),
    ),
    _Param("min_face_size", 24, "Smallest face side in pixels", (8, 4096)),
    _Param(
        "crop_margin",
        -1.0,
        "Margin added around the detector box on every side, times its side, for every column; < 0 = "
        "the framing measured for the detector (a tight crop for emotion, gender and age, a looser one "
        "for identity: docs/DATA.md)",
        (-1.0, 2.0),
    ),
    _Param(
        "crop_offset_y",
        0.0,
        "With crop_margin >= 0: shift of the crop centre in box heights (negative = up)",
        (-1.0, 1.0),
    ),
    _Param("tracker_iou", 0.3, "Minimum IoU to continue a track", (0.0, 1.0)),
    _Param("track_max_missed", 4, "Frames a track survives without a detection", (0, 100)),
    _Param("smoothing", 0.6, "Temporal smoothing of probabilities per track (0 = off)", (0.0, 0.99)),
    _Param("identity_enabled", True, "Recognise enrolled people (false: identity field is empty)"),
    _Param("gallery_path", "~/.local/share/facial_perception/gallery.db", "SQLite identity gallery (0600)"),
    _Param(
        "identity_threshold",
        DEFAULT_IDENTITY_THRESHOLD,
        "Cosine similarity below which a face is 'unknown' (default: <= 5 % of strangers named, 20 enrolled)",
        (0.0, 1.0),
        dynamic=True,
    ),
    _Param(
        "known_identity_threshold",
        1.01,
        "Confidence above which a face the gallery does not know is named after the identity column's "
        "trained people (> 1 never)",
        (0.0, 1.01),
        dynamic=True,
    ),
    _Param("store_face_images", False, "Keep enrolment face crops in the gallery (privacy: off by default)"),
    _Param(
        "enrol_frames",
        10,
        "Frames collected by a live enrolment when the request says 0",
        (1, 1000),
        dynamic=True,
    ),
    _Param(
        "enrol_timeout",
        10.0,
        "Seconds a live enrolment waits for frames when the request says 0",
        (0.5, 600.0),
        dynamic=True,
    ),
    _Param("training_epochs", 5, "Epochs of an added column when the goal says 0", (1, 1000), dynamic=True),
    _Param(
        "publish_debug_image", True, "Publish ~/debug_image (only while someone subscribes)", dynamic=True
    ),
    _Param("diagnostics_period", 1.0, "Seconds between /diagnostics messages", (0.1, 60.0)),
)
_CHOICES = {
    "input_type": ("raw", "compressed"),
    "image_reliability": ("best_effort", "reliable"),
    "half": ("auto", "true", "false"),
}
# Diagnostics thresholds (hri_face_detect uses 500 ms / 2 s as well).
LATENCY_WARN_MS, LATENCY_ERROR_MS = 500.0, 2000.0


def _descriptor(param: _Param) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=param.description)
    if param.name in _CHOICES:
        descriptor.additional_constraints = "one of: " + ", ".join(_CHOICES[param.name])
    if param.range is not None:
        low, high = param.range
        if isinstance(param.default, int) and not isinstance(param.default, bool):
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
        else:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(low), to_value=float(high))
            ]
    if not param.dynamic:
        descriptor.additional_constraints = (
            descriptor.additional_constraints + "; " if descriptor.additional_constraints else ""
        ) + "applied on configure (change it while the node is unconfigured)"
    return descriptor


# ------------------------------------------------------------------------------------------- model choice
@dataclass(frozen=True)
class ModelSource:
    """Which weights the node loads and why (``path`` None = untrained lite model)."""

    path: Path | None
    reason: str

    @property
    def untrained(self) -> bool:
        return self.path is None


def select_model(model_path: str, columns_dir: str) -> ModelSource:
    """``model_path`` if set; else the persisted model with added columns; else the shipped default."""
    if model_path.strip():
        return ModelSource(Path(model_path).expanduser(), "model_path parameter")
    current = current_model_path(columns_dir)
    if current.is_file():
        return ModelSource(current, "model with runtime-added columns (columns_dir)")
    if DEFAULT_MODEL.is_file():
        return ModelSource(DEFAULT_MODEL, "shipped default model")
    return ModelSource(None, "untrained lite model (no trained checkpoint found)")


def _load_predictor(
    source: ModelSource,
    device: str,
    half: bool | None,
    mirror_average: bool = True,
    fuse_columns: bool = True,
    standalone_members: bool = True,
) -> tuple[Any, Any]:
    """``(FacePredictor, ProgressiveNet)`` for ``source``; imports torch lazily (slow first import)."""
    from facial_perception.core.inference import FacePredictor

    if source.path is None:
        from facial_perception.core.config import get_config
        from facial_perception.core.progressive import ProgressiveNet, default_task_specs

        model = ProgressiveNet(get_config("lite"), default_task_specs()).eval()
        predictor = FacePredictor(
            model, device=device, half=half, mirror_average=mirror_average, fuse_columns=fuse_columns
        )
    else:
        predictor = FacePredictor.from_checkpoint(
            source.path,
            device=device,
            half=half,
            mirror_average=mirror_average,
            fuse_columns=fuse_columns,
            standalone_members=standalone_members,
        )
    return predictor, predictor.model


# ------------------------------------------------------------------------------------------- frame buffer
class LatestFrame:
    """A one-slot mailbox: ``put`` overwrites (counting the dropped frame), ``take`` waits for the newest."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self.dropped = 0
        self.received = 0

    def put(self, item: Any) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self.received += 1
            self._cond.notify()

    def take(self, timeout: float) -> Any:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def clear(self) -> None:
        with self._cond:
            self._item = None
            self._cond.notify_all()


class _Stats:
    """Rolling per-frame figures for diagnostics (bounded: the last 300 frames)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies_ms: deque[float] = deque(maxlen=300)
        self.publish_times: deque[float] = deque(maxlen=300)
        self.processed = 0
        self.bad_frames = 0
        self.errors = 0

    def record(self, latency_ms: float) -> None:
        with self.lock:
            self.latencies_ms.append(latency_ms)
            self.publish_times.append(time.monotonic())
            self.processed += 1

    def fps(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        with self.lock:
            recent = [t for t in self.publish_times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def latency(self, q: float) -> float:
        with self.lock:
            values = list(self.latencies_ms)
        return float(np.percentile(values, q)) if values else math.nan


# ------------------------------------------------------------------------------------------- the node
class PerceptionNode(LifecycleNode):
    """Lifecycle perception node; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        for param in PARAMETERS:
            self.declare_parameter(param.name, param.default, _descriptor(param))
        self._warn_unknown_overrides()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._configured = False
        self._service_group = MutuallyExclusiveCallbackGroup()  # quick services
        self._slow_group = ReentrantCallbackGroup()  # live enrolment and the action wait for frames/training
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._reset_state()

    def _reset_state(self) -> None:
        self.pipeline: FramePipeline | None = None
        self.model: Any = None
        self.model_source: ModelSource | None = None
        self.gallery: IdentityGallery | None = None
        self.trainer: ColumnTrainer | None = None
        self._column_meta: dict[str, dict[str, Any]] = {}
        self._frames = LatestFrame()
        self._stats = _Stats()
        self._worker: threading.Thread | None = None
        # overlap_stages: the worker prepares (decode, detect, track, crop) and hands over through
        # one-slot queues to the later stages' threads: [encoder (encoder_stage),] model (columns,
        # smooth, identify, publish)
        self._stage_workers: list[threading.Thread] = []
        self._handoff: queue.Queue[Any] | None = None
        # max_frames_in_flight: a token per frame between the first stage and publication
        self._in_flight: threading.BoundedSemaphore | None = None
        self._stop = threading.Event()
        self._subscription: Any = None
        self._entities: list[Any] = []  # services, action server, timers: destroyed on cleanup
        self._faces_pub: Any = None
        self._debug_pub: Any = None
        self._diag_pub: Any = None
        self._status_pub: Any = None
        self._frame_seq = 0
        self._last_process = 0.0

    # ---------------------------------------------------------------------------------- parameters
    def _warn_unknown_overrides(self) -> None:
        """One warning for ``-p`` / params-file values that name no parameter of this node.

        rclpy keeps such overrides silently, so a typo (``checkpoint`` for ``model_path``) would run the
        node with the default. ``qos_overrides.*`` are declared later, with the publishers.
        """
        overrides = getattr(self, "_parameter_overrides", {})  # rclpy's; no public accessor
        unknown = sorted(
            name
            for name in overrides
            if not self.has_parameter(name) and not name.startswith("qos_overrides.")
        )
        if unknown:
            self.get_logger().warning(
                f"ignoring unknown parameter(s) {', '.join(unknown)}: this node has no such parameter "
                f"(its parameters: ros2 param list /{NODE_NAME}; docs/ROS_NODE.md)"
            )

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _on_set_parameters(self, params: Sequence[Parameter]) -> SetParametersResult:
        """Validate choices; configure-time parameters only change while unconfigured."""
        dynamic = {p.name for p in PARAMETERS if p.dynamic}
        for param in params:
            if param.name in _CHOICES and str(param.value) not in _CHOICES[param.name]:
                return SetParametersResult(
                    successful=False, reason=f"{param.name} must be one of {_CHOICES[param.name]}"
                )
            if self._configured and param.name not in dynamic and param.name in {p.name for p in PARAMETERS}:
                return SetParametersResult(
                    successful=False,
                    reason=f"{param.name} is applied on configure: deactivate and clean up the node first",
                )
        for param in params:
            if param.name == "identity_threshold" and self.gallery is not None:
                self.gallery.threshold = float(param.value)
            if param.name == "known_identity_threshold" and self.pipeline is not None:
                self.pipeline.known_identity_threshold = float(param.value)
        return SetParametersResult(successful=True)

    # ---------------------------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model, detector, tracker, gallery; create publishers, services and the action."""
        log = self.get_logger()
        try:
            self._build_pipeline()
        except (
            DetectorError,
            GalleryError,
            TrackerError,
            SmootherError,
            ImportError,
            OSError,
            ValueError,
            RuntimeError,
        ) as exc:  # CheckpointError and device errors are ValueError/RuntimeError too
            log.error(
                f"configure failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            self._release()
            return TransitionCallbackReturn.FAILURE
        self._create_interfaces()
        self._configured = True
        tasks = ", ".join(self.model.task_names)
        log.info(f"configured: model from {self.model_source.reason} [{tasks}] on {self._device_name()}")
        return super().on_configure(state)

    def _crop_framing(self) -> Framing | None:
        """One framing for every column when the user set ``crop_margin``; None: the detector's own."""
        margin = float(self._p("crop_margin"))
        return Framing(margin, float(self._p("crop_offset_y"))) if margin >= 0 else None

    def _warm_up(self) -> None:
        """Run the detector and a model batch once, so the first camera frame is not the slow one."""
        assert self.pipeline is not None
        size = self.pipeline.input_size
        self.pipeline.detector.detect(np.full((480, 640, 3), 127, np.uint8))
        grey = np.full((size, size), 127, np.uint8)
        for faces in (1, 4):
            self.pipeline.run_model(preprocess_batch([grey] * faces, size))
        # The model, detector and ROS objects live as long as the node: move them out of the cyclic
        # collector's reach, so that its full collections stay short while frames are processed.
        gc.collect()
        gc.freeze()

    def _build_pipeline(self) -> None:
        log = self.get_logger()
        self.model_source = select_model(str(self._p("model_path")), str(self._p("columns_dir")))
        if self.model_source.untrained:
            columns_dir = str(self._p("columns_dir"))
            log.warning(
                UNTRAINED_WARNING.format(current=current_model_path(columns_dir), default=DEFAULT_MODEL)
            )
        half = {"auto": None, "true": True, "false": False}[str(self._p("half"))]
        threads = int(self._p("cpu_threads"))
        if threads > 0:  # process-wide; measured: 1 thread gave more fps and less CPU (docs/BENCHMARK_ROS.md)
            torch.set_num_threads(threads)
        predictor, self.model = _load_predictor(
            self.model_source,
            str(self._p("device")),
            half,
            bool(self._p("mirror_average")),
            bool(self._p("fuse_columns")),
            bool(self._p("standalone_members")),
        )
        self._half = half
        # Per-column training records (val accuracy, trained_at); kept on the model so that the next
        # save of an added column carries the earlier columns' records too.
        self.model.training_meta = dict(getattr(predictor, "metadata", {}).get("training", {}) or {})
        self._column_meta = dict(self.model.training_meta)
        detector = make_detector(
            str(self._p("detector")),
            min_score=float(self._p("detection_threshold")),
            min_face_size=float(self._p("min_face_size")),
            max_faces=int(self._p("max_faces")),
        )
        tracker = FaceTracker(
            iou_threshold=float(self._p("tracker_iou")), max_missed=int(self._p("track_max_missed"))
        )
        smoother = PredictionSmoother(alpha=1.0 - float(self._p("smoothing")))
        self.gallery = IdentityGallery(
            str(self._p("gallery_path")),
            threshold=float(self._p("identity_threshold")),
            store_images=bool(self._p("store_face_images")),
        )
        self.pipeline = FramePipeline(
            predictor,
            detector,
            tracker=tracker,
            smoother=smoother,
            gallery=self.gallery if bool(self._p("identity_enabled")) else None,
            max_faces=int(self._p("max_faces")),
            known_identity_threshold=float(self._p("known_identity_threshold")),
            detect_every=int(self._p("detect_every")),
            identity_every=int(self._p("identity_every")),
            standalone_every=int(self._p("standalone_every")),
            attributes_every=int(self._p("attributes_every")),
            framings=self._crop_framing(),
        )
        self._warm_up()
        self.trainer = ColumnTrainer(
            str(self._p("columns_dir")),
            device=self._training_device(),
            default_epochs=int(self._p("training_epochs")),
            on_status=self._publish_training_status,
            log=lambda text: self.get_logger().error(text),
        )

    def _create_interfaces(self) -> None:
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._faces_pub = self.create_lifecycle_publisher(FaceArray, "~/faces", reliable)
        self._debug_pub = self.create_lifecycle_publisher(Image, "~/debug_image", qos_profile_sensor_data)
        self._diag_pub = self.create_lifecycle_publisher(DiagnosticArray, "/diagnostics", reliable)
        # Training can run (and finish) while the node is inactive: its status is always published.
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self._status_pub = self.create_publisher(TrainingStatus, "~/training_status", latched)
        quick, slow = self._service_group, self._slow_group
        self._entities = [
            self._status_pub,
            self.create_service(ListTasks, "~/list_tasks", self._on_list_tasks, callback_group=quick),
            self.create_service(EnrolIdentity, "~/enrol_identity", self._on_enrol, callback_group=slow),
            self.create_service(ForgetIdentity, "~/forget_identity", self._on_forget, callback_group=quick),
            self.create_service(
                ListIdentities, "~/list_identities", self._on_list_identities, callback_group=quick
            ),
            self.create_service(
                GetTrainingStatus, "~/get_training_status", self._on_training_status, callback_group=quick
            ),
            ActionServer(
                self,
                AddTaskColumn,
                "~/add_task_column",
                execute_callback=self._execute_add_column,
                goal_callback=lambda _goal: GoalResponse.ACCEPT,
                cancel_callback=lambda _goal: CancelResponse.ACCEPT,
                callback_group=slow,
            ),
            self.create_timer(
                float(self._p("diagnostics_period")),
                self._publish_diagnostics,
                callback_group=self._timer_group,
            ),
        ]
        self._publish_training_status(self.trainer.status)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the camera and start the worker thread."""
        topic = str(self._p("image_topic"))
        compressed = str(self._p("input_type")) == "compressed"
        reliability = (
            ReliabilityPolicy.RELIABLE
            if str(self._p("image_reliability")) == "reliable"
            else ReliabilityPolicy.BEST_EFFORT
        )
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=reliability,
            durability=DurabilityPolicy.VOLATILE,
        )
        if compressed:
            topic = compressed_topic(topic)
            self._subscription = self.create_subscription(CompressedImage, topic, self._frames.put, qos)
        else:
            self._subscription = self.create_subscription(Image, topic, self._frames.put, qos)
        self._stop.clear()
        limit = int(self._p("max_frames_in_flight"))
        overlap = bool(self._p("overlap_stages"))
        self._in_flight = threading.BoundedSemaphore(limit) if overlap and limit > 0 else None
        if overlap:
            later: list[tuple[str, Callable[[Any], Any]]] = [("model", self._complete_stage)]
            if bool(self._p("encoder_stage")):
                later.insert(0, ("encoder", self._encode_stage))
            inboxes: list[queue.Queue[Any]] = [queue.Queue(maxsize=1) for _ in later]
            self._handoff = inboxes[0]
            for i, (name, work) in enumerate(later):
                outbox = inboxes[i + 1] if i + 1 < len(later) else None
                worker = threading.Thread(
                    target=self._stage_work,
                    args=(inboxes[i], work, outbox),
                    name=f"perception-{name}-worker",
                    daemon=True,
                )
                worker.start()
                self._stage_workers.append(worker)
        self._worker = threading.Thread(target=self._work, name="perception-worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"active: subscribed to {self.resolve_topic_name(topic)} "
            f"({'sensor_msgs/CompressedImage' if compressed else 'sensor_msgs/Image'}, QoS KEEP_LAST 1, "
            f"{reliability.name.lower()}, volatile); publishing {self.resolve_topic_name('~/faces')}"
        )
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe and stop the worker (the model stays loaded)."""
        self._stop_worker()
        self.get_logger().info("inactive: unsubscribed from the camera")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroy interfaces and free the model."""
        self._stop_worker()
        self._release()
        self.get_logger().info("unconfigured: model released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self) -> None:
        self._stop.set()
        self._frames.clear()
        if self.pipeline is not None:  # a live enrolment waiting for frames answers now
            self.pipeline.cancel_enrolments(
                "cancelled: the node stopped taking camera frames (deactivated or shut down)"
            )
        for worker in (self._worker, *self._stage_workers):
            if worker is not None:
                worker.join(timeout=10.0)
        self._worker, self._stage_workers, self._handoff = None, [], None
        if self._subscription is not None:
            self.destroy_subscription(self._subscription)
            self._subscription = None

    def _release(self) -> None:
        if self.trainer is not None:
            self.trainer.shutdown()
        for entity in self._entities:
            with contextlib.suppress(Exception):  # best effort: a half-built configure is released too
                if isinstance(entity, ActionServer):
                    entity.destroy()
                elif hasattr(entity, "cancel"):
                    self.destroy_timer(entity)
                elif hasattr(entity, "srv_type"):
                    self.destroy_service(entity)
                else:
                    self.destroy_publisher(entity)
        for pub in (self._faces_pub, self._debug_pub, self._diag_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        if self.pipeline is not None and hasattr(self.pipeline.detector, "close"):
            self.pipeline.detector.close()
        if self.gallery is not None:
            self.gallery.close()
        on_cuda = self._device_name().startswith("cuda")
        self._configured = False
        self._reset_state()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def _detector_name(self) -> str:
        """``blazeface_full (litert)``: the detector parameter and the back-end that runs it."""
        detector = self.pipeline.detector if self.pipeline is not None else None
        backend = getattr(detector, "backend", None)
        name = str(self._p("detector"))
        return f"{name} ({backend})" if backend else name

    def _device_name(self) -> str:
        predictor = self.pipeline.predictor if self.pipeline is not None else None
        return str(getattr(predictor, "device", "none"))

    def _training_device(self) -> str:
        device = str(self._p("device"))
        return "auto" if device == "auto" else device

    # ---------------------------------------------------------------------------------- frames
    def _work(self) -> None:
        """Worker thread: take the newest frame, prepare it, and complete it here or hand it over."""
        while not self._stop.is_set():
            if self._in_flight is not None and not self._in_flight.acquire(timeout=0.1):
                continue  # as many frames in flight as allowed: the camera's newest waits in its slot
            msg = self._frames.take(timeout=0.1)
            if msg is None:
                self._frame_done()
                continue
            rate = float(self._p("processing_rate"))
            if rate > 0.0:
                wait = self._last_process + 1.0 / rate - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
            self._last_process = time.monotonic()
            handed_over = False
            try:
                prepared = self._prepare(msg)
                if prepared is None:
                    continue
                handoff = self._handoff
                if handoff is None:
                    self._complete(*prepared)
                else:
                    self._hand_over(handoff, prepared)
                    handed_over = True  # its token goes with it
            except Exception as exc:  # whatever happens to one frame, the node keeps running
                self._frame_failed(exc)
            finally:
                if not handed_over:
                    self._frame_done()

    def _frame_done(self) -> None:
        """A frame left the pipeline (published, dropped or failed): the first stage may take another."""
        if self._in_flight is not None:
            self._in_flight.release()

    def _hand_over(self, outbox: queue.Queue[Any], item: Any) -> None:
        """Put into the next stage's one-slot queue once it has taken the last item (or we stop)."""
        while not self._stop.is_set():
            try:
                outbox.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _stage_work(
        self, inbox: queue.Queue[Any], work: Callable[[Any], Any], outbox: queue.Queue[Any] | None
    ) -> None:
        """A later stage's thread (overlap_stages): frames in order from ``inbox``, on to ``outbox``."""
        while not self._stop.is_set():
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                result = work(item)
            except Exception as exc:  # a failed frame is dropped; the stage goes on
                self._frame_failed(exc)
                self._frame_done()
                continue
            if outbox is not None:
                self._hand_over(outbox, result)
            else:
                self._frame_done()

    def _encode_stage(self, prepared: tuple[Any, ...]) -> tuple[Any, ...]:
        """Encoder stage (encoder_stage): the model's encoder on the prepared frame's faces."""
        self.pipeline.encode(prepared[2])
        return prepared

    def _complete_stage(self, prepared: tuple[Any, ...]) -> None:
        self._complete(*prepared)

    def _frame_failed(self, exc: Exception) -> None:
        if isinstance(exc, FacePipelineError):
            self._stats.bad_frames += 1
            self.get_logger().warning(f"skipping frame: {exc}", throttle_duration_sec=5.0)
            return
        self._stats.errors += 1
        self.get_logger().error(
            f"frame processing failed: {type(exc).__name__}: {exc}", throttle_duration_sec=5.0
        )

    def _prepare(self, msg: Image | CompressedImage) -> tuple[Any, ...] | None:
        """First stage: decode, detect, track, crop; None for a bad frame (counted and logged)."""
        t0 = time.perf_counter()
        try:
            rgb = compressed_msg_to_rgb(msg) if isinstance(msg, CompressedImage) else image_msg_to_rgb(msg)
        except ImageDecodeError as exc:
            self._stats.bad_frames += 1
            self.get_logger().warning(f"skipping bad frame: {exc}", throttle_duration_sec=5.0)
            return None
        decode_ms = (time.perf_counter() - t0) * 1000.0
        stamp_ns = stamp_to_ns(msg.header.stamp)
        prepared = self.pipeline.prepare(rgb, stamp=stamp_ns / 1e9, decode_ms=decode_ms)
        return msg, rgb, prepared, stamp_ns, t0

    def _complete(
        self, msg: Image | CompressedImage, rgb: np.ndarray, prepared: Any, stamp_ns: int, t0: float
    ) -> None:
        """Second stage: model, smoothing, identity; publish the FaceArray (and the debug image)."""
        result = self.pipeline.complete(prepared)
        self._frame_seq += 1
        now_ns = self.get_clock().now().nanoseconds
        # An unstamped camera (stamp 0) would give a meaningless latency: fall back to processing time.
        latency_ms = (now_ns - stamp_ns) / 1e6 if stamp_ns > 0 else (time.perf_counter() - t0) * 1000.0
        out = face_array_from_result(
            result,
            msg.header,
            rgb.shape[1],
            rgb.shape[0],
            kinds={name: spec.kind for name, spec in self.model.specs.items()},
            identity_enabled=bool(self._p("identity_enabled")),
            latency_ms=latency_ms,
            frame_seq=self._frame_seq,
        )
        self._faces_pub.publish(out)
        self._stats.record(latency_ms)
        if bool(self._p("publish_debug_image")) and self._debug_pub.get_subscription_count() > 0:
            self._debug_pub.publish(rgb_to_image_msg(draw_annotations(rgb, result), msg.header))

    # ---------------------------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        stats, frames = self._stats, self._frames
        p50, p95 = stats.latency(50), stats.latency(95)
        fps = stats.fps()
        status = DiagnosticStatus(name=f"{self.get_name()}: face perception", hardware_id=self._device_name())
        status.level, status.message = DiagnosticStatus.OK, "ok"
        if frames.received == 0:
            status.level, status.message = DiagnosticStatus.WARN, "no image received yet"
        elif stats.processed == 0:
            status.level, status.message = DiagnosticStatus.ERROR, "images received but none processed"
        elif p95 > LATENCY_ERROR_MS:
            status.level, status.message = (
                DiagnosticStatus.ERROR,
                f"latency p95 {p95:.0f} ms > {LATENCY_ERROR_MS:.0f}",
            )
        elif p95 > LATENCY_WARN_MS:
            status.level, status.message = (
                DiagnosticStatus.WARN,
                f"latency p95 {p95:.0f} ms > {LATENCY_WARN_MS:.0f}",
            )
        if (
            self.model_source is not None
            and self.model_source.untrained
            and status.level == DiagnosticStatus.OK
        ):
            status.level, status.message = DiagnosticStatus.WARN, "weights are untrained"
        values = {
            "fps": f"{fps:.2f}",
            "latency_p50_ms": f"{p50:.1f}",
            "latency_p95_ms": f"{p95:.1f}",
            "frames_received": str(frames.received),
            "frames_processed": str(stats.processed),
            "dropped_frames": str(frames.dropped),
            "bad_frames": str(stats.bad_frames),
            "processing_errors": str(stats.errors),
            "model": str(self.model_source.path or "untrained lite") if self.model_source else "",
            "model_config": str(getattr(getattr(self.model, "config", None), "name", "")),
            "weights": "untrained" if self.model_source and self.model_source.untrained else "trained",
            "device": self._device_name(),
            "detector": self._detector_name(),
            "tasks": ",".join(self.model.task_names) if self.model is not None else "",
            "image_topic": str(self._p("image_topic")),
            "training": self.trainer.status.state if self.trainer else "",
            "executor": type(self.executor).__name__ if self.executor is not None else "",
        }
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    # ---------------------------------------------------------------------------------- services
    def _on_list_tasks(self, request: ListTasks.Request, response: ListTasks.Response) -> ListTasks.Response:
        model = self.model
        response.tasks = [task_info_msg(spec, self._column_info(name)) for name, spec in model.specs.items()]
        return response

    def _column_info(self, name: str) -> dict[str, Any]:
        meta = dict(self._column_meta.get(name, {}) or {})
        if "val_accuracy" not in meta and "best_val_acc" in meta:
            meta["val_accuracy"] = meta["best_val_acc"]
        return meta

    def _on_enrol(
        self, request: EnrolIdentity.Request, response: EnrolIdentity.Response
    ) -> EnrolIdentity.Response:
        response.success, response.samples_used = False, 0
        name = request.name.strip()
        if not bool(self._p("identity_enabled")):
            response.message = "identity recognition is disabled (identity_enabled: false)"
        elif not name or name.lower() == "unknown":
            response.message = "name must be non-empty and not 'unknown'"
        elif request.image_paths:
            self._enrol_from_files(name, list(request.image_paths), response)
        else:
            self._enrol_live(name, request, response)
        level = self.get_logger().info if response.success else self.get_logger().warn
        level(f"enrol {name!r}: {response.message}")
        return response

    def _enrol_from_files(self, name: str, paths: list[str], response: EnrolIdentity.Response) -> None:
        from facial_perception.core.datasets import UnreadableImageError, read_image

        images = []
        for path in paths:
            try:
                image = read_image(Path(path).expanduser())
            except (UnreadableImageError, OSError) as exc:
                response.message = f"cannot read {path}: {exc}"
                return
            images.append(np.dstack([image] * 3) if image.ndim == 2 else image)
        try:
            embeddings, crops = self.pipeline.embed_faces(images)
        except FacePipelineError as exc:
            message = str(exc)
            for i, path in enumerate(paths):  # name the file rather than its index
                message = message.replace(f"image {i}", path) if f"image {i}" in message else message
            response.message = message
            return
        try:
            total = self.pipeline.enrol(name, embeddings, crops)
        except (GalleryError, FacePipelineError) as exc:
            response.message = str(exc)
            return
        response.success, response.samples_used = True, len(embeddings)
        response.message = f"enrolled {name!r} from {len(embeddings)} image(s); {total} sample(s) stored"

    def _enrol_live(
        self, name: str, request: EnrolIdentity.Request, response: EnrolIdentity.Response
    ) -> None:
        if self._worker is None:
            response.message = (
                "the node is not active: live enrolment needs camera frames (or give image_paths)"
            )
            return
        frames = int(request.num_frames) or int(self._p("enrol_frames"))
        timeout = float(request.timeout_s) if request.timeout_s > 0 else float(self._p("enrol_timeout"))
        try:
            collector = self.pipeline.start_enrolment(
                name, frames, int(request.track_id) or None, timeout_s=timeout
            )
        except FacePipelineError as exc:
            response.message = str(exc)
            return
        if not collector.wait(timeout + 1.0):
            collector.cancel(f"timed out after {timeout:g} s: no frames of the face arrived")
        if collector.ok:
            response.success, response.samples_used = True, len(collector.embeddings)
            response.message = (
                f"enrolled {name!r} from {len(collector.embeddings)} frame(s) of track {collector.track_id}; "
                f"{collector.count} sample(s) stored"
            )
        else:
            response.message = str(collector.error)

    def _on_forget(
        self, request: ForgetIdentity.Request, response: ForgetIdentity.Response
    ) -> ForgetIdentity.Response:
        name = request.name.strip()
        try:
            removed = bool(name) and self.gallery.forget(name)
        except GalleryError as exc:
            response.success, response.message = False, str(exc)
            return response
        response.success = removed
        response.message = f"forgot {name!r}" if removed else f"no enrolled person named {name!r}"
        return response

    def _on_list_identities(
        self, request: ListIdentities.Request, response: ListIdentities.Response
    ) -> ListIdentities.Response:
        counts = self.gallery.counts()
        response.names = sorted(counts)
        response.sample_counts = [int(counts[n]) for n in response.names]
        return response

    def _on_training_status(
        self, request: GetTrainingStatus.Request, response: GetTrainingStatus.Response
    ) -> GetTrainingStatus.Response:
        response.status = training_status_msg(self.trainer.status.to_dict())
        return response

    def _publish_training_status(self, state: TrainingState) -> None:
        if self._status_pub is not None and self.context.ok():  # not after Ctrl-C
            self._status_pub.publish(training_status_msg(state.to_dict()))

    # ---------------------------------------------------------------------------------- add column
    def _execute_add_column(self, goal_handle: Any) -> AddTaskColumn.Result:
        """Action: validate, train in the background, relay progress, report; hot swap on success."""
        goal = goal_handle.request
        request = ColumnRequest(
            name=goal.name,
            labels=list(goal.labels),
            dataset_path=goal.dataset_path,
            lateral_sources=list(goal.lateral_sources),
            epochs=int(goal.epochs),
            init_from=goal.init_from,
        )
        result = AddTaskColumn.Result()
        self.get_logger().info(describe_request(request))
        trainer = self.trainer
        try:
            trainer.start(request, self.model, self._on_column_trained)
        except ColumnRequestError as exc:
            result.success, result.message = False, str(exc)
            self.get_logger().warning(f"add column rejected: {exc}")
            goal_handle.abort()
            return result
        last: TrainingState | None = None
        while True:
            finished = trainer.wait(0.2)
            if not self.context.ok():  # Ctrl-C: the action server is gone, nothing can be reported
                trainer.cancel()
                result.success, result.message = False, "the node shut down during training"
                with contextlib.suppress(Exception):
                    goal_handle.abort()
                return result
            if goal_handle.is_cancel_requested:
                trainer.cancel()
            state = trainer.status
            if state != last:
                try:
                    goal_handle.publish_feedback(
                        AddTaskColumn.Feedback(status=training_status_msg(state.to_dict()))
                    )
                except Exception:
                    if self.context.ok():
                        raise
                    continue  # shut down between the check and the publish: handled above
                last = state
            if finished:
                break
        state = trainer.status
        result.success = state.state == "succeeded"
        result.message = state.message
        result.val_accuracy = float(state.val_accuracy) if math.isfinite(state.val_accuracy) else 0.0
        if result.success:
            result.task = task_info_msg(self.model.specs[state.task], self._column_info(state.task))
            goal_handle.succeed()
        elif state.state == "canceled" and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return result

    def _on_column_trained(self, model: Any, spec: Any, state: TrainingState) -> None:
        """Hot swap: a predictor over the trained model replaces the live one between two frames."""
        from facial_perception.core.inference import FacePredictor

        predictor = FacePredictor(
            model,
            device=str(self._p("device")),
            half=self._half,
            mirror_average=bool(self._p("mirror_average")),
            fuse_columns=bool(self._p("fuse_columns")),
            standalone_members=bool(self._p("standalone_members")),
        )
        self.pipeline.set_predictor(predictor)
        self.model = predictor.model
        self._column_meta = dict(getattr(model, "training_meta", {}) or {})
        self.model_source = ModelSource(
            current_model_path(str(self._p("columns_dir"))), "model with runtime-added columns"
        )
        self.get_logger().info(f"hot-swapped model: columns now {self.model.task_names}")


# ------------------------------------------------------------------------------------------- entry point
#: Fast DDS builtin transports the node picks for itself when the environment chooses none.
FASTDDS_TRANSPORTS = "LARGE_DATA"


def prefer_large_data_transport(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """Ask Fast DDS for its large-data transports unless the user already chose; returns what was set.

    Why: raw frames are ~0.9 MB; with ``LARGE_DATA`` (shared memory + TCP, multicast discovery
    unchanged) the node's tail latency was lower in both orders of a same-run comparison with the
    default transports (docs/BENCHMARK_ROS.md).  Only this process changes; it
    still talks to participants on the default transports.  It must run before ``rclpy.init``, and
    it does nothing for other RMWs, when ``FASTDDS_BUILTIN_TRANSPORTS`` is set (``DEFAULT`` opts
    out) or when a Fast DDS XML profile is in use.
    """
    rmw = environ.get("RMW_IMPLEMENTATION", "") or "rmw_fastrtps_cpp"
    if not rmw.startswith("rmw_fastrtps") or environ.get("FASTDDS_BUILTIN_TRANSPORTS"):
        return None
    if environ.get("FASTRTPS_DEFAULT_PROFILES_FILE") or environ.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        return None
    environ["FASTDDS_BUILTIN_TRANSPORTS"] = FASTDDS_TRANSPORTS
    return FASTDDS_TRANSPORTS


#: Environment variable choosing the node's executor: ``pooled`` (default) or ``multi_threaded``.
EXECUTOR_ENV = "FACIAL_PERCEPTION_EXECUTOR"
EXECUTOR_THREADS = 4


EXECUTORS: dict[str, Callable[[], Executor]] = {
    "pooled": lambda: PooledExecutor(num_threads=EXECUTOR_THREADS),
    "multi_threaded": lambda: MultiThreadedExecutor(num_threads=EXECUTOR_THREADS),
}


def executor_kind(environ: Mapping[str, str] = os.environ) -> str:
    """The executor ``EXECUTOR_ENV`` asks for; ``multi_threaded`` (rclpy's own) is kept for comparison.

    Why a choice at all: rclpy's ``MultiThreadedExecutor`` busy-waits in the rclpy releases we
    target (docs/ROS_NODE.md); the variable lets the benchmark measure both in one run, and lets a
    user whose rclpy is fixed go back to the stock executor.
    """
    kind = environ.get(EXECUTOR_ENV, "").strip() or "pooled"
    if kind not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV} must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    return kind


def main(args: Sequence[str] | None = None) -> int:
    """Run the node on a thread-pool executor (:class:`PooledExecutor`) until Ctrl-C / SIGTERM."""
    try:
        kind = executor_kind()
    except ValueError as exc:
        print(f"perception_node: error: {exc}", file=sys.stderr)
        return 2
    chosen = prefer_large_data_transport()
    rclpy.init(args=list(args) if args is not None else sys.argv)
    node = PerceptionNode()
    if chosen:
        node.get_logger().info(
            f"Fast DDS transports: {chosen} (for large images; set FASTDDS_BUILTIN_TRANSPORTS to choose)"
        )
    if kind != "pooled":
        node.get_logger().info(f"executor: {kind} ({EXECUTOR_ENV})")

    def release() -> None:
        node._stop_worker()
        node._release()

    return spin_until_shutdown(node, EXECUTORS[kind](), cleanup=release)


if __name__ == "__main__":
    sys.exit(main())
