"""Demo consumer: prints one readable line per face with latency, and writes an annotated video/image.

It subscribes to the perception node's ``~/faces`` (``FaceArray``) and to the camera images, pairs
them by header stamp (the node copies the image header into every ``FaceArray``), draws the boxes
and labels, and writes an MP4 (``cv2.VideoWriter``) or a single PNG/JPEG.  Beside a video it also
writes ``<stem>.png``: the frame with the most faces, the quickest thing to look at.

    python -m facial_perception.ros.demo_listener --ros-args -p output_path:=out/demo.mp4
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image

from facial_perception.msg import Face, FaceArray
from facial_perception.pipeline.images import ImageDecodeError
from facial_perception.ros.conversions import image_msg_to_rgb, stamp_to_ns

__all__ = ["DemoListener", "ListenerStats", "describe_face", "draw_face_array", "main"]

_VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov"}
_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def describe_face(face: Face) -> str:
    """One readable line: track, identity, built-in attributes, any runtime-added columns, box."""
    parts = [f"track {face.track_id:>3}"]
    if face.identity:
        parts.append(f"identity={face.identity} ({face.identity_confidence:.2f})")
    builtin = {"age", "age_group", "gender", "emotion", "identity"}
    if face.age_group:
        parts.append(f"age={face.age_group} ({face.age_confidence:.2f})")
    if face.gender:
        parts.append(f"gender={face.gender} ({face.gender_confidence:.2f})")
    if face.emotion:
        parts.append(f"emotion={face.emotion} ({face.emotion_confidence:.2f})")
    parts.extend(
        f"{p.task}={p.label} ({p.confidence:.2f})" for p in face.predictions if p.task not in builtin
    )
    roi = face.roi
    parts.append(
        f"box=({roi.x_offset},{roi.y_offset},{roi.width}x{roi.height}) score={face.detection_score:.2f}"
    )
    return "  ".join(parts)


def _face_label(face: Face) -> list[str]:
    lines = [f"#{face.track_id} {face.identity}" if face.identity else f"#{face.track_id}"]
    attributes = [v for v in (face.age_group, face.gender, face.emotion) if v]
    if attributes:
        lines.append(" ".join(attributes))
    extra = [f"{p.task}:{p.label}" for p in face.predictions if p.task not in {"age", "gender", "emotion"}]
    if extra:
        lines.append(" ".join(extra))
    return lines


def draw_face_array(rgb: np.ndarray, faces: FaceArray, note: str = "") -> np.ndarray:
    """A copy of ``rgb`` with each face's box, key-points and labels drawn (and ``note`` in the corner)."""
    canvas = np.ascontiguousarray(rgb).copy()
    for face in faces.faces:
        colour = _COLOURS[face.track_id % len(_COLOURS)]
        x, y, w, h = face.roi.x_offset, face.roi.y_offset, face.roi.width, face.roi.height
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, 2)
        for point in face.keypoints:  # normalised: the canvas may be another size than the node's image
            cv2.circle(
                canvas, (round(point.x * canvas.shape[1]), round(point.y * canvas.shape[0])), 3, colour, -1
            )
        for row, text in enumerate(_face_label(face)):
            baseline_y = max(y - 6 - 16 * (len(_face_label(face)) - 1 - row), 12)
            cv2.putText(
                canvas, text, (x, baseline_y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA
            )
            cv2.putText(canvas, text, (x, baseline_y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    if note:
        cv2.putText(canvas, note, (8, canvas.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1)
    return canvas


@dataclass
class ListenerStats:
    """What the listener saw: result messages, faces, latencies (ms) and receipt times (s)."""

    messages: int = 0
    faces: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    receipt_times: list[float] = field(default_factory=list)
    frames_written: int = 0

    def fps(self) -> float:
        """Result messages per second between the first and last receipt."""
        if len(self.receipt_times) < 2:
            return 0.0
        span = self.receipt_times[-1] - self.receipt_times[0]
        return (len(self.receipt_times) - 1) / span if span > 0 else 0.0

    def latency_percentile(self, q: float) -> float:
        """Latency percentile ``q`` in ms (NaN when nothing was received)."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else math.nan

    def summary(self) -> str:
        """One line for the end of the demo."""
        return (
            f"{self.messages} result messages, {self.faces} faces, {self.fps():.1f} results/s, latency p50 "
            f"{self.latency_percentile(50):.1f} ms, p95 {self.latency_percentile(95):.1f} ms"
        )


class DemoListener(Node):
    """Prints per-face results and latency; writes the annotated frames to ``output_path``."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__("demo_listener", **kwargs)

        def declare(name: str, default: object, description: str) -> object:
            descriptor = ParameterDescriptor(description=description, read_only=True)
            return self.declare_parameter(name, default, descriptor).value

        faces_topic = str(declare("faces_topic", "/facial_perception/faces", "FaceArray topic to listen to"))
        image_topic = str(declare("image_topic", "/camera/image_raw", "Camera images to annotate"))
        output = str(
            declare("output_path", "out/demo_annotated.mp4", "Annotated .mp4/.avi video or .png/.jpg")
        )
        self.fps_hint = float(declare("video_fps", 10.0, "Frame rate written into the video file"))
        self.quiet = bool(declare("quiet", False, "Do not print a line per face"))
        self.note = ""
        self.output_path = Path(output).expanduser()
        self.stats = ListenerStats()
        self._images: OrderedDict[int, Image] = OrderedDict()  # stamp ns -> image, the last few only
        self._lock = threading.Lock()
        self._writer: cv2.VideoWriter | None = None
        self._best: tuple[int, np.ndarray] | None = None  # (faces, annotated frame)
        self._video_shape: tuple[int, ...] = ()
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(FaceArray, faces_topic, self._on_faces, reliable)
        self.create_subscription(Image, image_topic, self._on_image, qos_profile_sensor_data)
        self.get_logger().info(
            f"listening to {faces_topic} (+ images {image_topic}); writing {self.output_path}"
        )

    def _on_image(self, msg: Image) -> None:
        with self._lock:
            self._images[stamp_to_ns(msg.header.stamp)] = msg
            while len(self._images) > 60:
                self._images.popitem(last=False)

    def _on_faces(self, msg: FaceArray) -> None:
        now_ns = self.get_clock().now().nanoseconds
        latency_ms = (now_ns - stamp_to_ns(msg.header.stamp)) / 1e6
        self.stats.messages += 1
        self.stats.faces += len(msg.faces)
        self.stats.latencies_ms.append(latency_ms)
        self.stats.receipt_times.append(now_ns / 1e9)
        if not self.quiet:
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec / 1e9
            print(
                f"[frame {msg.frame_seq} t={stamp:.3f} latency {latency_ms:.1f} ms] {len(msg.faces)} face(s)",
                flush=True,
            )
            for face in msg.faces:
                print(f"    {describe_face(face)}", flush=True)
        with self._lock:
            image = self._images.get(stamp_to_ns(msg.header.stamp))
        if image is not None:
            self._write(image, msg)

    def _write(self, image: Image, faces: FaceArray) -> None:
        try:
            rgb = image_msg_to_rgb(image)
        except ImageDecodeError as exc:
            self.get_logger().warning(f"cannot annotate frame: {exc}", throttle_duration_sec=5.0)
            return
        annotated = draw_face_array(rgb, faces, self.note)
        if self._best is None or len(faces.faces) > self._best[0]:
            self._best = (len(faces.faces), annotated)
        if self.output_path.suffix.lower() in _VIDEO_SUFFIXES:
            if self._writer is None:
                self.output_path.parent.mkdir(parents=True, exist_ok=True)
                fourcc = cv2.VideoWriter_fourcc(
                    *("mp4v" if self.output_path.suffix.lower() != ".avi" else "MJPG")
                )
                self._video_shape = annotated.shape[:2]
                size = (annotated.shape[1], annotated.shape[0])
                self._writer = cv2.VideoWriter(str(self.output_path), fourcc, self.fps_hint, size)
            if annotated.shape[:2] == self._video_shape:  # a video needs one frame size throughout
                self._writer.write(cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))
        self.stats.frames_written += 1

    def snapshot_path(self) -> Path:
        """Where the single annotated image goes (the output itself, or ``<stem>.png`` beside a video)."""
        if self.output_path.suffix.lower() in _VIDEO_SUFFIXES:
            return self.output_path.with_suffix(".png")
        return self.output_path

    def finish(self) -> list[Path]:
        """Close the video and write the snapshot; returns the files written."""
        written: list[Path] = []
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            written.append(self.output_path)
        if self._best is not None:
            path = self.snapshot_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
            if cv2.imwrite(str(tmp), cv2.cvtColor(self._best[1], cv2.COLOR_RGB2BGR)):
                tmp.replace(path)
                written.append(path)
        return written


def main(args: Sequence[str] | None = None) -> int:
    """Entry point (``demo_listener`` executable): listen until Ctrl-C, then write the files."""
    rclpy.init(args=list(args) if args is not None else sys.argv)
    node = DemoListener()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        files = node.finish()
        print(node.stats.summary())
        for path in files:
            print(f"annotated output: {path}")
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
