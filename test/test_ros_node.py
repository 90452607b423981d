"""The perception node over real DDS: the node runs in a child process, this test is another rclpy node.

conftest.py gives every test run its own ROS_DOMAIN_ID and LOCALHOST discovery.  Waits are for
discovery (subscription counts, wait_for_service) or for the expected message, never blind sleeps;
node processes are always stopped in ``finally``.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from node_params import perception_test_params

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("facial_perception.msg", reason="interfaces not built: run scripts/setup.sh")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from facial_perception.action import AddTaskColumn  # noqa: E402
from facial_perception.msg import FaceArray  # noqa: E402
from facial_perception.srv import EnrolIdentity, ForgetIdentity, ListIdentities, ListTasks  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from facial_perception.ros.conversions import rgb_to_compressed_msg, rgb_to_image_msg, stamp_to_ns  # noqa: E402
from facial_perception.ros.demo import LifecycleClient, start_perception_node, stop_process  # noqa: E402
from facial_perception.ros.demo_camera import make_frame  # noqa: E402
from facial_perception.ros.spinning import BackgroundNode  # noqa: E402

TOPIC = "/test_camera/image_raw"
STARTUP_S = 90.0


class Harness(BackgroundNode):
    """A test-side rclpy node spinning in a background thread, with publishers/clients for the node."""

    def __init__(self) -> None:
        super().__init__("fp_test_client")
        self.faces: list[FaceArray] = []
        self._cond = threading.Condition()
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(FaceArray, "/facial_perception/faces", self._on_faces, qos)
        self.diagnostics: list[DiagnosticStatus] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos)
        self.raw_pub = self.node.create_publisher(Image, TOPIC, 10)
        self.compressed_pub = self.node.create_publisher(CompressedImage, TOPIC + "/compressed", 10)
        self.lifecycle = LifecycleClient(self.node)

    def _on_faces(self, msg: FaceArray) -> None:
        with self._cond:
            self.faces.append(msg)
            self._cond.notify_all()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self._cond:
            self.diagnostics += [s for s in msg.status if "face perception" in s.name]
            self._cond.notify_all()

    # -- waiting ------------------------------------------------------------------------------
    def wait_for_subscriber(self, publisher: Any, timeout: float = 30.0) -> None:
        self.wait_until(
            lambda: publisher.get_subscription_count() > 0, timeout, f"a subscriber on {publisher.topic}"
        )
        self.wait_until(
            lambda: self.node.count_publishers("/facial_perception/faces") > 0, timeout, "faces publisher"
        )

    def send_until_result(
        self, make_msg: Callable[[Header], Any], publisher: Any, timeout: float = 30.0, frame_id: str = "cam"
    ) -> FaceArray:
        """Publish frames (new stamp each) until a FaceArray with one of their stamps arrives."""
        sent: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            header = Header(stamp=self.node.get_clock().now().to_msg(), frame_id=frame_id)
            sent.add(stamp_to_ns(header.stamp))
            publisher.publish(make_msg(header))
            with self._cond:
                self._cond.wait_for(lambda: any(stamp_to_ns(f.header.stamp) in sent for f in self.faces), 0.5)
                for msg in self.faces:
                    if stamp_to_ns(msg.header.stamp) in sent:
                        return msg
        raise AssertionError(f"no FaceArray for the published frames within {timeout:g} s")

    def call_while_publishing(
        self, srv_type: Any, name: str, request: Any, frame: np.ndarray, timeout: float = 30.0
    ) -> Any:
        """Call a service that needs live camera frames, publishing frames until it answers."""
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _f: done.set())
            deadline = time.monotonic() + timeout
            while not done.wait(0.1):
                assert time.monotonic() < deadline, f"service {name} did not answer"
                header = Header(stamp=self.node.get_clock().now().to_msg(), frame_id="live")
                self.raw_pub.publish(rgb_to_image_msg(frame, header))
            return future.result()
        finally:
            self.node.destroy_client(client)

    def call(self, srv_type: Any, name: str, request: Any, timeout: float = 30.0) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _f: done.set())
            assert done.wait(timeout), f"service {name} did not answer"
            return future.result()
        finally:
            self.node.destroy_client(client)


def _params(tmp: Path, **extra: Any) -> dict[str, Any]:
    return perception_test_params(tmp, TOPIC, **extra)


class NodeUnderTest:
    """The node process + the harness; ``up()`` configures and activates it."""

    def __init__(self, harness: Harness, tmp: Path, **params: Any) -> None:
        self.harness = harness
        self.log = tmp / "node.log"
        self.process = start_perception_node(_params(tmp, **params), log_path=self.log)

    def up(self) -> None:
        try:
            self.harness.lifecycle.bring_up(STARTUP_S)
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- node log ---\n{self.log_text()}") from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def harness():
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def _raw(frame: np.ndarray) -> Callable[[Header], Image]:
    return lambda header: rgb_to_image_msg(frame, header)


def _faces_frame() -> np.ndarray:
    return make_frame([0, 1])  # astronaut + Grace Hopper, side by side, 640x480


# ------------------------------------------------------------------------------------------------
def test_image_in_faces_out_with_header_and_lifecycle(harness, tmp_path):
    node = NodeUnderTest(harness, tmp_path)
    try:
        assert harness.lifecycle.state(STARTUP_S) == "unconfigured"
        harness.lifecycle.change(Transition.TRANSITION_CONFIGURE, STARTUP_S)
        assert harness.lifecycle.state() == "inactive"
        # inactive: no camera subscription, nothing published
        assert harness.node.count_subscribers(TOPIC) == 0
        for _ in range(10):
            harness.raw_pub.publish(rgb_to_image_msg(_faces_frame(), Header(frame_id="cam")))
            time.sleep(0.05)
        assert harness.faces == []

        harness.lifecycle.change(Transition.TRANSITION_ACTIVATE)
        harness.wait_for_subscriber(harness.raw_pub)
        msg = harness.send_until_result(_raw(_faces_frame()), harness.raw_pub, frame_id="test_optical_frame")
        assert msg.header.frame_id == "test_optical_frame"
        assert len(msg.faces) == 2, f"expected both real faces, got {len(msg.faces)}"
        first, second = msg.faces
        assert first.roi.width * first.roi.height >= second.roi.width * second.roi.height
        for face in msg.faces:
            assert face.track_id >= 1 and 0.0 < face.detection_score <= 1.0
            assert 0.0 <= face.roi_normalized.x_min < face.roi_normalized.x_max <= 1.0
            assert {p.task for p in face.predictions} >= {"age", "gender", "emotion"}
            assert face.gender and face.age_group and face.emotion
            for p in face.predictions:
                assert len(p.label_names) == len(p.probabilities) >= 2
                assert math.isclose(sum(p.probabilities), 1.0, abs_tol=1e-3)
            assert face.identity == "unknown"  # empty gallery

        tasks = harness.call(ListTasks, "/facial_perception/list_tasks", ListTasks.Request()).tasks
        # the columns of the model the node loaded, in column order
        assert [t.name for t in tasks] == _expected_task_order()

        # /diagnostics: what runs, and how it goes (ros4hri/hri_face_detect-style key/values)
        def processed() -> dict[str, str] | None:
            with harness._cond:
                found = [{kv.key: kv.value for kv in s.values} for s in harness.diagnostics]
            return next((v for v in reversed(found) if int(v.get("frames_processed", "0")) > 0), None)

        harness.wait_until(lambda: processed() is not None, 30.0, "diagnostics after processed frames")
        values = processed()
        assert values["detector"] == "blazeface_full (litert)" and values["weights"] == "trained"
        assert values["tasks"].split(",") == _expected_task_order() and values["image_topic"] == TOPIC
        assert values["executor"] == "PooledExecutor"
        assert float(values["fps"]) >= 0.0 and float(values["latency_p50_ms"]) > 0.0

        # deactivate: the node stops publishing results
        harness.lifecycle.change(Transition.TRANSITION_DEACTIVATE)
        assert harness.lifecycle.state() == "inactive"
        with harness._cond:
            seen = len(harness.faces)
        stamp_ns = harness.node.get_clock().now().nanoseconds
        for _ in range(10):
            harness.raw_pub.publish(
                rgb_to_image_msg(_faces_frame(), Header(stamp=harness.node.get_clock().now().to_msg()))
            )
            time.sleep(0.05)
        assert all(stamp_to_ns(f.header.stamp) < stamp_ns for f in harness.faces[seen:])
        assert node.alive()
    finally:
        node.stop()


def test_malformed_images_never_stop_the_node(harness, tmp_path):
    # also the two-thread path (encoder_stage false: the whole model in one thread); bad frames fail
    # in the first stage, before any hand-over, whatever the number of stages
    # "checkpoint" is no parameter of the node (model_path is): a warning names it, the node runs on;
    # one frame in flight: a bad frame that kept its token would stop the node taking frames
    node = NodeUnderTest(
        harness, tmp_path, encoder_stage=False, max_frames_in_flight=1, checkpoint="/nowhere.safetensors"
    )
    try:
        node.up()
        harness.wait_for_subscriber(harness.raw_pub)
        good = _faces_frame()
        rng = np.random.default_rng(0)

        def bad_messages() -> list[Image]:
            msgs = []
            base = rgb_to_image_msg(good[:120, :160].copy())
            for mutate in (
                lambda m: setattr(m, "encoding", "32FC1"),
                lambda m: setattr(m, "encoding", ""),
                lambda m: setattr(m, "step", m.step - 7),
                lambda m: setattr(m, "step", m.step * 3),
                lambda m: setattr(m, "data", bytes(m.data)[:100]),
                lambda m: (setattr(m, "width", 0), setattr(m, "height", 0), setattr(m, "data", b"")),
                lambda m: (
                    setattr(m, "width", 60_000),
                    setattr(m, "height", 60_000),
                    setattr(m, "step", 180_000),
                ),
                lambda m: (
                    setattr(m, "encoding", "yuv422"),
                    setattr(m, "width", m.width - 1),
                ),  # odd YUV width
                lambda m: setattr(m, "data", rng.integers(0, 255, 57, dtype=np.uint8).tobytes()),
            ):
                msg = Image()
                msg.height, msg.width, msg.step, msg.encoding, msg.data = (
                    base.height,
                    base.width,
                    base.step,
                    base.encoding,
                    bytes(base.data),
                )
                mutate(msg)
                msgs.append(msg)
            for _ in range(10):  # random geometry fuzz (a few may even be valid tiny images)
                msg = Image()
                msg.header.frame_id = "fuzz"
                msg.height, msg.width = int(rng.integers(0, 5000)), int(rng.integers(0, 5000))
                msg.step = int(rng.integers(0, 20000))
                msg.encoding = str(
                    rng.choice(["rgb8", "bgr8", "mono8", "mono16", "rgba8", "bayer_rggb8", "x"])
                )
                msg.data = rng.integers(0, 255, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
                msgs.append(msg)
            return msgs

        for msg in bad_messages():
            msg.header = Header(
                stamp=harness.node.get_clock().now().to_msg(), frame_id=msg.header.frame_id or "bad"
            )
            harness.raw_pub.publish(msg)
            time.sleep(0.02)  # let the newest-frame worker see most of them (1-slot buffer)
        result = harness.send_until_result(_raw(good), harness.raw_pub, frame_id="after_fuzz")
        assert node.alive()
        assert result.header.frame_id == "after_fuzz" and len(result.faces) == 2
        assert all(f.header.frame_id != "bad" for f in harness.faces)
        assert "skipping bad frame" in node.log_text()
        assert "ignoring unknown parameter(s) checkpoint: this node has no such parameter" in node.log_text()
    finally:
        node.stop()


def test_compressed_input_and_garbage_compressed(harness, tmp_path):
    # also the one-thread path (overlap_stages false); the other tests run the default three stages
    node = NodeUnderTest(harness, tmp_path, input_type="compressed", overlap_stages=False)
    try:
        node.up()
        harness.wait_for_subscriber(harness.compressed_pub)
        for payload in (b"", b"\xff\xd8\xff\xe0" + b"\x00" * 64, np.random.default_rng(1).bytes(5000)):
            msg = CompressedImage(format="jpeg", data=payload)
            msg.header = Header(stamp=harness.node.get_clock().now().to_msg(), frame_id="bad")
            harness.compressed_pub.publish(msg)
            time.sleep(0.05)
        frame = _faces_frame()
        result = harness.send_until_result(
            lambda header: rgb_to_compressed_msg(frame, header), harness.compressed_pub, frame_id="jpeg_cam"
        )
        assert result.header.frame_id == "jpeg_cam" and len(result.faces) == 2
        assert node.alive()
    finally:
        node.stop()


def _tiny_dataset(shared_datasets: Path, root: Path, per_class: int = 12) -> Path:
    """A 2-class class-folder dataset (male/female) from real UTKFace photos."""
    folder = root / "tiny_gender"
    counts = {"male": 0, "female": 0}
    for path in sorted((shared_datasets / "utkface").iterdir()):
        parts = path.name.split("_")
        if len(parts) < 4 or parts[1] not in ("0", "1"):
            continue
        label = "male" if parts[1] == "0" else "female"
        if counts[label] >= per_class:
            if all(v >= per_class for v in counts.values()):
                break
            continue
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / label / path.name)
        counts[label] += 1
    return folder


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def test_bad_service_requests_change_nothing(harness, tmp_path, shared_datasets):
    node = NodeUnderTest(harness, tmp_path)
    try:
        node.up()
        dataset = _tiny_dataset(shared_datasets, tmp_path, per_class=4)
        tasks_before = [
            t.name
            for t in harness.call(ListTasks, "/facial_perception/list_tasks", ListTasks.Request()).tasks
        ]
        client = harness.create_action_client(AddTaskColumn, "/facial_perception/add_task_column")
        assert client.wait_for_server(timeout_sec=30.0)
        png = str(_write_png(tmp_path / "one.png", _faces_frame()))
        ds = str(dataset)
        bad_goals = {  # request -> words the one-line error must contain
            "nope": dict(name="smile", labels=["male", "female"], dataset_path=ds, lateral_sources=["nope"]),
            "already exists": dict(name="gender", labels=["male", "female"], dataset_path=ds),
            "at least 2 labels": dict(name="smile", labels=[], dataset_path=ds),
            "got 1": dict(name="smile", labels=["male"], dataset_path=ds),
            "not found": dict(name="smile", labels=["a", "b"], dataset_path=str(tmp_path / "nowhere")),
            "is a file": dict(name="smile", labels=["a", "b"], dataset_path=png),
            "not among the requested": dict(name="smile", labels=["happy", "sad"], dataset_path=ds),
            "have no images": dict(name="smile", labels=["male", "female", "other"], dataset_path=ds),
            "must match": dict(name="Bad Name", labels=["male", "female"], dataset_path=ds),
            "no column 'nose' to start from": dict(name="smile", labels=["male", "female"], dataset_path=ds,
                                                   init_from="nose"),
            "keeps its lateral sources": dict(name="smile", labels=["male", "female"], dataset_path=ds,
                                              init_from="gender", lateral_sources=["identity"]),
        }  # fmt: skip
        for why, fields in bad_goals.items():
            goal = AddTaskColumn.Goal(**fields)
            result = _run_goal(client, goal, timeout=30.0)[0]
            assert not result.success, why
            assert why in result.message, result.message
            assert result.message and "\n" not in result.message, why
        tasks_after = [
            t.name
            for t in harness.call(ListTasks, "/facial_perception/list_tasks", ListTasks.Request()).tasks
        ]
        assert tasks_after == tasks_before
        assert not (tmp_path / "columns" / "current.safetensors").exists()

        for name, paths in (
            ("", [str(tmp_path / "one.png")]),
            ("unknown", [str(tmp_path / "one.png")]),
            ("bob", [str(tmp_path / "missing.png")]),
            ("bob", [str(_write_png(tmp_path / "blank.png", np.full((200, 200, 3), 90, np.uint8)))]),
        ):
            response = harness.call(
                EnrolIdentity,
                "/facial_perception/enrol_identity",
                EnrolIdentity.Request(name=name, image_paths=paths),
            )
            assert not response.success and response.message, (name, paths)
        forget = harness.call(
            ForgetIdentity, "/facial_perception/forget_identity", ForgetIdentity.Request(name="bob")
        )
        assert not forget.success and "bob" in forget.message
        listed = harness.call(ListIdentities, "/facial_perception/list_identities", ListIdentities.Request())
        assert list(listed.names) == []
        assert node.alive()
    finally:
        node.stop()


def _run_goal(client: ActionClient, goal: Any, timeout: float) -> tuple[Any, list[Any]]:
    feedback: list[Any] = []
    send = client.send_goal_async(goal, feedback_callback=lambda fb: feedback.append(fb.feedback.status))
    done = threading.Event()
    send.add_done_callback(lambda _f: done.set())
    assert done.wait(10.0), "goal not acknowledged"
    handle = send.result()
    assert handle.accepted
    result_future = handle.get_result_async()
    finished = threading.Event()
    result_future.add_done_callback(lambda _f: finished.set())
    assert finished.wait(timeout), "no action result"
    return result_future.result().result, feedback


def test_add_column_enrol_and_restart(harness, tmp_path, shared_datasets, real_faces):
    dataset = _tiny_dataset(shared_datasets, tmp_path)
    astronaut_file = _write_png(tmp_path / "eileen.png", real_faces[0])
    node = NodeUnderTest(harness, tmp_path)
    try:
        node.up()
        harness.wait_for_subscriber(harness.raw_pub)
        # enrol from an image file, then the face is recognised in a camera frame
        enrol = harness.call(
            EnrolIdentity,
            "/facial_perception/enrol_identity",
            EnrolIdentity.Request(name="eileen", image_paths=[str(astronaut_file)]),
        )
        assert enrol.success, enrol.message
        assert enrol.samples_used == 1
        frame = make_frame([0])
        msg = harness.send_until_result(_raw(frame), harness.raw_pub)
        assert [f.identity for f in msg.faces] == ["eileen"]
        # live enrolment: the next 3 frames of the largest tracked face
        live = harness.call_while_publishing(
            EnrolIdentity,
            "/facial_perception/enrol_identity",
            EnrolIdentity.Request(name="grace", num_frames=3, timeout_s=20.0),
            make_frame([1]),
        )
        assert live.success, live.message
        assert live.samples_used == 3

        # add a column in the background, fine-tuned from the gender column (so it keeps that column's
        # lateral sources); feedback arrives; the hot swap shows in the output
        client = harness.create_action_client(AddTaskColumn, "/facial_perception/add_task_column")
        assert client.wait_for_server(timeout_sec=30.0)
        goal = AddTaskColumn.Goal(
            name="utk_gender", labels=["male", "female"], dataset_path=str(dataset), epochs=2
        )
        goal.init_from = "gender"
        result, feedback = _run_goal(client, goal, timeout=120.0)
        assert result.success, result.message + "\n" + node.log_text()[-2000:]
        listed = harness.call(ListTasks, "/facial_perception/list_tasks", ListTasks.Request()).tasks
        gender_sources = next(t.laterals for t in listed if t.name == "gender")
        assert result.task.name == "utk_gender" and list(result.task.laterals) == list(gender_sources)
        # it starts as the trained gender column on real faces, and keeps no epoch worse than that start
        assert result.val_accuracy >= 0.6
        assert feedback and any(f.state == "running" for f in feedback)
        assert max(f.epoch for f in feedback) == 2
        harness.faces.clear()
        msg = harness.send_until_result(_raw(frame), harness.raw_pub)
        added = [p for p in msg.faces[0].predictions if p.task == "utk_gender"]
        assert len(added) == 1 and added[0].label in ("male", "female")
        current = tmp_path / "columns" / "current.safetensors"
        saved = current.read_bytes()

        # a kill during the next training leaves the saved model intact
        long_goal = AddTaskColumn.Goal(
            name="killed_column", labels=["male", "female"], dataset_path=str(dataset), epochs=1000
        )
        epochs_seen = threading.Event()
        client.send_goal_async(
            long_goal, feedback_callback=lambda fb: fb.feedback.status.epoch >= 1 and epochs_seen.set()
        )
        assert epochs_seen.wait(60.0), "the second training never reported an epoch"
        node.process.kill()
        node.process.wait(10.0)
        assert current.read_bytes() == saved
        assert sorted(p.name for p in current.parent.iterdir()) == ["current.safetensors", "training"]
    finally:
        node.stop()

    # restart: the added column and the enrolled person are still there.  A fresh DDS participant,
    # because the killed node's endpoints linger in the old one until their lease expires.
    harness = Harness()
    node = NodeUnderTest(harness, tmp_path)
    try:
        node.up()
        harness.wait_for_subscriber(harness.raw_pub)
        names = [
            t.name
            for t in harness.call(ListTasks, "/facial_perception/list_tasks", ListTasks.Request()).tasks
        ]
        assert "utk_gender" in names and "killed_column" not in names
        listed = harness.call(ListIdentities, "/facial_perception/list_identities", ListIdentities.Request())
        assert list(listed.names) == ["eileen", "grace"] and list(listed.sample_counts) == [1, 3]
        # both enrolments tied the gallery file to the weights behind the identity embedding, which
        # adding a column left alone
        from facial_perception.core.checkpoint import load_model

        db = sqlite3.connect(tmp_path / "gallery.db")
        stored = db.execute("SELECT value FROM meta WHERE key = 'embedding_fingerprint'").fetchone()
        db.close()
        served = load_model(tmp_path / "columns" / "current.safetensors")[0]
        assert stored == (served.embedding_fingerprint("identity"),)
        msg = harness.send_until_result(_raw(make_frame([0])), harness.raw_pub)
        assert msg.faces[0].identity == "eileen"
        assert "utk_gender" in [p.task for p in msg.faces[0].predictions]
        forget = harness.call(
            ForgetIdentity, "/facial_perception/forget_identity", ForgetIdentity.Request(name="eileen")
        )
        assert forget.success
        harness.faces.clear()
        assert harness.send_until_result(_raw(make_frame([0])), harness.raw_pub).faces[0].identity != "eileen"

        # enrolled again from the command line, beside the running node (its model, its gallery file):
        # the node names her from its next frames, without a restart
        from facial_perception.pipeline.gallery_cli import main as gallery_command

        served_file = tmp_path / "columns" / "current.safetensors"
        argv = ["--gallery", str(tmp_path / "gallery.db"), "enrol", "eileen", str(astronaut_file)]
        assert gallery_command([*argv, "--checkpoint", str(served_file)]) == 0
        harness.faces.clear()
        assert harness.send_until_result(_raw(make_frame([0])), harness.raw_pub).faces[0].identity == "eileen"
    finally:
        node.stop()
        harness.close()


def _expected_task_order() -> list[str]:
    """Task order of what the node loads with an empty columns_dir: the shipped default, else untrained."""
    from facial_perception.core.checkpoint import DEFAULT_MODEL, load_model
    from facial_perception.core.progressive import default_task_specs

    if DEFAULT_MODEL.is_file():
        return load_model(DEFAULT_MODEL)[0].task_names
    return [spec.name for spec in default_task_specs()]


def test_a_waiting_live_enrolment_ends_on_deactivate_and_on_sigint(harness, tmp_path):
    """No camera frames: a live enrolment would wait out its 120 s; stopping the node ends it now."""
    node = NodeUnderTest(harness, tmp_path)
    client = harness.node.create_client(EnrolIdentity, "/facial_perception/enrol_identity")
    try:
        node.up()
        assert client.wait_for_service(timeout_sec=30.0)

        def start_enrolment() -> tuple[Any, threading.Event]:
            request = EnrolIdentity.Request(name="nobody", num_frames=3, timeout_s=120.0)
            future, answered = client.call_async(request), threading.Event()
            future.add_done_callback(lambda _f: answered.set())
            return future, answered

        future, answered = start_enrolment()
        assert not answered.wait(2.0), "answered although no frame arrived"  # the node is waiting
        harness.lifecycle.change(Transition.TRANSITION_DEACTIVATE)
        assert answered.wait(20.0), "deactivation left the enrolment waiting"
        response = future.result()
        assert not response.success and response.message.startswith("cancelled: the node stopped taking")
        listed = harness.call(ListIdentities, "/facial_perception/list_identities", ListIdentities.Request())
        assert "nobody" not in listed.names

        harness.lifecycle.change(Transition.TRANSITION_ACTIVATE)
        start_enrolment()
        time.sleep(1.0)  # let the request reach the node before it is told to stop
        assert stop_process(node.process, timeout=20.0) == 0, node.log_text()[-2000:]
    finally:
        harness.node.destroy_client(client)
        node.stop()


def test_ctrl_c_during_training_exits_cleanly(harness, tmp_path, shared_datasets):
    """SIGINT while the add-column action trains: exit code 0 at once, no traceback in the log."""
    node = NodeUnderTest(harness, tmp_path)
    try:
        node.up()
        dataset = _tiny_dataset(shared_datasets, tmp_path, per_class=40)
        client = harness.create_action_client(AddTaskColumn, "/facial_perception/add_task_column")
        assert client.wait_for_server(timeout_sec=30.0)
        feedback = threading.Event()
        goal = AddTaskColumn.Goal(
            name="smile", labels=["male", "female"], dataset_path=str(dataset), epochs=500
        )
        client.send_goal_async(goal, feedback_callback=lambda _msg: feedback.set())
        assert feedback.wait(60.0), "no training feedback"
        assert stop_process(node.process, timeout=20.0) == 0, node.log_text()[-2000:]
        log = node.log_text()
        assert "add column 'smile'" in log, log[-2000:]
        assert "Traceback" not in log and "callback failed" not in log, log[-2000:]
    finally:
        node.stop()
