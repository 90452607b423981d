"""ROS4HRI bridge: the perception node's faces republished on the REP-155 ``/humans/...`` topics.

ROS4HRI (REP-155) is the ROS standard for human-robot interaction; nodes such as
``hri_person_manager``, ``hri_engagement`` or ``rqt_human_radar`` and the ``pyhri``/``libhri``
client libraries read faces from these topics. This node adapts our ``FaceArray`` to them:

  * ``/humans/faces/tracked``            ``hri_msgs/IdsList``: the ids of the faces in view, every frame
  * ``/humans/faces/<id>/roi``           ``hri_msgs/NormalizedRegionOfInterest2D`` (c = detector score)
  * ``/humans/faces/<id>/softbiometrics`` ``hri_msgs/SoftBiometrics``: age in years (the middle of the
    age group; 60+ -> 65), gender FEMALE/MALE, their confidences
  * ``/humans/faces/<id>/expression``    ``hri_msgs/Expression``: the emotion column's label in the
    REP's words (happiness -> happy, ...), its confidence; valence and arousal stay 0 (the column is
    categorical)
  * ``/humans/faces/<id>/landmarks``     ``hri_msgs/FacialLandmarks``: the detector's six key-points in
    their REP-155 slots (pupils, nose, mouth, ears; the other 64 have c = 0)
  * ``/humans/faces/<id>/cropped`` and ``/aligned`` ``sensor_msgs/Image`` (``bgr8``,
    ``face_image_size`` square): only when ``image_topic`` is set, cut from the camera frame with
    the FaceArray's stamp; ``aligned`` is turned so that the eyes are level (``pipeline.face_images``)
  * ``/humans/candidate_matches``        ``hri_msgs/IdsMatch``: face id -> person id (the enrolled
    name, made a valid topic token) with the identity confidence, when a face is recognised or
    changes person; confidence 0 withdraws the match when the face leaves or becomes unknown

Face ids are short random strings, one per track of the perception node (``deterministic_ids``:
``f00001``-style, from the track id); per-face publishers are created when a face appears and
destroyed when it leaves. Face images are off by default: no image of a face leaves the
perception graph unless ``image_topic`` names the camera (docs/PRIVACY.md); the bridge then keeps
the camera frames newer than the last FaceArray (at most ``image_cache_frames``) to cut them from.

It is a lifecycle node (``configure`` checks ``hri_msgs`` and reads the parameters, ``activate``
subscribes). ``hri_msgs`` comes from ``apt install ros-$ROS_DISTRO-hri-msgs`` on a robot; the
wheel-based setup builds the subset in ``third_party/hri_msgs``.

    python -m facial_perception.ros.hri_bridge --ros-args -p faces_topic:=/facial_perception/faces
"""

from __future__ import annotations

import math
import random
import re
import string
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.duration import Duration
from rclpy.exceptions import InvalidTopicNameException
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.validate_full_topic_name import validate_full_topic_name
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from facial_perception.msg import Face, FaceArray
from facial_perception.pipeline.face_images import aligned_face, square_face_crop
from facial_perception.pipeline.images import ImageDecodeError, encode_raw
from facial_perception.ros.conversions import compressed_msg_to_rgb, image_msg_to_rgb, stamp_to_ns
from facial_perception.ros.demo import param_args
from facial_perception.ros.demo_camera import compressed_topic
from facial_perception.ros.spinning import spin_until_shutdown

__all__ = [
    "EXPRESSIONS",
    "HriBridge",
    "age_years",
    "expression_name",
    "face_id_for_track",
    "gender_code",
    "image_parameter_problems",
    "landmark_points",
    "main",
    "person_id",
    "start_hri_bridge",
]

#: The emotion column's FER+ labels in REP-155's ``Expression`` words; other labels pass unchanged.
EXPRESSIONS = {
    "neutral": "neutral",
    "happiness": "happy",
    "surprise": "surprised",
    "sadness": "sad",
    "anger": "angry",
    "disgust": "disgusted",
    "fear": "scared",
}
#: Years reported for an open-ended age group ("60+"): its lower bound plus this.
OPEN_AGE_GROUP_OFFSET = 5
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_OPEN = re.compile(r"^\s*(\d+)\s*\+\s*$")
_NOT_TOKEN = re.compile(r"[^0-9A-Za-z_]+")
# hri_msgs constants, repeated so that the pure helpers below need no hri_msgs import
_UNDEFINED, _FEMALE, _MALE = 0, 1, 2
#: Face.keypoints index -> the hri_msgs/FacialLandmarks slots it fills (RIGHT_PUPIL, LEFT_PUPIL, NOSE,
#: MOUTH_INNER_TOP_2 and MOUTH_INNER_BOTTOM_2 for the mouth centre, RIGHT_EAR, LEFT_EAR)
LANDMARK_SLOTS: dict[int, tuple[int, ...]] = {0: (68,), 1: (69,), 2: (30,), 3: (62, 66), 4: (0,), 5: (16,)}
#: Number of landmarks in hri_msgs/FacialLandmarks (dlib's 68 and the two pupils)
LANDMARK_COUNT = 70


def age_years(group: str) -> int | None:
    """Years for an age-group label: the middle of "25-32" (29, rounded up), "60+" -> 65; None otherwise."""
    if match := _RANGE.match(group):
        low, high = int(match[1]), int(match[2])
        return min((low + high + 1) // 2, 255)
    if match := _OPEN.match(group):
        return min(int(match[1]) + OPEN_AGE_GROUP_OFFSET, 255)
    return None


def gender_code(label: str) -> int:
    """``SoftBiometrics.gender`` for a gender label (FEMALE=1, MALE=2, anything else UNDEFINED=0)."""
    return {"female": _FEMALE, "male": _MALE}.get(label.strip().lower(), _UNDEFINED)


def expression_name(label: str) -> str:
    """REP-155's word for an emotion label (``happiness`` -> ``happy``); unknown labels lower-cased."""
    name = label.strip().lower()
    return EXPRESSIONS.get(name, name)


def person_id(name: str) -> str:
    """A persistent person id from an enrolled name, valid in topic names ("Ada Lovelace": Ada_Lovelace)."""
    token = _NOT_TOKEN.sub("_", name.strip()).strip("_")
    if not token:
        return ""
    return token if token[0].isalpha() else f"p_{token}"


def face_id_for_track(track_id: int, deterministic: bool, rng: random.Random) -> str:
    """A REP-155 face id: ``f00042`` for track 42 (deterministic), else 5 random letters."""
    if deterministic:
        return f"f{track_id:05d}"
    return "".join(rng.choices(string.ascii_lowercase, k=5))


def _unit(value: float) -> float:
    """A confidence or normalised coordinate clamped to [0, 1] (NaN -> 0): bad input never propagates."""
    return 0.0 if not math.isfinite(value) else min(max(float(value), 0.0), 1.0)


@dataclass
class _TrackedFace:
    """The publishers of one face in view and the person it was last matched to."""

    face_id: str
    roi: Any
    softbiometrics: Any
    expression: Any
    landmarks: Any = None
    cropped: Any = None
    aligned: Any = None
    person: str = ""
    missing: int = 0  # consecutive FaceArrays without this track


#: Seconds without a FaceArray (or, with face images, a camera frame) after which the diagnostics warn.
SILENCE_WARN_S = 5.0
#: FaceArrays without their camera frame, and none with, in one diagnostics period that make it warn.
MISSING_WARN_FRAMES = 5


class HriBridge(LifecycleNode):
    """Subscribes to a ``FaceArray`` topic and publishes REP-155 topics (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("hri_bridge", **kwargs)

        def declare(name: str, default: object, description: str) -> None:
            self.declare_parameter(
                name, default, ParameterDescriptor(description=description, read_only=True)
            )

        declare("faces_topic", "/facial_perception/faces", "FaceArray topic of the perception node")
        declare("humans_namespace", "/humans", "Root of the REP-155 topics")
        declare("diagnostics_period", 1.0, "Seconds between /diagnostics messages (0: none)")
        declare("face_retention", 4, "[0, 1000] frames a face may miss before it has left (keeps its id)")
        declare("deterministic_ids", False, "Face ids f<track id> (5 digits) instead of random letters")
        declare(
            "publish_matches", True, "Publish face -> person matches on <humans_namespace>/candidate_matches"
        )
        declare(
            "publish_landmarks", True, "Publish the detector's key-points on /humans/faces/<id>/landmarks"
        )
        declare(
            "image_topic",
            "",
            "Camera topic to cut /cropped and /aligned face images from (the perception node's); '' = no "
            "face images leave the bridge",
        )
        declare("input_type", "raw", "raw (sensor_msgs/Image) or compressed ('<image_topic>/compressed')")
        declare(
            "image_reliability", "best_effort", "Camera subscription reliability: best_effort or reliable"
        )
        declare(
            "face_image_size", 128, "[16, 1024] side of the square cropped and aligned face images (pixels)"
        )
        declare(
            "image_cache_frames", 30, "[1, 300] most camera frames held while waiting for their FaceArray"
        )
        self._hri: Any = None  # the hri_msgs.msg module, imported at configure
        self._faces: dict[int, _TrackedFace] = {}
        self._rng = random.Random()
        self._subscription: Any = None
        self._tracked_pub: Any = None
        self._matches_pub: Any = None
        self.bad_messages = 0
        self.republished = 0  # FaceArray messages turned into REP-155 messages since activation
        self.matches_published = 0
        self._last_faces_at: float | None = None  # monotonic time of the last FaceArray
        self._image_subscription: Any = None
        self._images: OrderedDict[int, Any] = OrderedDict()  # stamp (ns) -> camera message, oldest first
        self.images_matched = self.images_missing = self.bad_images = 0
        self._window_matched = self._window_missing = 0  # since the last diagnostics message
        self._last_image_at: float | None = None  # monotonic time of the last camera frame
        self._last_frame_seq = 0  # FaceArray.frame_seq counts frames since the perception node's activation
        self._active_since = 0.0
        self._diag_pub: Any = None
        self._diag_timer: Any = None

    # -- lifecycle ----------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            import hri_msgs.msg as hri
        except ImportError:
            self.get_logger().error(
                "hri_msgs is not installed: 'sudo apt install ros-$ROS_DISTRO-hri-msgs' "
                "(or run scripts/setup.sh, which builds third_party/hri_msgs)"
            )
            return TransitionCallbackReturn.FAILURE
        root = "/" + str(self.get_parameter("humans_namespace").value).strip("/")
        try:
            validate_full_topic_name(f"{root}/faces/tracked")
        except InvalidTopicNameException as exc:
            self.get_logger().error(f"humans_namespace {root!r} is not a valid topic namespace: {exc}")
            return TransitionCallbackReturn.FAILURE
        retention = int(self.get_parameter("face_retention").value)
        if not 0 <= retention <= 1000:
            self.get_logger().error(f"face_retention must be in [0, 1000] frames, got {retention}")
            return TransitionCallbackReturn.FAILURE
        self._hri, self._root, self._retention = hri, root, retention
        self._deterministic = bool(self.get_parameter("deterministic_ids").value)
        self._publish_matches = bool(self.get_parameter("publish_matches").value)
        self._publish_landmarks = bool(self.get_parameter("publish_landmarks").value)
        self._image_topic = str(self.get_parameter("image_topic").value).strip()
        input_type = str(self.get_parameter("input_type").value)
        reliability = str(self.get_parameter("image_reliability").value)
        self._face_image_size = int(self.get_parameter("face_image_size").value)
        self._image_cache_frames = int(self.get_parameter("image_cache_frames").value)
        if input_type == "compressed" and self._image_topic:
            self._image_topic = compressed_topic(self._image_topic)
        problems = image_parameter_problems(
            self._image_topic, input_type, reliability, self._face_image_size, self._image_cache_frames
        )
        if problems:
            self.get_logger().error("; ".join(problems))
            return TransitionCallbackReturn.FAILURE
        self._compressed = input_type == "compressed"
        self._image_reliability = (
            ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        hri = self._hri
        depth1 = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)  # as hri_face_detect publishes
        self._tracked_pub = self.create_publisher(hri.IdsList, f"{self._root}/faces/tracked", depth1)
        if self._publish_matches:
            matches_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)  # every match counts
            self._matches_pub = self.create_publisher(
                hri.IdsMatch, f"{self._root}/candidate_matches", matches_qos
            )
        faces_topic = str(self.get_parameter("faces_topic").value)
        self._subscription = self.create_subscription(
            FaceArray,
            faces_topic,
            self._on_faces,
            QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE),
        )
        self._faces_topic = faces_topic
        if self._image_topic:
            camera_qos = QoSProfile(
                history=HistoryPolicy.KEEP_LAST,
                depth=5,
                reliability=self._image_reliability,
                durability=DurabilityPolicy.VOLATILE,
            )
            self._image_subscription = self.create_subscription(
                CompressedImage if self._compressed else Image, self._image_topic, self._on_image, camera_qos
            )
        self.republished = self.matches_published = self.bad_messages = 0
        self.images_matched = self.images_missing = self.bad_images = 0
        self._window_matched = self._window_missing = 0
        self._last_image_at = None
        self._last_faces_at, self._active_since = None, time.monotonic()
        self._last_frame_seq = 0
        period = float(self.get_parameter("diagnostics_period").value)
        if period > 0:
            reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
            self._diag_timer = self.create_timer(period, self._publish_diagnostics)
        images = f", face images from {self._image_topic}" if self._image_topic else ", no face images"
        self.get_logger().info(f"republishing {faces_topic} on {self._root}/faces/... (REP-155){images}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._hri = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        """Tell listeners that no face is in view any more, then drop every topic."""
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self.destroy_publisher(self._diag_pub)
            self._diag_timer = self._diag_pub = None
        if self._subscription is not None:
            self.destroy_subscription(self._subscription)
            self._subscription = None
        if self._image_subscription is not None:
            self.destroy_subscription(self._image_subscription)
            self._image_subscription = None
        self._images.clear()
        if self._tracked_pub is not None:
            for track_id in list(self._faces):
                self._drop_face(track_id)
            self._tracked_pub.publish(self._hri.IdsList(header=Header(stamp=self.get_clock().now().to_msg())))
        for publisher in (self._tracked_pub, self._matches_pub):
            if publisher is not None:
                publisher.wait_for_all_acked(Duration(seconds=1))  # the last words reach reliable readers
                self.destroy_publisher(publisher)
        self._tracked_pub = self._matches_pub = None

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        silent = None if self._last_faces_at is None else now - self._last_faces_at
        level, message = _diagnostics_level(silent, now - self._active_since)
        if level == DiagnosticStatus.OK and self._image_subscription is not None:
            quiet = now - (self._last_image_at or self._active_since)
            level, message = _images_level(
                self._image_topic, quiet, self._window_matched, self._window_missing, level, message
            )
        self._window_matched = self._window_missing = 0
        values = {
            "faces_topic": self._faces_topic,
            "humans_namespace": self._root,
            "faces_tracked": str(len(self._faces)),
            "frames_republished": str(self.republished),
            "bad_messages": str(self.bad_messages),
            "matches_published": str(self.matches_published),
            "image_topic": self._image_topic or "(no face images)",
            "images_matched": str(self.images_matched),
            "images_missing": str(self.images_missing),
            "bad_images": str(self.bad_images),
        }
        status = DiagnosticStatus(
            name=f"{self.get_name()}: ROS4HRI bridge", hardware_id="none", level=level, message=message
        )
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(DiagnosticArray(header=Header(stamp=stamp), status=[status]))

    # -- camera frames ----------------------------------------------------------------------------
    def _on_image(self, msg: Any) -> None:
        """Hold a camera frame (undecoded) until the FaceArray with its stamp arrives."""
        self._images[stamp_to_ns(msg.header.stamp)] = msg
        self._last_image_at = time.monotonic()
        while len(self._images) > self._image_cache_frames:
            self._images.popitem(last=False)

    def _frame_for(self, header: Header, needed: bool) -> Any:
        """The decoded camera frame of a FaceArray (RGB) if ``needed`` (it has faces), or None; frames up
        to it are let go."""
        if self._image_subscription is None:
            return None
        stamp = stamp_to_ns(header.stamp)
        msg = self._images.pop(stamp, None)
        # FaceArrays come in stamp order: frames older than this one will never be asked for
        for old in [s for s in self._images if s < stamp]:
            del self._images[old]
        if not needed:
            return None
        if msg is None:
            self.images_missing += 1
            self._window_missing += 1
            return None
        try:
            rgb = compressed_msg_to_rgb(msg) if self._compressed else image_msg_to_rgb(msg)
        except ImageDecodeError as exc:
            self.bad_images += 1
            self.get_logger().warning(
                f"camera frame not usable for face images: {exc}", throttle_duration_sec=5.0
            )
            return None
        self.images_matched += 1
        self._window_matched += 1
        return rgb

    # -- faces ----------------------------------------------------------------------------------
    def _on_faces(self, msg: FaceArray) -> None:
        """One FaceArray -> tracked list, topics of each face, matches; a bad message is logged, skipped."""
        self._last_faces_at = time.monotonic()
        try:
            self._republish(msg)
            self.republished += 1
        except Exception as exc:  # a malformed message must never stop the bridge
            self.bad_messages += 1
            self.get_logger().warning(
                f"skipped a FaceArray that cannot be republished: {type(exc).__name__}: {exc}",
                throttle_duration_sec=5.0,
            )

    def _republish(self, msg: FaceArray) -> None:
        if msg.frame_seq < self._last_frame_seq:
            # the perception node was re-activated or restarted: its track ids start again, so no face
            # of the previous run continues (else a new track 1 would inherit the old track 1's face id)
            self.get_logger().info("the perception node started a new run (frame_seq went back): faces reset")
            for track_id in list(self._faces):
                self._drop_face(track_id)
        self._last_frame_seq = msg.frame_seq
        frame = self._frame_for(msg.header, needed=bool(msg.faces))
        in_view: list[str] = []
        seen: set[int] = set()
        for face in msg.faces:
            if face.track_id in seen:
                continue  # a track appears once per frame; a duplicate is a malformed message
            seen.add(face.track_id)
            tracked = self._faces.get(face.track_id) or self._add_face(face.track_id)
            tracked.missing = 0
            self._publish_face(tracked, face, msg)
            if frame is not None:
                self._publish_images(tracked, face, frame, msg.header)
            in_view.append(tracked.face_id)
        # a face missing from a few frames (a missed detection) keeps its id and stays listed, as in
        # hri_face_detect; after face_retention frames it has left
        for track_id, tracked in list(self._faces.items()):
            if track_id not in seen:
                tracked.missing += 1
                if tracked.missing > self._retention:
                    self._drop_face(track_id)
                else:
                    in_view.append(tracked.face_id)
        self._tracked_pub.publish(self._hri.IdsList(header=msg.header, ids=in_view))

    def _add_face(self, track_id: int) -> _TrackedFace:
        hri = self._hri
        face_id = face_id_for_track(track_id, self._deterministic, self._rng)
        while any(f.face_id == face_id for f in self._faces.values()):
            face_id = face_id_for_track(track_id, False, self._rng)
        ns = f"{self._root}/faces/{face_id}"
        depth1 = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        tracked = _TrackedFace(
            face_id=face_id,
            roi=self.create_publisher(hri.NormalizedRegionOfInterest2D, f"{ns}/roi", depth1),
            softbiometrics=self.create_publisher(hri.SoftBiometrics, f"{ns}/softbiometrics", depth1),
            expression=self.create_publisher(hri.Expression, f"{ns}/expression", depth1),
        )
        if self._publish_landmarks:
            tracked.landmarks = self.create_publisher(hri.FacialLandmarks, f"{ns}/landmarks", depth1)
        if self._image_topic:
            tracked.cropped = self.create_publisher(Image, f"{ns}/cropped", depth1)
            tracked.aligned = self.create_publisher(Image, f"{ns}/aligned", depth1)
        self._faces[track_id] = tracked
        self.get_logger().info(f"new face {face_id} (track {track_id})")
        return tracked

    def _drop_face(self, track_id: int) -> None:
        tracked = self._faces.pop(track_id)
        self._match(tracked, "", 0.0)
        for publisher in (tracked.roi, tracked.softbiometrics, tracked.expression):
            self.destroy_publisher(publisher)
        for publisher in (tracked.landmarks, tracked.cropped, tracked.aligned):
            if publisher is not None:
                self.destroy_publisher(publisher)
        self.get_logger().info(f"face {tracked.face_id} left (track {track_id})")

    def _publish_face(self, tracked: _TrackedFace, face: Face, msg: FaceArray) -> None:
        hri, header = self._hri, msg.header
        box = face.roi_normalized
        tracked.roi.publish(
            hri.NormalizedRegionOfInterest2D(
                header=header,
                xmin=_unit(box.x_min),
                ymin=_unit(box.y_min),
                xmax=_unit(box.x_max),
                ymax=_unit(box.y_max),
                c=_unit(face.detection_score),
            )
        )
        years = age_years(face.age_group)
        gender = gender_code(face.gender)
        if years is not None or gender != _UNDEFINED:
            tracked.softbiometrics.publish(
                hri.SoftBiometrics(
                    header=header,
                    age=years or 0,
                    age_confidence=_unit(face.age_confidence) if years is not None else 0.0,
                    gender=gender,
                    gender_confidence=_unit(face.gender_confidence) if gender != _UNDEFINED else 0.0,
                )
            )
        if face.emotion:
            tracked.expression.publish(
                hri.Expression(
                    header=header,
                    expression=expression_name(face.emotion),
                    confidence=_unit(face.emotion_confidence),
                )
            )
        if tracked.landmarks is not None and face.keypoints:
            tracked.landmarks.publish(
                hri.FacialLandmarks(
                    header=header,
                    landmarks=landmark_points(face, hri.NormalizedPointOfInterest2D),
                    height=msg.image_height,
                    width=msg.image_width,
                )
            )
        known = face.identity not in ("", "unknown")
        self._match(tracked, person_id(face.identity) if known else "", _unit(face.identity_confidence))

    def _publish_images(self, tracked: _TrackedFace, face: Face, frame: Any, header: Header) -> None:
        """/cropped (square around the box) and, with both eyes known, /aligned (eyes level)."""
        box = face.roi_normalized
        crops = [
            (
                tracked.cropped,
                square_face_crop(frame, (box.x_min, box.y_min, box.x_max, box.y_max), self._face_image_size),
            )
        ]
        if len(face.keypoints) >= 2:
            right, left = face.keypoints[Face.KEYPOINT_RIGHT_EYE], face.keypoints[Face.KEYPOINT_LEFT_EYE]
            crops.append(
                (
                    tracked.aligned,
                    aligned_face(frame, (right.x, right.y), (left.x, left.y), self._face_image_size),
                )
            )
        for publisher, crop in crops:
            if crop is None:
                continue
            data, step = encode_raw(crop, "bgr8")  # as hri_face_detect publishes them (cv_bridge's default)
            publisher.publish(
                Image(
                    header=header,
                    height=crop.shape[0],
                    width=crop.shape[1],
                    encoding="bgr8",
                    step=step,
                    data=data,
                )
            )

    def _match(self, tracked: _TrackedFace, person: str, confidence: float) -> None:
        """Publish a face -> person match when it changes; withdraw the previous one (confidence 0)."""
        if self._matches_pub is None or person == tracked.person:
            return
        hri = self._hri
        if tracked.person:
            self._matches_pub.publish(
                hri.IdsMatch(
                    id1=tracked.face_id,
                    id1_type=hri.IdsMatch.FACE,
                    id2=tracked.person,
                    id2_type=hri.IdsMatch.PERSON,
                    confidence=0.0,
                )
            )
        self.matches_published += bool(tracked.person) + bool(person)  # withdrawal, new match
        if person:
            self._matches_pub.publish(
                hri.IdsMatch(
                    id1=tracked.face_id,
                    id1_type=hri.IdsMatch.FACE,
                    id2=person,
                    id2_type=hri.IdsMatch.PERSON,
                    confidence=max(confidence, 1e-3),  # 0 would mean "not associated"
                )
            )
        tracked.person = person


def landmark_points(face: Face, point_type: Any) -> list[Any]:
    """The 70 ``hri_msgs/FacialLandmarks`` points of a face: its key-points in their slots, c = its score."""
    points = [point_type(x=0.0, y=0.0, c=0.0) for _ in range(LANDMARK_COUNT)]
    score = _unit(face.detection_score)
    for index, keypoint in enumerate(face.keypoints):
        for slot in LANDMARK_SLOTS.get(index, ()):
            points[slot] = point_type(x=_unit(keypoint.x), y=_unit(keypoint.y), c=score)
    return points


def start_hri_bridge(params: Mapping[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
    """Start the bridge (``python -m facial_perception.ros.hri_bridge``, unconfigured); output to a log."""
    command = [sys.executable, "-m", "facial_perception.ros.hri_bridge", "--ros-args", *param_args(params)]
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _diagnostics_level(silent_s: float | None, active_s: float) -> tuple[bytes, str]:
    """OK while FaceArrays arrive; WARN after ``SILENCE_WARN_S`` without one (or none since activation)."""
    if silent_s is None:
        if active_s > SILENCE_WARN_S:
            return DiagnosticStatus.WARN, "no FaceArray received yet: is the perception node active?"
        return DiagnosticStatus.OK, "waiting for the first FaceArray"
    if silent_s > SILENCE_WARN_S:
        return DiagnosticStatus.WARN, f"no FaceArray for {silent_s:.0f} s"
    return DiagnosticStatus.OK, "ok"


def image_parameter_problems(
    topic: str, input_type: str, reliability: str, size: int, cache: int
) -> list[str]:
    """What is wrong with the face-image parameters, one phrase each (empty: nothing)."""
    problems = []
    if input_type not in ("raw", "compressed"):
        problems.append(f"input_type must be raw or compressed, got {input_type!r}")
    if reliability not in ("best_effort", "reliable"):
        problems.append(f"image_reliability must be best_effort or reliable, got {reliability!r}")
    if not 16 <= size <= 1024:
        problems.append(f"face_image_size must be in [16, 1024] pixels, got {size}")
    if not 1 <= cache <= 300:
        problems.append(f"image_cache_frames must be in [1, 300], got {cache}")
    if topic:
        try:
            validate_full_topic_name(topic if topic.startswith("/") else "/" + topic)
        except InvalidTopicNameException as exc:
            problems.append(f"image_topic {topic!r} is not a valid topic name: {exc}")
    return problems


def _images_level(
    topic: str, quiet_s: float, matched: int, missing: int, level: bytes, message: str
) -> tuple[bytes, str]:
    """WARN when face images are on but the camera is silent, or its frames never match a FaceArray."""
    if quiet_s > SILENCE_WARN_S:
        return DiagnosticStatus.WARN, (
            f"no camera frame on {topic} for {quiet_s:.0f} s: no face images "
            "(check image_topic, input_type, image_reliability)"
        )
    if matched == 0 and missing >= MISSING_WARN_FRAMES:
        return DiagnosticStatus.WARN, (
            f"camera frames on {topic} arrive but none has a FaceArray's stamp: "
            "is it the camera the perception node reads?"
        )
    return level, message


def main(args: Sequence[str] | None = None) -> int:
    """Run the bridge until Ctrl-C / SIGTERM (it starts unconfigured; hri_bridge.launch.py activates it)."""
    rclpy.init(args=list(args) if args is not None else sys.argv)
    return spin_until_shutdown(HriBridge(), SingleThreadedExecutor())


if __name__ == "__main__":
    sys.exit(main())
