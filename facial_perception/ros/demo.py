"""The main job (``make demo``): a camera, the perception node and a listener, over real DDS.

The perception node runs in its own process (as on a robot), started with the demo parameter file
and brought to *active* by a small lifecycle client (``/facial_perception/change_state``: configure,
then activate -- what ``perception.launch.py`` does with launch_ros).  The demo camera (real face
photos from scikit-image/matplotlib) and the listener (prints per-face lines, writes an annotated
video + PNG) share this process on one executor.  After ``--duration`` seconds everything stops and
a summary is printed: processed results per second, latency, where the annotated output is, and
-- plainly -- whether the weights were untrained.

    python -m facial_perception.ros.demo --duration 20 --output out/demo_annotated.mp4

The helpers (:func:`start_perception_node`, :class:`LifecycleClient`, :func:`stop_process`) are
reused by the ROS tests and the benchmark.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rclpy
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.node import Node
from rclpy.parameter import Parameter

from facial_perception.ros.executors import PooledExecutor

__all__ = [
    "DemoError",
    "LifecycleClient",
    "find_config",
    "main",
    "param_args",
    "start_perception_node",
    "stop_process",
]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "facial_perception"


class DemoError(RuntimeError):
    """The demo graph could not be brought up (one line, e.g. the node failed to configure)."""


def find_config(name: str) -> Path:
    """A file of the package's ``config/``: the source checkout first, else the installed share folder."""
    candidates = [REPO / "config" / name, Path(sys.prefix) / "share" / PACKAGE / "config" / name]
    candidates += [
        Path(p) / "share" / PACKAGE / "config" / name
        for p in os.environ.get("AMENT_PREFIX_PATH", "").split(":")
        if p
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise DemoError(
        f"config file {name} not found (looked in {', '.join(str(c.parent) for c in candidates)})"
    )


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    return str(value)


def param_args(params: Mapping[str, Any]) -> list[str]:
    """``{"a": 1}`` -> ``["-p", "a:=1"]`` (ROS command-line parameter overrides)."""
    out: list[str] = []
    for name, value in params.items():
        out += ["-p", f"{name}:={_param_text(value)}"]
    return out


def start_perception_node(
    params: Mapping[str, Any] | None = None,
    params_file: Path | None = None,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m facial_perception.ros.perception_node`` as a child process (unconfigured).

    Its output goes to ``log_path`` (or is discarded).  The child inherits ``PYTHONPATH`` with the
    repository first, so a source checkout runs its own code.
    """
    command = [sys.executable, "-m", "facial_perception.ros.perception_node", "--ros-args"]
    if params_file is not None:
        command += ["--params-file", str(params_file)]
    command += param_args(params or {})
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH", "")]))
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env)
    finally:
        if log_path is not None:
            out.close()


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGINT (clean ROS shutdown), then SIGKILL after ``timeout``; returns the exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)
    return process.returncode


class LifecycleClient:
    """Drives a lifecycle node through ``<node>/change_state`` and ``<node>/get_state``."""

    def __init__(self, node: Node, target: str = f"/{PACKAGE}") -> None:
        self.node = node
        self.target = target
        self._change = node.create_client(ChangeState, f"{target}/change_state")
        self._get = node.create_client(GetState, f"{target}/get_state")

    def _call(self, client: Any, request: Any, timeout: float, resend_after: float | None = None) -> Any:
        """Call and wait; an idempotent request is re-sent every ``resend_after`` s without an answer.

        Re-sending matters after a node was killed: DDS keeps announcing the dead server until its
        lease expires, so ``wait_for_service`` can succeed before the new server is matched, and a
        request sent then is lost.
        """
        deadline = time.monotonic() + timeout
        if not client.wait_for_service(timeout_sec=timeout):
            raise DemoError(f"{client.srv_name} not available after {timeout:g} s (is the node running?)")
        while True:
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _f, event=done: event.set())
            wait = deadline - time.monotonic()
            if resend_after is not None:
                wait = min(wait, resend_after)
            if done.wait(max(wait, 0.0)):
                return future.result()
            client.remove_pending_request(future)
            if time.monotonic() >= deadline:
                raise DemoError(f"{client.srv_name} did not answer within {timeout:g} s")

    def state(self, timeout: float = 10.0) -> str:
        """The node's current state label (``unconfigured``, ``inactive``, ``active``, ...)."""
        return str(self._call(self._get, GetState.Request(), timeout, resend_after=2.0).current_state.label)

    def change(self, transition_id: int, timeout: float = 120.0) -> None:
        """Request a transition; :class:`DemoError` when the node refuses or fails it."""
        request = ChangeState.Request()
        request.transition.id = transition_id
        if not self._call(self._change, request, timeout).success:
            raise DemoError(f"{self.target}: transition {transition_id} failed (see the node's log)")

    def bring_up(self, timeout: float = 120.0) -> None:
        """configure (loads the model: can take a while on first start) then activate."""
        if self.state(timeout) == "unconfigured":
            self.change(Transition.TRANSITION_CONFIGURE, timeout)
        if self.state(timeout) == "inactive":
            self.change(Transition.TRANSITION_ACTIVATE, timeout)

    @staticmethod
    def active_id() -> int:
        return State.PRIMARY_STATE_ACTIVE


def _parse_node_params(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        if ":=" not in item and "=" not in item:
            raise DemoError(f"--param wants name:=value, got {item!r}")
        name, value = item.split(":=", 1) if ":=" in item else item.split("=", 1)
        params[name.strip()] = value.strip()
    return params


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facial_perception demo",
        description="Camera (real face photos) -> facial_perception node -> listener, over real DDS.",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds to run (default 20)")
    parser.add_argument(
        "--output", default="out/demo_annotated.mp4", help="annotated .mp4 or .png (default %(default)s)"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="camera frames per second (default 10)")
    parser.add_argument(
        "--compressed", action="store_true", help="send JPEG CompressedImage instead of raw rgb8"
    )
    parser.add_argument(
        "--params-file", type=Path, default=None, help="node parameter file (default config/demo.yaml)"
    )
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME:=VALUE", help="node parameter override"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-face lines, only the summary")
    parser.add_argument(
        "--hri-bridge",
        action="store_true",
        help="also run the ROS4HRI bridge (needs hri_msgs) and summarise its /humans/... topics",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=180.0, help="seconds allowed for the node to come up"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo graph for ``--duration`` seconds and print a summary; returns the exit code."""
    args = _build_parser().parse_args(argv)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    try:
        return _run(args)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1


def _start_hri_bridge(
    client_node: Node, log_dir: Path, timeout: float, camera_topic: str, compressed: bool
) -> tuple[subprocess.Popen[bytes], Node]:
    """The ROS4HRI bridge process on the node's faces (face images from the demo's camera), brought up,
    and a listener of its topics."""
    try:
        from facial_perception.ros.hri_listener import HriListener

        listener = HriListener()
    except ImportError:
        raise DemoError("--hri-bridge needs hri_msgs (scripts/setup.sh builds it; on a robot: apt)") from None
    from facial_perception.ros.hri_bridge import start_hri_bridge

    log = log_dir / "demo_hri_bridge.log"
    log.unlink(missing_ok=True)
    params = {
        "faces_topic": f"/{PACKAGE}/faces",
        "image_topic": camera_topic,  # the demo's sample photos: /cropped and /aligned on
        "input_type": "compressed" if compressed else "raw",
    }
    bridge = start_hri_bridge(params, log)
    try:
        LifecycleClient(client_node, "/hri_bridge").bring_up(timeout)
    except DemoError:
        stop_process(bridge)
        listener.destroy_node()
        raise
    print(f"demo: ROS4HRI bridge active (log: {log})", flush=True)
    return bridge, listener


def _run(args: argparse.Namespace) -> int:
    from facial_perception.ros.demo_camera import DemoCamera
    from facial_perception.ros.demo_listener import DemoListener
    from facial_perception.ros.perception_node import select_model

    params_file = args.params_file or find_config("demo.yaml")
    node_params = _parse_node_params(args.param)
    import yaml

    with open(params_file, encoding="utf-8") as f:
        file_params = (yaml.safe_load(f) or {}).get(f"/{PACKAGE}", {}).get("ros__parameters", {})
    topic = str(node_params.get("image_topic", file_params.get("image_topic", "/demo/image_raw")))
    node_params.setdefault("image_topic", topic)
    if args.compressed:
        node_params["input_type"] = "compressed"
    source = select_model(
        str(node_params.get("model_path", file_params.get("model_path", ""))),
        str(
            node_params.get(
                "columns_dir", file_params.get("columns_dir", "~/.local/share/facial_perception/models")
            )
        ),
    )
    if source.untrained:
        print(
            "demo: NOTE -- the weights are UNTRAINED (no trained checkpoint installed yet): faces are"
            " detected and tracked, but identity/age/gender/emotion labels are random.",
            flush=True,
        )
    else:
        print(f"demo: model {source.path} ({source.reason})", flush=True)

    log_dir = Path(args.output).expanduser().resolve().parent
    log_dir.mkdir(parents=True, exist_ok=True)
    node_log = log_dir / "demo_perception_node.log"
    node_log.unlink(missing_ok=True)
    process = start_perception_node(node_params, params_file, node_log)
    rclpy.init(args=["--ros-args", "--params-file", str(params_file)])
    executor = PooledExecutor(num_threads=3)
    nodes: list[Node] = []
    listener: DemoListener | None = None
    bridge: subprocess.Popen[bytes] | None = None
    hri_listener: Any = None  # HriListener with --hri-bridge
    hri_lines: list[str] = []
    spinner = threading.Thread(target=executor.spin, daemon=True)
    try:
        client_node = rclpy.create_node("demo_lifecycle_client")
        nodes.append(client_node)
        executor.add_node(client_node)
        spinner.start()
        print(f"demo: starting the perception node (log: {node_log}) ...", flush=True)
        started = time.monotonic()
        try:
            LifecycleClient(client_node).bring_up(args.startup_timeout)
        except DemoError as exc:
            tail = node_log.read_text(errors="replace").strip().splitlines()[-5:] if node_log.exists() else []
            raise DemoError(f"{exc}\n  " + "\n  ".join(tail)) from None
        print(f"demo: perception node active after {time.monotonic() - started:.1f} s", flush=True)
        if args.hri_bridge:
            bridge, hri_listener = _start_hri_bridge(
                client_node, log_dir, args.startup_timeout, topic, args.compressed
            )
            nodes.append(hri_listener)
            executor.add_node(hri_listener)
        listener = DemoListener(
            parameter_overrides=[
                Parameter("output_path", value=str(args.output)),
                Parameter("image_topic", value=topic),
                Parameter("video_fps", value=float(args.rate)),
                Parameter("quiet", value=bool(args.quiet)),
            ]
        )
        listener.note = "UNTRAINED WEIGHTS - labels are random" if source.untrained else ""
        camera = DemoCamera(
            parameter_overrides=[
                Parameter("image_topic", value=topic),
                Parameter("rate", value=float(args.rate)),
                Parameter("num_frames", value=0),
                Parameter("compressed", value=bool(args.compressed)),
            ]
        )
        for node in (listener, camera):
            nodes.append(node)
            executor.add_node(node)
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DemoError(
                    f"the perception node exited with code {process.returncode} (log: {node_log})"
                )
            time.sleep(0.2)
    finally:
        stop_process(bridge)
        stop_process(process)
        executor.shutdown(timeout_sec=2.0)
        files = listener.finish() if listener is not None else []
        if hri_listener is not None:
            hri_lines = hri_listener.summary()
            aligned = hri_listener.save_aligned(log_dir / "hri_aligned.png")
            hri_lines.append(f"ROS4HRI aligned faces: {aligned}" if aligned else "ROS4HRI: no aligned face")
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
    stats = listener.stats
    print("-" * 78)
    print(f"demo summary ({args.duration:g} s, camera {args.rate:g} Hz): {stats.summary()}")
    for line in hri_lines:
        print(line)
    if stats.messages == 0:
        print(f"demo: no results arrived -- see the node log {node_log}")
    for path in files:
        print(f"annotated output: {path}")
    if source.untrained:
        print("weights: UNTRAINED -- train and install models/default.safetensors for meaningful labels")
    else:
        print(f"weights: {source.path}")
    return 0 if stats.messages > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
