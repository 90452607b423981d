"""Benchmark of the perception node over real DDS (not a test): fps, latency, CPU and memory over time.

A camera process publishes 640x480 ``rgb8`` frames at 30 Hz holding 1-5 real faces (the demo photos;
the scene changes every 2 s), the node runs in its own process exactly as deployed, and this process
records for every ``FaceArray`` the latency from the image stamp to its receipt.  A sampler reads
the node process's CPU time and RSS once a second (psutil when installed, else ``/proc``).  The
first ``--warmup`` seconds are excluded from the figures.  Results: JSON + ``docs/BENCHMARK_ROS.md``.

    python -m facial_perception.ros.ros_benchmark --duration 60

Targets (lite model, 2 CPU cores): >= 25 fps processed, p99 latency <= 100 ms, RSS growth < 50 MB.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_system_default
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from facial_perception.core.fileio import atomic_write_text
from facial_perception.msg import FaceArray
from facial_perception.ros.conversions import rgb_to_image_msg, stamp_to_ns
from facial_perception.ros.demo import REPO, DemoError, LifecycleClient, start_perception_node, stop_process
from facial_perception.ros.demo_camera import make_frame
from facial_perception.ros.executors import PooledExecutor

__all__ = ["BenchmarkResult", "ProcessSampler", "main", "run_benchmark", "write_markdown"]

TARGET_FPS, TARGET_P99_MS, TARGET_RSS_GROWTH_MB = 25.0, 100.0, 50.0
TOPIC = "/benchmark/image_raw"


class ProcessSampler:
    """CPU % (of one core) and RSS (MB) of a process once per ``period`` seconds, in a thread."""

    def __init__(self, pid: int, period: float = 1.0) -> None:
        self.pid, self.period = pid, period
        self.samples: list[dict[str, float]] = []  # {"t": s since start, "cpu_percent", "rss_mb"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        try:
            import psutil

            self._proc: Any = psutil.Process(pid)
        except ImportError:
            self._proc = None
        self._ticks = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float]:
        """(cumulative CPU seconds, RSS MB) of the process."""
        if self._proc is not None:
            times = self._proc.cpu_times()
            return times.user + times.system, self._proc.memory_info().rss / 2**20
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime (fields 14, 15)
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return cpu, rss_kb / 1024

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        start = time.monotonic()
        try:
            last_cpu, _ = self._read()
        except (OSError, StopIteration):
            return
        last_t = time.monotonic()
        while not self._stop.wait(self.period):
            try:
                cpu, rss = self._read()
            except (OSError, StopIteration):
                return  # the process ended
            now = time.monotonic()
            self.samples.append(
                {
                    "t": now - start,
                    "cpu_percent": 100.0 * (cpu - last_cpu) / max(now - last_t, 1e-6),
                    "rss_mb": rss,
                }
            )
            last_cpu, last_t = cpu, now


#: frames published after a scene change counted as the scene's start (BenchmarkResult.by_faces)
SCENE_START_FRAMES = 10


@dataclass
class BenchmarkResult:
    """Everything measured; ``to_dict`` is the JSON written next to the Markdown report."""

    settings: dict[str, Any]
    published: int = 0
    received: int = 0
    faces_total: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    receipts: list[float] = field(default_factory=list)  # monotonic seconds, measured window only
    faces_per_result: list[int] = field(default_factory=list)
    # per result: (faces the camera showed, frames published since its scene began)
    scene_per_result: list[tuple[int, int]] = field(default_factory=list)
    resources: list[dict[str, float]] = field(default_factory=list)
    window_s: float = 0.0
    # the same benchmark with other node transports, run right after this one: [{settings, summary}]
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = {
            f"latency_p{q}_ms": float(np.percentile(lat, q)) if lat.size else math.nan for q in (50, 95, 99)
        }
        measured = [s for s in self.resources if s["t"] >= self.settings["warmup_s"]]
        rss = [s["rss_mb"] for s in measured]
        cpu = [s["cpu_percent"] for s in measured]
        fps = self.received / self.window_s if self.window_s > 0 else 0.0
        out = {
            "processed_fps": fps,
            "published_fps": self.published / self.window_s if self.window_s > 0 else 0.0,
            "frames_published": self.published,
            "results_received": self.received,
            "frames_skipped_percent": 100.0 * max(self.published - self.received, 0) / max(self.published, 1),
            "mean_faces_per_frame": float(np.mean(self.faces_per_result)) if self.faces_per_result else 0.0,
            **pct,
            "latency_max_ms": float(lat.max()) if lat.size else math.nan,
            "cpu_percent_mean": float(np.mean(cpu)) if cpu else math.nan,
            "cpu_percent_max": float(np.max(cpu)) if cpu else math.nan,
            "rss_start_mb": rss[0] if rss else math.nan,
            "rss_end_mb": rss[-1] if rss else math.nan,
            "rss_max_mb": max(rss) if rss else math.nan,
            "rss_growth_mb": (rss[-1] - rss[0]) if rss else math.nan,
        }
        out["targets"] = {
            f"processed_fps >= {TARGET_FPS:g}": bool(fps >= TARGET_FPS),
            f"latency_p99_ms <= {TARGET_P99_MS:g}": bool(pct["latency_p99_ms"] <= TARGET_P99_MS),
            f"rss_growth_mb < {TARGET_RSS_GROWTH_MB:g}": bool(out["rss_growth_mb"] < TARGET_RSS_GROWTH_MB),
        }
        return out

    def timeline(self, step_s: float = 5.0) -> list[dict[str, float]]:
        """Per ``step_s`` bucket: results/s, latency p95, CPU % and RSS (for the report)."""
        rows = []
        t0 = self.settings["warmup_s"]
        start_receipt = self.receipts[0] if self.receipts else 0.0
        for bucket_start in np.arange(0.0, math.floor(self.window_s / step_s) * step_s, step_s):  # full only
            in_bucket = [
                i
                for i, t in enumerate(self.receipts)
                if bucket_start <= t - start_receipt < bucket_start + step_s
            ]
            lat = [self.latencies_ms[i] for i in in_bucket]
            res = [s for s in self.resources if bucket_start <= s["t"] - t0 < bucket_start + step_s]
            rows.append(
                {
                    "t_s": float(bucket_start + t0),
                    "fps": len(in_bucket) / step_s,
                    "latency_p95_ms": float(np.percentile(lat, 95)) if lat else math.nan,
                    "cpu_percent": float(np.mean([s["cpu_percent"] for s in res])) if res else math.nan,
                    "rss_mb": float(res[-1]["rss_mb"]) if res else math.nan,
                }
            )
        return rows

    def by_faces(self, scene_start: int = SCENE_START_FRAMES) -> list[dict[str, float]]:
        """Latency per number of faces the camera showed, over a scene's first frames and the rest.

        Why: the tail of the latency comes from frames with many faces or from a scene change, when
        every face is a new track (identity crop and standalone member due on its first frame); this
        tells the two apart.  ``detected`` is the mean number of faces in those frames' results.
        """
        rows: list[dict[str, float]] = []
        if not self.scene_per_result:
            return rows
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        shown, since = (np.asarray(column) for column in zip(*self.scene_per_result, strict=True))
        detected = np.asarray(self.faces_per_result, dtype=np.float64)
        early = since < scene_start
        for faces in sorted(set(shown.tolist())):
            row: dict[str, float] = {
                "faces": int(faces),
                "results": int((shown == faces).sum()),
                "detected": float(detected[shown == faces].mean()),
            }
            for name, mask in (
                ("all", shown == faces),
                ("scene_start", (shown == faces) & early),
                ("steady", (shown == faces) & ~early),
            ):
                values = lat[mask]
                for q in (50, 99):
                    row[f"{name}_p{q}_ms"] = float(np.percentile(values, q)) if values.size else math.nan
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "timeline": self.timeline(),
            "by_faces": self.by_faces(),
            "resources": self.resources,
            "comparisons": self.comparisons,
        }


def _frames(width: int, height: int) -> list[tuple[int, Image]]:
    """(faces, Image message) for scenes of 1..5 faces, a few drifted copies each (pre-encoded)."""
    out = []
    for count in range(1, 6):
        for shift in (-6.0, 0.0, 6.0):
            out.append((count, rgb_to_image_msg(make_frame(list(range(count)), width, height, shift=shift))))
    return out


def camera_process(width: int, height: int, rate: float, seconds: float, go: Any, reports: Any) -> None:
    """The camera, in a process of its own: publish pre-encoded frames at ``rate`` Hz once ``go`` is set.

    Why a separate process: in one process with the result subscriber, the executor's threads held
    the GIL and the publishing loop stalled (gaps up to 1.8 s, then bursts), which measured the
    benchmark rather than the node.  Reports ``("ready", None)`` once the node has subscribed and
    ``("published", [(header stamp in ns, faces shown, frames since the scene began)])`` at the end
    (wall-clock stamps, as the results' stamps).
    """
    rclpy.init()
    node = rclpy.create_node("fp_benchmark_camera")
    try:
        frames = _frames(width, height)
        publisher = node.create_publisher(Image, TOPIC, qos_profile_system_default)
        deadline = time.monotonic() + 30.0
        while publisher.get_subscription_count() == 0:  # discovery needs no spinning
            if time.monotonic() > deadline:
                reports.put(("error", "the node never subscribed to the benchmark topic"))
                return
            time.sleep(0.05)
        reports.put(("ready", None))
        go.wait()
        period, start = 1.0 / rate, time.monotonic()
        stamps: list[tuple[int, int, int]] = []
        scene_began, last_scene = 0, -1
        tick = 0
        while True:
            target = start + tick * period
            now = time.monotonic()
            if now - start >= seconds:
                break
            if target > now:
                time.sleep(target - now)
            scene = int((time.monotonic() - start) / 2.0) % 5  # 1..5 faces, 2 s each
            if scene != last_scene:
                scene_began, last_scene = tick, scene
            faces, msg = frames[scene * 3 + tick % 3]
            stamp = node.get_clock().now()
            msg.header = Header(stamp=stamp.to_msg(), frame_id="benchmark_camera")
            stamps.append((stamp.nanoseconds, faces, tick - scene_began))
            publisher.publish(msg)
            tick += 1
        reports.put(("published", stamps))
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def _expect(reports: Any, kind: str, timeout: float, camera: Any) -> Any:
    """The camera process's next report, which must be ``kind``; a clear error otherwise."""
    try:
        got, payload = reports.get(timeout=timeout)
    except queue.Empty:
        raise DemoError(f"no '{kind}' report from the camera process (exit code {camera.exitcode})") from None
    if got != kind:
        raise DemoError(f"camera process: {payload}")
    return payload


def run_benchmark(
    args: argparse.Namespace,
    node_transports: str = "",
    overrides: Mapping[str, Any] | None = None,
    node_executor: str = "",
) -> BenchmarkResult:
    """Start the node, publish for warmup + duration seconds, collect results and resource samples.

    ``node_transports`` sets ``FASTDDS_BUILTIN_TRANSPORTS`` for the node process only ("" = the node's
    own choice); the publisher, like a camera driver, keeps the environment's transports.
    ``overrides`` are node parameters set for this run (the comparisons: ``mirror_average``,
    ``encoder_stage``, ``fuse_columns``, ``standalone_members``); ``node_executor`` sets the node's
    ``FACIAL_PERCEPTION_EXECUTOR`` ("" = the node's default, ``pooled``).
    """
    from facial_perception.core.benchmark import machine_summary
    from facial_perception.ros.perception_node import EXECUTOR_ENV, select_model

    workdir = Path(tempfile.mkdtemp(prefix="fp_benchmark_"))
    base_params = dict(getattr(args, "base_params", ()))  # --param, set by main()
    params: dict[str, Any] = {
        "image_topic": TOPIC,
        "image_reliability": args.reliability,
        "device": args.device,
        "gallery_path": str(workdir / "gallery.db"),
        "columns_dir": args.columns_dir or str(workdir / "columns"),
        "publish_debug_image": False,
        "mirror_average": True,
        "encoder_stage": True,
        "fuse_columns": True,
        "standalone_members": True,
        **base_params,
        **(overrides or {}),
    }
    if args.model_path:
        params["model_path"] = args.model_path
    if args.detector:
        params["detector"] = args.detector
    source = select_model(str(params.get("model_path", "")), str(params["columns_dir"]))
    settings = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rate_hz": args.rate,
        "resolution": f"{args.width}x{args.height}",
        "faces_per_frame": "1-5 (scene changes every 2 s)",
        "image_reliability": args.reliability,
        "device": args.device,
        "detector": args.detector or "node default",
        "mirror_average": params["mirror_average"],
        "encoder_stage": params["encoder_stage"],
        "fuse_columns": params["fuse_columns"],
        "standalone_members": params["standalone_members"],
        **{
            name: params.get(name, _param_defaults()[name])
            for name in ("standalone_every", "max_frames_in_flight", "attributes_every")
        },
        "model": str(source.path) if source.path else "untrained lite model (random weights, same compute)",
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()}, {machine_summary()}",
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "resource_sampler": "psutil" if _has_psutil() else "/proc",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "node_fastdds_transports": node_transports
        or os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA (node default)"),
        "publisher_fastdds_transports": os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", "DEFAULT (unset)"),
        "node_executor": node_executor or os.environ.get(EXECUTOR_ENV, "") or "pooled (node default)",
        "base_params": base_params,
        "overrides": dict(overrides or {}),
    }
    result = BenchmarkResult(settings)
    log = workdir / "node.log"
    node_env = dict(os.environ)
    if node_transports:
        node_env["FASTDDS_BUILTIN_TRANSPORTS"] = node_transports
    if node_executor:
        node_env[EXECUTOR_ENV] = node_executor
    process = start_perception_node(params, log_path=log, env=node_env)
    rclpy.init()
    node = rclpy.create_node("fp_benchmark")
    executor = PooledExecutor(num_threads=2)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    lock = threading.Lock()
    measuring = threading.Event()
    # (stamp ns, latency ms, receipt monotonic s, faces): kept from the start; the results of frames
    # stamped inside the measured window are counted at the end (a result received early in the
    # window may belong to a warm-up frame)
    results: list[tuple[int, float, float, int]] = []

    def on_faces(msg: FaceArray) -> None:
        now_ns = node.get_clock().now().nanoseconds
        if not measuring.is_set():
            return
        stamp_ns = stamp_to_ns(msg.header.stamp)
        with lock:
            results.append((stamp_ns, (now_ns - stamp_ns) / 1e6, time.monotonic(), len(msg.faces)))

    node.create_subscription(
        FaceArray,
        "/facial_perception/faces",
        on_faces,
        QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
    )
    total_s = args.warmup + args.duration
    mp = multiprocessing.get_context("spawn")
    go, reports = mp.Event(), mp.Queue()
    camera = mp.Process(
        target=camera_process,
        args=(args.width, args.height, args.rate, total_s, go, reports),
        name="fp-benchmark-camera",
        daemon=True,
    )
    sampler = ProcessSampler(process.pid)
    try:
        spinner.start()
        LifecycleClient(node).bring_up(args.startup_timeout)
        camera.start()
        _expect(reports, "ready", 60.0, camera)
        sampler.start()
        print(
            f"benchmark: publishing {args.rate:g} Hz {args.width}x{args.height} for {args.warmup:g} s warm-up"
            f" + {args.duration:g} s ...",
            flush=True,
        )
        start = time.monotonic()
        wall_minus_monotonic_ns = time.time_ns() - time.monotonic_ns()  # the camera stamps in wall time
        measuring.set()
        go.set()
        window_start, end = start + args.warmup, start + total_s
        while time.monotonic() < end:
            if process.poll() is not None:
                raise DemoError(f"the node exited with code {process.returncode} (log: {log})")
            if not camera.is_alive():
                raise DemoError(f"the camera process exited with code {camera.exitcode}")
            time.sleep(0.05)
        stamps = _expect(reports, "published", 30.0, camera)
        time.sleep(0.3)  # let the last results arrive
        measuring.clear()
        result.window_s = end - window_start
        # frames and results are both counted by the frames' stamps: every counted result is one of
        # the counted frames
        first_ns, end_ns = (int(t * 1e9) + wall_minus_monotonic_ns for t in (window_start, end))
        result.published = sum(1 for stamp_ns, _, _ in stamps if first_ns <= stamp_ns < end_ns)
        scenes = {stamp_ns: (faces, since) for stamp_ns, faces, since in stamps}
        with lock:
            for stamp_ns, latency_ms, receipt, faces in results:
                if first_ns <= stamp_ns < end_ns:  # frames published inside the window
                    result.received += 1
                    result.latencies_ms.append(latency_ms)
                    result.receipts.append(receipt)
                    result.faces_per_result.append(faces)
                    result.scene_per_result.append(scenes.get(stamp_ns, (0, 0)))
    finally:
        stop_process(process)  # first: a failure below must never leave the node running
        if camera.is_alive():
            camera.terminate()
        camera.join(5.0)
        sampler.stop()
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
    result.resources = sampler.samples
    # Other processes on the machine share the cores: the load average puts the figures in context.
    result.settings["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return result


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt(value: float, digits: int = 1) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def write_markdown(result: BenchmarkResult, path: Path, json_path: Path) -> None:
    """The human-readable report (atomic write)."""
    s = result.summary()
    st = result.settings
    met = ["yes" if ok else "no" for ok in s["targets"].values()]  # fps, p99, rss (insertion order)
    setup = (
        f"Setup: a camera process publishes {st['resolution']} `rgb8` frames at {st['rate_hz']:g} Hz with "
        f"{st['faces_per_frame']} (real face photos of the demo) over real DDS (Fast DDS, loopback, "
        f"`image_reliability: {st['image_reliability']}`); the perception node runs in its own process on "
        f"`{st['device']}` with model: {st['model']}. Latency is the image header stamp to the receipt of "
        f"its `FaceArray` in the benchmark process (a third process). The first {st['warmup_s']:g} s are "
        f"warm-up and excluded; {st['duration_s']:g} s are measured (frames, and the results of frames, "
        "stamped inside that window). CPU % is of one core (200 % = both "
        f"cores), sampled each second with {st['resource_sampler']}. Machine load average (1 min) at "
        f"start / end: {st.get('load_average_1min_at_start', 'n/a')} / "
        f"{st.get('load_average_1min_at_end', 'n/a')}."
        + (
            " Node parameters set in every run (`--param`): "
            + ", ".join(f"`{k}={v}`" for k, v in st["base_params"].items())
            + "."
            if st.get("base_params")
            else ""
        )
    )
    fps = f"{_fmt(s['processed_fps'])} (published {_fmt(s['published_fps'])})"
    latency = f"{_fmt(s['latency_p50_ms'])} / {_fmt(s['latency_p95_ms'])} / {_fmt(s['latency_p99_ms'])} ms"
    rss = (
        f"{_fmt(s['rss_start_mb'])} / {_fmt(s['rss_end_mb'])} / {_fmt(s['rss_max_mb'])} MB "
        f"(growth {_fmt(s['rss_growth_mb'])} MB)"
    )
    lines = [
        "# ROS node benchmark",
        "",
        f"Generated by `python -m facial_perception.ros.ros_benchmark` on {st['date']} ({st['machine']}, "
        f"{st['cpu_count']} CPU cores, no GPU). Raw data: `{json_path.name}`.",
        "",
        setup,
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
        f"| processed fps | {fps} | >= {TARGET_FPS:g} | {met[0]} |",
        f"| latency p50 / p95 / p99 | {latency} | p99 <= {TARGET_P99_MS:g} ms | {met[1]} |",
        f"| RSS start / end / max | {rss} | growth < {TARGET_RSS_GROWTH_MB:g} MB | {met[2]} |",
        f"| node CPU mean / max | {_fmt(s['cpu_percent_mean'])} / {_fmt(s['cpu_percent_max'])} % | | |",
        f"| frames skipped (newest-frame policy) | {_fmt(s['frames_skipped_percent'])} % of "
        f"{s['frames_published']} | | |",
        f"| faces per processed frame | {_fmt(s['mean_faces_per_frame'], 2)} | | |",
        "",
        "## Over time",
        "",
        "| t (s) | results/s | latency p95 (ms) | node CPU % | node RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for row in result.timeline():
        cells = [f"{row['t_s']:.0f}", _fmt(row["fps"]), _fmt(row["latency_p95_ms"]), _fmt(row["cpu_percent"])]
        lines.append("| " + " | ".join([*cells, _fmt(row["rss_mb"])]) + " |")
    lines += [
        "",
        "## Latency by faces in the frame",
        "",
        f"Faces the camera showed; a scene's start is its first {SCENE_START_FRAMES} published frames "
        "(every face a new track: its identity crop and standalone member are due); steady is the rest.",
        "",
        "| faces shown | detected (mean) | results | p50 / p99 all (ms) | p50 / p99 scene start (ms) "
        "| p50 / p99 steady (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.by_faces():
        cells = [str(row["faces"]), _fmt(row["detected"], 2), str(row["results"])] + [
            f"{_fmt(row[f'{name}_p50_ms'])} / {_fmt(row[f'{name}_p99_ms'])}"
            for name in ("all", "scene_start", "steady")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    base = st.get("base_params", {})

    def section(title: str, text: str, header: str, runs: list[tuple[Any, dict[str, Any]]]) -> None:
        """One same-run comparison: the main run first, then the others, with their fps ratio to it."""
        lines.extend(["", f"## {title}", ""])
        lines.extend([text, ""] if text else [])
        lines.append(f"| {header} | processed fps | latency p50 / p95 / p99 (ms) | node CPU % | fps ratio |")
        lines.append("|---|---|---|---|---|")
        for label, summ in runs:
            lat = " / ".join(_fmt(summ[f"latency_p{q}_ms"]) for q in (50, 95, 99))
            ratio = summ["processed_fps"] / s["processed_fps"] if s["processed_fps"] else math.nan
            cells = [
                str(label),
                _fmt(summ["processed_fps"]),
                lat,
                _fmt(summ["cpu_percent_mean"]),
                _fmt(ratio, 2),
            ]
            lines.append("| " + " | ".join(cells) + " |")

    def of_kind(kind: str) -> list[dict[str, Any]]:
        return [c for c in result.comparisons if c.get("kind", "transports") == kind]

    main_run = {"settings": st, "summary": s}
    for kind, title, text in _PARAMETER_COMPARISONS:
        if of_kind(kind):
            runs = [
                (str(c["settings"].get(kind, True)).lower(), c["summary"]) for c in [main_run, *of_kind(kind)]
            ]
            section(f"{title} (node parameter `{kind}`; {SAME_RUN})", text, kind, runs)
    for name in dict.fromkeys(c["name"] for c in of_kind("param")):
        default = f"{base[name]} (--param)" if name in base else f"{_param_defaults().get(name)} (default)"
        compared = [c for c in of_kind("param") if c["name"] == name]
        runs = [
            (c["settings"].get("overrides", {}).get(name, default), c["summary"])
            for c in [main_run, *compared]
        ]
        section(f"Node parameter `{name}` ({SAME_RUN})", "", name, runs)
    if of_kind("executor"):
        text = (
            "The node spins on the package's `PooledExecutor`; `multi_threaded` is rclpy's "
            "`MultiThreadedExecutor`, whose spin thread loops while a callback waits in its pool "
            "(ros2/rclpy#1452; docs/ROS_NODE.md). Chosen with `FACIAL_PERCEPTION_EXECUTOR` in the "
            "node's environment."
        )
        runs = [
            (c["settings"].get("node_executor", "pooled"), c["summary"])
            for c in [main_run, *of_kind("executor")]
        ]
        section(f"Executor of the node ({SAME_RUN})", text, "node executor", runs)
    if of_kind("transports"):
        text = (
            "The node sets `FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA` for itself unless the environment chooses "
            "(docs/ROS_NODE.md); the publisher keeps the default transports, like a camera driver would."
        )
        runs = [
            (c["settings"]["node_fastdds_transports"], c["summary"])
            for c in [main_run, *of_kind("transports")]
        ]
        section(f"Fast DDS transports of the node ({SAME_RUN})", text, "node transports", runs)
    lines += [
        "",
        "Notes: camera, node and benchmark processes share the same 2 cores (the camera serialises 30 frames "
        "of 0.9 MB per second), so the node has less than the whole machine. Frames the node cannot take "
        "in time are skipped (one-slot buffer), never queued, so latency stays bounded when fps drops. "
        "Re-run: `make benchmark` or `python -m facial_perception.ros.ros_benchmark --duration 60`.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


SAME_RUN = "same run, one after the other"

#: Node parameters the benchmark also runs with ``false`` in the same run: (name, title, explanation).
_PARAMETER_COMPARISONS = (
    (
        "encoder_stage",
        "Three worker threads or two",
        "With `true` (the default) the model's encoder runs in a third worker thread between the first "
        "stage (decode, detect, track, crop) and the columns; `false` runs the whole model in the second "
        "(docs/PIPELINE.md).",
    ),
    (
        "fuse_columns",
        "Fused columns or one by one",
        "With `true` (the default) the frozen task columns run as one stack of wide layers (`FusedColumns`, "
        "BatchNorm folded: the same results with under a third of the tensor ops); `false` runs them one "
        "after the other as in training (docs/PIPELINE.md).",
    ),
    (
        "mirror_average",
        "Mirror averaging",
        "With `true` (the default) the columns whose checkpoint asks for it average their probabilities "
        "over the face and its mirror image: twice the model's work per face (the v4 model asked for it "
        "on emotion, gender and age; v5 on none: docs/MODEL_CARD.md#ensemble-columns).",
    ),
    (
        "standalone_members",
        "Standalone members",
        "With `true` (the default) columns with standalone members average their probabilities with "
        "theirs: one more encoder pass per face for each (the v6 model: one for gender, +0.8 points of "
        "validation accuracy; docs/MODEL_CARD.md#standalone-gender-member-v6) on a track's first frame and "
        "every `standalone_every`-th (default 3; in between their last probabilities stand in the mix); "
        "`false`: the columns alone.",
    ),
)


@functools.cache
def _param_defaults() -> dict[str, Any]:
    """The node's parameters and defaults (imported lazily: the node module loads torch)."""
    from facial_perception.ros.perception_node import PARAMETERS

    return {p.name: p.default for p in PARAMETERS}


def parse_param_override(text: str, flag: str = "--compare-param") -> tuple[str, Any]:
    """``NAME=VALUE`` -> ``(name, value)`` typed like the node parameter's default; ValueError if unknown."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    if not sep or not name or not raw:
        raise ValueError(f"{flag} wants NAME=VALUE, got {text!r}")
    if name not in _param_defaults():
        raise ValueError(f"{flag}: the node has no parameter {name!r}")
    default = _param_defaults()[name]
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return name, raw.lower() == "true"
        if isinstance(default, int):
            return name, int(raw)
        if isinstance(default, float):
            return name, float(raw)
    except ValueError:
        kind = type(default).__name__
        raise ValueError(f"{flag}: {name} takes a {kind} value, got {raw!r}") from None
    return name, raw


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facial_perception ros_benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds (default 60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds excluded at the start (default 5)")
    parser.add_argument("--rate", type=float, default=30.0, help="published frames per second (default 30)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable")
    parser.add_argument("--detector", default="", help="detector parameter of the node (default: the node's)")
    parser.add_argument("--model-path", default="", help="checkpoint (default: what the node would load)")
    parser.add_argument(
        "--columns-dir", default="", help="columns_dir of the node (default: a fresh temp dir)"
    )
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmark_ros.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "BENCHMARK_ROS.md")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument(
        "--node-transports",
        default="",
        help="FASTDDS_BUILTIN_TRANSPORTS of the node process (default: the node's own choice, LARGE_DATA)",
    )
    parser.add_argument(
        "--compare-transports",
        nargs="*",
        default=["DEFAULT"],
        metavar="NAME",
        help="also run the benchmark with these node transports, for comparison (default: DEFAULT)",
    )
    parser.add_argument(
        "--no-compare-stages",
        action="store_true",
        help="skip the run with the node's encoder_stage false (the whole model in one worker thread)",
    )
    parser.add_argument(
        "--no-compare-fused",
        action="store_true",
        help="skip the run with the node's fuse_columns false (the columns one by one)",
    )
    parser.add_argument(
        "--no-compare-mirror",
        action="store_true",
        help="skip the second run with the node's mirror_average false",
    )
    parser.add_argument(
        "--no-compare-standalone",
        action="store_true",
        help="skip the run with the node's standalone_members false (the columns alone)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set this node parameter in every run (repeatable), e.g. to compare in the other order",
    )
    parser.add_argument(
        "--compare-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also run with this node parameter set (repeatable; e.g. cpu_threads=2, detect_every=2)",
    )
    parser.add_argument(
        "--no-compare-executor",
        action="store_true",
        help="skip the run with the node on rclpy's MultiThreadedExecutor",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the summary, write JSON + Markdown; exit code 0 even when a target is missed."""
    args = _parser().parse_args(argv)
    if args.duration <= 0 or args.rate <= 0:
        print("ros_benchmark: error: --duration and --rate must be positive", file=sys.stderr)
        return 2
    try:
        extra = [parse_param_override(text) for text in args.compare_param]
        args.base_params = [parse_param_override(text, "--param") for text in args.param]
    except ValueError as exc:
        print(f"ros_benchmark: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    try:
        result = run_benchmark(args, args.node_transports)
        for transports in args.compare_transports:
            print(f"benchmark: again with the node on FASTDDS_BUILTIN_TRANSPORTS={transports}", flush=True)
            other = run_benchmark(args, transports)
            result.comparisons.append(
                {"kind": "transports", "settings": other.settings, "summary": other.summary()}
            )
        skipped = {
            "encoder_stage": args.no_compare_stages,
            "fuse_columns": args.no_compare_fused,
            "mirror_average": args.no_compare_mirror,
            "standalone_members": args.no_compare_standalone,
        }
        for name, skip in skipped.items():
            if skip:
                continue
            print(f"benchmark: again with the node's {name} false", flush=True)
            other = run_benchmark(args, args.node_transports, {name: False})
            result.comparisons.append({"kind": name, "settings": other.settings, "summary": other.summary()})
        for name, value in extra:
            print(f"benchmark: again with the node's {name} {value!r}", flush=True)
            other = run_benchmark(args, args.node_transports, {name: value})
            result.comparisons.append(
                {"kind": "param", "name": name, "settings": other.settings, "summary": other.summary()}
            )
        if not args.no_compare_executor:
            print("benchmark: again with the node on rclpy's MultiThreadedExecutor", flush=True)
            other = run_benchmark(args, args.node_transports, node_executor="multi_threaded")
            result.comparisons.append(
                {"kind": "executor", "settings": other.settings, "summary": other.summary()}
            )
    except DemoError as exc:
        print(f"ros_benchmark: error: {exc}", file=sys.stderr)
        return 1
    atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2, allow_nan=True) + "\n")
    write_markdown(result, args.markdown, args.json)
    summary = result.summary()
    print(json.dumps({k: v for k, v in summary.items()}, indent=2))
    print(f"wrote {args.json} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
