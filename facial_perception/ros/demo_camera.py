"""A stand-in camera: publishes a looping sequence of real face photos as a camera driver would.

The photos ship with ordinary packages, so the demo, the tests and the benchmark need no dataset and
no download: scikit-image ``astronaut`` (Eileen Collins), matplotlib ``grace_hopper`` and a few
``lfw_subset`` faces.  Each scene is pasted into a ``width x height`` frame and drifts slowly, so the
tracker sees motion like a real video.  Published as ``sensor_msgs/Image`` ``rgb8`` (plus JPEG
``CompressedImage`` on ``<image_topic>/compressed`` when ``compressed`` is set) with
``SystemDefaultsQoS`` (REP-2003) and a header stamped at publication time.

    python -m facial_perception.ros.demo_camera --ros-args -p rate:=10.0 -p image_topic:=/camera/image_raw
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import cv2
import numpy as np
import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import qos_profile_system_default
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from facial_perception.ros.conversions import rgb_to_compressed_msg, rgb_to_image_msg

__all__ = ["DemoCamera", "compressed_topic", "face_photos", "main", "make_frame", "make_sequence"]

# Head-and-shoulders crops (x1, y1, x2, y2) around the faces of the two photos (face ~95 and ~195 px).
_ASTRONAUT_CROP = (110, 20, 340, 270)
_HOPPER_CROP = (80, 60, 460, 460)


def compressed_topic(image_topic: str) -> str:
    """The image_transport name of the compressed stream of ``image_topic`` (``.../compressed``)."""
    topic = image_topic.rstrip("/")
    return topic if topic.endswith("/compressed") else topic + "/compressed"


def _crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return image[y1:y2, x1:x2]


@functools.lru_cache(maxsize=1)
def face_photos() -> tuple[np.ndarray, ...]:
    """Real face photos (RGB ``uint8``), cropped to head and shoulders: astronaut, Grace Hopper, LFW faces."""
    import matplotlib.cbook
    from PIL import Image as PILImage
    from skimage import data

    astronaut = data.astronaut()
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(PILImage.open(f).convert("RGB"))
    photos = [_crop(astronaut, _ASTRONAUT_CROP), _crop(hopper, _HOPPER_CROP)]
    lfw = data.lfw_subset()[:100]  # the first 100 images are faces (25x25 grey)
    for index in (0, 7, 31):
        grey = (np.clip(lfw[index], 0.0, 1.0) * 255).astype(np.uint8)
        photos.append(np.dstack([cv2.resize(grey, (160, 160), interpolation=cv2.INTER_CUBIC)] * 3))
    return tuple(np.ascontiguousarray(p) for p in photos)


def make_frame(
    photo_indices: Sequence[int], width: int = 640, height: int = 480, shift: float = 0.0
) -> np.ndarray:
    """One ``height x width`` RGB frame with the given photos side by side on a grey background.

    Up to three photos per row; ``shift`` (pixels) slides the whole scene horizontally, so a sequence
    of frames with a growing shift looks like a slow camera pan.
    """
    photos = face_photos()
    frame = np.full((height, width, 3), 96, dtype=np.uint8)
    count = len(photo_indices)
    if count == 0:
        return frame
    rows = 1 if count <= 3 else 2
    per_row = -(-count // rows)
    cell_w, cell_h = width // per_row, height // rows
    for slot, index in enumerate(photo_indices):
        photo = photos[index % len(photos)]
        if index >= len(photos) and (index // len(photos)) % 2:
            photo = photo[:, ::-1]  # mirrored copies make extra distinct-looking faces
        scale = min(cell_w * 0.9 / photo.shape[1], cell_h * 0.9 / photo.shape[0])
        size = (max(int(photo.shape[1] * scale), 1), max(int(photo.shape[0] * scale), 1))
        resized = cv2.resize(np.ascontiguousarray(photo), size, interpolation=cv2.INTER_AREA)
        row, col = divmod(slot, per_row)
        x = int(col * cell_w + (cell_w - size[0]) / 2 + shift)
        y = int(row * cell_h + (cell_h - size[1]) / 2)
        x = min(max(x, 0), width - size[0])
        frame[y : y + size[1], x : x + size[0]] = resized
    return frame


def make_sequence(
    width: int = 640, height: int = 480, frames_per_scene: int = 20, gap_frames: int = 6
) -> list[np.ndarray]:
    """The demo loop: one face, the other face, both, three (with an LFW face), each drifting slowly.

    Each scene is followed by ``gap_frames`` empty frames: people leave before others arrive.  The
    tracker has no appearance model (docs/PIPELINE.md), so a face that replaced another in the same
    place from one frame to the next would inherit its track id and, for a few frames, its smoothed
    labels; with more empty frames than the node's ``track_max_missed`` (4) every scene starts with
    new tracks.
    """
    scenes: list[list[int]] = [[0], [1], [0, 1], [1, 2, 0]]
    sequence = []
    for scene in scenes:
        for i in range(frames_per_scene):
            drift = 12.0 * np.sin(2 * np.pi * i / max(frames_per_scene, 1))
            sequence.append(make_frame(scene, width, height, shift=drift))
        sequence.extend(make_frame([], width, height) for _ in range(gap_frames))
    return sequence


class DemoCamera(Node):
    """Publishes :func:`make_sequence` in a loop at ``rate`` Hz (``num_frames`` frames, 0 = forever)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__("demo_camera", **kwargs)

        def declare(name: str, default: object, description: str, **extra: object) -> object:
            return self.declare_parameter(
                name, default, ParameterDescriptor(description=description, read_only=True, **extra)
            ).value

        self.image_topic = str(declare("image_topic", "/camera/image_raw", "Topic of the published images"))
        self.frame_id = str(declare("frame_id", "camera", "frame_id written into every header"))
        self.rate = float(
            declare(
                "rate",
                10.0,
                "Frames per second",
                floating_point_range=[FloatingPointRange(from_value=0.1, to_value=120.0)],
            )
        )
        self.num_frames = int(
            declare(
                "num_frames",
                0,
                "Frames to publish before stopping (0 = loop forever)",
                integer_range=[IntegerRange(from_value=0, to_value=10_000_000, step=1)],
            )
        )
        width = int(
            declare(
                "width",
                640,
                "Frame width (pixels)",
                integer_range=[IntegerRange(from_value=64, to_value=4096, step=1)],
            )
        )
        height = int(
            declare(
                "height",
                480,
                "Frame height (pixels)",
                integer_range=[IntegerRange(from_value=64, to_value=4096, step=1)],
            )
        )
        self.compressed = bool(
            declare("compressed", False, "Also publish JPEG CompressedImage on <image_topic>/compressed")
        )

        self.frames = make_sequence(width, height)
        self.published = 0
        # Like image_transport: raw frames always, plus the JPEG stream on <topic>/compressed when asked.
        self.publisher = self.create_publisher(Image, self.image_topic, qos_profile_system_default)
        self.compressed_publisher = (
            self.create_publisher(
                CompressedImage, compressed_topic(self.image_topic), qos_profile_system_default
            )
            if self.compressed
            else None
        )
        self.timer = self.create_timer(1.0 / self.rate, self._publish_next)
        streams = self.image_topic + (
            f" and {compressed_topic(self.image_topic)} (jpeg)" if self.compressed else ""
        )
        self.get_logger().info(
            f"publishing {len(self.frames)} looping {width}x{height} face frames on {streams}"
            f" at {self.rate:g} Hz (frame_id {self.frame_id!r})"
        )

    @property
    def done(self) -> bool:
        """True once ``num_frames`` frames have been published (never when looping forever)."""
        return 0 < self.num_frames <= self.published

    def _publish_next(self) -> None:
        if self.done:
            self.timer.cancel()
            return
        frame = self.frames[self.published % len(self.frames)]
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.frame_id)
        self.publisher.publish(rgb_to_image_msg(frame, header))
        if self.compressed_publisher is not None:
            self.compressed_publisher.publish(rgb_to_compressed_msg(frame, header))
        self.published += 1


def main(args: Sequence[str] | None = None) -> int:
    """Entry point (``demo_camera`` executable): spin until ``num_frames`` are out or Ctrl-C."""
    rclpy.init(args=list(args) if args is not None else sys.argv)
    node = DemoCamera()
    try:
        while rclpy.ok() and not node.done:
            rclpy.spin_once(node, timeout_sec=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
