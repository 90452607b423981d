"""Benchmark of the ROS4HRI bridge: the latency it adds and the CPU it takes, over real DDS.

A publisher sends ``FaceArray`` messages at camera rate (30 Hz) with 1, 3 and 10 faces (a scene each),
the bridge runs in its own process, and one listener node receives both the ``FaceArray`` itself and
the bridge's ``/humans/faces/tracked`` for the same frame. The bridge's cost is the difference of the
two receipt times of each frame (same clock, same run), plus the bridge process's CPU use.

    python -m facial_perception.ros.hri_bridge_benchmark [--seconds 20] [--rate 30]
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
from std_msgs.msg import Header

from facial_perception.core.benchmark import machine_summary
from facial_perception.core.fileio import atomic_write_text
from facial_perception.msg import Face, FaceArray, NormalizedRoi
from facial_perception.ros.conversions import stamp_to_ns
from facial_perception.ros.demo import REPO, DemoError, LifecycleClient, stop_process
from facial_perception.ros.hri_bridge import start_hri_bridge
from facial_perception.ros.ros_benchmark import ProcessSampler
from facial_perception.ros.spinning import BackgroundNode

__all__ = ["main", "run", "scene", "write_markdown"]

FACES_TOPIC = "/hri_bridge_benchmark/faces"
TRACKED_TOPIC = "/humans/faces/tracked"
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
        out.append(face)
    return out


class _Probe(BackgroundNode):
    """Publishes the scenes and records, per frame stamp, when the FaceArray and the tracked list arrived."""

    def __init__(self) -> None:
        import hri_msgs.msg as hri

        super().__init__("hri_bridge_benchmark")
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.publisher = self.node.create_publisher(FaceArray, FACES_TOPIC, reliable)
        self.lock = threading.Lock()
        self.faces_at: dict[int, float] = {}
        self.tracked_at: dict[int, float] = {}
        self.node.create_subscription(FaceArray, FACES_TOPIC, self._record(self.faces_at), reliable)
        self.node.create_subscription(hri.IdsList, TRACKED_TOPIC, self._record(self.tracked_at), reliable)
        self.lifecycle = LifecycleClient(self.node, "/hri_bridge")

    def _record(self, into: dict[int, float]) -> Any:
        def callback(msg: Any) -> None:
            now = time.perf_counter()
            with self.lock:
                into[stamp_to_ns(msg.header.stamp)] = now

        return callback


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def run(seconds: float, rate: float, face_counts: Sequence[int]) -> dict[str, Any]:
    """Run every scene for ``seconds`` at ``rate`` Hz; per scene the latencies (ms) and the bridge's CPU."""
    log = REPO / "out" / "hri_bridge_benchmark.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    bridge = start_hri_bridge({"faces_topic": FACES_TOPIC}, log)
    load_at_start = round(os.getloadavg()[0], 2)
    probe = _Probe()
    scenes = []
    try:
        probe.lifecycle.bring_up(60.0)
        # the bridge's subscription and the probe's own
        probe.wait_until(
            lambda: probe.publisher.get_subscription_count() >= 2, 30.0, "the bridge to subscribe"
        )
        for faces in face_counts:
            sampler = ProcessSampler(bridge.pid)
            faces_list = scene(faces)
            stamps: list[int] = []
            warmup = 1.0  # the first second of a scene: new faces' publishers are being discovered
            start = time.perf_counter()
            sampler.start()
            tick = start
            while (now := time.perf_counter()) - start < warmup + seconds:
                header = Header(stamp=probe.node.get_clock().now().to_msg(), frame_id="benchmark")
                probe.publisher.publish(FaceArray(header=header, faces=faces_list))
                if now - start >= warmup:
                    stamps.append(stamp_to_ns(header.stamp))
                tick += 1.0 / rate
                time.sleep(max(tick - time.perf_counter(), 0.0))
            time.sleep(1.0)  # the last frames' answers
            sampler.stop()
            with probe.lock:
                pairs = [(probe.faces_at.get(s), probe.tracked_at.get(s)) for s in stamps]
            received = [(a, b) for a, b in pairs if a is not None and b is not None]
            added = [1000.0 * (b - a) for a, b in received]
            cpu = [s["cpu_percent"] for s in sampler.samples[1:]]  # the first sample spans the warm-up
            scenes.append(
                {
                    "faces": faces,
                    "frames_published": len(stamps),
                    "frames_republished": len(received),
                    "added_latency_p50_ms": _percentile(added, 50),
                    "added_latency_p99_ms": _percentile(added, 99),
                    "bridge_cpu_percent_median": float(np.median(cpu)) if cpu else math.nan,
                }
            )
            last = scenes[-1]
            print(
                f"{faces:>2} faces: {len(received)}/{len(stamps)} frames republished, added latency p50 "
                f"{last['added_latency_p50_ms']:.2f} ms, p99 {last['added_latency_p99_ms']:.2f} ms, "
                f"bridge CPU {last['bridge_cpu_percent_median']:.1f} %",
                flush=True,
            )
    finally:
        probe.close()
        stop_process(bridge)
    return {
        "benchmark": "hri_bridge",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "seconds_per_scene": seconds,
            "rate_hz": rate,
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
        "CPU: the bridge process, % of one core, median of 1-s samples.",
        "",
        "| faces | frames republished | added latency p50 | p99 | bridge CPU |",
        "|---|---|---|---|---|",
    ]
    for s in result["scenes"]:
        lines.append(
            f"| {s['faces']} | {s['frames_republished']} / {s['frames_published']} | "
            f"{s['added_latency_p50_ms']:.2f} ms | {s['added_latency_p99_ms']:.2f} ms | "
            f"{s['bridge_cpu_percent_median']:.1f} % |"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per scene")
    parser.add_argument("--rate", type=float, default=30.0, help="FaceArray messages per second")
    parser.add_argument("--faces", type=int, nargs="+", default=[1, 3, 10], help="faces per scene")
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
        result = run(args.seconds, args.rate, args.faces)
    except (DemoError, TimeoutError) as exc:
        print(f"hri_bridge_benchmark: error: {exc}", file=sys.stderr)
        return 1
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.markdown, args.json)
    print(f"wrote {args.json} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
