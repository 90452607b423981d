"""Message conversions: real sensor_msgs buffers, real pipeline result types, no DDS needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("facial_perception.msg", reason="interfaces not built: run scripts/setup.sh")

from builtin_interfaces.msg import Time
from facial_perception.msg import Face
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from facial_perception.core.progressive import TaskSpec
from facial_perception.pipeline.frame_pipeline import FaceResult, FrameResult, TaskResult
from facial_perception.pipeline.images import encode_raw
from facial_perception.ros.conversions import (
    ImageDecodeError,
    compressed_msg_to_rgb,
    face_array_from_result,
    image_msg_to_rgb,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
    stamp_to_ns,
    task_info_msg,
    training_status_msg,
)


def _image_msg(rgb: np.ndarray, encoding: str, pad: int = 0) -> Image:
    data, step = encode_raw(rgb, encoding)
    rows = np.frombuffer(data, np.uint8).reshape(rgb.shape[0], step)
    padded = np.concatenate([rows, np.full((rgb.shape[0], pad), 7, np.uint8)], axis=1)
    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=step + pad)
    msg.data = padded.tobytes()
    return msg


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_raw_image_roundtrip_with_padded_rows(real_faces, encoding):
    rgb = np.ascontiguousarray(real_faces[0][::4, ::4])
    decoded = image_msg_to_rgb(_image_msg(rgb, encoding, pad=5))
    assert decoded.shape == rgb.shape
    np.testing.assert_array_equal(decoded, rgb)


def test_mono_image_becomes_grey_rgb(real_faces):
    rgb = np.ascontiguousarray(real_faces[1][::4, ::4])
    decoded = image_msg_to_rgb(_image_msg(rgb, "mono8"))
    assert decoded.shape == rgb.shape
    assert np.array_equal(decoded[..., 0], decoded[..., 2])


def test_rgb_to_image_msg_keeps_header_and_layout(real_faces):
    rgb = np.ascontiguousarray(real_faces[0][:50, :70])
    header = Header(stamp=Time(sec=12, nanosec=345), frame_id="cam")
    msg = rgb_to_image_msg(rgb, header)
    assert (msg.width, msg.height, msg.step, msg.encoding) == (70, 50, 210, "rgb8")
    assert msg.header.frame_id == "cam" and msg.header.stamp.nanosec == 345
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: setattr(m, "encoding", "32FC1"),
        lambda m: setattr(m, "step", m.step - 1),
        lambda m: setattr(m, "data", bytes(m.data)[: len(m.data) // 2]),
        lambda m: (setattr(m, "width", 0), setattr(m, "height", 0)),
        lambda m: (setattr(m, "width", 100_000), setattr(m, "height", 100_000), setattr(m, "step", 300_000)),
    ],
    ids=["encoding", "step", "truncated", "zero-size", "huge"],
)
def test_malformed_raw_image_raises_one_clear_error(real_faces, mutate):
    msg = rgb_to_image_msg(np.ascontiguousarray(real_faces[0][::8, ::8]))
    mutate(msg)
    with pytest.raises(ImageDecodeError) as info:
        image_msg_to_rgb(msg)
    assert "\n" not in str(info.value)


def test_compressed_roundtrip_and_garbage(real_faces):
    rgb = np.ascontiguousarray(real_faces[1][::2, ::2])
    png = rgb_to_compressed_msg(rgb, fmt="png")
    np.testing.assert_array_equal(compressed_msg_to_rgb(png), rgb)
    jpeg = rgb_to_compressed_msg(rgb)
    decoded = compressed_msg_to_rgb(jpeg)
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 8
    jpeg.data = bytes(jpeg.data)[:20] + b"\x00garbage" * 10
    with pytest.raises(ImageDecodeError):
        compressed_msg_to_rgb(jpeg)


def _task(labels: list[str], probs: list[float]) -> TaskResult:
    p = np.asarray(probs, dtype=np.float32)
    i = int(p.argmax())
    return TaskResult(label=labels[i], index=i, confidence=float(p[i]), labels=labels, probabilities=p)


def _face(track_id: int, box: list[float], identity: str = "unknown") -> FaceResult:
    box_arr = np.asarray(box, dtype=np.float32)
    return FaceResult(
        track_id=track_id,
        box=box_arr,
        box_normalized=box_arr / np.array([640, 480, 640, 480], np.float32),
        detection_score=0.9,
        identity=identity,
        identity_confidence=0.7,
        tasks={
            "gender": _task(["male", "female"], [0.2, 0.8]),
            "age": _task(["0-2", "25-32", "60+"], [0.1, 0.6, 0.3]),
            "emotion": _task(["neutral", "happiness"], [0.3, 0.7]),
            "identity": _task(["person_000", "person_001"], [0.5, 0.5]),
            "smile": _task(["no", "yes"], [0.9, 0.1]),
        },
        embedding=np.ones(4, np.float32) / 2,
    )


def test_face_array_carries_header_rois_and_every_classification_column():
    result = FrameResult(
        faces=[_face(3, [10, 20, 60, 90]), _face(7, [100, 100, 300, 340], "grace")],
        timings={},
        width=640,
        height=480,
    )
    header = Header(stamp=Time(sec=5, nanosec=7), frame_id="camera_optical")
    kinds = {"gender": "classification", "age": "classification", "emotion": "classification",
             "identity": "identity", "smile": "classification"}  # fmt: skip
    msg = face_array_from_result(result, header, 640, 480, kinds=kinds, latency_ms=12.5, frame_seq=4)
    assert msg.header.frame_id == "camera_optical" and stamp_to_ns(msg.header.stamp) == 5_000_000_007
    assert msg.frame_seq == 4 and math.isclose(msg.latency_ms, 12.5)
    assert [f.track_id for f in msg.faces] == [7, 3]  # largest first
    big = msg.faces[0]
    assert (big.roi.x_offset, big.roi.y_offset, big.roi.width, big.roi.height) == (100, 100, 200, 240)
    assert math.isclose(big.roi_normalized.x_max, 300 / 640, rel_tol=1e-6)
    assert math.isclose(big.roi_normalized.y_min, 100 / 480, rel_tol=1e-6)
    assert big.identity == "grace" and math.isclose(big.identity_confidence, 0.7, rel_tol=1e-6)
    assert (big.gender, big.age_group, big.emotion) == ("female", "25-32", "happiness")
    assert math.isclose(big.gender_confidence, 0.8, rel_tol=1e-6)
    tasks = [p.task for p in big.predictions]
    assert tasks == ["gender", "age", "emotion", "smile"]  # identity is reported through the gallery
    smile = big.predictions[-1]
    assert smile.label == "no" and list(smile.label_names) == ["no", "yes"]
    assert np.allclose(list(smile.probabilities), [0.9, 0.1])


def test_identity_disabled_leaves_identity_empty_and_missing_columns_blank():
    face = _face(1, [0, 0, 50, 50], "grace")
    del face.tasks["emotion"]
    msg = face_array_from_result(
        FrameResult(faces=[face], timings={}), Header(), 640, 480, identity_enabled=False
    )
    assert msg.faces[0].identity == "" and msg.faces[0].identity_confidence == 0.0
    assert msg.faces[0].emotion == "" and msg.faces[0].emotion_confidence == 0.0


def test_roi_is_clipped_to_the_image():
    msg = face_array_from_result(
        FrameResult(faces=[_face(1, [-20, -5, 700, 500])], timings={}), Header(), 640, 480
    )
    roi, norm = msg.faces[0].roi, msg.faces[0].roi_normalized
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height) == (0, 0, 640, 480)
    assert (norm.x_min, norm.y_min, norm.x_max, norm.y_max) == (0.0, 0.0, 1.0, 1.0)


def test_keypoints_are_normalised_clamped_and_empty_without_a_detector_that_gives_them():
    face = _face(1, [100, 100, 300, 340])
    points_px = [[160, 180], [240, 180], [200, 230], [200, 280], [-30, 200], [700, 200]]
    face.keypoints = np.array(points_px, np.float32)
    bare = _face(2, [400, 100, 450, 160])  # a haar face: no key-points
    msg = face_array_from_result(FrameResult(faces=[face, bare], timings={}), Header(), 640, 480)
    assert (msg.image_width, msg.image_height) == (640, 480)
    points = [(p.x, p.y) for p in msg.faces[0].keypoints]
    assert len(points) == 6
    right_eye = points[Face.KEYPOINT_RIGHT_EYE]
    assert right_eye == (pytest.approx(160 / 640), pytest.approx(180 / 480))
    assert points[Face.KEYPOINT_RIGHT_EAR_TRAGION][0] == 0.0  # outside the image: clamped
    assert points[Face.KEYPOINT_LEFT_EAR_TRAGION][0] == 1.0
    assert list(msg.faces[1].keypoints) == []


def test_task_info_and_training_status_messages():
    spec = TaskSpec("smile", ["no", "yes"], ["gender"])
    info = task_info_msg(spec, {"val_accuracy": 0.75, "trained_at": "2026-01-01T00:00:00+00:00"})
    assert (info.name, info.kind, list(info.labels), list(info.laterals)) == (
        "smile",
        "classification",
        ["no", "yes"],
        ["gender"],
    )
    assert math.isclose(info.val_accuracy, 0.75) and info.trained_at.startswith("2026")
    assert math.isnan(task_info_msg(spec).val_accuracy)
    status = training_status_msg(
        {"task": "smile", "state": "running", "epoch": 1, "epochs": 3, "progress": 0.33}
    )
    assert (status.task, status.state, status.epoch, status.epochs) == ("smile", "running", 1, 3)
    assert math.isnan(status.train_loss)
