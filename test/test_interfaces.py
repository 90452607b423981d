"""The generated ROS interfaces: they import, carry the specified fields and constants, survive a CDR round
trip, load their type support in rclpy, and docs/interfaces.md documents every field."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="the ROS wheels are installed by scripts/setup.sh")

from builtin_interfaces.msg import Time  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import RegionOfInterest  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from facial_perception import action as fp_action  # noqa: E402
from facial_perception import msg as fp_msg  # noqa: E402
from facial_perception import srv as fp_srv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The specification of issue 3 (field -> ROS IDL type as rosidl reports it).
MESSAGES: dict[str, dict[str, str]] = {
    "TaskPrediction": {
        "task": "string",
        "label": "string",
        "confidence": "float",
        "label_names": "sequence<string>",
        "probabilities": "sequence<float>",
    },
    "NormalizedRoi": {"x_min": "float", "y_min": "float", "x_max": "float", "y_max": "float"},
    "NormalizedPoint": {"x": "float", "y": "float"},
    "Face": {
        "track_id": "uint64",
        "roi": "sensor_msgs/RegionOfInterest",
        "roi_normalized": "facial_perception/NormalizedRoi",
        "detection_score": "float",
        "keypoints": "sequence<facial_perception/NormalizedPoint>",
        "identity": "string",
        "identity_confidence": "float",
        "age_group": "string",
        "age_confidence": "float",
        "gender": "string",
        "gender_confidence": "float",
        "emotion": "string",
        "emotion_confidence": "float",
        "predictions": "sequence<facial_perception/TaskPrediction>",
    },
    "FaceArray": {
        "header": "std_msgs/Header",
        "image_width": "uint32",
        "image_height": "uint32",
        "faces": "sequence<facial_perception/Face>",
        "latency_ms": "float",
        "frame_seq": "uint32",
    },
    "TaskInfo": {
        "name": "string",
        "kind": "string",
        "labels": "sequence<string>",
        "laterals": "sequence<string>",
        "val_accuracy": "float",
        "trained_at": "string",
    },
    "TrainingStatus": {
        "task": "string",
        "state": "string",
        "epoch": "uint32",
        "epochs": "uint32",
        "progress": "float",
        "train_loss": "float",
        "val_accuracy": "float",
        "message": "string",
    },
    "GroundTruthFace": {
        "roi": "sensor_msgs/RegionOfInterest",
        "tasks": "sequence<string>",
        "labels": "sequence<string>",
        "attribute_names": "sequence<string>",
        "attribute_values": "sequence<string>",
    },
    "GroundTruthArray": {
        "header": "std_msgs/Header",
        "faces": "sequence<facial_perception/GroundTruthFace>",
        "source": "string",
    },
}
SERVICES: dict[str, dict[str, dict[str, str]]] = {
    "ListTasks": {"request": {}, "response": {"tasks": "sequence<facial_perception/TaskInfo>"}},
    "EnrolIdentity": {
        "request": {
            "name": "string",
            "num_frames": "uint32",
            "track_id": "uint64",
            "image_paths": "sequence<string>",
            "timeout_s": "float",
        },
        "response": {"success": "boolean", "message": "string", "samples_used": "uint32"},
    },
    "ForgetIdentity": {
        "request": {"name": "string"},
        "response": {"success": "boolean", "message": "string"},
    },
    "ListIdentities": {
        "request": {},
        "response": {"names": "sequence<string>", "sample_counts": "sequence<uint32>"},
    },
    "GetTrainingStatus": {"request": {}, "response": {"status": "facial_perception/TrainingStatus"}},
}
ACTIONS: dict[str, dict[str, dict[str, str]]] = {
    "AddTaskColumn": {
        "goal": {
            "name": "string",
            "labels": "sequence<string>",
            "dataset_path": "string",
            "lateral_sources": "sequence<string>",
            "epochs": "uint32",
            "init_from": "string",
        },
        "result": {
            "success": "boolean",
            "message": "string",
            "val_accuracy": "float",
            "task": "facial_perception/TaskInfo",
        },
        "feedback": {"status": "facial_perception/TrainingStatus"},
    }
}


def _fields(cls: type) -> dict[str, str]:
    """Field name -> IDL type of a generated class; empty request/response structs carry a dummy field."""
    fields = dict(cls.get_fields_and_field_types())
    fields.pop("structure_needs_at_least_one_member", None)
    return fields


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_fields(name: str) -> None:
    assert _fields(getattr(fp_msg, name)) == MESSAGES[name]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_fields(name: str) -> None:
    srv = getattr(fp_srv, name)
    assert _fields(srv.Request) == SERVICES[name]["request"]
    assert _fields(srv.Response) == SERVICES[name]["response"]


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_action_fields(name: str) -> None:
    act = getattr(fp_action, name)
    assert _fields(act.Goal) == ACTIONS[name]["goal"]
    assert _fields(act.Result) == ACTIONS[name]["result"]
    assert _fields(act.Feedback) == ACTIONS[name]["feedback"]


def test_face_keypoint_constants_index_the_detectors_six_points() -> None:
    face = fp_msg.Face
    indices = (
        face.KEYPOINT_RIGHT_EYE,
        face.KEYPOINT_LEFT_EYE,
        face.KEYPOINT_NOSE_TIP,
        face.KEYPOINT_MOUTH_CENTRE,
        face.KEYPOINT_RIGHT_EAR_TRAGION,
        face.KEYPOINT_LEFT_EAR_TRAGION,
    )
    assert indices == (0, 1, 2, 3, 4, 5)  # BlazeFace's order (pipeline.detection)


def test_training_status_constants() -> None:
    status = fp_msg.TrainingStatus
    assert (status.IDLE, status.RUNNING, status.SUCCEEDED, status.FAILED, status.CANCELED) == (
        "idle",
        "running",
        "succeeded",
        "failed",
        "canceled",
    )
    # constants are class-level, not fields that would be serialised per message
    assert "IDLE" not in status.get_fields_and_field_types()


def _sample_face_array() -> fp_msg.FaceArray:
    """A frame with two faces, one of them carrying a runtime-added column.

    Float values are exact in float32, so the round trip can be compared with ==.
    """
    emotion = fp_msg.TaskPrediction(
        task="emotion",
        label="happy",
        confidence=0.75,
        label_names=["neutral", "happy", "sad"],
        probabilities=[0.125, 0.75, 0.125],
    )
    glasses = fp_msg.TaskPrediction(
        task="glasses", label="yes", confidence=0.5, label_names=["no", "yes"], probabilities=[0.5, 0.5]
    )
    faces = [
        fp_msg.Face(
            track_id=2**40 + 7,
            roi=RegionOfInterest(x_offset=10, y_offset=20, width=64, height=80),
            roi_normalized=fp_msg.NormalizedRoi(x_min=0.015625, y_min=0.046875, x_max=0.125, y_max=0.21875),
            detection_score=0.9375,
            keypoints=[fp_msg.NormalizedPoint(x=0.0625, y=0.125), fp_msg.NormalizedPoint(x=0.09375, y=0.125)],
            identity="ada",
            identity_confidence=0.8125,
            age_group="25-32",
            age_confidence=0.375,
            gender="female",
            gender_confidence=0.875,
            emotion="happy",
            emotion_confidence=0.75,
            predictions=[emotion, glasses],
        ),
        fp_msg.Face(track_id=1, identity="unknown", predictions=[emotion]),
    ]
    header = Header(stamp=Time(sec=1_700_000_000, nanosec=123_456_789), frame_id="camera_optical")
    return fp_msg.FaceArray(
        header=header,
        image_width=640,
        image_height=480,
        faces=faces,
        latency_ms=12.5,
        frame_seq=4_000_000_000,
    )


def test_face_array_cdr_round_trip() -> None:
    original = _sample_face_array()
    data = serialize_message(original)
    assert isinstance(data, bytes) and len(data) > 100
    restored = deserialize_message(data, fp_msg.FaceArray)
    assert restored == original
    assert restored.header.stamp.nanosec == 123_456_789
    assert restored.faces[0].track_id == 2**40 + 7
    assert (restored.image_width, restored.image_height) == (640, 480)
    assert [(p.x, p.y) for p in restored.faces[0].keypoints] == [(0.0625, 0.125), (0.09375, 0.125)]
    assert [p.task for p in restored.faces[0].predictions] == ["emotion", "glasses"]
    assert math.isclose(sum(restored.faces[0].predictions[0].probabilities), 1.0, rel_tol=1e-6)


def test_action_and_service_round_trips() -> None:
    status = fp_msg.TrainingStatus(
        task="glasses",
        state=fp_msg.TrainingStatus.RUNNING,
        epoch=3,
        epochs=10,
        progress=0.3,
        train_loss=float("nan"),
        val_accuracy=0.5,
        message="epoch 3/10",
    )
    feedback = fp_action.AddTaskColumn.Feedback(status=status)
    restored = deserialize_message(serialize_message(feedback), fp_action.AddTaskColumn.Feedback)
    assert restored.status.state == "running" and restored.status.epoch == 3
    assert math.isnan(restored.status.train_loss)  # NaN = "not known yet" must survive the wire

    goal = fp_action.AddTaskColumn.Goal(
        name="glasses", labels=["no", "yes"], dataset_path="/data/g", lateral_sources=["emotion"], epochs=5
    )
    goal.init_from = "gender"
    assert deserialize_message(serialize_message(goal), fp_action.AddTaskColumn.Goal) == goal

    request = fp_srv.EnrolIdentity.Request(name="ada", num_frames=5, track_id=0, image_paths=["a.jpg"])
    assert deserialize_message(serialize_message(request), fp_srv.EnrolIdentity.Request) == request
    response = fp_srv.ListIdentities.Response(names=["ada", "bob"], sample_counts=[5, 1])
    assert deserialize_message(serialize_message(response), fp_srv.ListIdentities.Response) == response


def test_ground_truth_round_trip() -> None:
    face = fp_msg.GroundTruthFace(
        roi=RegionOfInterest(x_offset=1, y_offset=2, width=48, height=48),
        tasks=["emotion", "age"],
        labels=["sad", "25-32"],
        attribute_names=["age_years"],
        attribute_values=["27"],
    )
    frame = fp_msg.GroundTruthArray(header=Header(frame_id="cam"), faces=[face], source="fer/test/sad/1.png")
    assert deserialize_message(serialize_message(frame), fp_msg.GroundTruthArray) == frame


def test_field_types_are_checked_on_request() -> None:
    """With field checks on (check_fields=True, or ROS_PYTHON_CHECK_FIELDS=1 for a whole process) the
    generated setters reject values that would otherwise be published as garbage (a str is a valid
    sequence of one-character strings on the wire)."""
    with pytest.raises(AssertionError, match="track_id"):
        fp_msg.Face(track_id=-1, check_fields=True)
    with pytest.raises(AssertionError, match="label_names"):
        fp_msg.TaskPrediction(label_names="happy", check_fields=True)
    ok = fp_msg.TaskPrediction(label_names=["a", "b"], probabilities=[0.5, 0.5], check_fields=True)
    assert list(ok.label_names) == ["a", "b"]


def test_type_support_loads_in_rclpy() -> None:
    """Publishers, services and action servers need the compiled type support of every interface."""
    from rclpy.action import ActionServer

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("fp_interface_probe", context=context)
        try:
            for name in MESSAGES:
                node.create_publisher(getattr(fp_msg, name), f"probe_{name.lower()}", 1)
            for name in SERVICES:
                node.create_service(getattr(fp_srv, name), f"probe_{name.lower()}", lambda req, resp: resp)
            server = ActionServer(node, fp_action.AddTaskColumn, "probe_add_task_column", lambda handle: None)
            topics = dict(node.get_topic_names_and_types())
            assert topics["/probe_facearray"] == ["facial_perception/msg/FaceArray"]
            services = dict(node.get_service_names_and_types())
            assert services["/probe_enrolidentity"] == ["facial_perception/srv/EnrolIdentity"]
            assert "/probe_add_task_column/_action/send_goal" in services
            server.destroy()
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def _documented_fields() -> dict[str, set[str]]:
    """Section `facial_perception/<kind>/<Name>` of docs/interfaces.md -> field names in its tables."""
    text = (REPO / "docs" / "interfaces.md").read_text(encoding="utf-8")
    sections: dict[str, set[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        heading = re.match(r"^### `facial_perception/(?:msg|srv|action)/(\w+)`", line)
        if heading:
            current = heading.group(1)
            sections[current] = set()
            continue
        if line.startswith("## "):
            current = None
        row = re.match(r"^\| `(\w+)`(?: \((\w+)\))? \|", line)
        if current and row:
            role = row.group(2)
            sections[current].add(f"{role}.{row.group(1)}" if role else row.group(1))
    return sections


def test_docs_document_every_field() -> None:
    documented = _documented_fields()
    expected: dict[str, set[str]] = {name: set(fields) for name, fields in MESSAGES.items()}
    for name, parts in {**SERVICES, **ACTIONS}.items():
        expected[name] = {f"{role}.{field}" for role, fields in parts.items() for field in fields}
    assert set(documented) == set(expected), "docs/interfaces.md sections differ from the interfaces"
    for name, fields in expected.items():
        assert documented[name] == fields, f"docs/interfaces.md: fields of {name} differ"


def test_interface_files_match_cmake() -> None:
    """Every .msg/.srv/.action file is generated (listed in CMakeLists.txt) and every generated one exists."""
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r'"((?:msg|srv|action)/\w+\.(?:msg|srv|action))"', cmake))
    on_disk = {
        str(p.relative_to(REPO)) for kind in ("msg", "srv", "action") for p in (REPO / kind).glob(f"*.{kind}")
    }
    assert listed == on_disk
    assert {Path(p).stem for p in listed} == set(MESSAGES) | set(SERVICES) | set(ACTIONS)
