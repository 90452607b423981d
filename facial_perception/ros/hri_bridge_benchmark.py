"""Benchmark of the ROS4HRI bridge: the latency it adds and the CPU it takes, over real DDS.

A publisher sends ``FaceArray`` messages at camera rate (30 Hz) with 1, 3 and 10 faces (a scene each),
the bridge runs in its own process, and one listener node receives both the ``FaceArray`` itself and
the bridge's ``/humans/faces/tracked`` for the same frame. The bridge's cost is the difference of the
two receipt times of each frame (same clock, same run), plus the bridge process's CPU use. Every
scene runs twice, in the same run: without face images (the default), then with ``image_topic`` set,
the publisher sending a 640x480 camera frame before each ``FaceArray`` (the bridge cuts ``/cropped``
and ``/aligned`` of every face from it).

    python -m facial_perception.ros.hri_bridge_benchmark [--seconds 20] [--rate 30] [--no-images]
    -> docs/benchmark_hri_bridge.json + docs/BENCHMARK_HRI_BRIDGE.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from facial_perception.core.benchmark import machine_summary
from facial_perception.core.fileio import atomic_write_text
from facial_perception.msg import Face, FaceArray, NormalizedPoint, NormalizedRoi
from facial_perception.ros.conversions import rgb_to_image_msg, stamp_to_ns
from facial_perception.ros.demo import REPO, DemoError, LifecycleClient, stop_process
from facial_perception.ros.demo_camera import make_frame
from facial_perception.ros.hri_bridge import start_hri_bridge
from facial_perception.ros.ros_benchmark import ProcessSampler
from facial_perception.ros.spinning import BackgroundNode

__all__ = ["main", "run", "scene", "write_markdown"]

FACES_TOPIC = "/hri_bridge_benchmark/faces"
CAMERA_TOPIC = "/hri_bridge_benchmark/image_raw"
TRACKED_TOPIC = "/humans/faces/tracked"
CROPPED_TOPIC = "/humans/faces/f00001/cropped"  # the first face's (deterministic ids)
#: Key-points of a face as fractions of its box (eyes, nose tip, mouth centre, ear tragions)
_KEYPOINTS = ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.5, 0.8), (0.05, 0.5), (0.95, 0.5))
_AGES = ("0-2", "8-12", "25-32", "38-43", "60+")
_EMOTIONS = ("neutral", "happiness", "surprise", "sadness")


def scene(faces: int) -> list[Face]:
    """``faces`` faces side by side with every field the bridge reads filled in (half of them enrolled)."""
    out = []
    for i in range(faces):
        face = Face(track_id=i + 1, detection_score=0.9, identity=f"person {i}" if i % 2 == 0 else "unknown")
        face.identity_confidence = 0.8
        x = i / faces
        face.roi_normalized = NormalizedRoi(x_min=x, y_min=0.2, x_max=x + 0.8 / faces, y_max=0.6)
        face.age_group, face.age_confidence = _AGES[i % len(_AGES)], 0.6
        face.gender, face.gender_confidence = ("female", "male")[i % 2], 0.9
        face.emotion, face.emotion_confidence = _EMOTIONS[i % len(_EMOTIONS)], 0.7
        box = face.roi_normalized
        face.keypoints = [
            NormalizedPoint(
                x=box.x_min + u * (box.x_max - box.x_min), y=box.y_min + v * (box.y_max - box.y_min)
            )
            for u, v in _KEYPOINTS
        ]
        out.append(face)
    return out


class _Probe(BackgroundNode):
    """Publishes the scenes and records, per frame stamp, when the FaceArray and the tracked list arrived."""

    def __init__(self) -> None:
        import hri_msgs.msg as hri

        super().__init__("hri_bridge_benchmark")
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.publisher = self.node.create_publisher(FaceArray, FACES_TOPIC, reliable)
        self.camera = self.node.create_publisher(Image, CAMERA_TOPIC, QoSProfile(depth=5))
        self.lock = threading.Lock()
        self.faces_at: dict[int, float] = {}
        self.tracked_at: dict[int, float] = {}
        self.cropped_at: dict[int, float] = {}
        self.node.create_subscription(FaceArray, FACES_TOPIC, self._record(self.faces_at), reliable)
        self.node.create_subscription(hri.IdsList, TRACKED_TOPIC, self._record(self.tracked_at), reliable)
        self.node.create_subscription(Image, CROPPED_TOPIC, self._record(self.cropped_at), reliable)
        self.lifecycle = LifecycleClient(self.node, "/hri_bridge")

    def _record(self, into: dict[int, float]) -> Any:
        def callback(msg: Any) -> None:
            now = time.perf_counter()
            with self.lock:
                into[stamp_to_ns(msg.header.stamp)] = now

        return callback


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _run_scene(
    probe: _Probe, bridge_pid: int, faces: int, seconds: float, rate: float, images: bool
) -> dict[str, Any]:
    """One scene: FaceArrays (after their camera frames, with ``images``) at ``rate`` for ``seconds``."""
    sampler = ProcessSampler(bridge_pid)
    faces_list = scene(faces)
    frame = make_frame([0, 1, 2])  # 640x480, the demo's photos
    stamps: list[int] = []
    warmup = 1.0  # the first second of a scene: new faces' publishers are being discovered
    start = time.perf_counter()
    sampler.start()
    tick = start
    previous: Header | None = None
    while (now := time.perf_counter()) - start < warmup + seconds:
        header = Header(stamp=probe.node.get_clock().now().to_msg(), frame_id="benchmark")
        if images:
            # a camera frame now, its faces one frame later (as the perception node answers ~30-100 ms
            # after the frame): the bridge holds the frame until its FaceArray comes
            probe.camera.publish(rgb_to_image_msg(frame, header))
            header, previous = previous, header
        if header is not None:
            faces_msg = FaceArray(header=header, image_width=640, image_height=480, faces=faces_list)
            probe.publisher.publish(faces_msg)
            if now - start >= warmup:
                stamps.append(stamp_to_ns(header.stamp))
        tick += 1.0 / rate
        time.sleep(max(tick - time.perf_counter(), 0.0))
    time.sleep(1.0)  # the last frames' answers
    sampler.stop()
    with probe.lock:
        pairs = [(probe.faces_at.get(s), probe.tracked_at.get(s)) for s in stamps]
        cropped = sum(s in probe.cropped_at for s in stamps)
    received = [(a, b) for a, b in pairs if a is not None and b is not None]
    added = [1000.0 * (b - a) for a, b in received]
    cpu = [s["cpu_percent"] for s in sampler.samples[1:]]  # the first sample spans the warm-up
    result = {
        "faces": faces,
        "face_images": images,
        "frames_published": len(stamps),
        "frames_republished": len(received),
        "frames_with_images": cropped,
        "added_latency_p50_ms": _percentile(added, 50),
        "added_latency_p99_ms": _percentile(added, 99),
        "bridge_cpu_percent_median": float(np.median(cpu)) if cpu else math.nan,
    }
    print(
        f"{faces:>2} faces, face images {'on ' if images else 'off'}: {len(received)}/{len(stamps)} frames "
        f"republished ({cropped} with images), added latency p50 {result['added_latency_p50_ms']:.2f} ms, "
        f"p99 {result['added_latency_p99_ms']:.2f} ms, "
        f"bridge CPU {result['bridge_cpu_percent_median']:.1f} %",
        flush=True,
    )
    return result


def run(
    seconds: float, rate: float, face_counts: Sequence[int], images: Sequence[bool] = (False, True)
) -> dict[str, Any]:
    """Every scene for ``seconds`` at ``rate`` Hz, with a bridge per ``images`` setting (off, on)."""
    log = REPO / "out" / "hri_bridge_benchmark.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    load_at_start = round(os.getloadavg()[0], 2)
    probe = _Probe()  # before the bridge: if it cannot start, no bridge process is left behind
    scenes = []
    try:
        for with_images in images:
            params: dict[str, Any] = {"faces_topic": FACES_TOPIC, "deterministic_ids": True}
            if with_images:
                params.update(image_topic=CAMERA_TOPIC, image_reliability="reliable")
            bridge = start_hri_bridge(params, log)
            try:
                probe.lifecycle.bring_up(60.0)
                camera_readers = 1 if with_images else 0

                def subscribed(readers: int = camera_readers) -> bool:  # the bridge's and the probe's own
                    return (
                        probe.publisher.get_subscription_count() >= 2
                        and probe.camera.get_subscription_count() >= readers
                    )

                probe.wait_until(subscribed, 30.0, "the bridge to subscribe")
                for faces in face_counts:
                    scenes.append(_run_scene(probe, bridge.pid, faces, seconds, rate, with_images))
            finally:
                stop_process(bridge)
            probe.wait_until(
                lambda: probe.publisher.get_subscription_count() < 2, 30.0, "the bridge to leave"
            )
    finally:
        probe.close()
    return {
        "benchmark": "hri_bridge",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "seconds_per_scene": seconds,
            "rate_hz": rate,
            "camera_frame": "640x480 rgb8",
            "face_image_size": 128,
            "machine": f"{platform.system()}, {machine_summary()}",
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1min_at_start": load_at_start,
        },
        "scenes": scenes,
    }


def write_markdown(result: dict[str, Any], path: Path, json_path: Path) -> None:
    """The table of the run, with how to reproduce it."""
    st = result["settings"]
    lines = [
        "# ROS4HRI bridge benchmark",
        "",
        f"Run {result['date']} on {st['machine']} (load {st['load_average_1min_at_start']} at start): "
        f"`python -m facial_perception.ros.hri_bridge_benchmark --seconds {st['seconds_per_scene']:g} "
        f"--rate {st['rate_hz']:g}`. Raw data: `{json_path.name}`.",
        "",
        "FaceArray messages at the camera rate, each scene's faces on every frame (half of them",
        "enrolled people), published to the bridge in its own process. *Added latency* is, per frame,",
        "the receipt time of the bridge's `/humans/faces/tracked` minus that of the FaceArray itself,",
        "in one listener (the bridge publishes each face's `roi`, `softbiometrics` and `expression`",
        "before the tracked list).",
        "With *face images* on, the bridge has `image_topic` set and the publisher sends a 640x480",
        "`rgb8` camera frame 2 ms before each FaceArray; the bridge then also cuts each face's",
        "128x128 `/cropped` and `/aligned` images from it (counted: frames whose first face's",
        "`/cropped` image arrived). Both settings run in the same run, one after the other.",
        "CPU: the bridge process, % of one core, median of 1-s samples.",
        "",
        "| faces | face images | frames republished (with images) | added latency p50 | p99 | bridge CPU |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["scenes"]:
        with_images = f" ({s['frames_with_images']})" if s["face_images"] else ""
        lines.append(
            f"| {s['faces']} | {'on' if s['face_images'] else 'off'} | "
            f"{s['frames_republished']} / {s['frames_published']}{with_images} | "
            f"{s['added_latency_p50_ms']:.2f} ms | {s['added_latency_p99_ms']:.2f} ms | "
            f"{s['bridge_cpu_percent_median']:.1f} % |"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per scene")
    parser.add_argument("--rate", type=float, default=30.0, help="FaceArray messages per second")
    parser.add_argument("--faces", type=int, nargs="+", default=[1, 3, 10], help="faces per scene")
    parser.add_argument("--no-images", action="store_true", help="only the bridge without face images")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmark_hri_bridge.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "BENCHMARK_HRI_BRIDGE.md")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0 or any(n < 1 for n in args.faces):
        parser.error("--seconds, --rate and --faces must be positive")
    try:
        import hri_msgs.msg  # noqa: F401
    except ImportError:
        print(
            "hri_bridge_benchmark: error: hri_msgs is not installed (run scripts/setup.sh)", file=sys.stderr
        )
        return 2
    try:
        result = run(args.seconds, args.rate, args.faces, (False,) if args.no_images else (False, True))
    except (DemoError, TimeoutError) as exc:
        print(f"hri_bridge_benchmark: error: {exc}", file=sys.stderr)
        return 1
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.markdown, args.json)
    print(f"wrote {args.json} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
