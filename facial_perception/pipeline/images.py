"""Camera buffers -> RGB ``uint8`` arrays, with every malformed input turned into one clear error.

The ROS node and the bag evaluator both receive untrusted buffers (``sensor_msgs/Image`` with a
declared encoding, width, height and row step; ``CompressedImage`` bytes).  Everything here checks
the declared geometry against the real buffer *before* touching the pixels, so a bad frame costs a
one-line :class:`ImageDecodeError` and never a crash, a huge allocation, or a read past the end.

Raw decoding is zero-copy where the encoding allows it (``rgb8``: a strided view of the buffer;
the result is then read-only when the buffer is ``bytes`` -- copy it before drawing on it).
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_COMPRESSED_BYTES",
    "DEFAULT_MAX_SIZE",
    "ENCODINGS",
    "ImageDecodeError",
    "bytes_per_pixel",
    "decode_compressed",
    "decode_raw",
    "encode_compressed",
    "encode_raw",
]

#: Largest accepted width or height (pixels).  Beyond this a frame is rejected before allocation.
DEFAULT_MAX_SIZE = 8192
#: Largest accepted compressed payload (bytes).
DEFAULT_MAX_COMPRESSED_BYTES = 64 * 1024 * 1024


class ImageDecodeError(ValueError):
    """A camera buffer cannot be turned into an image; the message says what is wrong in one line."""


# encoding -> (bytes per pixel, canonical name).  ROS names first; "yuv422" is UYVY in ROS
# (sensor_msgs/image_encodings.hpp), "yuv422_yuy2" is YUYV.
_ENCODINGS: dict[str, tuple[int, str]] = {
    "rgb8": (3, "rgb8"),
    "bgr8": (3, "bgr8"),
    "rgba8": (4, "rgba8"),
    "bgra8": (4, "bgra8"),
    "mono8": (1, "mono8"),
    "8uc1": (1, "mono8"),
    "mono16": (2, "mono16"),
    "16uc1": (2, "mono16"),
    "yuv422": (2, "uyvy"),
    "uyvy": (2, "uyvy"),
    "yuv422_yuy2": (2, "yuyv"),
    "yuyv": (2, "yuyv"),
    "yuy2": (2, "yuyv"),
}
#: Encodings accepted by :func:`decode_raw` (lower case; matching is case-insensitive).
ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)


def _canonical(encoding: str) -> tuple[int, str]:
    if not isinstance(encoding, str):
        raise ImageDecodeError(f"encoding must be a string, got {type(encoding).__name__}")
    key = encoding.strip().lower()
    if key not in _ENCODINGS:
        raise ImageDecodeError(
            f"unsupported encoding {encoding!r} (supported: {', '.join(sorted(set(_ENCODINGS)))})"
        )
    return _ENCODINGS[key]


def bytes_per_pixel(encoding: str) -> int:
    """Bytes per pixel of a supported encoding (YUV 4:2:2 counts 2 bytes per pixel)."""
    return _canonical(encoding)[0]


def _as_byte_array(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Flat ``uint8`` view of the buffer without copying (ROS gives ``array.array``/bytes/ndarray)."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return data.reshape(-1).view(np.uint8)
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise ImageDecodeError(f"image data must be a byte buffer, got {type(data).__name__}") from exc
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=np.uint8)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ImageDecodeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


def decode_raw(
    data: bytes | bytearray | memoryview | np.ndarray,
    width: int,
    height: int,
    step: int,
    encoding: str,
    is_bigendian: int | bool = 0,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
) -> np.ndarray:
    """Decode a raw ``sensor_msgs/Image``-style buffer to RGB ``uint8`` ``(height, width, 3)``.

    ``step`` is the row length in bytes (rows may be padded).  ``mono16`` is scaled from the full
    16-bit range to 8 bits (``v // 257``), honouring ``is_bigendian``.  Raises
    :class:`ImageDecodeError` for an unknown encoding, non-positive or too large sizes
    (``> max_size``), ``step < width * bytes_per_pixel``, a buffer shorter than
    ``step * height`` (extra trailing bytes are ignored), or an odd width for YUV 4:2:2.
    """
    bpp, kind = _canonical(encoding)
    width = _check_int("width", width)
    height = _check_int("height", height)
    step = _check_int("step", step)
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image size must be positive, got {width}x{height}")
    if width > max_size or height > max_size:
        raise ImageDecodeError(f"image {width}x{height} exceeds the maximum size {max_size}x{max_size}")
    row_bytes = width * bpp
    if step < row_bytes:
        raise ImageDecodeError(
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{bpp} ({encoding})"
        )
    if kind in ("uyvy", "yuyv") and width % 2:
        raise ImageDecodeError(f"{encoding} needs an even width, got {width}")
    buf = _as_byte_array(data)
    if buf.size < step * height:
        raise ImageDecodeError(
            f"image data too short: {buf.size} bytes for {width}x{height} {encoding} with step {step} "
            f"(need step*height = {step * height})"
        )
    # Strided (H, row_bytes) view of the buffer: no copy, padding bytes skipped.
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row_bytes), strides=(step, 1), writeable=False)

    if kind == "rgb8":
        return np.lib.stride_tricks.as_strided(
            rows, shape=(height, width, 3), strides=(step, 3, 1), writeable=False
        )
    if kind == "mono8":
        return cv2.cvtColor(np.ascontiguousarray(rows), cv2.COLOR_GRAY2RGB)
    if kind == "mono16":
        dtype = np.dtype(">u2" if is_bigendian else "<u2")
        pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width)
        grey = (pixels.astype(np.uint32) // 257).astype(np.uint8)
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    pixels = np.ascontiguousarray(rows).reshape(height, width, bpp)
    code = {
        "bgr8": cv2.COLOR_BGR2RGB,
        "rgba8": cv2.COLOR_RGBA2RGB,
        "bgra8": cv2.COLOR_BGRA2RGB,
        "uyvy": cv2.COLOR_YUV2RGB_UYVY,
        "yuyv": cv2.COLOR_YUV2RGB_YUY2,
    }[kind]
    return cv2.cvtColor(pixels, code)


def encode_raw(rgb: np.ndarray, encoding: str, *, is_bigendian: int | bool = 0) -> tuple[bytes, int]:
    """Encode an RGB ``uint8`` image into a raw buffer of ``encoding``; returns ``(data, step)``.

    The inverse of :func:`decode_raw` (lossy for mono and YUV), used by tests, the demo source and
    bag writers.  Rows are unpadded (``step = width * bytes_per_pixel``).
    """
    bpp, kind = _canonical(encoding)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(
            f"encode_raw needs a non-empty RGB uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}"
        )
    if kind in ("uyvy", "yuyv") and rgb.shape[1] % 2:
        raise ImageDecodeError(f"{encoding} needs an even width, got {rgb.shape[1]}")
    rgb = np.ascontiguousarray(rgb)
    if kind == "rgb8":
        out = rgb
    elif kind == "mono8":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif kind == "mono16":
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
        out = grey.astype(">u2" if is_bigendian else "<u2")
    else:
        code = {
            "bgr8": cv2.COLOR_RGB2BGR,
            "rgba8": cv2.COLOR_RGB2RGBA,
            "bgra8": cv2.COLOR_RGB2BGRA,
            "uyvy": cv2.COLOR_RGB2YUV_UYVY,
            "yuyv": cv2.COLOR_RGB2YUV_YUY2,
        }[kind]
        out = cv2.cvtColor(rgb, code)
    return np.ascontiguousarray(out).tobytes(), rgb.shape[1] * bpp


def _format_family(fmt: str) -> str:
    """Image family named by a ``CompressedImage.format`` ("jpeg", "bgr8; jpeg compressed bgr8", ...)."""
    text = (fmt or "").lower()
    if "compresseddepth" in text:
        return "compresseddepth"
    for family, words in (
        ("jpeg", ("jpeg", "jpg")),
        ("png", ("png",)),
        ("webp", ("webp",)),
        ("bmp", ("bmp",)),
        ("tiff", ("tiff", "tif")),
    ):
        if any(word in text for word in words):
            return family
    return ""


def _peek_size(data: bytes) -> tuple[int, int] | None:
    """Width/height from the file header (no pixel decoding), or None when PIL does not know the format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return int(img.width), int(img.height)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"compressed image is a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        return None
    except Exception:  # PIL's header parsers raise assorted errors on hostile input; cv2 decides then
        return None


def decode_compressed(
    data: bytes | bytearray | memoryview | np.ndarray,
    format: str = "",
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_bytes: int = DEFAULT_MAX_COMPRESSED_BYTES,
) -> np.ndarray:
    """Decode ``CompressedImage`` bytes (JPEG/PNG/WebP/BMP/TIFF, sniffed from the data) to RGB ``uint8``.

    The header is read first so that a decompression bomb (declared size above ``max_size``) is
    rejected without allocating; ``compressedDepth`` payloads are not images and are refused.
    """
    family = _format_family(format)
    if family == "compresseddepth":
        raise ImageDecodeError(f"format {format!r} (compressedDepth) is a depth map, not a camera image")
    buf = _as_byte_array(data)
    if buf.size == 0:
        raise ImageDecodeError("compressed image data is empty")
    if buf.size > max_bytes:
        raise ImageDecodeError(f"compressed image of {buf.size} bytes exceeds the limit of {max_bytes} bytes")
    size = _peek_size(buf.tobytes())
    if size is not None:
        w, h = size
        if w <= 0 or h <= 0 or w > max_size or h > max_size:
            raise ImageDecodeError(f"compressed image declares size {w}x{h} (limit {max_size}x{max_size})")
    label = format or "unknown format"
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "cv2 error"
        raise ImageDecodeError(f"cannot decode compressed image ({label}): {reason}") from None
    if decoded is None or decoded.size == 0:
        raise ImageDecodeError(f"cannot decode compressed image ({label}, {buf.size} bytes): not an image")
    h, w = decoded.shape[:2]
    if w > max_size or h > max_size:
        raise ImageDecodeError(f"compressed image {w}x{h} exceeds the maximum size {max_size}x{max_size}")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def encode_compressed(rgb: np.ndarray, format: str = "jpeg", *, quality: int = 90) -> bytes:
    """Encode RGB ``uint8`` as JPEG or PNG bytes (for ``CompressedImage`` publishers and bags)."""
    family = _format_family(format)
    if family not in ("jpeg", "png", "webp", "bmp", "tiff"):
        raise ImageDecodeError(f"cannot encode format {format!r} (use jpeg, png, webp, bmp or tiff)")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ImageDecodeError(
            f"encode_compressed needs a non-empty RGB uint8 image, got {rgb.dtype} {rgb.shape}"
        )
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)] if family == "jpeg" else []
    ok, out = cv2.imencode(
        "." + {"jpeg": "jpg", "tiff": "tif"}.get(family, family),
        cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
        params,
    )
    if not ok:
        raise ImageDecodeError(f"OpenCV could not encode the image as {family}")
    return out.tobytes()
