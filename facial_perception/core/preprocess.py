"""The one face preprocessing shared by training and inference, face cropping, and augmentation.

Every face that reaches a model goes through :func:`resize_grey` followed by :func:`normalise`
(``preprocess_face`` is exactly that composition), whether it comes from a dataset file, the
in-memory training cache of :func:`facial_perception.core.datasets.load_images`, or a live
detector crop made by :func:`crop_face`. Keeping one code path is what makes training accuracy
transfer to the robot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Augment",
    "PreprocessError",
    "crop_face",
    "normalise",
    "normalise_tensor",
    "preprocess_batch",
    "preprocess_face",
    "resize_grey",
    "to_grey",
]

# ITU-R BT.601 luma weights (the ones cv2.COLOR_RGB2GRAY and PIL "L" use).
_LUMA_RGB = (0.299, 0.587, 0.114)


class PreprocessError(ValueError):
    """An image or box that cannot be turned into a face crop (wrong dtype, shape, empty box)."""


def _check_uint8(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise PreprocessError(f"expected a numpy image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise PreprocessError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise PreprocessError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    return image


def to_grey(image: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3), RGBA (H, W, 4), (H, W, 1) or grey (H, W) uint8 -> grey (H, W) uint8 (BT.601 luma).

    Alpha is ignored. Grey input is returned unchanged (no copy), so calling this twice is free.
    """
    image = _check_uint8(image)
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 1:
        return image[:, :, 0]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
    raise PreprocessError(f"expected 1, 3 or 4 channels, got {channels}")


def resize_grey(image: np.ndarray, size: int) -> np.ndarray:
    """Any uint8 image -> grey (size, size) uint8.

    ``INTER_AREA`` when shrinking (it averages, so no aliasing from 100 px dataset crops to 64 px),
    ``INTER_LINEAR`` when enlarging (``INTER_AREA`` degenerates to nearest-neighbour upwards, which
    would make 48 px FER images blocky at 128 px). Non-square input is stretched: square crops
    are the caller's job (:func:`crop_face` makes them).
    """
    if not isinstance(size, int | np.integer) or size < 1:
        raise PreprocessError(f"size must be a positive integer, got {size!r}")
    grey = to_grey(image)
    height, width = grey.shape
    if (height, width) == (size, size):
        return np.ascontiguousarray(grey)
    shrinking = height * width >= size * size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(grey, (int(size), int(size)), interpolation=interpolation)


def normalise(grey: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W) -> float32 in [-1, 1] as ``x / 127.5 - 1`` (the BEGAN's tanh-free input range)."""
    return grey.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def normalise_tensor(grey: torch.Tensor) -> torch.Tensor:
    """The torch twin of :func:`normalise` (bit-identical for uint8 input), for cached uint8 batches."""
    return grey.to(torch.float32) / 127.5 - 1.0


def preprocess_face(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) or grey (H, W) face crop -> float32 (1, size, size) in [-1, 1]."""
    return normalise(resize_grey(image, size))[None]


def preprocess_batch(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """A list of face crops -> float32 tensor (N, 1, size, size); an empty list gives (0, 1, size, size)."""
    if not isinstance(size, int | np.integer) or size < 1:
        raise PreprocessError(f"size must be a positive integer, got {size!r}")
    batch = np.empty((len(images), 1, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess_face(image, size)
    return torch.from_numpy(batch)


def crop_face(
    frame: np.ndarray,
    box_xyxy: Sequence[float],
    margin: float = 0.2,
    square: bool = True,
    pad_mode: str = "replicate",
    offset_y: float = 0.0,
) -> np.ndarray:
    """Cut a face out of a camera frame with the framing the training datasets use.

    The detector box ``(x1, y1, x2, y2)`` (pixels, x2/y2 exclusive) is enlarged by ``margin`` times
    its size on every side and, with ``square=True``, made square around its centre using the
    longer side, so a tight detector box becomes a crop with forehead, chin and a little
    background like the UTKFace/LFW crops (see docs/DATA.md). Parts of the crop outside the frame
    are padded (``"replicate"`` edge pixels, or ``"constant"`` black) so the face stays centred
    and undistorted instead of being shifted or stretched. ``offset_y`` moves the crop centre by
    that fraction of the box height (negative = up): BlazeFace boxes sit low on the face, and
    docs/DATA.md lists the margin and offset that reproduce each dataset's framing. Returns a new
    uint8 array with the frame's channel layout.
    """
    frame = _check_uint8(frame)
    if len(box_xyxy) != 4:
        raise PreprocessError(f"box must be (x1, y1, x2, y2), got {box_xyxy!r}")
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise PreprocessError(f"box has non-finite coordinates: {box_xyxy!r}")
    if x2 <= x1 or y2 <= y1:
        raise PreprocessError(f"empty face box {box_xyxy!r}")
    if not math.isfinite(offset_y):
        raise PreprocessError(f"offset_y must be finite, got {offset_y}")
    if margin < 0:
        raise PreprocessError(f"margin must be >= 0, got {margin}")
    if pad_mode not in ("replicate", "constant"):
        raise PreprocessError(f"pad_mode must be 'replicate' or 'constant', got {pad_mode!r}")

    width, height = x2 - x1, y2 - y1
    if square:
        width = height = max(width, height)
    width *= 1.0 + 2.0 * margin
    height *= 1.0 + 2.0 * margin
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0 + offset_y * (y2 - y1)
    left = round(cx - width / 2.0)
    top = round(cy - height / 2.0)
    right = left + max(1, round(width))
    bottom = top + max(1, round(height))

    frame_h, frame_w = frame.shape[:2]
    if right <= 0 or bottom <= 0 or left >= frame_w or top >= frame_h:
        raise PreprocessError(f"face box {box_xyxy!r} lies outside the {frame_w}x{frame_h} frame")
    inner = frame[max(top, 0) : min(bottom, frame_h), max(left, 0) : min(right, frame_w)]
    pads = (max(0, -top), max(0, bottom - frame_h), max(0, -left), max(0, right - frame_w))
    if not any(pads):
        return inner.copy()
    border = cv2.BORDER_REPLICATE if pad_mode == "replicate" else cv2.BORDER_CONSTANT
    padded = cv2.copyMakeBorder(inner, *pads, border, value=0)
    if frame.ndim == 3 and padded.ndim == 2:  # OpenCV drops a singleton channel axis
        padded = padded[:, :, None]
    return padded


class Augment(nn.Module):
    """Random flip, small affine warp and brightness/contrast jitter for (N, C, H, W) batches in [-1, 1].

    Runs on the batch's own device (CPU or CUDA) with one ``grid_sample`` per batch, so it costs
    next to nothing compared with the model. The random numbers are drawn on the CPU from
    ``generator`` (or torch's global RNG) and then moved to the device, so a seeded CPU generator
    gives the same augmentation on any device. In ``eval()`` mode the module is the identity.
    """

    def __init__(
        self,
        flip_probability: float = 0.5,
        max_rotation_degrees: float = 10.0,
        scale_range: tuple[float, float] = (0.9, 1.1),
        max_shift: float = 0.08,
        brightness: float = 0.1,
        contrast: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        if not 0.0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        if min(max_rotation_degrees, max_shift, brightness, contrast) < 0:
            raise ValueError("augmentation magnitudes must be >= 0")
        self.flip_probability = float(flip_probability)
        self.max_rotation_degrees = float(max_rotation_degrees)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.max_shift = float(max_shift)
        self.brightness = float(brightness)
        self.contrast = float(contrast)

    def extra_repr(self) -> str:
        return (
            f"flip={self.flip_probability}, rotation=±{self.max_rotation_degrees}°, "
            f"scale={self.scale_range}, shift=±{self.max_shift}, "
            f"brightness=±{self.brightness}, contrast=±{self.contrast}"
        )

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch; returns a new tensor of the same shape, dtype and device, clamped to [-1, 1]."""
        if images.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
        if not self.training or images.shape[0] == 0:
            return images
        n = images.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(n, generator=generator, dtype=torch.float32) * (high - low) + low

        flip = torch.rand(n, generator=generator) < self.flip_probability
        angle = torch.deg2rad(uniform(-self.max_rotation_degrees, self.max_rotation_degrees))
        scale = uniform(*self.scale_range)
        # affine_grid works in [-1, 1] coordinates: a shift of f * width is 2 * f there.
        shift_x = uniform(-self.max_shift, self.max_shift) * 2.0
        shift_y = uniform(-self.max_shift, self.max_shift) * 2.0
        gain = uniform(1.0 - self.contrast, 1.0 + self.contrast)
        offset = uniform(-self.brightness, self.brightness) * 2.0  # brightness is a fraction of the range

        # theta maps output coordinates to input coordinates: the inverse of the wanted warp.
        # A horizontal flip is a sign change of the x column.
        sign_x = torch.where(flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = cos * sign_x
        theta[:, 0, 1] = -sin
        theta[:, 0, 2] = shift_x
        theta[:, 1, 0] = sin * sign_x
        theta[:, 1, 1] = cos
        theta[:, 1, 2] = shift_y

        device = images.device
        work = images if images.is_floating_point() else images.float()
        grid = F.affine_grid(theta.to(device=device, dtype=work.dtype), list(work.shape), align_corners=False)
        warped = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # Contrast around each image's own mean keeps the average brightness where the offset puts it.
        mean = warped.mean(dim=(1, 2, 3), keepdim=True)
        gain = gain.to(device=device, dtype=work.dtype).view(n, 1, 1, 1)
        offset = offset.to(device=device, dtype=work.dtype).view(n, 1, 1, 1)
        out = ((warped - mean) * gain + mean + offset).clamp_(-1.0, 1.0)
        return out.to(images.dtype)
