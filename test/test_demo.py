"""The demo: its camera frames hold detectable real faces, and the whole graph runs end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("facial_perception.msg", reason="interfaces not built: run scripts/setup.sh")

from facial_perception.msg import Face, FaceArray, NormalizedPoint, TaskPrediction

from facial_perception.pipeline.detection import make_detector
from facial_perception.ros.demo import param_args
from facial_perception.ros.demo_camera import compressed_topic, make_frame, make_sequence
from facial_perception.ros.demo_listener import describe_face, draw_face_array

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detector():
    det = make_detector("blazeface", min_score=0.6)
    yield det
    det.close()


@pytest.mark.parametrize("photos", [[0], [1], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]])
def test_demo_frames_hold_detectable_real_faces(detector, photos):
    frame = make_frame(photos, 640, 480)
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    assert len(detector.detect(frame)) == len(photos)


def test_demo_sequence_moves_between_frames():
    sequence = make_sequence(320, 240, frames_per_scene=4, gap_frames=2)
    assert len(sequence) == 4 * (4 + 2) and all(f.shape == (240, 320, 3) for f in sequence)
    assert not np.array_equal(sequence[0], sequence[1])  # the scene drifts
    # between scenes the room is empty (grey), so the next scene's faces start new tracks
    assert all(not (f != 96).any() for f in sequence[4:6]) and (sequence[6] != 96).any()


def test_compressed_topic_follows_image_transport_naming():
    assert compressed_topic("/camera/image_raw") == "/camera/image_raw/compressed"
    assert compressed_topic("/camera/image_raw/compressed") == "/camera/image_raw/compressed"


def test_param_args_formats_ros_overrides():
    assert param_args({"a": True, "b": "", "c": 0.5}) == ["-p", "a:=true", "-p", "b:=''", "-p", "c:=0.5"]


def test_listener_line_and_drawing():
    face = Face(track_id=4, identity="grace", identity_confidence=0.8, gender="female", gender_confidence=0.9)
    face.roi.x_offset, face.roi.y_offset, face.roi.width, face.roi.height = 10, 20, 50, 60
    face.predictions = [
        TaskPrediction(task="gender", label="female", confidence=0.9),
        TaskPrediction(task="smile", label="yes", confidence=0.7),
    ]
    line = describe_face(face)
    assert "track   4" in line and "identity=grace (0.80)" in line and "smile=yes (0.70)" in line
    assert "gender=female (0.90)" in line and "box=(10,20,50x60)" in line
    canvas = np.zeros((120, 160, 3), np.uint8)
    drawn = draw_face_array(canvas, FaceArray(faces=[face]))
    assert drawn.any() and not canvas.any()  # drawn on a copy
    assert not drawn[72, 40].any()  # inside the box, no key-point yet
    face.keypoints = [NormalizedPoint(x=0.25, y=0.6)]  # (40, 72) on this canvas
    assert draw_face_array(canvas, FaceArray(faces=[face]))[72, 40].any()


def _run_demo(tmp_path: Path, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "facial_perception.ros.demo", "--duration", "6", "--rate", "5", "--quiet",
        "--output", str(output), "--param", f"gallery_path:={tmp_path / 'gallery.db'}",
        "--param", f"columns_dir:={tmp_path / 'columns'}", "--param", "device:=cpu", *extra,
    ]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_demo_runs_end_to_end_and_writes_its_annotated_image(tmp_path):
    output = tmp_path / "out" / "demo.png"
    done = _run_demo(tmp_path, output)
    assert "ROS4HRI" not in done.stdout  # the bridge runs only when asked for
    assert "demo summary" in done.stdout and "result messages" in done.stdout
    assert f"annotated output: {output}" in done.stdout
    image = cv2.imread(str(output))
    assert image is not None and image.shape == (480, 640, 3)
    if "UNTRAINED" in done.stdout:  # plainly said both at start and in the summary
        assert done.stdout.count("UNTRAINED") >= 2


def test_demo_with_the_ros4hri_bridge_summarises_the_humans_topics(tmp_path):
    pytest.importorskip("hri_msgs.msg", reason="hri_msgs not built: run scripts/setup.sh")
    done = _run_demo(tmp_path, tmp_path / "out" / "demo.png", "--hri-bridge")
    lines = done.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("ROS4HRI (/humans):"))
    tracked, ids = (int(n) for n in re.findall(r"(\d+) tracked lists, (\d+) face id", lines[summary])[0])
    assert tracked >= 10 and ids >= 1, lines[summary]
    faces = lines[summary + 1 : summary + 1 + ids]
    assert len(faces) == ids and all(re.match(r"    face [a-z]{5}: ", line) for line in faces), faces
    # the demo's photos are faces: at least one face id got its soft biometrics and expression
    assert any(re.search(r"age \d+ \(.*\)  (female|male) \(.*\)  \w+ \(", line) for line in faces), faces
    # ... and their landmarks and aligned images (the demo gives the bridge its camera): saved side by side
    assert any(re.search(r"  7 landmarks  aligned 128x128$", line) for line in faces), faces
    strip = cv2.imread(str(tmp_path / "out" / "hri_aligned.png"))
    assert f"ROS4HRI aligned faces: {tmp_path / 'out' / 'hri_aligned.png'}" in done.stdout
    assert strip is not None and strip.shape[0] == 128 and strip.shape[1] % 128 == 0
