"""Camera buffer decoding: every encoding round-trips, every malformed buffer is one ImageDecodeError."""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest

from facial_perception.pipeline.images import (
    ENCODINGS,
    ImageDecodeError,
    bytes_per_pixel,
    decode_compressed,
    decode_raw,
    encode_compressed,
    encode_raw,
)


@pytest.fixture(scope="module")
def photo(real_faces: list[np.ndarray]) -> np.ndarray:
    """A small real photo with an even width (YUV 4:2:2 needs pairs of pixels)."""
    return cv2.resize(real_faces[0], (96, 72), interpolation=cv2.INTER_AREA)


def _pad_rows(data: bytes, height: int, step: int, pad: int) -> bytes:
    """Re-layout an unpadded buffer with ``pad`` junk bytes after each row (as camera drivers do)."""
    rows = np.frombuffer(data, dtype=np.uint8).reshape(height, step)
    junk = np.full((height, pad), 0xAB, dtype=np.uint8)
    return np.concatenate([rows, junk], axis=1).tobytes()


EXACT = ("rgb8", "bgr8", "rgba8", "bgra8")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("pad", [0, 5])
def test_every_encoding_round_trips(photo: np.ndarray, encoding: str, pad: int) -> None:
    height, width = photo.shape[:2]
    data, step = encode_raw(photo, encoding)
    assert step == width * bytes_per_pixel(encoding)
    assert len(data) == step * height
    if pad:
        data, step = _pad_rows(data, height, step, pad), step + pad
    out = decode_raw(data, width, height, step, encoding)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - photo.astype(int))
    if encoding in EXACT:
        assert diff.max() == 0
    elif encoding.lower() in ("mono8", "8uc1", "mono16", "16uc1"):
        grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
        assert np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 0], out[..., 2])
    else:  # YUV 4:2:2 halves the chroma resolution: close, not exact
        assert diff.mean() < 8.0, f"{encoding}: mean abs error {diff.mean():.1f}"


def test_bgr_channel_order_is_swapped() -> None:
    bgr = bytes([10, 20, 30] * 4)  # 2x2 image, every pixel B=10 G=20 R=30
    out = decode_raw(bgr, 2, 2, 6, "bgr8")
    assert out[0, 0].tolist() == [30, 20, 10]


def test_mono16_endianness_and_scaling() -> None:
    values = np.array([[0, 25700], [65535, 1000]], dtype=np.uint16)  # byte-asymmetric values
    little = decode_raw(values.astype("<u2").tobytes(), 2, 2, 4, "mono16", is_bigendian=0)
    big = decode_raw(values.astype(">u2").tobytes(), 2, 2, 4, "mono16", is_bigendian=1)
    assert little[..., 0].tolist() == [[0, 100], [255, 3]]  # v // 257
    assert np.array_equal(little, big)
    wrong = decode_raw(values.astype(">u2").tobytes(), 2, 2, 4, "mono16", is_bigendian=0)
    assert not np.array_equal(wrong, little)


def test_rgb8_is_zero_copy_for_every_buffer_type(photo: np.ndarray) -> None:
    height, width = photo.shape[:2]
    data, step = encode_raw(photo, "rgb8")
    buffers = (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8), array.array("B", data))
    for buffer in buffers:
        out = decode_raw(buffer, width, height, step, "rgb8")
        assert np.array_equal(out, photo)
    backing = np.frombuffer(bytearray(data), dtype=np.uint8)
    assert np.shares_memory(decode_raw(backing, width, height, step, "rgb8"), backing)


def test_encoding_names_are_case_insensitive(photo: np.ndarray) -> None:
    data, step = encode_raw(photo, "bgr8")
    assert np.array_equal(decode_raw(data, 96, 72, step, "BGR8"), photo)


@pytest.mark.parametrize(
    ("width", "height", "step", "encoding", "length", "fragment"),
    [
        (4, 4, 12, "rgb8", 47, "too short"),  # truncated by one byte
        (4, 4, 11, "rgb8", 48, "step 11 is smaller"),  # step/width mismatch
        (4, 4, 12, "rgba8", 48, "step 12 is smaller"),  # step of rgb8 declared as rgba8
        (0, 4, 0, "rgb8", 0, "must be positive"),
        (4, 0, 12, "rgb8", 0, "must be positive"),
        (-4, 4, 12, "rgb8", 48, "must be positive"),
        (9000, 2, 27000, "rgb8", 54000, "exceeds the maximum"),
        (2, 9000, 6, "rgb8", 54000, "exceeds the maximum"),
        (3, 2, 6, "yuv422", 12, "even width"),
        (4, 4, 12, "rgb16", 96, "unsupported encoding"),
        (4, 4, 12, "", 48, "unsupported encoding"),
        (4, 4, 24, "mono16", 90, "too short"),
    ],
)
def test_bad_raw_buffers_raise_one_line_errors(
    width: int, height: int, step: int, encoding: str, length: int, fragment: str
) -> None:
    with pytest.raises(ImageDecodeError, match=fragment) as info:
        decode_raw(bytes(length), width, height, step, encoding)
    assert "\n" not in str(info.value)


def test_huge_dimensions_are_rejected_before_allocation() -> None:
    # A 2^31 x 2^31 image would need exabytes; the check must fire on the size, not on MemoryError.
    with pytest.raises(ImageDecodeError, match="maximum size"):
        decode_raw(b"\x00" * 16, 2**31, 2**31, 3 * 2**31, "rgb8")
    with pytest.raises(ImageDecodeError, match="maximum size"):
        decode_raw(bytes(300), 100, 1, 300, "rgb8", max_size=64)


def test_wrong_argument_types_are_decode_errors() -> None:
    with pytest.raises(ImageDecodeError, match="width must be an integer"):
        decode_raw(bytes(12), 2.0, 2, 6, "rgb8")  # type: ignore[arg-type]
    with pytest.raises(ImageDecodeError, match="byte buffer"):
        decode_raw([1, 2, 3], 1, 1, 3, "rgb8")  # type: ignore[arg-type]
    with pytest.raises(ImageDecodeError, match="encoding must be a string"):
        decode_raw(bytes(12), 2, 2, 6, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["jpeg", "png", "rgb8; jpeg compressed bgr8", "bgr8; png compressed bgr8"])
def test_compressed_round_trip(photo: np.ndarray, fmt: str) -> None:
    data = encode_compressed(photo, fmt, quality=95)
    out = decode_compressed(data, fmt)
    assert out.shape == photo.shape and out.dtype == np.uint8
    error = np.abs(out.astype(int) - photo.astype(int)).mean()
    assert error < (4.0 if "jpeg" in fmt else 1e-9)


def test_bad_compressed_data(photo: np.ndarray) -> None:
    jpeg = encode_compressed(photo, "jpeg")
    cases = [
        (b"", "empty"),
        (b"\x00" * 100, "cannot decode"),
        (b"definitely not an image", "cannot decode"),
        (jpeg[:20], "cannot decode"),  # header only
    ]
    for data, fragment in cases:
        with pytest.raises(ImageDecodeError, match=fragment):
            decode_compressed(data, "jpeg")
    with pytest.raises(ImageDecodeError, match="compressedDepth"):
        decode_compressed(encode_compressed(photo, "png"), "16UC1; compressedDepth")
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_compressed(jpeg, "jpeg", max_bytes=100)


def test_huge_compressed_image_is_rejected_from_its_header() -> None:
    # 10 x 9000 black PNG: a few hundred bytes on the wire, above the 8192 limit once decoded.
    wide = encode_compressed(np.zeros((10, 9000, 3), np.uint8), "png")
    assert len(wide) < 10_000
    with pytest.raises(ImageDecodeError, match="9000x10"):
        decode_compressed(wide, "png")
    small = encode_compressed(np.zeros((10, 100, 3), np.uint8), "png")
    with pytest.raises(ImageDecodeError, match="limit 64x64"):
        decode_compressed(small, "png", max_size=64)


def test_fuzzed_raw_buffers_only_raise_image_decode_error() -> None:
    rng = np.random.default_rng(1234)
    encodings = [*ENCODINGS, "bayer_rggb8", "32FC1", "RGB8 ", "yuv420"]
    decoded = 0
    for _ in range(400):
        encoding = encodings[rng.integers(len(encodings))]
        width = int(rng.choice([-3, 0, 1, 2, 3, 7, 16, 33, 9001]))
        height = int(rng.choice([-1, 0, 1, 2, 5, 16, 9001]))
        bpp = int(rng.integers(1, 5))
        step = max(width, 0) * bpp + int(rng.integers(-4, 6))
        length = max(step * max(height, 0) + int(rng.integers(-8, 8)), 0)
        length = min(length, 200_000)
        data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        try:
            out = decode_raw(data, width, height, step, encoding, is_bigendian=int(rng.integers(2)))
        except ImageDecodeError as exc:
            assert "\n" not in str(exc)
            continue
        assert out.shape == (height, width, 3) and out.dtype == np.uint8
        decoded += 1
    assert decoded > 0  # the fuzzer also produced valid frames, so it exercised both paths


def test_fuzzed_compressed_buffers_only_raise_image_decode_error(photo: np.ndarray) -> None:
    rng = np.random.default_rng(99)
    seeds = [encode_compressed(photo, "jpeg"), encode_compressed(photo, "png")]
    errors = 0
    for i in range(300):
        data = bytearray(seeds[i % 2])
        mode = i % 3
        if mode == 0:  # flip random bytes
            for pos in rng.integers(0, len(data), 20):
                data[pos] = int(rng.integers(256))
        elif mode == 1:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        else:  # random bytes with a valid magic
            tail = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8)
            data = data[:8] + bytearray(tail.tobytes())
        try:
            out = decode_compressed(bytes(data), "jpeg" if i % 2 == 0 else "png")
        except ImageDecodeError as exc:
            assert "\n" not in str(exc)
            errors += 1
            continue
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
    assert errors > 0


def test_encode_raw_rejects_bad_input(photo: np.ndarray) -> None:
    with pytest.raises(ImageDecodeError, match="RGB uint8"):
        encode_raw(photo.astype(np.float32), "rgb8")
    with pytest.raises(ImageDecodeError, match="even width"):
        encode_raw(photo[:, :95], "yuyv")
    with pytest.raises(ImageDecodeError, match="cannot encode format"):
        encode_compressed(photo, "gif")
