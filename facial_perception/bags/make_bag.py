"""Labelled ROS 2 bags from face datasets: faces pasted into camera-sized frames, with ground truth.

Dataset images are tight face crops; a camera sees whole scenes.  To exercise detection and tracking
and not only classification, every frame is a canvas (gradient, noise, blurred blobs or a real
non-face photo from scikit-image) with one or more faces pasted at varied sizes and positions that
never overlap.  A pasted face stays for ``track_length`` consecutive frames and drifts slowly, like
a person in front of a robot, so id switches of the tracker can be counted.

Each image has a ``facial_perception/GroundTruthArray`` with the same header stamp on
:data:`~facial_perception.bags.bag_io.GROUND_TRUTH_TOPIC`: the box of the face inside each pasted
crop, the task labels (several tasks of one dataset are joined by file), the dataset attributes
(UTKFace race/gender/age) and the ground-truth track id.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facial_perception.bags.bag_io import (
    ATTRIBUTE_TRACK,
    COMPRESSED_IMAGE_TYPE,
    DEFAULT_COMPRESSED_TOPIC,
    DEFAULT_IMAGE_TOPIC,
    GROUND_TRUTH_TOPIC,
    IMAGE_TYPE,
    STORAGES,
    BagError,
    BagWriter,
    GroundTruthFace,
    GroundTruthFrame,
    get_typestore,
    make_header,
)

__all__ = [
    "BACKGROUNDS",
    "FACE_REGIONS",
    "MakeBagOptions",
    "MakeBagSummary",
    "Placement",
    "make_bag",
    "plan_placements",
]

BACKGROUNDS = ("gradient", "noise", "blur", "photo")
#: scikit-image sample photos without faces (``camera`` shows a person, ``chelsea`` a cat face).
_PHOTOS = (
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
)
#: Where the face lies inside a dataset's crop, as fractions ``(x0, y0, x1, y1)`` of the crop.  FER+
#: declares the whole 48x48 image as the face box; UTKFace crops are aligned to the face; the LFW crops
#: of ``lfw_identity`` (central 150 of the 250-pixel deep-funneled images) leave forehead and
#: background around it, so the box is the eyebrow-to-chin region (measured on the shared copy).
FACE_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "ferplus": (0.0, 0.0, 1.0, 1.0),
    "utkface": (0.0, 0.0, 1.0, 1.0),
    "identity": (0.16, 0.24, 0.86, 0.96),
    "default": (0.0, 0.0, 1.0, 1.0),
}
#: First header stamp of every generated bag (a fixed epoch time keeps bags reproducible).
START_TIME_NS = 1_700_000_000 * 1_000_000_000


@dataclass
class MakeBagOptions:
    """How to turn a dataset into frames.  Defaults: 640x480 raw rgb8 at 10 Hz, one face per frame."""

    storage: str = "sqlite3"
    image_type: str = "raw"  # "raw" (sensor_msgs/Image rgb8) or "compressed" (JPEG CompressedImage)
    fps: float = 10.0
    width: int = 640
    height: int = 480
    faces_per_frame: tuple[int, int] = (1, 1)  # inclusive range; each track group draws a count
    face_size: tuple[int, int] = (112, 200)  # side of the pasted crop, pixels (BlazeFace misses < ~96)
    track_length: int = 1  # frames a pasted face stays (with small motion) before new faces appear
    motion: float = 3.0  # maximum drift of a pasted face per frame, pixels
    background: str = "gradient"
    frames: int | None = None  # default: enough frames to show every selected sample once
    max_samples: int | None = 200  # samples drawn from the dataset (shuffled with seed)
    seed: int = 0
    jpeg_quality: int = 90
    frame_id: str = "camera"
    topic: str | None = None  # default /camera/image_raw or /camera/image_raw/compressed
    face_region: tuple[float, float, float, float] | None = None  # default: from the dataset layout

    def validate(self) -> None:
        """Refuse inconsistent options with one line (frame too small for the faces, bad ranges...)."""
        if self.storage not in STORAGES:
            raise BagError(f"storage must be one of {', '.join(STORAGES)}, got {self.storage!r}")
        if self.image_type not in ("raw", "compressed"):
            raise BagError(f"image type must be raw or compressed, got {self.image_type!r}")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise BagError(f"fps must be positive, got {self.fps}")
        if self.width < 32 or self.height < 32 or self.width > 8192 or self.height > 8192:
            raise BagError(f"frame size {self.width}x{self.height} out of range (32..8192)")
        lo, hi = self.faces_per_frame
        if not 1 <= lo <= hi or hi > 32:
            raise BagError(f"faces per frame must be a range within 1..32, got {lo}..{hi}")
        smin, smax = self.face_size
        if not 8 <= smin <= smax:
            raise BagError(f"face size must be a range of at least 8 pixels, got {smin}..{smax}")
        if smin > min(self.width, self.height):
            raise BagError(f"faces of {smin} px do not fit into {self.width}x{self.height} frames")
        if self.track_length < 1:
            raise BagError(f"track length must be >= 1 frame, got {self.track_length}")
        if self.motion < 0:
            raise BagError(f"motion must be >= 0 pixels per frame, got {self.motion}")
        if self.background not in BACKGROUNDS:
            raise BagError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.frames is not None and self.frames < 1:
            raise BagError(f"frames must be >= 1, got {self.frames}")
        if self.max_samples is not None and self.max_samples < 1:
            raise BagError(f"max samples must be >= 1, got {self.max_samples}")
        if not 1 <= self.jpeg_quality <= 100:
            raise BagError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if self.face_region is not None:
            x0, y0, x1, y1 = self.face_region
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise BagError(
                    f"face region must be fractions 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1, got "
                    f"{self.face_region}"
                )


@dataclass
class MakeBagSummary:
    """What was written: paths, counts and the options used (also stored in the bag's custom data)."""

    path: str
    storage: str
    frames: int
    faces: int
    tracks: int
    samples: int
    tasks: list[str]
    image_topic: str
    ground_truth_topic: str
    label_names: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


@dataclass
class Placement:
    """One pasted face in one group of frames: starting box, per-frame drift and the sample it shows."""

    sample: int  # index into the selected samples
    track: int  # ground-truth track id (1-based, unique in the bag)
    x: float
    y: float
    w: int
    h: int
    vx: float
    vy: float

    def box_at(self, t: int) -> tuple[int, int, int, int]:
        """Integer crop box ``(x0, y0, x1, y1)`` at frame ``t`` of the group."""
        x0 = round(self.x + self.vx * t)
        y0 = round(self.y + self.vy * t)
        return x0, y0, x0 + self.w, y0 + self.h


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def plan_placements(
    rng: random.Random,
    aspects: Sequence[float],
    width: int,
    height: int,
    face_size: tuple[int, int],
    track_length: int,
    motion: float,
    first_track: int,
    sample_ids: Sequence[int],
) -> list[Placement]:
    """Non-overlapping placements for the given samples over a group of ``track_length`` frames.

    ``aspects`` are height/width ratios of the samples.  The whole swept area of each face (start to
    end of its drift) is kept clear of the others, with a gap so the detector sees separate faces.
    Samples that cannot be placed after many tries are left out (the caller shows them later).
    """
    placed: list[Placement] = []
    swept: list[tuple[float, float, float, float]] = []
    gap = 8.0
    for sample, aspect in zip(sample_ids, aspects, strict=True):
        for _ in range(200):
            w = rng.randint(face_size[0], face_size[1])
            h = round(w * aspect)
            if h > height or w > width:
                scale = min(height / h, width / w)
                w, h = max(int(w * scale), 1), max(int(h * scale), 1)
            angle = rng.uniform(0, 2 * math.pi)
            speed = rng.uniform(0, motion)
            vx, vy = speed * math.cos(angle), speed * math.sin(angle)
            span_x, span_y = vx * (track_length - 1), vy * (track_length - 1)
            lo_x, hi_x = max(0.0, -span_x), width - w - max(0.0, span_x)
            lo_y, hi_y = max(0.0, -span_y), height - h - max(0.0, span_y)
            if hi_x < lo_x or hi_y < lo_y:
                continue
            x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            area = (min(x, x + span_x), min(y, y + span_y), max(x, x + span_x) + w, max(y, y + span_y) + h)
            if any(_overlaps(area, other, gap) for other in swept):
                continue
            placed.append(Placement(sample, first_track + len(placed), x, y, w, h, vx, vy))
            swept.append(area)
            break
    return placed


# --------------------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------------------


def _background(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A face-free RGB canvas; varied per group of frames so the detector sees different scenes."""
    if kind == "gradient":
        c0, c1 = rng.integers(20, 236, size=(2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
        img += rng.normal(0, 3, size=img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)
    if kind == "noise":
        small = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3)).astype(np.uint8)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    if kind == "blur":
        img = np.full((height, width, 3), rng.integers(40, 200, size=3), dtype=np.uint8)
        for _ in range(12):
            center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            radius = int(rng.integers(max(min(width, height) // 20, 2), max(min(width, height) // 4, 3)))
            cv2.circle(img, center, radius, tuple(int(v) for v in rng.integers(0, 256, size=3)), -1)
        return cv2.GaussianBlur(img, (0, 0), sigmaX=max(min(width, height) / 40, 1.0))
    from skimage import data

    name = _PHOTOS[int(rng.integers(0, len(_PHOTOS)))]
    photo = np.asarray(getattr(data, name)())
    if photo.ndim == 2:
        photo = cv2.cvtColor(photo.astype(np.uint8), cv2.COLOR_GRAY2RGB)
    photo = photo[..., :3].astype(np.uint8)
    scale = max(width / photo.shape[1], height / photo.shape[0])
    resized = cv2.resize(
        photo,
        (math.ceil(photo.shape[1] * scale), math.ceil(photo.shape[0] * scale)),
        interpolation=cv2.INTER_LINEAR,
    )
    oy = int(rng.integers(0, resized.shape[0] - height + 1))
    ox = int(rng.integers(0, resized.shape[1] - width + 1))
    return np.ascontiguousarray(resized[oy : oy + height, ox : ox + width])


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    path: Path
    labels: dict[str, str]
    attributes: dict[str, str]


def _layout_kind(dataset: Any) -> str:
    if dataset.task in ("emotion", "emotion_distribution"):
        return "ferplus"
    if dataset.task == "identity":
        return "identity"
    if dataset.samples and "race" in dataset.samples[0].attributes:
        return "utkface"
    return "default"


def _load_items(
    dataset_path: Path, tasks: Sequence[str] | None
) -> tuple[list[_Item], dict[str, list[str]], str]:
    """Samples with string labels of every requested task (joined by file path) and attributes."""
    from facial_perception.core.datasets import DatasetError, open_dataset

    requested: list[str | None] = list(tasks) if tasks else [None]
    try:
        datasets = [open_dataset(dataset_path, task=t) for t in requested]
    except DatasetError as exc:
        raise BagError(f"cannot read dataset: {exc}") from None
    label_names: dict[str, list[str]] = {}
    per_task: list[tuple[str, dict[Path, str]]] = []
    for ds in datasets:
        if ds.task == "unlabeled" or not ds.label_names:
            raise BagError(f"{dataset_path}: task {ds.task!r} has no class labels to put in a bag")
        label_names[ds.task] = list(ds.label_names)
        per_task.append(
            (
                ds.task,
                {
                    s.path: ds.label_names[s.label]
                    for s in ds.samples
                    if s.label is not None and 0 <= s.label < len(ds.label_names)
                },
            )
        )
    primary = datasets[0]
    items = []
    for sample in primary.samples:
        labels = {task: table[sample.path] for task, table in per_task if sample.path in table}
        if len(labels) != len(per_task):
            continue  # a label the reader dropped for one task (e.g. a FER+ tie)
        attributes = {k: str(v) for k, v in sample.attributes.items()}
        items.append(_Item(sample.path, labels, attributes))
    if not items:
        raise BagError(f"{dataset_path}: the dataset has no labelled samples")
    return items, label_names, _layout_kind(primary)


def _read_face(path: Path) -> np.ndarray:
    from facial_perception.core.datasets import UnreadableImageError, read_image

    try:
        image = read_image(path)
    except UnreadableImageError as exc:
        raise BagError(f"unreadable dataset image: {exc}") from None
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(image[..., :3])


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _image_message(rgb: np.ndarray, stamp_ns: int, options: MakeBagOptions) -> Any:
    from facial_perception.pipeline.images import encode_compressed, encode_raw

    store = get_typestore()
    header = make_header(stamp_ns, options.frame_id)
    if options.image_type == "compressed":
        data = encode_compressed(rgb, "jpeg", quality=options.jpeg_quality)
        cls = store.types[COMPRESSED_IMAGE_TYPE]
        return cls(header=header, format="jpeg", data=np.frombuffer(data, dtype=np.uint8))
    data, step = encode_raw(rgb, "rgb8")
    cls = store.types[IMAGE_TYPE]
    return cls(
        header=header,
        height=rgb.shape[0],
        width=rgb.shape[1],
        encoding="rgb8",
        is_bigendian=0,
        step=step,
        data=np.frombuffer(data, dtype=np.uint8),
    )


def make_bag(
    dataset: str | os.PathLike[str],
    output: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
    options: MakeBagOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> MakeBagSummary:
    """Write a labelled bag at ``output`` (a bag folder) from the dataset at ``dataset``.

    ``tasks`` picks the labelled tasks (default: the layout's default task); several tasks of one
    dataset (UTKFace ``gender`` and ``age``) label the same faces.  The bag appears atomically: on
    any error nothing is left at ``output``.
    """
    from tqdm import tqdm

    options = options or MakeBagOptions()
    options.validate()
    items, label_names, kind = _load_items(Path(dataset), tasks)
    region = options.face_region or FACE_REGIONS[kind]
    rng = random.Random(options.seed)
    np_rng = np.random.default_rng(options.seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    if options.max_samples is not None:
        order = order[: options.max_samples]
    mean_faces = sum(options.faces_per_frame) / 2
    n_frames = options.frames or max(1, math.ceil(len(order) / mean_faces) * options.track_length)
    compressed = options.image_type == "compressed"
    topic = options.topic or (DEFAULT_COMPRESSED_TOPIC if compressed else DEFAULT_IMAGE_TOPIC)
    image_type = COMPRESSED_IMAGE_TYPE if compressed else IMAGE_TYPE
    period_ns = round(1e9 / options.fps)
    cache: dict[int, np.ndarray] = {}

    def face(index: int) -> np.ndarray:
        if index not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[index] = _read_face(items[order[index]].path)
        return cache[index]

    faces_written = tracks = 0
    next_sample = 0
    used: set[int] = set()
    with BagWriter(output, options.storage, overwrite=overwrite) as writer:
        writer.add_topic(topic, image_type)
        writer.add_topic(GROUND_TRUTH_TOPIC, "facial_perception/msg/GroundTruthArray")
        bar = tqdm(total=n_frames, desc="make bag", unit="frame", disable=not progress)
        frame_index = 0
        while frame_index < n_frames:
            length = min(options.track_length, n_frames - frame_index)
            count = rng.randint(*options.faces_per_frame)
            ids = [(next_sample + k) % len(order) for k in range(count)]
            aspects = [face(i).shape[0] / face(i).shape[1] for i in ids]
            placements = plan_placements(
                rng,
                aspects,
                options.width,
                options.height,
                options.face_size,
                length,
                options.motion,
                tracks + 1,
                ids,
            )
            next_sample = (next_sample + max(len(placements), 1)) % len(order)
            tracks += len(placements)
            background = _background(options.background, np_rng, options.width, options.height)
            resized = {
                p.track: cv2.resize(
                    face(p.sample),
                    (p.w, p.h),
                    interpolation=cv2.INTER_AREA if p.w < face(p.sample).shape[1] else cv2.INTER_LINEAR,
                )
                for p in placements
            }
            for t in range(length):
                stamp = START_TIME_NS + frame_index * period_ns
                frame = background.copy()
                gt_faces = []
                for p in placements:
                    x0, y0, x1, y1 = p.box_at(t)
                    frame[y0:y1, x0:x1] = resized[p.track]
                    item = items[order[p.sample]]
                    used.add(p.sample)
                    box = (
                        x0 + region[0] * p.w,
                        y0 + region[1] * p.h,
                        x0 + region[2] * p.w,
                        y0 + region[3] * p.h,
                    )
                    attributes = {**item.attributes, ATTRIBUTE_TRACK: str(p.track)}
                    gt_faces.append(GroundTruthFace(box, dict(item.labels), attributes))
                source = ",".join(_relative(items[order[p.sample]].path, Path(dataset)) for p in placements)
                writer.write(topic, stamp, _image_message(frame, stamp, options))
                writer.write(
                    GROUND_TRUTH_TOPIC,
                    stamp,
                    GroundTruthFrame(stamp, gt_faces, source).to_msg(options.frame_id),
                )
                faces_written += len(gt_faces)
                frame_index += 1
                bar.update(1)
        bar.close()
        summary = MakeBagSummary(
            path=str(output),
            storage=options.storage,
            frames=n_frames,
            faces=faces_written,
            tracks=tracks,
            samples=len(used),
            tasks=list(label_names),
            image_topic=topic,
            ground_truth_topic=GROUND_TRUTH_TOPIC,
            label_names=label_names,
        )
        writer.set_custom_data(
            "facial_perception.make_bag",
            json.dumps(
                {
                    "dataset": str(dataset),
                    "tasks": list(label_names),
                    "label_names": label_names,
                    "face_region": list(region),
                    "options": _options_dict(options),
                }
            ),
        )
    return summary


def _options_dict(options: MakeBagOptions) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return Path(path).name
