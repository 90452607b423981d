"""Face images for other nodes (pipeline.face_images): square crops and eye-aligned faces of real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facial_perception.pipeline.detection import make_detector
from facial_perception.pipeline.face_images import (
    ALIGNED_EYE_DISTANCE,
    ALIGNED_EYE_HEIGHT,
    aligned_face,
    normalized_points,
    square_face_crop,
)
from facial_perception.ros.demo_camera import make_frame

SIZE = 128


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, list]:
    """The demo's frame with the astronaut and Grace Hopper, and BlazeFace's faces in it."""
    frame = make_frame([0, 1])
    faces = make_detector("blazeface_full").detect(frame)
    assert len(faces) == 2 and all(f.keypoints is not None for f in faces)
    return frame, faces


def _eyes(frame: np.ndarray) -> np.ndarray:
    """Right and left eye (pixels) of the one face short-range BlazeFace (close-ups) finds in ``frame``."""
    faces = make_detector("blazeface").detect(frame)
    assert len(faces) == 1, f"expected one face, found {len(faces)}"
    return faces[0].keypoints[:2]


def test_square_crop_keeps_the_face_centred_and_pads_past_the_edge_with_black(scene) -> None:
    frame, faces = scene
    height, width = frame.shape[:2]
    box = faces[0].box / [width, height, width, height]
    crop = square_face_crop(frame, box, SIZE)
    assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
    assert len(make_detector("blazeface").detect(crop)) == 1  # still a face
    # the same box moved half out of the frame: the face keeps its place and size, the rest is black
    shift = box[0] + (box[2] - box[0]) / 2
    edge = square_face_crop(frame, box - [shift, 0, shift, 0], SIZE)
    assert edge.shape == (SIZE, SIZE, 3)
    assert edge[:, : SIZE // 2 - 1].max() == 0 and edge[:, SIZE // 2 + 1 :].mean() > 40
    assert square_face_crop(frame, (0.5, 0.5, 0.5, 0.5), SIZE) is None  # empty box
    assert square_face_crop(frame, (np.nan, 0.1, 0.2, 0.3), SIZE) is None


def test_aligned_face_is_the_same_whatever_the_roll_of_the_head(scene) -> None:
    frame, faces = scene
    face = max(faces, key=lambda f: f.box[2] - f.box[0])
    x1, y1, x2, y2 = face.box.astype(int)
    pad = (x2 - x1) // 2
    portrait = np.ascontiguousarray(frame[max(y1 - pad, 0) : y2 + pad, max(x1 - pad, 0) : x2 + pad])
    h, w = portrait.shape[:2]
    upright_eyes = _eyes(portrait)
    upright = aligned_face(portrait, *normalized_points(upright_eyes, w, h), SIZE)
    centre = (slice(SIZE // 4, 3 * SIZE // 4),) * 2  # the face itself, away from the black corners
    for angle in (25, -20):
        turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        rolled = cv2.warpAffine(portrait, turn, (w, h), flags=cv2.INTER_LINEAR)
        # the upright eyes carried along by the roll: the aligned faces match up to resampling
        carried = np.hstack([upright_eyes, np.ones((2, 1))]) @ turn.T
        same = aligned_face(rolled, *normalized_points(carried, w, h), SIZE)
        assert np.abs(same[centre].astype(int) - upright[centre].astype(int)).mean() < 6, angle
        # the detector's own eyes on the rolled face: it finds them where the alignment put them (level,
        # centred, the set distance apart)
        aligned = aligned_face(rolled, *normalized_points(_eyes(rolled), w, h), SIZE)
        assert aligned.shape == (SIZE, SIZE, 3)
        eyes = _eyes(aligned)
        assert abs(eyes[0, 1] - eyes[1, 1]) < 0.04 * SIZE, (angle, eyes)
        assert np.mean(eyes[:, 1]) == pytest.approx(ALIGNED_EYE_HEIGHT * SIZE, abs=0.06 * SIZE)
        assert eyes[1, 0] - eyes[0, 0] == pytest.approx(ALIGNED_EYE_DISTANCE * SIZE, abs=0.06 * SIZE)
        assert np.mean(eyes[:, 0]) == pytest.approx(SIZE / 2, abs=0.05 * SIZE)
    shifted = np.roll(upright, SIZE // 16, axis=0)  # 8 pixels off: the tolerance above tells that apart
    assert np.abs(shifted[centre].astype(int) - upright[centre].astype(int)).mean() > 6


def test_degenerate_eyes_and_bad_frames() -> None:
    frame = make_frame([0])
    assert aligned_face(frame, (0.5, 0.5), (0.5, 0.5), SIZE) is None  # coincident eyes (a profile)
    assert aligned_face(frame, (np.nan, 0.5), (0.6, 0.5), SIZE) is None
    with pytest.raises(ValueError, match="RGB uint8"):
        square_face_crop(frame[:, :, 0], (0.1, 0.1, 0.3, 0.3), SIZE)
    with pytest.raises(ValueError, match="size"):
        aligned_face(frame, (0.4, 0.5), (0.6, 0.5), 4)


def test_normalized_points_clamp_and_pass_no_keypoints_as_empty() -> None:
    points = np.array([[320, 240], [-10, 500], [np.nan, 10]], np.float32)
    assert normalized_points(points, 640, 480) == [(0.5, 0.5), (0.0, 1.0), (0.0, pytest.approx(10 / 480))]
    assert normalized_points(None, 640, 480) == []
