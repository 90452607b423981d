"""The ROS4HRI (REP-155) bridge over real DDS: the bridge runs in a child process, this test publishes
FaceArray messages (or runs the real perception node on real photos) and reads the /humans/... topics.

conftest.py gives the run its own ROS_DOMAIN_ID and LOCALHOST discovery. hri_msgs is the package
scripts/setup.sh builds from third_party/hri_msgs (or a robot's installed one).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from node_params import perception_test_params

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("facial_perception.msg", reason="interfaces not built: run scripts/setup.sh")
hri = pytest.importorskip("hri_msgs.msg", reason="hri_msgs not built: run scripts/setup.sh")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from facial_perception.msg import Face, FaceArray, NormalizedPoint, NormalizedRoi  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from facial_perception.core.datasets import AGE8_GROUPS, FERPLUS_EMOTIONS, UTK_GENDERS  # noqa: E402
from facial_perception.pipeline.detection import make_detector  # noqa: E402
from facial_perception.pipeline.face_images import aligned_face, normalized_points, square_face_crop  # noqa: E402
from facial_perception.ros import hri_bridge  # noqa: E402
from facial_perception.ros.conversions import image_msg_to_rgb, rgb_to_image_msg, stamp_to_ns  # noqa: E402
from facial_perception.ros.demo import (  # noqa: E402
    DemoError,
    LifecycleClient,
    start_perception_node,
    stop_process,
)
from facial_perception.ros.demo_camera import make_frame  # noqa: E402
from facial_perception.ros.spinning import BackgroundNode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACES_TOPIC = "/test_bridge/faces"
STARTUP_S = 90.0
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)


# ------------------------------------------------------------------------------------ the mappings
def test_every_age_group_maps_to_years_inside_it() -> None:
    years = [hri_bridge.age_years(group) for group in AGE8_GROUPS]
    assert years == sorted(years) and len(set(years)) == len(years)
    for group, age in zip(AGE8_GROUPS, years, strict=True):
        low, _, high = group.rstrip("+").partition("-")
        assert int(low) <= age <= (int(high) if high else 255), (group, age)
    assert hri_bridge.age_years("60+") == 65
    assert hri_bridge.age_years("25-32") == 29
    for not_an_age in ("", "unknown", "adult", "32-", "-5"):
        assert hri_bridge.age_years(not_an_age) is None


def test_labels_map_to_the_rep155_constants() -> None:
    values = [getattr(hri.Expression, n) for n in dir(hri.Expression) if n.isupper()]
    constants = {value for value in values if isinstance(value, str)}
    assert {"neutral", "happy", "scared"} <= constants
    for emotion in FERPLUS_EMOTIONS:
        name = hri_bridge.expression_name(emotion)
        # contempt has no REP-155 word: it passes unchanged (the REP allows other expressions)
        assert name in constants or name == emotion == "contempt", (emotion, name)
    assert hri_bridge.expression_name(" Happiness ") == "happy"
    codes = {label: hri_bridge.gender_code(label) for label in UTK_GENDERS}
    assert codes == {"male": hri.SoftBiometrics.MALE, "female": hri.SoftBiometrics.FEMALE}
    assert hri_bridge.gender_code("") == hri_bridge.gender_code("x") == hri.SoftBiometrics.UNDEFINED


def test_person_ids_are_topic_tokens() -> None:
    from rclpy.validate_full_topic_name import validate_full_topic_name

    for name, expected in [("Ada Lovelace", "Ada_Lovelace"), ("José-María", "Jos_Mar_a"), ("42", "p_42")]:
        got = hri_bridge.person_id(name)
        assert got == expected
        validate_full_topic_name(f"/humans/persons/{got}/face_id")  # raises if not a valid token
    assert hri_bridge.person_id("  ") == hri_bridge.person_id("???") == ""


def test_image_parameter_problems_name_each_bad_value() -> None:
    assert hri_bridge.image_parameter_problems("", "raw", "best_effort", 128, 30) == []
    assert hri_bridge.image_parameter_problems("camera/image_raw", "compressed", "reliable", 16, 1) == []
    problems = hri_bridge.image_parameter_problems("/cam era", "jpeg", "fast", 8, 0)
    assert [p.split()[0] for p in problems] == [
        "input_type",
        "image_reliability",
        "face_image_size",
        "image_cache_frames",
        "image_topic",
    ]


def test_parameter_file_lists_exactly_the_declared_parameters() -> None:
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = hri_bridge.HriBridge(context=context)
        parameters = node.get_parameters_by_prefix("")
        rcl_own = {"use_sim_time", "start_type_description_service"}  # every rclpy node has these
        declared = {name: p.value for name, p in parameters.items() if name not in rcl_own}
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
    text = yaml.safe_load((REPO / "config" / "hri_bridge.yaml").read_text())
    assert text["/**"]["ros__parameters"] == declared


# ------------------------------------------------------------------------------------ over DDS
class Listener(BackgroundNode):
    """A test-side node: publishes FaceArray, records every REP-155 message it can subscribe to."""

    def __init__(self) -> None:
        super().__init__("hri_test_client")
        self.lock = threading.Lock()
        self.received: dict[str, list[Any]] = {}
        self.faces_pub = self.node.create_publisher(FaceArray, FACES_TOPIC, RELIABLE)
        self.subscribe(hri.IdsList, "/humans/faces/tracked")
        self.subscribe(hri.IdsMatch, "/humans/candidate_matches")
        self.subscribe(DiagnosticArray, "/diagnostics")
        self.lifecycle = LifecycleClient(self.node, "/hri_bridge")

    def subscribe(self, msg_type: Any, topic: str) -> None:
        self.received.setdefault(topic, [])

        def record(msg: Any) -> None:
            with self.lock:
                self.received[topic].append(msg)

        self.node.create_subscription(msg_type, topic, record, RELIABLE)

    def subscribe_face(self, face_id: str) -> None:
        root = f"/humans/faces/{face_id}"
        self.subscribe(hri.NormalizedRegionOfInterest2D, f"{root}/roi")
        self.subscribe(hri.SoftBiometrics, f"{root}/softbiometrics")
        self.subscribe(hri.Expression, f"{root}/expression")

    def messages(self, topic: str) -> list[Any]:
        with self.lock:
            return list(self.received.get(topic, []))

    def publish_until(self, make: Callable[[Header], FaceArray], done: Callable[[], bool], what: str) -> None:
        """Publish frames (new stamp each) until ``done()``: a new face's topics need discovery first."""
        deadline = time.monotonic() + 30.0
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.faces_pub.publish(make(Header(stamp=self.node.get_clock().now().to_msg(), frame_id="cam")))
            time.sleep(0.1)


wait_until = BackgroundNode.wait_until


def start_bridge(log: Path, **params: Any) -> subprocess.Popen[bytes]:
    return hri_bridge.start_hri_bridge(params, log)


@pytest.fixture
def listener():
    client = Listener()
    try:
        yield client
    finally:
        client.close()


def _face(track_id: int, identity: str, age: str, gender: str, emotion: str, box: tuple[float, ...]) -> Face:
    face = Face(track_id=track_id, identity=identity, identity_confidence=0.8, detection_score=0.95)
    face.roi_normalized = NormalizedRoi(x_min=box[0], y_min=box[1], x_max=box[2], y_max=box[3])
    face.age_group, face.age_confidence = age, 0.6
    face.gender, face.gender_confidence = gender, 0.7
    face.emotion, face.emotion_confidence = emotion, 0.9
    return face


def test_faces_appear_change_person_and_leave_on_the_rep155_topics(listener, tmp_path):
    log = tmp_path / "bridge.log"
    process = start_bridge(log, faces_topic=FACES_TOPIC, deterministic_ids=True)
    try:
        listener.lifecycle.bring_up(STARTUP_S)
        wait_until(lambda: listener.faces_pub.get_subscription_count() > 0, 30.0, "the bridge's subscription")
        ada = _face(7, "Ada Lovelace", "25-32", "female", "happiness", (0.1, 0.2, 0.3, 0.4))
        stranger = _face(9, "unknown", "60+", "male", "contempt", (0.5, 0.5, 0.9, 1.0))
        listener.subscribe_face("f00007")
        listener.subscribe_face("f00009")

        def both(header: Header) -> FaceArray:
            return FaceArray(header=header, faces=[ada, stranger])

        per_face = [
            f"/humans/faces/f0000{t}/{k}" for t in (7, 9) for k in ("roi", "softbiometrics", "expression")
        ]
        listener.publish_until(
            both, lambda: all(listener.messages(t) for t in per_face), "both faces' topics"
        )

        tracked = listener.messages("/humans/faces/tracked")[-1]
        assert tracked.ids == ["f00007", "f00009"] and tracked.header.frame_id == "cam"
        roi = listener.messages("/humans/faces/f00007/roi")[-1]
        assert [roi.xmin, roi.ymin, roi.xmax, roi.ymax] == pytest.approx([0.1, 0.2, 0.3, 0.4])
        assert roi.c == pytest.approx(0.95)
        assert stamp_to_ns(roi.header.stamp) > 0 and roi.header.frame_id == "cam"
        bio = listener.messages("/humans/faces/f00007/softbiometrics")[-1]
        assert (bio.age, bio.gender) == (29, hri.SoftBiometrics.FEMALE)
        assert (bio.age_confidence, bio.gender_confidence) == pytest.approx((0.6, 0.7))
        old = listener.messages("/humans/faces/f00009/softbiometrics")[-1]
        assert (old.age, old.gender) == (65, hri.SoftBiometrics.MALE)
        assert listener.messages("/humans/faces/f00007/expression")[-1].expression == hri.Expression.HAPPY
        assert listener.messages("/humans/faces/f00007/expression")[-1].confidence == pytest.approx(0.9)
        assert listener.messages("/humans/faces/f00009/expression")[-1].expression == "contempt"
        # one match, for the enrolled face only, published once however many frames carried it
        matches = listener.messages("/humans/candidate_matches")
        assert [(m.id1, m.id1_type, m.id2, m.id2_type) for m in matches] == [
            ("f00007", hri.IdsMatch.FACE, "Ada_Lovelace", hri.IdsMatch.PERSON)
        ]
        assert matches[0].confidence == pytest.approx(0.8)

        # the stranger is recognised as someone else: the old match is not withdrawn (there was none)
        # and a new one is published; Ada leaves: her match is withdrawn, her topics disappear
        stranger.identity = "Grace Hopper"

        def only_stranger(header: Header) -> FaceArray:
            return FaceArray(header=header, faces=[stranger])

        listener.publish_until(
            only_stranger, lambda: len(listener.messages("/humans/candidate_matches")) >= 3, "the new matches"
        )
        changes = [
            (m.id1, m.id2, round(m.confidence, 2)) for m in listener.messages("/humans/candidate_matches")
        ]
        assert sorted(changes[1:]) == [("f00007", "Ada_Lovelace", 0.0), ("f00009", "Grace_Hopper", 0.8)]
        # Ada stayed listed for face_retention (4) frames without her, then left
        wait_until(lambda: listener.messages("/humans/faces/tracked")[-1].ids == ["f00009"], 10.0, "Ada gone")
        lists = [m.ids for m in listener.messages("/humans/faces/tracked")]
        first_without = next(i for i, ids in enumerate(lists) if ids == ["f00009"])
        assert lists[first_without - 4 : first_without] == [["f00009", "f00007"]] * 4
        wait_until(
            lambda: listener.node.count_publishers("/humans/faces/f00007/roi") == 0, 10.0, "f00007 gone"
        )
        assert listener.node.count_publishers("/humans/faces/f00009/roi") == 1

        # malformed content never stops the bridge: NaN, out-of-range values, a duplicate track,
        # the largest track id, labels of no known column
        weird = _face(2**64 - 1, "???", "adult", "", "", (math.nan, -3.0, 7.0, math.inf))
        weird.detection_score = math.nan
        weird.identity_confidence = math.inf

        def malformed(header: Header) -> FaceArray:
            return FaceArray(header=header, faces=[stranger, stranger, weird])

        big = "f18446744073709551615"
        listener.subscribe_face(big)
        listener.publish_until(
            malformed, lambda: bool(listener.messages(f"/humans/faces/{big}/roi")), "weird face"
        )
        roi = listener.messages(f"/humans/faces/{big}/roi")[-1]
        assert [roi.xmin, roi.ymin, roi.xmax, roi.ymax, roi.c] == [0.0, 0.0, 1.0, 0.0, 0.0]
        assert listener.messages("/humans/faces/tracked")[-1].ids == ["f00009", big]
        time.sleep(0.5)
        assert (
            listener.messages(f"/humans/faces/{big}/softbiometrics") == []
        )  # no age, no gender: nothing said
        assert listener.messages(f"/humans/faces/{big}/expression") == []
        assert all(
            m.id1 != big for m in listener.messages("/humans/candidate_matches")
        )  # "???": no person id

        # /diagnostics: what it did (3 matches: Ada, Grace, Ada's withdrawal), level OK while faces arrive
        def bridge_status() -> tuple[DiagnosticStatus, dict[str, str]] | None:
            for array in reversed(listener.messages("/diagnostics")):
                for status in array.status:
                    if status.name == "hri_bridge: ROS4HRI bridge":
                        return status, {kv.key: kv.value for kv in status.values}
            return None

        wait_until(lambda: (bridge_status() or (0, {}))[1].get("faces_tracked") == "2", 10.0, "diagnostics")
        status, values = bridge_status()
        assert status.level == DiagnosticStatus.OK and values["faces_topic"] == FACES_TOPIC
        assert values["matches_published"] == "3" and values["bad_messages"] == "0"
        assert int(values["frames_republished"]) == len(listener.messages("/humans/faces/tracked"))

        # deactivate: an empty tracked list, every match withdrawn, every per-face topic gone
        listener.lifecycle.change(Transition.TRANSITION_DEACTIVATE)
        wait_until(
            lambda: listener.messages("/humans/faces/tracked")[-1].ids == [], 10.0, "empty tracked list"
        )
        last = listener.messages("/humans/candidate_matches")[-1]
        assert (last.id1, last.id2, last.confidence) == ("f00009", "Grace_Hopper", 0.0)
        wait_until(
            lambda: listener.node.count_publishers("/humans/faces/f00009/roi") == 0, 10.0, "f00009 gone"
        )
        assert process.poll() is None, log.read_text()
    finally:
        stop_process(process)


def _configure_fails(listener: Listener, process: subprocess.Popen[bytes], log: Path) -> list[str]:
    """Configure is refused, the node stays up and unconfigured; returns the error lines of its log."""
    # get_state is re-sent until answered: the server has matched this client before a change is sent
    assert listener.lifecycle.state(STARTUP_S) == "unconfigured"
    with pytest.raises(DemoError, match="transition"):
        listener.lifecycle.change(Transition.TRANSITION_CONFIGURE, STARTUP_S)
    assert listener.lifecycle.state() == "unconfigured" and process.poll() is None
    return [line for line in log.read_text().splitlines() if "[ERROR]" in line]


def test_random_face_ids_and_a_bad_namespace(listener, tmp_path):
    log = tmp_path / "bridge.log"
    process = start_bridge(log, faces_topic=FACES_TOPIC, humans_namespace="/no spaces allowed")
    try:
        (error,) = _configure_fails(listener, process, log)
        assert "is not a valid topic namespace" in error
    finally:
        stop_process(process)

    process = start_bridge(log, faces_topic=FACES_TOPIC)  # random ids (the default)
    try:
        listener.lifecycle.bring_up(STARTUP_S)
        wait_until(lambda: listener.faces_pub.get_subscription_count() > 0, 30.0, "the bridge's subscription")
        face = _face(1, "", "8-12", "male", "neutral", (0.1, 0.1, 0.2, 0.2))
        tracked: list[str] = []

        def got_ids() -> bool:
            tracked[:] = next(
                (m.ids for m in reversed(listener.messages("/humans/faces/tracked")) if m.ids), []
            )
            return bool(tracked)

        listener.publish_until(lambda h: FaceArray(header=h, faces=[face]), got_ids, "a tracked face")
        (face_id,) = tracked
        assert len(face_id) == 5 and face_id.isalpha() and face_id.islower()
        listener.subscribe_face(face_id)
        listener.publish_until(
            lambda h: FaceArray(header=h, faces=[face]),
            lambda: bool(listener.messages(f"/humans/faces/{face_id}/softbiometrics")),
            "the random id's topics",
        )
        # the id stays with its track from frame to frame, and through two frames without it (a missed
        # detection: still listed, nothing else said); after face_retention (4) such frames it has left
        header = Header(stamp=listener.node.get_clock().now().to_msg())
        before = len(listener.messages("/humans/faces/tracked"))
        for faces in ([], [], [face]):
            header.stamp.nanosec = (header.stamp.nanosec + 1000) % 1_000_000_000
            listener.faces_pub.publish(FaceArray(header=header, faces=faces))
            time.sleep(0.1)  # the tracked list keeps only its newest message (depth 1, as hri_face_detect)
        wait_until(
            lambda: len(listener.messages("/humans/faces/tracked")) >= before + 3, 10.0, "3 tracked lists"
        )
        assert {tuple(m.ids) for m in listener.messages("/humans/faces/tracked")} == {(face_id,)}
        assert listener.node.count_publishers(f"/humans/faces/{face_id}/roi") == 1
        for _ in range(5):
            listener.faces_pub.publish(FaceArray(header=header, faces=[]))
            time.sleep(0.1)
        wait_until(
            lambda: listener.messages("/humans/faces/tracked")[-1].ids == [], 10.0, "the face to leave"
        )
        empty_lists = [m.ids for m in listener.messages("/humans/faces/tracked")][-5:]
        assert empty_lists == [[face_id]] * 4 + [[]]
        wait_until(
            lambda: listener.node.count_publishers(f"/humans/faces/{face_id}/roi") == 0, 10.0, "no roi"
        )
        assert listener.messages("/humans/candidate_matches") == []  # identity disabled (""): no match

        # the perception node starts a new run (frame_seq goes back): the same track id is another face
        def seq(n: int) -> Callable[[Header], FaceArray]:
            return lambda h: FaceArray(header=h, faces=[face], frame_seq=n)

        listener.publish_until(
            seq(50), lambda: listener.messages("/humans/faces/tracked")[-1].ids != [], "face"
        )
        (old_id,) = listener.messages("/humans/faces/tracked")[-1].ids
        listener.publish_until(
            seq(2), lambda: listener.messages("/humans/faces/tracked")[-1].ids not in ([], [old_id]), "new id"
        )
        (new_id,) = listener.messages("/humans/faces/tracked")[-1].ids
        assert new_id != old_id and len(new_id) == 5

        # no FaceArray for 5 s: the diagnostics warn, naming the silence
        def warned() -> bool:
            statuses = [s for a in listener.messages("/diagnostics") for s in a.status if "ROS4HRI" in s.name]
            return bool(statuses) and statuses[-1].level == DiagnosticStatus.WARN

        wait_until(warned, 15.0, "a WARN status after 5 s without FaceArray")
        last = [s for a in listener.messages("/diagnostics") for s in a.status if "ROS4HRI" in s.name][-1]
        assert last.message.startswith("no FaceArray for ")
    finally:
        stop_process(process)


def _detected_faces(frame: Any) -> list[Face]:
    """The faces BlazeFace finds in ``frame`` as the perception node would send them (box, key-points)."""
    height, width = frame.shape[:2]
    faces = []
    for track_id, found in enumerate(make_detector("blazeface_full").detect(frame), start=1):
        x1, y1, x2, y2 = (float(v) for v in found.box)
        face = _face(
            track_id, "", "25-32", "female", "neutral", (x1 / width, y1 / height, x2 / width, y2 / height)
        )
        face.detection_score = float(found.score)
        face.keypoints = [
            NormalizedPoint(x=x, y=y) for x, y in normalized_points(found.keypoints, width, height)
        ]
        faces.append(face)
    return faces


def _statuses(listener: Listener) -> list[Any]:
    return [s for a in listener.messages("/diagnostics") for s in a.status if "ROS4HRI" in s.name]


def test_face_images_and_landmarks_from_the_camera_frame_with_the_faces_stamp(listener, tmp_path):
    """/cropped and /aligned are cut from the frame whose stamp the FaceArray carries; bad or missing
    frames cost those images only; /landmarks put the six key-points in their REP-155 slots."""
    camera_topic, size = "/test_bridge/camera", 96
    process = start_bridge(
        tmp_path / "bridge.log",
        faces_topic=FACES_TOPIC,
        deterministic_ids=True,
        image_topic=camera_topic,
        image_reliability="reliable",
        face_image_size=size,
    )
    camera = listener.node.create_publisher(Image, camera_topic, RELIABLE)
    try:
        listener.lifecycle.bring_up(STARTUP_S)
        wait_until(
            lambda: listener.faces_pub.get_subscription_count() > 0 and camera.get_subscription_count() > 0,
            30.0,
            "the bridge's subscriptions",
        )
        frame = make_frame([0, 1])  # the astronaut and Grace Hopper
        faces = _detected_faces(frame)
        assert len(faces) == 2
        topics = [f"/humans/faces/f0000{t}/{k}" for t in (1, 2) for k in ("cropped", "aligned", "landmarks")]
        for topic in topics:
            listener.subscribe(hri.FacialLandmarks if topic.endswith("landmarks") else Image, topic)

        def frame_then_faces(header: Header, image: Image | None = None) -> FaceArray:
            camera.publish(image or rgb_to_image_msg(frame, header))
            time.sleep(0.05)
            return FaceArray(header=header, image_width=640, image_height=480, faces=faces)

        listener.publish_until(
            frame_then_faces, lambda: all(listener.messages(t) for t in topics), "face images"
        )
        for face in faces:
            root = f"/humans/faces/f{face.track_id:05d}"
            cropped = listener.messages(f"{root}/cropped")[-1]
            aligned = listener.messages(f"{root}/aligned")[-1]
            for image in (cropped, aligned):
                assert (image.encoding, image.width, image.height, image.step) == (
                    "bgr8",
                    size,
                    size,
                    3 * size,
                )
                assert image.header.frame_id == "cam"
            box = face.roi_normalized
            expected = square_face_crop(frame, (box.x_min, box.y_min, box.x_max, box.y_max), size)
            assert image_msg_to_rgb(cropped).tobytes() == expected.tobytes()
            eyes = [(float(np.float32(p.x)), float(np.float32(p.y))) for p in face.keypoints[:2]]  # as sent
            assert image_msg_to_rgb(aligned).tobytes() == aligned_face(frame, *eyes, size).tobytes()
            landmarks = listener.messages(f"{root}/landmarks")[-1]
            assert len(landmarks.landmarks) == 70 and (landmarks.width, landmarks.height) == (640, 480)
            right_pupil = landmarks.landmarks[hri.FacialLandmarks.RIGHT_PUPIL]
            assert (right_pupil.x, right_pupil.y) == pytest.approx(eyes[0])
            assert right_pupil.c == pytest.approx(face.detection_score)
            nose = landmarks.landmarks[hri.FacialLandmarks.NOSE]
            assert (nose.x, nose.y) == pytest.approx((face.keypoints[2].x, face.keypoints[2].y))
            assert sum(p.c > 0 for p in landmarks.landmarks) == 7  # 6 key-points, the mouth in two slots

        # a corrupt camera frame, then a FaceArray whose frame never came: no images, nothing else lost
        before = len(listener.messages("/humans/faces/f00001/cropped"))
        stamp = listener.node.get_clock().now().to_msg()
        corrupt = rgb_to_image_msg(frame, Header(stamp=stamp, frame_id="cam"))
        corrupt.data = bytes(corrupt.data[:1000])
        listener.faces_pub.publish(frame_then_faces(Header(stamp=stamp, frame_id="cam"), corrupt))
        later = Header(stamp=listener.node.get_clock().now().to_msg(), frame_id="cam")
        later.stamp.sec = stamp.sec + 2
        camera.publish(rgb_to_image_msg(frame, later))  # a newer frame is held, not taken for the next one
        time.sleep(0.05)
        stamp.sec += 1  # (the camera frame of this one never came)
        listener.faces_pub.publish(FaceArray(header=Header(stamp=stamp, frame_id="cam"), faces=faces))

        def counted() -> bool:
            values = {kv.key: kv.value for kv in (_statuses(listener) or [DiagnosticStatus()])[-1].values}
            return values.get("bad_images") == "1" and int(values.get("images_missing", 0)) >= 1

        wait_until(counted, 10.0, "diagnostics counting the bad and the missing frame")
        assert stamp_to_ns(listener.messages("/humans/faces/tracked")[-1].header.stamp) == stamp_to_ns(stamp)
        assert len(listener.messages("/humans/faces/f00001/cropped")) == before
        listener.faces_pub.publish(FaceArray(header=later, faces=faces))  # its frame is still there
        wait_until(
            lambda: len(listener.messages("/humans/faces/f00001/cropped")) == before + 1, 10.0, "a new crop"
        )
        assert stamp_to_ns(listener.messages("/humans/faces/f00001/cropped")[-1].header.stamp) == stamp_to_ns(
            later.stamp
        )
        assert process.poll() is None
        values = {kv.key: kv.value for kv in _statuses(listener)[-1].values}
        assert values["image_topic"] == camera_topic and int(values["images_matched"]) >= 1

        # the usual misconfigurations are named: frames of another camera (stamps never match), no camera
        def warned(text: str) -> Callable[[], bool]:
            return lambda: any(
                s.level == DiagnosticStatus.WARN and text in s.message for s in _statuses(listener)
            )

        def other_camera(header: Header) -> FaceArray:
            other = Header(stamp=header.stamp, frame_id="cam")
            other.stamp.nanosec = (other.stamp.nanosec + 500) % 1_000_000_000
            camera.publish(rgb_to_image_msg(frame, other))
            return FaceArray(header=header, faces=faces)

        listener.publish_until(other_camera, warned("none has a FaceArray's stamp"), "WARN: unmatched frames")
        listener.publish_until(
            lambda h: FaceArray(header=h, faces=faces), warned("no camera frame on"), "a WARN on no frames"
        )
        assert process.poll() is None
    finally:
        stop_process(process)

    # bad image parameters: configure fails with one line naming each, and the node stays up
    log = tmp_path / "bad.log"
    process = start_bridge(
        log, faces_topic=FACES_TOPIC, image_topic=camera_topic, face_image_size=4, input_type="jpeg"
    )
    try:
        (error,) = _configure_fails(listener, process, log)
        assert "face_image_size" in error and "input_type" in error
    finally:
        stop_process(process)


def test_without_hri_msgs_configure_fails_with_one_line(listener, tmp_path):
    """A machine without hri_msgs (here: the import made to fail in the bridge's process) gets one line."""
    log = tmp_path / "bridge.log"
    code = (
        "import sys; sys.modules['hri_msgs'] = None\n"  # what Python does for a package that is not there
        "from facial_perception.ros.hri_bridge import main; sys.exit(main())"
    )
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code, "--ros-args"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        (error,) = _configure_fails(listener, process, log)
        assert "apt install ros-$ROS_DISTRO-hri-msgs" in error
    finally:
        stop_process(process)


def test_the_perception_node_on_real_photos_through_the_bridge(listener, tmp_path):
    """Camera frame -> perception node -> bridge -> REP-155: what the node said, in REP-155 words."""
    camera_topic = "/test_bridge/image_raw"
    perception = start_perception_node(
        perception_test_params(tmp_path, camera_topic), log_path=tmp_path / "perception.log"
    )
    bridge = start_bridge(
        tmp_path / "bridge.log", faces_topic="/facial_perception/faces", deterministic_ids=True
    )
    node_faces: list[FaceArray] = []
    listener.node.create_subscription(FaceArray, "/facial_perception/faces", node_faces.append, RELIABLE)
    camera = listener.node.create_publisher(Image, camera_topic, 10)
    try:
        LifecycleClient(listener.node).bring_up(STARTUP_S)
        listener.lifecycle.bring_up(STARTUP_S)
        frame = make_frame([0, 1])  # the astronaut and Grace Hopper
        wait_until(
            lambda: camera.get_subscription_count() > 0, 30.0, "the perception node's camera subscription"
        )

        def published() -> bool:
            ids = next((m.ids for m in reversed(listener.messages("/humans/faces/tracked")) if m.ids), [])
            for face_id in ids:
                if f"/humans/faces/{face_id}/softbiometrics" not in listener.received:
                    listener.subscribe_face(face_id)
            return len(ids) == 2 and all(
                listener.messages(f"/humans/faces/{i}/softbiometrics")
                and listener.messages(f"/humans/faces/{i}/roi")
                for i in ids
            )

        deadline = time.monotonic() + 60.0
        while not published():
            assert time.monotonic() < deadline, (tmp_path / "bridge.log").read_text()[-2000:]
            camera.publish(rgb_to_image_msg(frame, Header(stamp=listener.node.get_clock().now().to_msg())))
            time.sleep(0.2)
        last = node_faces[-1]
        assert len(last.faces) == 2 and (last.image_width, last.image_height) == (640, 480)
        for face in last.faces:
            face_id = f"f{face.track_id:05d}"
            bio = listener.messages(f"/humans/faces/{face_id}/softbiometrics")[-1]
            assert bio.gender == hri_bridge.gender_code(face.gender) != hri.SoftBiometrics.UNDEFINED
            assert bio.age == hri_bridge.age_years(face.age_group)
            roi = listener.messages(f"/humans/faces/{face_id}/roi")[-1]
            assert roi.xmin == pytest.approx(face.roi_normalized.x_min) and roi.c == pytest.approx(
                face.detection_score
            )
            expression = listener.messages(f"/humans/faces/{face_id}/expression")[-1]
            assert expression.expression == hri_bridge.expression_name(face.emotion)
            # BlazeFace's six key-points, normalised: the right eye left of the left one, both in the box
            right, left = face.keypoints[Face.KEYPOINT_RIGHT_EYE], face.keypoints[Face.KEYPOINT_LEFT_EYE]
            assert len(face.keypoints) == 6 and right.x < left.x
            box = face.roi_normalized
            assert all(box.x_min < p.x < box.x_max and box.y_min < p.y < box.y_max for p in (right, left))
        assert listener.messages("/humans/candidate_matches") == []  # nobody enrolled
    finally:
        stop_process(bridge)
        stop_process(perception)


def test_benchmark_command_writes_consistent_json_and_table(tmp_path):
    from facial_perception.ros import hri_bridge_benchmark

    json_path, markdown = tmp_path / "bench.json", tmp_path / "BENCH.md"
    argv = ["--seconds", "2", "--faces", "1", "4", "--json", str(json_path), "--markdown", str(markdown)]
    assert hri_bridge_benchmark.main(argv) == 0
    result = json.loads(json_path.read_text())
    assert [(s["faces"], s["face_images"]) for s in result["scenes"]] == [
        (1, False),
        (4, False),
        (1, True),
        (4, True),
    ]
    table = markdown.read_text()
    for s in result["scenes"]:
        assert 50 <= s["frames_published"] <= 61  # 2 s at 30 Hz after the warm-up second
        assert s["frames_republished"] >= 0.9 * s["frames_published"]  # reliable QoS, nothing lost
        # with face images, (nearly) every frame's crops were cut from its own camera frame
        assert s["frames_with_images"] >= (0.9 * s["frames_published"] if s["face_images"] else 0)
        assert 0.0 < s["added_latency_p50_ms"] <= s["added_latency_p99_ms"]
        images = f" ({s['frames_with_images']})" if s["face_images"] else ""
        row = f"| {s['faces']} | {'on' if s['face_images'] else 'off'} | "
        row += f"{s['frames_republished']} / {s['frames_published']}{images} | "
        assert row + f"{s['added_latency_p50_ms']:.2f} ms" in table
    with pytest.raises(SystemExit) as bad:
        hri_bridge_benchmark.main(["--rate", "-1"])
    assert bad.value.code == 2
