"""Face preprocessing, cropping and augmentation on real face photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from facial_perception.core.preprocess import (
    Augment,
    PreprocessError,
    crop_face,
    normalise,
    normalise_tensor,
    preprocess_batch,
    preprocess_face,
    resize_grey,
    to_grey,
)


def test_to_grey_is_bt601_luma(real_faces: list[np.ndarray]) -> None:
    rgb = real_faces[0]
    grey = to_grey(rgb)
    expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert grey.shape == rgb.shape[:2] and grey.dtype == np.uint8
    assert np.abs(grey.astype(np.float64) - expected).max() <= 1.0


def test_to_grey_accepts_grey_rgba_and_single_channel(real_faces: list[np.ndarray]) -> None:
    rgb = real_faces[1]
    grey = to_grey(rgb)
    assert to_grey(grey) is grey
    np.testing.assert_array_equal(to_grey(grey[:, :, None]), grey)
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    np.testing.assert_array_equal(to_grey(rgba), grey)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8,), np.uint8), np.zeros((0, 4), np.uint8)]
)
def test_bad_images_raise_one_error(bad: np.ndarray) -> None:
    with pytest.raises(PreprocessError):
        preprocess_face(bad, 64)


@pytest.mark.parametrize("size", [64, 128])
def test_preprocess_face_shape_dtype_range(real_faces: list[np.ndarray], size: int) -> None:
    for face in real_faces:
        out = preprocess_face(face, size)
        assert out.shape == (1, size, size) and out.dtype == np.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
        assert out.std() > 0.1  # a photo keeps its contrast


def test_normalisation_endpoints_and_torch_twin() -> None:
    black = np.zeros((10, 10), np.uint8)
    white = np.full((10, 10), 255, np.uint8)
    assert np.all(preprocess_face(black, 4) == -1.0) and np.all(preprocess_face(white, 4) == 1.0)
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(
        normalise_tensor(torch.from_numpy(every_value)).numpy(), normalise(every_value)
    )


def test_resize_uses_area_to_shrink_and_linear_to_enlarge(real_faces: list[np.ndarray]) -> None:
    grey = to_grey(real_faces[0])
    np.testing.assert_array_equal(
        resize_grey(grey, 64), cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA)
    )
    small = cv2.resize(grey, (48, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(
        resize_grey(small, 128), cv2.resize(small, (128, 128), interpolation=cv2.INTER_LINEAR)
    )
    np.testing.assert_array_equal(resize_grey(small, 48), small)


def test_rgb_and_its_grey_give_the_same_input(real_faces: list[np.ndarray]) -> None:
    rgb = real_faces[1]
    np.testing.assert_array_equal(preprocess_face(rgb, 64), preprocess_face(to_grey(rgb), 64))


def test_preprocess_batch_matches_single_faces(real_faces: list[np.ndarray]) -> None:
    batch = preprocess_batch(real_faces, 64)
    assert batch.shape == (2, 1, 64, 64) and batch.dtype == torch.float32
    for i, face in enumerate(real_faces):
        np.testing.assert_array_equal(batch[i].numpy(), preprocess_face(face, 64))
    assert preprocess_batch([], 32).shape == (0, 1, 32, 32)


def test_crop_face_inside_frame_is_square_with_margin(real_faces: list[np.ndarray]) -> None:
    frame = real_faces[0]  # 512 x 512
    crop = crop_face(frame, (180, 60, 280, 200), margin=0.2)
    side = round(140 * 1.4)
    assert crop.shape == (side, side, 3)
    top, left = round(130 - side / 2), round(230 - side / 2)
    np.testing.assert_array_equal(crop, frame[top : top + side, left : left + side])
    plain = crop_face(frame, (180, 60, 280, 200), margin=0.0, square=False)
    np.testing.assert_array_equal(plain, frame[60:200, 180:280])
    raised = crop_face(frame, (180, 60, 280, 200), margin=0.0, square=False, offset_y=-0.25)
    np.testing.assert_array_equal(raised, frame[25:165, 180:280])


def test_crop_face_pads_outside_the_frame(real_faces: list[np.ndarray]) -> None:
    frame = to_grey(real_faces[1])
    width = frame.shape[1]
    box = (width - 40, -20, width + 20, 40)  # over the top-right corner
    replicate = crop_face(frame, box, margin=0.0)
    constant = crop_face(frame, box, margin=0.0, pad_mode="constant")
    assert replicate.shape == constant.shape == (60, 60)
    inside = frame[0:40, width - 40 : width]
    np.testing.assert_array_equal(constant[20:, :40], inside)
    assert np.all(constant[:20] == 0) and np.all(constant[:, 40:] == 0)
    np.testing.assert_array_equal(replicate[:20, :40], np.repeat(inside[:1], 20, axis=0))


@pytest.mark.parametrize("box", [(10, 10, 10, 50), (600, 600, 700, 700), (0, 0, float("nan"), 5)])
def test_crop_face_rejects_empty_or_outside_boxes(real_faces: list[np.ndarray], box: tuple) -> None:
    with pytest.raises(PreprocessError):
        crop_face(real_faces[0], box)


def _face_batch(real_faces: list[np.ndarray]) -> torch.Tensor:
    return preprocess_batch(real_faces * 2, 64)


def test_augment_is_deterministic_given_a_generator(real_faces: list[np.ndarray]) -> None:
    batch = _face_batch(real_faces)
    augment = Augment()
    first = augment(batch, generator=torch.Generator().manual_seed(7))
    second = augment(batch, generator=torch.Generator().manual_seed(7))
    other = augment(batch, generator=torch.Generator().manual_seed(8))
    assert first.shape == batch.shape and first.dtype == batch.dtype
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert not torch.equal(first, batch)
    assert first.min() >= -1.0 and first.max() <= 1.0


def test_augment_flip_only_mirrors_and_eval_is_identity(real_faces: list[np.ndarray]) -> None:
    batch = _face_batch(real_faces)
    flip = Augment(
        flip_probability=1.0,
        max_rotation_degrees=0,
        scale_range=(1, 1),
        max_shift=0,
        brightness=0,
        contrast=0,
    )
    torch.testing.assert_close(flip(batch), torch.flip(batch, dims=[3]), atol=1e-5, rtol=0)
    flip.eval()
    assert flip(batch) is batch


def test_augment_warp_keeps_each_face_recognisable(real_faces: list[np.ndarray]) -> None:
    batch = _face_batch(real_faces)  # astronaut, hopper, astronaut, hopper
    out = Augment(flip_probability=0.0)(batch, generator=torch.Generator().manual_seed(3))

    def coarse_corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = torch.nn.functional.avg_pool2d(a, 8), torch.nn.functional.avg_pool2d(b, 8)
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    # Small rotations/shifts/scales: each augmented face still looks more like itself than the other face.
    for i in range(len(batch)):
        other = batch[(i + 1) % len(batch)]
        assert coarse_corr(out[i], batch[i]) > coarse_corr(out[i], other) + 0.2
