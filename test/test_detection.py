"""Face detectors on real photos: BlazeFace (offline mediapipe) and the OpenCV Haar fallback."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facial_perception.pipeline.detection import (
    BlazeFaceDetector,
    Detection,
    DetectorError,
    FaceDetector,
    HaarDetector,
    finalize_detections,
    make_detector,
)
from facial_perception.pipeline.tracking import iou_matrix

# Hand-marked face boxes (xyxy pixels) of the conftest photos: astronaut (Eileen Collins), Grace Hopper.
FACE_BOXES = [np.array([175, 70, 275, 180]), np.array([160, 120, 370, 340])]


@pytest.fixture(scope="module", params=["blazeface", "blazeface_full", "haar"])
def detector(request: pytest.FixtureRequest) -> FaceDetector:
    det = make_detector(request.param)
    yield det
    det.close()


def test_detectors_find_the_real_faces(detector: FaceDetector, real_faces: list[np.ndarray]) -> None:
    assert isinstance(detector, FaceDetector)
    for photo, truth in zip(real_faces, FACE_BOXES, strict=True):
        found = detector.detect(photo)
        assert len(found) == 1, f"expected exactly one face, got {[d.box for d in found]}"
        det = found[0]
        assert det.box.dtype == np.float32 and det.box.shape == (4,)
        assert iou_matrix(det.box, truth)[0, 0] > 0.5, f"box {det.box} far from the face {truth}"
        assert 0.0 < det.score <= 1.0


def test_blazeface_keypoints_lie_inside_the_face(real_faces: list[np.ndarray]) -> None:
    with BlazeFaceDetector(min_score=0.5) as det:
        face = det.detect(real_faces[0])[0]
    assert face.keypoints is not None and face.keypoints.shape == (6, 2)
    x1, y1, x2, y2 = face.box
    margin = 0.15 * (x2 - x1)
    eyes = face.keypoints[:2]
    assert np.all((eyes[:, 0] > x1 - margin) & (eyes[:, 0] < x2 + margin))
    assert np.all((eyes[:, 1] > y1 - margin) & (eyes[:, 1] < y2 + margin))


def test_no_face_in_a_blank_or_noise_frame(detector: FaceDetector) -> None:
    assert detector.detect(np.zeros((120, 160, 3), np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    assert detector.detect(noise) == []


def test_scaled_and_grey_frames(real_faces: list[np.ndarray]) -> None:
    det = make_detector("blazeface")
    small = cv2.resize(real_faces[1], (256, 300))
    boxes = det.detect(small)
    assert len(boxes) == 1
    assert iou_matrix(boxes[0].box * 2, FACE_BOXES[1])[0, 0] > 0.5
    grey = cv2.cvtColor(real_faces[1], cv2.COLOR_RGB2GRAY)
    assert len(det.detect(grey)) == 1
    det.close()
    with pytest.raises(DetectorError, match="closed"):
        det.detect(small)


def test_two_faces_largest_first_and_capped(real_faces: list[np.ndarray]) -> None:
    # A 640x480 frame: the astronaut small (face ~60 px), Hopper large (face ~140 px).
    canvas = np.full((480, 640, 3), 90, np.uint8)
    canvas[20:340, 10:330] = cv2.resize(real_faces[0], (320, 320))
    canvas[60:460, 300:640] = cv2.resize(real_faces[1], (340, 400))
    both = make_detector("blazeface_full", min_score=0.5).detect(canvas)
    assert len(both) == 2
    assert both[0].area > both[1].area and both[0].box[0] >= 300 and both[1].box[2] <= 330
    capped = make_detector("blazeface_full", min_score=0.5, max_faces=1).detect(canvas)
    assert len(capped) == 1 and np.allclose(capped[0].box, both[0].box)
    no_small = make_detector("blazeface_full", min_score=0.5, min_face_size=100).detect(canvas)
    assert len(no_small) == 1 and np.allclose(no_small[0].box, both[0].box)


def test_finalize_clips_filters_and_sorts() -> None:
    dets = [
        Detection(np.array([-10, -5, 30, 40], np.float32), 0.9),
        Detection(np.array([50, 50, 55, 200], np.float32), 0.8),  # 5 px wide: too small
        Detection(np.array([60, 10, 200, 150], np.float32), 0.7),
        Detection(np.array([np.nan, 0, 10, 10], np.float32), 0.99),
    ]
    out = finalize_detections(dets, (100, 120, 3), min_face_size=10, max_faces=5)
    assert [d.score for d in out] == [0.7, 0.9]
    assert out[0].box.tolist() == [60, 10, 120, 100]
    assert out[1].box.tolist() == [0, 0, 30, 40]


def test_bad_options_and_input() -> None:
    with pytest.raises(DetectorError, match="unknown detector 'yolo'"):
        make_detector("yolo")
    with pytest.raises(DetectorError, match="'short' or 'full'"):
        make_detector("blazeface", model="huge")
    with pytest.raises(DetectorError, match="bad option"):
        make_detector("haar", nonsense=1)
    with pytest.raises(DetectorError, match="cascade not found"):
        HaarDetector(cascade="no_such_cascade.xml")
    with pytest.raises(DetectorError, match="uint8"):
        make_detector("haar").detect(np.zeros((10, 10, 3), np.float32))


def test_auto_prefers_blazeface() -> None:
    det = make_detector("auto")
    assert isinstance(det, BlazeFaceDetector)
    det.close()


def _scenes(real_faces: list[np.ndarray]) -> list[np.ndarray]:
    """Frames of several shapes with 1-3 real faces at several sizes (letterbox both ways)."""
    from data_fixtures import real_face_files

    lfw = [cv2.imread(str(p))[..., ::-1] for p in real_face_files("lfw", 6)]
    rng = np.random.default_rng(0)
    scenes = [*real_faces, cv2.resize(real_faces[1], (200, 330))]
    for shape, faces in (((480, 640), 3), ((720, 400), 2), ((300, 300), 1), ((480, 640), 2)):
        frame = np.full((*shape, 3), 90, np.uint8)
        for k in range(faces):
            face = lfw[(len(scenes) + k) % len(lfw)]
            side = int(rng.integers(70, min(shape) // 2))
            y, x = int(rng.integers(0, shape[0] - side)), (k * shape[1] // faces) + 5
            x = min(x, shape[1] - side)
            frame[y : y + side, x : x + side] = cv2.resize(face, (side, side))
        scenes.append(frame)
    return scenes


@pytest.mark.parametrize("model", ["full", "short"])
def test_litert_backend_finds_what_the_mediapipe_graph_finds(
    model: str, real_faces: list[np.ndarray]
) -> None:
    """Same weights, same pre- and post-processing: the same boxes, scores and keypoints."""
    # the short-range graph ignores min_detection_confidence and keeps its own 0.5
    fast = BlazeFaceDetector(
        model=model, backend="litert", min_face_size=0, min_score=0.5 if model == "short" else 0.6
    )
    graph = BlazeFaceDetector(model=model, backend="mediapipe", min_face_size=0)
    assert (fast.backend, graph.backend) == ("litert", "mediapipe")
    compared = 0
    for scene in _scenes(real_faces):
        mine = fast.detect(scene)
        # the short-range graph lets through some faces below min_detection_confidence; ours does not
        theirs = [d for d in graph.detect(scene) if d.score >= fast.min_score]
        assert len(mine) == len(theirs), (scene.shape, [d.box for d in mine], [d.box for d in theirs])
        for a, b in zip(mine, theirs, strict=True):
            assert iou_matrix(a.box, b.box)[0, 0] > 0.995
            assert abs(a.score - b.score) < 1e-3
            assert np.abs(a.keypoints - b.keypoints).max() < 0.5
            assert a.keypoints.dtype == b.keypoints.dtype == np.float32 and a.box.dtype == np.float32
            compared += 1
    assert compared >= 8
    fast.close()
    with pytest.raises(DetectorError, match="closed"):
        fast.detect(real_faces[0])
    with pytest.raises(DetectorError, match="backend must be one of"):
        BlazeFaceDetector(backend="tensorrt")
    assert make_detector("blazeface_full").backend == "litert"  # the default when installed
