"""Face images cut from a camera frame for other nodes: a square crop of the box, an eye-aligned crop.

REP-155 publishes two images per face: ``cropped`` (the face's region) and ``aligned`` (the face
turned so that the eyes lie on a horizontal line, at a fixed place and distance, as face recognisers
expect). Both are made here with one affine warp each, so a box that reaches past the image edge is
padded with black instead of shifting or shrinking the face, and the output always has the asked size.

Coordinates are normalised to [0, 1] by the frame's width and height (as ``Face.roi_normalized`` and
``Face.keypoints``), so the crops do not depend on the resolution the perception node worked at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "ALIGNED_EYE_DISTANCE",
    "ALIGNED_EYE_HEIGHT",
    "aligned_face",
    "normalized_points",
    "square_face_crop",
]

#: Distance between the eyes in an aligned face, as a fraction of its width.
ALIGNED_EYE_DISTANCE = 0.36
#: Height of the eye line in an aligned face, as a fraction of its height (from the top).
ALIGNED_EYE_HEIGHT = 0.40
#: Shortest distance between the eyes (pixels of the frame) from which a face is aligned.
MIN_EYE_DISTANCE_PX = 2.0


def normalized_points(points: np.ndarray | None, width: int, height: int) -> list[tuple[float, float]]:
    """Pixel ``(K, 2)`` key-points -> ``(x, y)`` normalised by the frame size, clamped to [0, 1].

    ``None`` (a detector without key-points) gives ``[]``; a non-finite coordinate becomes 0.
    """
    if points is None:
        return []
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) / (max(width, 1), max(height, 1))
    pts = np.clip(np.nan_to_num(pts, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return [(float(x), float(y)) for x, y in pts]


def _warp(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    # bilinear (warpAffine has no INTER_AREA); faces in front of a robot are rarely over 2x the output
    return cv2.warpAffine(
        rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def _check(rgb: np.ndarray, size: int) -> tuple[int, int]:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
        raise ValueError(f"a face crop needs an RGB uint8 (H, W, 3) frame, got {rgb.dtype} {rgb.shape}")
    if not 8 <= size <= 1024:
        raise ValueError(f"face image size must be in [8, 1024] pixels, got {size}")
    return rgb.shape[1], rgb.shape[0]


def square_face_crop(rgb: np.ndarray, box_normalized: Sequence[float], size: int = 128) -> np.ndarray | None:
    """The square around a face box (side = the box's longer side, same centre), resized to ``size``.

    ``box_normalized`` is ``(x_min, y_min, x_max, y_max)`` in [0, 1]; returns ``None`` for an empty
    or non-finite box. Parts outside the frame are black.
    """
    width, height = _check(rgb, size)
    x1, y1, x2, y2 = (float(v) for v in box_normalized)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    side = max(x2 - x1, y2 - y1)
    if side < 1.0:
        return None
    scale = size / side
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    matrix = np.array(
        [[scale, 0.0, size / 2.0 - scale * cx], [0.0, scale, size / 2.0 - scale * cy]], dtype=np.float64
    )
    return _warp(rgb, matrix, size)


def aligned_face(
    rgb: np.ndarray,
    right_eye: Sequence[float],
    left_eye: Sequence[float],
    size: int = 128,
) -> np.ndarray | None:
    """The face rotated and scaled so that its eyes are level, ``ALIGNED_EYE_DISTANCE`` apart.

    ``right_eye`` / ``left_eye`` are the person's (the right eye is on the image's left in a frontal
    view), normalised ``(x, y)``. Returns ``None`` when the eyes are too close or not finite (a face
    seen from the side, or a detector without key-points).
    """
    width, height = _check(rgb, size)
    rx, ry = float(right_eye[0]) * width, float(right_eye[1]) * height
    lx, ly = float(left_eye[0]) * width, float(left_eye[1]) * height
    if not all(math.isfinite(v) for v in (rx, ry, lx, ly)):
        return None
    dx, dy = lx - rx, ly - ry
    distance = math.hypot(dx, dy)
    if distance < MIN_EYE_DISTANCE_PX:
        return None
    scale = ALIGNED_EYE_DISTANCE * size / distance
    cos, sin = scale * dx / distance, scale * dy / distance  # rotate the eye line onto +x, then scale
    mx, my = (rx + lx) / 2.0, (ry + ly) / 2.0
    tx = size / 2.0 - (cos * mx + sin * my)
    ty = ALIGNED_EYE_HEIGHT * size - (-sin * mx + cos * my)
    matrix = np.array([[cos, sin, tx], [-sin, cos, ty]], dtype=np.float64)
    return _warp(rgb, matrix, size)
