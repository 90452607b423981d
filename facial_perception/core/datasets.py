"""Readers for the face-dataset layouts users download, all returning one in-memory description.

Every reader returns a :class:`FaceDataset`: a list of :class:`FaceSample` (path, integer label,
attributes, optional vote distribution) plus the label names, the task name, the model input size
and the root folder. Files are decoded lazily by ``__getitem__`` (an unreadable file gives ``None``,
which :func:`collate_skip_unreadable` drops and counts), or once into memory by
:func:`load_images` / :func:`load_into_memory` so CPU training does not re-decode JPEGs every epoch.
The labelling rules (FER+ majority, UTKFace age groups, ...) are documented in docs/DATA.md.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar, overload

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facial_perception.core.fileio import atomic_path
from facial_perception.core.preprocess import normalise_tensor, resize_grey

__all__ = [
    "ADIENCE_AGE_GROUPS",
    "AGE7_GROUPS",
    "AGE8_GROUPS",
    "FER2013_CLASSES",
    "FERPLUS_EMOTIONS",
    "IMAGE_EXTENSIONS",
    "UTK_GENDERS",
    "UTK_RACES",
    "Batch",
    "DatasetError",
    "FaceDataset",
    "FaceSample",
    "UnreadableImageError",
    "age_to_age7",
    "age_to_age8",
    "collate_skip_unreadable",
    "ferplus_label",
    "load_images",
    "load_into_memory",
    "open_dataset",
    "parse_utkface_name",
    "read_adience_folds",
    "read_class_folders",
    "read_fer2013_folders",
    "read_ferplus",
    "read_grey",
    "read_identity_folders",
    "read_image",
    "read_unlabeled",
    "read_utkface",
    "split_people",
    "split_per_person",
    "stratified_split",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
DEFAULT_SIZE = 64

FERPLUS_EMOTIONS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
FERPLUS_SPLITS = ("FER2013Train", "FER2013Valid", "FER2013Test")
# The Kaggle FER2013 label order (0..6), used for the class-folder release.
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
UTK_GENDERS = ("male", "female")
UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")
# The 8 Adience age groups (inclusive year ranges; the last is open-ended).
ADIENCE_AGE_GROUPS: tuple[tuple[int, int | None], ...] = (
    (0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, None),
)  # fmt: skip
AGE8_GROUPS = tuple(f"{lo}-{hi}" if hi is not None else f"{lo}+" for lo, hi in ADIENCE_AGE_GROUPS)
# The 7 groups of the face-attribute bias literature (e.g. Das et al. 2018 on UTKFace).
_AGE7_UPPER = (3, 12, 19, 30, 45, 60)
AGE7_GROUPS = ("0-3", "4-12", "13-19", "20-30", "31-45", "46-60", "61+")

_UTK_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)\.jpg(?:\.chip\.jpg)?$", re.IGNORECASE)
_ADIENCE_RANGE = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
_ADIENCE_FOLD = re.compile(r"fold_(?:frontal_)?(\d+)_data\.txt$")

T = TypeVar("T")


class DatasetError(Exception):
    """A dataset that cannot be used as asked (missing, empty, unknown layout, labels that do not match)."""


class UnreadableImageError(Exception):
    """One image file that cannot be read or decoded; readers skip it and count it."""


@dataclass
class FaceSample:
    """One face image on disk with its label (``None`` for unlabeled data) and what else is known about it."""

    path: Path
    label: int | None
    attributes: dict[str, str | int] = field(default_factory=dict)
    soft_label: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------
# Decoding


def _decode(path: Path, grey: bool) -> np.ndarray:
    """Decode with OpenCV (fast, EXIF orientation applied), falling back to Pillow for other formats."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise UnreadableImageError(f"{path}: {exc.strerror or exc}") from None
    image = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR) if data.size else None
    if image is not None:
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if grey else cv2.COLOR_BGRA2RGB)
        elif image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if grey else cv2.COLOR_BGR2RGB)
        return image
    try:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data.tobytes())) as pil:
            pil = ImageOps.exif_transpose(pil)
            if pil.mode not in ("L", "RGB"):
                pil = pil.convert("RGB")
            image = np.asarray(pil, dtype=np.uint8)
    except Exception as exc:  # Pillow raises many types for bad data; all mean "not an image"
        raise UnreadableImageError(f"{path}: not a decodable image ({type(exc).__name__})") from None
    if grey and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """A file -> uint8 RGB (H, W, 3), or grey (H, W) when the file is grey; raises UnreadableImageError."""
    return _decode(Path(path), grey=False)


def read_grey(path: str | os.PathLike[str]) -> np.ndarray:
    """A file -> uint8 grey (H, W) with the BT.601 luma of :func:`preprocess.to_grey`."""
    return _decode(Path(path), grey=True)


def _load_grey_resized(path: Path, size: int) -> np.ndarray | None:
    try:
        return resize_grey(read_grey(path), size)
    except UnreadableImageError as exc:
        log.warning("skipping unreadable image %s", exc)
        return None


# ----------------------------------------------------------------------------------------------
# The dataset object


class FaceDataset(Dataset):
    """Face samples with labels; items are ``(tensor (1, size, size) in [-1, 1], label or -1, index)``.

    ``__getitem__`` returns ``None`` for an unreadable file (logged), so wrap it in a DataLoader with
    ``collate_fn=collate_skip_unreadable``. ``skipped`` records what the reader left out and why
    (e.g. ``{"malformed file name": 3}``), for logs and docs. When ``images`` (uint8
    (N, size, size), aligned with ``samples``) is set, items come from memory instead of disk.
    """

    def __init__(
        self,
        samples: Sequence[FaceSample],
        label_names: Sequence[str],
        task: str,
        size: int = DEFAULT_SIZE,
        root: Path | None = None,
        skipped: dict[str, int] | None = None,
        images: np.ndarray | None = None,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise DatasetError(f"image size must be a positive integer, got {size!r}")
        self.samples: list[FaceSample] = list(samples)
        self.label_names: list[str] = list(label_names)
        self.task = task
        self.size = size
        self.root = root
        self.skipped: dict[str, int] = dict(skipped or {})
        if images is not None and (
            images.dtype != np.uint8 or images.shape != (len(self.samples), size, size)
        ):
            raise DatasetError(
                f"in-memory images must be uint8 {(len(self.samples), size, size)}, "
                f"got {images.dtype} {images.shape}"
            )
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        sample = self.samples[index]
        label = -1 if sample.label is None else int(sample.label)
        if self.images is not None:
            grey = self.images[index]
        else:
            loaded = _load_grey_resized(sample.path, self.size)
            if loaded is None:
                return None
            grey = loaded
        return normalise_tensor(torch.from_numpy(np.ascontiguousarray(grey))).unsqueeze(0), label, int(index)

    def __repr__(self) -> str:
        return f"FaceDataset({self.summary()})"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def labels(self) -> np.ndarray:
        """int64 labels of all samples, -1 where unlabeled."""
        return np.array([-1 if s.label is None else s.label for s in self.samples], dtype=np.int64)

    def soft_labels(self) -> np.ndarray | None:
        """float32 (N, classes) vote distributions, or None when the samples carry none."""
        if not self.samples or any(s.soft_label is None for s in self.samples):
            return None
        return np.stack([np.asarray(s.soft_label, dtype=np.float32) for s in self.samples])

    def class_counts(self) -> dict[str, int]:
        """Samples per label name (labels in ``label_names`` order; unlabeled ones under ``"<none>"``)."""
        counts = Counter(self.labels().tolist())
        out = {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}
        if counts.get(-1):
            out["<none>"] = counts[-1]
        return out

    def summary(self) -> str:
        """One line for logs: task, size, sample count, classes and what was skipped."""
        text = f"task={self.task!r}, {len(self)} images at {self.size}px, {len(self.label_names)} classes"
        if self.root is not None:
            text += f", root={self.root}"
        if self.skipped:
            text += ", skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return text

    def subset(self, indices: Iterable[int]) -> FaceDataset:
        """A dataset over some samples (same label names, so label indices stay valid)."""
        idx = [int(i) for i in indices]
        images = self.images[idx] if self.images is not None else None
        return FaceDataset(
            [self.samples[i] for i in idx],
            self.label_names,
            self.task,
            self.size,
            self.root,
            self.skipped,
            images,
        )

    def with_size(self, size: int) -> FaceDataset:
        """The same samples at another model input size (drops in-memory images of the old size)."""
        return FaceDataset(self.samples, self.label_names, self.task, size, self.root, self.skipped)

    def remap_labels(self, label_names: Sequence[str]) -> FaceDataset:
        """Re-index labels to ``label_names`` (e.g. a column's order); labels outside it -> DatasetError."""
        wanted = list(label_names)
        position = {name: i for i, name in enumerate(wanted)}
        present = {self.label_names[s.label] for s in self.samples if s.label is not None}
        unknown = sorted(present - position.keys())
        if unknown:
            raise DatasetError(
                f"labels {unknown} in {self.root or 'the dataset'} are not among the requested labels "
                f"{wanted}"
            )
        samples = [
            FaceSample(
                s.path,
                None if s.label is None else position[self.label_names[s.label]],
                s.attributes,
                s.soft_label if wanted == self.label_names else None,
            )
            for s in self.samples
        ]
        return FaceDataset(samples, wanted, self.task, self.size, self.root, self.skipped, self.images)


class Batch(NamedTuple):
    """A collated batch: images (B, 1, S, S), labels (B,), dataset indices (B,), number of dropped files."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: int


def collate_skip_unreadable(items: Sequence[tuple[torch.Tensor, int, int] | None]) -> Batch:
    """DataLoader ``collate_fn`` that drops ``None`` items and reports how many in ``Batch.skipped``.

    The count travels with the batch, so it is right with worker processes too; the trainer sums it
    and logs "skipped N unreadable images". A batch whose items were all unreadable has 0 rows.
    """
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(torch.empty((0, 1, 0, 0), dtype=torch.float32), empty, empty.clone(), skipped)
    return Batch(
        torch.stack([item[0] for item in kept]),
        torch.tensor([item[1] for item in kept], dtype=torch.int64),
        torch.tensor([item[2] for item in kept], dtype=torch.int64),
        skipped,
    )


# ----------------------------------------------------------------------------------------------
# Helpers


def _existing_dir(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset path not found: {path} (expected {what})")
    if not path.is_dir():
        raise DatasetError(f"dataset path is not a folder: {path} (expected {what})")
    return path


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder in a stable (sorted) order; hidden files and folders are ignored."""
    if recursive:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(Path(dirpath) / f for f in filenames)
        return sorted(p for p in found if _is_image(p))
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _finish(
    samples: list[FaceSample],
    label_names: Sequence[str],
    task: str,
    size: int,
    root: Path,
    skipped: Counter[str],
    expected: str,
) -> FaceDataset:
    """Log what was skipped, refuse an empty result, and build the dataset."""
    for why, count in sorted(skipped.items()):
        log.info("%s: skipped %d images (%s)", root, count, why)
    if not samples:
        detail = f"; skipped {sum(skipped.values())}" if skipped else ""
        raise DatasetError(f"no usable images in {root} (expected {expected}){detail}")
    dataset = FaceDataset(samples, label_names, task, size, root, dict(skipped))
    log.info("loaded %s", dataset.summary())
    return dataset


# ----------------------------------------------------------------------------------------------
# FER+ and FER2013


def ferplus_label(
    votes: Sequence[int], tie: str = "drop", min_share: float = 0.0
) -> tuple[int | None, str | None]:
    """The FER+ majority rule: ``(emotion index, None)`` or ``(None, reason it is dropped)``.

    ``votes`` are the 10 counts (8 emotions, unknown, NF). The image is dropped when unknown or
    not-a-face has at least as many votes as the best emotion, when the best emotion is tied with
    another emotion and ``tie="drop"`` (``tie="first"`` keeps the first in FER+ column order), or
    when the best emotion holds no more than ``min_share`` of all votes (0.5 = a strict majority).
    """
    if tie not in ("drop", "first"):
        raise ValueError(f"tie must be 'drop' or 'first', got {tie!r}")
    emotions = list(votes[:8])
    top = max(emotions)
    total = sum(votes)
    if top == 0 or max(votes[8], votes[9]) >= top:
        return None, "unknown or not-a-face is the most voted"
    if emotions.count(top) > 1 and tie == "drop":
        return None, "tied top emotion votes"
    if top <= min_share * total:
        return None, f"top emotion has <= {min_share:.0%} of the votes"
    return emotions.index(top), None


def _ferplus_split_dirs(root: Path, split: str | Sequence[str]) -> list[Path]:
    if (root / "label.csv").is_file():
        return [root]
    splits = [split] if isinstance(split, str) else list(split)
    if not splits:
        raise DatasetError("no FER+ split requested")
    dirs = []
    for name in splits:
        candidate = root / name
        if not (candidate / "label.csv").is_file():
            available = [p.name for p in _subfolders(root) if (p / "label.csv").is_file()]
            raise DatasetError(
                f"no FER+ labels at {candidate / 'label.csv'} (expected FER+ layout: {name}/label.csv"
                + (f"; found splits {available})" if available else ")")
            )
        dirs.append(candidate)
    return dirs


def read_ferplus(
    root: str | os.PathLike[str],
    split: str | Sequence[str] = "FER2013Train",
    target: str = "majority",
    tie: str = "drop",
    min_share: float = 0.0,
    size: int = DEFAULT_SIZE,
) -> FaceDataset:
    """FER+ (``<root>/<split>/label.csv`` + images, or ``root`` being a split folder itself).

    ``target="majority"`` keeps images with a clear winning emotion (:func:`ferplus_label`);
    ``target="distribution"`` keeps every image whose most voted category is an emotion (ties
    allowed; label = first top emotion) for training on the vote distributions. Both set
    ``soft_label`` to the 8 emotion votes normalised to sum 1. ``split`` may list several splits.
    """
    if target not in ("majority", "distribution"):
        raise DatasetError(f"FER+ target must be 'majority' or 'distribution', got {target!r}")
    if tie not in ("drop", "first"):
        raise DatasetError(f"FER+ tie rule must be 'drop' or 'first', got {tie!r}")
    base = _existing_dir(root, "FER+ layout: FER2013Train/label.csv")
    samples: list[FaceSample] = []
    skipped: Counter[str] = Counter()
    for split_dir in _ferplus_split_dirs(base, split):
        on_disk = {p.name for p in split_dir.iterdir()}
        with open(split_dir / "label.csv", newline="", encoding="utf-8") as handle:
            for line_no, row in enumerate(csv.reader(handle), start=1):
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != 12:
                    raise DatasetError(
                        f"{split_dir / 'label.csv'} line {line_no}: expected 12 columns "
                        f"(file, bbox, 8 emotions, unknown, NF), got {len(row)}"
                    )
                name = row[0].strip()
                try:
                    votes = [int(float(v)) for v in row[2:]]
                except ValueError:
                    raise DatasetError(
                        f"{split_dir / 'label.csv'} line {line_no}: vote counts must be numbers, "
                        f"got {row[2:]}"
                    ) from None
                if not name:
                    skipped["no image file named"] += 1
                    continue
                if name not in on_disk:
                    skipped["image file missing"] += 1
                    continue
                emotion_votes = np.asarray(votes[:8], dtype=np.float32)
                if target == "majority":
                    label, reason = ferplus_label(votes, tie=tie, min_share=min_share)
                else:
                    label, reason = ferplus_label(votes, tie="first", min_share=min_share)
                if label is None:
                    skipped[reason or "dropped"] += 1
                    continue
                samples.append(
                    FaceSample(
                        split_dir / name,
                        label,
                        {
                            "split": split_dir.name,
                            "top_votes": int(max(votes[:8])),
                            "total_votes": sum(votes),
                        },
                        emotion_votes / emotion_votes.sum(),
                    )
                )
    return _finish(
        samples, FERPLUS_EMOTIONS, "emotion", size, base, skipped, "FER+ layout: FER2013Train/label.csv"
    )


def _read_named_class_folders(
    root: Path, canonical: Sequence[str], task: str, size: int, expected: str
) -> FaceDataset:
    """Class folders whose names must be (case-insensitively) among ``canonical``; labels in that order."""
    index = {name.lower(): i for i, name in enumerate(canonical)}
    folders = [p for p in _subfolders(root) if _images_in(p, recursive=True)]
    unknown = [p.name for p in folders if p.name.lower() not in index]
    if unknown:
        raise DatasetError(f"{root}: folders {unknown} are not among the expected classes {list(canonical)}")
    samples = [
        FaceSample(path, index[folder.name.lower()], {"class": canonical[index[folder.name.lower()]]})
        for folder in folders
        for path in _images_in(folder, recursive=True)
    ]
    return _finish(samples, canonical, task, size, root, Counter(), expected)


def read_fer2013_folders(
    root: str | os.PathLike[str], split: str | None = None, size: int = DEFAULT_SIZE
) -> FaceDataset:
    """FER2013 class folders ``angry/ disgust/ fear/ happy/ neutral/ sad/ surprise/`` (any case).

    Labels follow the Kaggle FER2013 order (:data:`FER2013_CLASSES`). For the common
    ``train/`` + ``test/`` release pass ``split="train"`` (or point ``root`` at that folder).
    """
    expected = "FER2013 class folders angry/ disgust/ fear/ happy/ neutral/ sad/ surprise/"
    base = _existing_dir(root, expected)
    if split is not None:
        matches = [p for p in _subfolders(base) if p.name.lower() == split.lower()]
        if not matches:
            raise DatasetError(f"no split folder {split!r} in {base} (expected {expected} inside it)")
        base = matches[0]
    return _read_named_class_folders(base, FER2013_CLASSES, "emotion", size, expected)


# ----------------------------------------------------------------------------------------------
# Age groups and UTKFace


def age_to_age8(age: float) -> int:
    """Years -> index into :data:`AGE8_GROUPS` (the 8 Adience groups).

    Adience leaves gaps (3, 7, 13-14, 21-24, 33-37, 44-47, 54-59). An age in a gap goes to the
    nearest group by years, and an exact tie to the younger group, which gives the partition
    0-3, 4-7, 8-13, 14-22, 23-35, 36-45, 46-56, 57+.
    """
    if not math.isfinite(age) or age < 0:
        raise ValueError(f"age must be a non-negative number, got {age!r}")
    for i, (low, high) in enumerate(ADIENCE_AGE_GROUPS):
        if high is None or age <= high:
            if age >= low or i == 0:
                return i
            previous_high = ADIENCE_AGE_GROUPS[i - 1][1]
            assert previous_high is not None
            return i - 1 if age - previous_high <= low - age else i
    raise AssertionError("unreachable: the last Adience group is open-ended")


def age_to_age7(age: float) -> int:
    """Years -> index into :data:`AGE7_GROUPS` (0-3, 4-12, 13-19, 20-30, 31-45, 46-60, 61+).

    Fractional ages (Adience range midpoints) are rounded down first, as in "age in whole years".
    """
    if not math.isfinite(age) or age < 0:
        raise ValueError(f"age must be a non-negative number, got {age!r}")
    years = math.floor(age)
    for i, upper in enumerate(_AGE7_UPPER):
        if years <= upper:
            return i
    return len(_AGE7_UPPER)


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """``[age]_[gender]_[race]_[date].jpg.chip.jpg`` -> (age, gender, race), or None when malformed."""
    match = _UTK_NAME.match(name)
    if match is None:
        return None
    age = int(match.group(1))
    if age > 120:
        return None
    return age, int(match.group(2)), int(match.group(3))


_UTK_TARGETS = ("age8", "age7", "gender", "race", "age", "age_years")


def read_utkface(root: str | os.PathLike[str], target: str = "age8", size: int = DEFAULT_SIZE) -> FaceDataset:
    """UTKFace (labels in the file names; searched recursively, so ``part1/ part2/`` work too).

    Targets: ``age8`` (task "age", Adience groups), ``age7`` (task "age7", bias-literature groups),
    ``gender`` (male/female), ``race`` (White, Black, Asian, Indian, Others), ``age``/``age_years``
    (task "age_years": label = age in years, no label names). Every sample carries the attributes
    age, gender, race, age8 and age7 for subgroup evaluation. Malformed names are skipped and counted.
    """
    if target not in _UTK_TARGETS:
        raise DatasetError(f"UTKFace target must be one of {list(_UTK_TARGETS)}, got {target!r}")
    expected = "UTKFace names [age]_[gender]_[race]_[date].jpg.chip.jpg"
    base = _existing_dir(root, expected)
    samples: list[FaceSample] = []
    skipped: Counter[str] = Counter()
    for path in _images_in(base, recursive=True):
        parsed = parse_utkface_name(path.name)
        if parsed is None:
            skipped["malformed file name"] += 1
            continue
        age, gender, race = parsed
        attributes: dict[str, str | int] = {
            "age": age,
            "gender": UTK_GENDERS[gender],
            "race": UTK_RACES[race],
            "age8": AGE8_GROUPS[age_to_age8(age)],
            "age7": AGE7_GROUPS[age_to_age7(age)],
        }
        label = {
            "age8": age_to_age8(age),
            "age7": age_to_age7(age),
            "gender": gender,
            "race": race,
        }.get(target, age)
        samples.append(FaceSample(path, label, attributes))
    names: Sequence[str]
    task, names = {
        "age8": ("age", AGE8_GROUPS),
        "age7": ("age7", AGE7_GROUPS),
        "gender": ("gender", UTK_GENDERS),
        "race": ("race", UTK_RACES),
    }.get(target, ("age_years", ()))
    return _finish(samples, names, task, size, base, skipped, expected)


# ----------------------------------------------------------------------------------------------
# Identities


def read_identity_folders(
    root: str | os.PathLike[str], min_images: int = 1, size: int = DEFAULT_SIZE
) -> FaceDataset:
    """LFW-style ``<Name>/<Name>_NNNN.jpg``: one label per person folder with at least ``min_images``."""
    expected = "identity folders <Name>/<Name>_NNNN.jpg"
    base = _existing_dir(root, expected)
    if min_images < 1:
        raise DatasetError(f"min_images must be >= 1, got {min_images}")
    people: list[tuple[str, list[Path]]] = []
    skipped: Counter[str] = Counter()
    for folder in _subfolders(base):
        images = _images_in(folder)
        if not images:
            continue
        if len(images) < min_images:
            skipped[f"person with fewer than {min_images} images"] += len(images)
            continue
        people.append((folder.name, images))
    samples = [
        FaceSample(path, label, {"person": name})
        for label, (name, images) in enumerate(people)
        for path in images
    ]
    return _finish(samples, [name for name, _ in people], "identity", size, base, skipped, expected)


def _person(sample: FaceSample, label_names: Sequence[str]) -> str:
    person = sample.attributes.get("person")
    if person is not None:
        return str(person)
    if sample.label is None:
        raise DatasetError(f"{sample.path}: sample has neither a person attribute nor a label")
    return label_names[sample.label] if sample.label < len(label_names) else str(sample.label)


def _as_samples(data: FaceDataset | Sequence[FaceSample]) -> tuple[list[FaceSample], list[str]]:
    if isinstance(data, FaceDataset):
        return data.samples, data.label_names
    return list(data), []


@overload
def _take(data: FaceDataset, first: list[int], second: list[int]) -> tuple[FaceDataset, FaceDataset]: ...
@overload
def _take(
    data: Sequence[FaceSample], first: list[int], second: list[int]
) -> tuple[list[FaceSample], list[FaceSample]]: ...
def _take(data, first, second):  # type: ignore[no-untyped-def]
    """Return the two index lists as the caller's kind: datasets for a dataset, lists for a list."""
    if isinstance(data, FaceDataset):
        return data.subset(first), data.subset(second)
    items = list(data)
    return [items[i] for i in first], [items[i] for i in second]


def _grouped(keys: Sequence[T]) -> dict[T, list[int]]:
    groups: dict[T, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise DatasetError(f"{name} must be in [0, 1), got {value}")


def _split_groups(
    groups: dict[T, list[int]], val_fraction: float, seed: int, min_train: int
) -> tuple[list[int], list[int]]:
    """Per group, a seeded shuffle then ``round(n * val_fraction)`` to validation, keeping ``min_train``."""
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for key in sorted(groups, key=str):
        members = list(groups[key])
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(members) > min_train:
            n_val = 1  # every group is represented in validation where it can be
        n_val = max(0, min(n_val, len(members) - min_train))
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train), sorted(val)


@overload
def split_per_person(
    data: FaceDataset, val_fraction: float, seed: int = 0, min_train: int = 1
) -> tuple[FaceDataset, FaceDataset]: ...
@overload
def split_per_person(
    data: Sequence[FaceSample], val_fraction: float, seed: int = 0, min_train: int = 1
) -> tuple[list[FaceSample], list[FaceSample]]: ...
def split_per_person(data, val_fraction, seed=0, min_train=1):  # type: ignore[no-untyped-def]
    """Split each person's images into train/validation, so every person is in both parts where possible.

    A person gets ``round(n * val_fraction)`` validation images (at least 1), but keeps at least
    ``min_train`` training images; people with ``n <= min_train`` stay in training only.
    Deterministic for a given seed. Returns two datasets for a dataset, two lists for a list.
    """
    _check_fraction(val_fraction, "val_fraction")
    if min_train < 1:
        raise DatasetError(f"min_train must be >= 1, got {min_train}")
    samples, names = _as_samples(data)
    groups = _grouped([_person(s, names) for s in samples])
    train, val = _split_groups(groups, val_fraction, seed, min_train)
    return _take(data, train, val)


@overload
def split_people(
    data: FaceDataset, holdout_people_fraction: float, seed: int = 0
) -> tuple[FaceDataset, FaceDataset]: ...
@overload
def split_people(
    data: Sequence[FaceSample], holdout_people_fraction: float, seed: int = 0
) -> tuple[list[FaceSample], list[FaceSample]]: ...
def split_people(data, holdout_people_fraction, seed=0):  # type: ignore[no-untyped-def]
    """Split by person: (known people, held-out people) share nobody, e.g. for few-shot enrolment tests.

    ``round(P * fraction)`` people are held out (at least one when the fraction is positive, and at
    least one person always stays known). Deterministic for a given seed.
    """
    _check_fraction(holdout_people_fraction, "holdout_people_fraction")
    samples, names = _as_samples(data)
    groups = _grouped([_person(s, names) for s in samples])
    people = sorted(groups)
    if holdout_people_fraction > 0 and len(people) < 2:
        raise DatasetError(f"cannot hold out people from a dataset of {len(people)} person(s)")
    n_out = round(len(people) * holdout_people_fraction)
    if holdout_people_fraction > 0:
        n_out = min(max(n_out, 1), len(people) - 1)
    random.Random(seed).shuffle(people)
    held = set(people[:n_out])
    known = sorted(i for p in people[n_out:] for i in groups[p])
    out = sorted(i for p in held for i in groups[p])
    return _take(data, known, out)


@overload
def stratified_split(
    data: FaceDataset, val_fraction: float, seed: int = 0
) -> tuple[FaceDataset, FaceDataset]: ...
@overload
def stratified_split(
    data: Sequence[FaceSample], val_fraction: float, seed: int = 0
) -> tuple[list[FaceSample], list[FaceSample]]: ...
def stratified_split(data, val_fraction, seed=0):  # type: ignore[no-untyped-def]
    """Deterministic train/validation split with each label's share preserved (unlabeled form one group).

    Each class with at least two images gets at least one validation image when the fraction is
    positive, so per-class recall is defined on small data.
    """
    _check_fraction(val_fraction, "val_fraction")
    samples, _ = _as_samples(data)
    groups = _grouped([-1 if s.label is None else s.label for s in samples])
    train, val = _split_groups(groups, val_fraction, seed, min_train=1)
    return _take(data, train, val)


# ----------------------------------------------------------------------------------------------
# Adience


def _adience_age(text: str) -> float | None:
    """An Adience age cell -> a representative age in years ("(25, 32)" -> 28.5, "35" -> 35), or None."""
    text = text.strip()
    match = _ADIENCE_RANGE.match(text)
    if match:
        return (int(match.group(1)) + int(match.group(2))) / 2.0
    if text.isdigit():
        return float(text)
    return None


def _adience_image(faces: Path, user_id: str, face_id: str, original: str) -> Path | None:
    for prefix in ("coarse_tilt_aligned_face", "landmark_aligned_face"):
        candidate = faces / user_id / f"{prefix}.{face_id}.{original}"
        if candidate.is_file():
            return candidate
    return None


def read_adience_folds(
    fold_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    image_root: str | os.PathLike[str],
    target: str = "age8",
    size: int = DEFAULT_SIZE,
) -> FaceDataset:
    """Adience ``fold_N_data.txt`` files (or a folder holding them) with images under ``image_root``.

    Images are looked up as ``faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<original_image>``
    (``image_root`` may be the folder containing ``faces/`` or ``faces/`` itself; the
    ``landmark_aligned_face`` variant is accepted too). Ages that are one of the 8 official ranges map
    to their group; other ranges and single ages map by their midpoint with :func:`age_to_age8`.
    Rows without an age (or gender "u"/empty for ``target="gender"``) and missing images are skipped
    and counted. Attributes: age (the original cell), gender, fold.
    """
    if target not in ("age8", "gender"):
        raise DatasetError(f"Adience target must be 'age8' or 'gender', got {target!r}")
    expected = "Adience fold_N_data.txt files and faces/<user_id>/coarse_tilt_aligned_face.*"
    if isinstance(fold_files, str | os.PathLike):
        fold_path = Path(fold_files).expanduser()
        if fold_path.is_dir():
            files = sorted(fold_path.glob("fold_*_data.txt"))
            if not files:
                raise DatasetError(f"no fold_*_data.txt files in {fold_path} (expected {expected})")
        else:
            files = [fold_path]
    else:
        files = [Path(f).expanduser() for f in fold_files]
    if not files:
        raise DatasetError(f"no Adience fold files given (expected {expected})")
    for f in files:
        if not f.is_file():
            raise DatasetError(f"Adience fold file not found: {f}")
    base = _existing_dir(image_root, expected)
    faces = base / "faces" if (base / "faces").is_dir() else base

    official = {
        f"({lo}, {hi if hi is not None else 100})": i for i, (lo, hi) in enumerate(ADIENCE_AGE_GROUPS)
    }
    samples: list[FaceSample] = []
    skipped: Counter[str] = Counter()
    required = ("user_id", "original_image", "face_id", "age", "gender")
    for fold_file in files:
        fold_match = _ADIENCE_FOLD.search(fold_file.name)
        fold = int(fold_match.group(1)) if fold_match else -1
        with open(fold_file, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{fold_file}: not an Adience fold file (missing columns {missing})")
            for row in reader:
                age_text = (row.get("age") or "").strip()
                gender = (row.get("gender") or "").strip().lower()
                if target == "age8":
                    if age_text in official:
                        label: int | None = official[age_text]
                    else:
                        years = _adience_age(age_text)
                        label = None if years is None else age_to_age8(years)
                    if label is None:
                        skipped["no age label"] += 1
                        continue
                else:
                    if gender not in ("m", "f"):
                        skipped["no gender label"] += 1
                        continue
                    label = 0 if gender == "m" else 1
                image = _adience_image(
                    faces, row["user_id"].strip(), row["face_id"].strip(), row["original_image"].strip()
                )
                if image is None:
                    skipped["image file missing"] += 1
                    continue
                attributes: dict[str, str | int] = {"age": age_text, "gender": gender, "fold": fold}
                samples.append(FaceSample(image, label, attributes))
    task, names = ("age", AGE8_GROUPS) if target == "age8" else ("gender", UTK_GENDERS)
    return _finish(samples, names, task, size, base, skipped, expected)


# ----------------------------------------------------------------------------------------------
# Generic layouts


def read_class_folders(
    root: str | os.PathLike[str],
    label_names: Sequence[str] | None = None,
    task: str = "class",
    size: int = DEFAULT_SIZE,
) -> FaceDataset:
    """Generic ``<class>/<image>`` folders (images may sit in sub-folders of a class folder).

    Without ``label_names`` the classes are the folder names, sorted. With ``label_names`` (e.g. an
    existing column's labels) that order is used and a folder outside it is a DatasetError.
    """
    expected = "class folders <class>/<image>"
    base = _existing_dir(root, expected)
    folders = [p for p in _subfolders(base) if _images_in(p, recursive=True)]
    if label_names is None:
        names = [p.name for p in folders]
    else:
        names = list(label_names)
        unknown = [p.name for p in folders if p.name not in names]
        if unknown:
            raise DatasetError(f"{base}: class folders {unknown} are not among the requested labels {names}")
    index = {name: i for i, name in enumerate(names)}
    samples = [
        FaceSample(path, index[folder.name], {"class": folder.name})
        for folder in folders
        for path in _images_in(folder, recursive=True)
    ]
    return _finish(samples, names, task, size, base, Counter(), expected)


def read_unlabeled(roots: Sequence[str | os.PathLike[str]], size: int = DEFAULT_SIZE) -> FaceDataset:
    """Every image under the given folders (recursively), without labels, for encoder training."""
    if isinstance(roots, str | os.PathLike):
        roots = [roots]
    if not roots:
        raise DatasetError("no folders given for unlabeled images")
    expected = "image files in the folder or its sub-folders"
    samples: list[FaceSample] = []
    bases = [_existing_dir(r, expected) for r in roots]
    for base in bases:
        samples.extend(
            FaceSample(path, None, {"source": base.name}) for path in _images_in(base, recursive=True)
        )
    root = bases[0] if len(bases) == 1 else Path(os.path.commonpath([str(b) for b in bases]))
    if not samples:
        where = ", ".join(str(b) for b in bases)
        raise DatasetError(f"no images found in {where} (expected {expected})")
    return _finish(samples, [], "unlabeled", size, root, Counter(), expected)


# ----------------------------------------------------------------------------------------------
# Layout detection


_LAYOUT_HELP = (
    "expected one of: FER+ (FER2013Train/label.csv or a folder with label.csv), Adience fold_N_data.txt, "
    "UTKFace [age]_[gender]_[race]_[date].jpg.chip.jpg, <Name>/<Name>_NNNN.jpg identity folders, "
    "<class>/<image> folders, or any images with task 'unlabeled'"
)


def _utk_target(task: str | None) -> str:
    mapping = {
        None: "age8",
        "age": "age8",
        "age8": "age8",
        "age7": "age7",
        "gender": "gender",
        "race": "race",
    }
    mapping["age_years"] = "age_years"
    if task not in mapping:
        raise DatasetError(
            f"task {task!r} is not available in UTKFace (use age, age7, gender, race or age_years)"
        )
    return mapping[task]


def _looks_like_identities(folders: Sequence[Path]) -> bool:
    """True when most person folders name their files ``<folder>_...`` (the LFW convention)."""
    votes = 0
    for folder in folders[:50]:
        images = _images_in(folder)
        votes += bool(images) and sum(p.name.startswith(folder.name + "_") for p in images) * 2 > len(images)
    return votes * 2 > min(len(folders), 50)


def open_dataset(
    path: str | os.PathLike[str],
    task: str | None = None,
    size: int = DEFAULT_SIZE,
    label_names: Sequence[str] | None = None,
) -> FaceDataset:
    """Open any supported layout, detecting it from the folder; used by the CLI and the ROS services.

    Detection order: ``label.csv`` (FER+ split folder) or ``FER2013Train/label.csv`` (FER+ root,
    Train split), ``fold_*_data.txt`` (Adience), UTKFace file names, FER2013 class folders,
    ``<Name>/<Name>_NNNN`` identity folders, other class folders, and otherwise (images at the top,
    possibly with sub-folders) unlabeled images. ``task`` picks the target where a layout offers
    several (UTKFace: age, age7, gender, race, age_years; FER+: emotion or emotion_distribution;
    Adience: age or gender), names the task of class folders, and ``"unlabeled"`` reads any
    layout without labels.
    ``label_names`` re-indexes the labels to that order and rejects labels outside it.
    """
    dataset = _open_dataset(Path(path).expanduser(), task, size)
    if label_names is not None and dataset.task != "unlabeled":
        dataset = dataset.remap_labels(label_names)
    return dataset


def _open_dataset(path: Path, task: str | None, size: int) -> FaceDataset:
    if not path.exists():
        raise DatasetError(f"dataset path not found: {path}")
    if task == "unlabeled":
        return read_unlabeled([path], size=size)
    if path.is_file():
        if path.name == "label.csv":
            path = path.parent
        elif _ADIENCE_FOLD.search(path.name):
            return read_adience_folds(
                [path], path.parent, target="gender" if task == "gender" else "age8", size=size
            )
        else:
            raise DatasetError(f"{path} is a file; pass the dataset folder ({_LAYOUT_HELP})")

    if (path / "label.csv").is_file() or any((path / s / "label.csv").is_file() for s in FERPLUS_SPLITS):
        if task not in (None, "emotion", "emotion_distribution"):
            raise DatasetError(
                f"{path} is a FER+ dataset: task must be emotion or emotion_distribution, not {task!r}"
            )
        # A split folder is read as it is; a FER+ root gives its first split (normally FER2013Train).
        split = next((s for s in FERPLUS_SPLITS if (path / s / "label.csv").is_file()), "FER2013Train")
        target = "distribution" if task == "emotion_distribution" else "majority"
        return read_ferplus(path, split=split, target=target, size=size)

    if sorted(path.glob("fold_*_data.txt")):
        if task not in (None, "age", "age8", "gender"):
            raise DatasetError(f"{path} is an Adience dataset: task must be age or gender, not {task!r}")
        return read_adience_folds(path, path, target="gender" if task == "gender" else "age8", size=size)

    flat = _images_in(path)
    folders = [p for p in _subfolders(path) if _images_in(p, recursive=True)]
    if flat and sum(parse_utkface_name(p.name) is not None for p in flat) * 2 > len(flat):
        return read_utkface(path, target=_utk_target(task), size=size)
    if folders and not flat:  # loose images beside folders mean "not a class layout"
        lowered = {p.name.lower() for p in folders}
        if lowered <= {"train", "test", "val", "valid", "validation"}:
            raise DatasetError(
                f"{path} holds split folders {sorted(p.name for p in folders)}: pass one of them"
            )
        if lowered <= set(FER2013_CLASSES) and task in (None, "emotion"):
            return read_fer2013_folders(path, size=size)
        if task == "identity" or (task is None and _looks_like_identities(folders)):
            return read_identity_folders(path, size=size)
        return read_class_folders(path, task=task or path.name, size=size)
    if flat:
        if task is None:
            return read_unlabeled([path], size=size)
        raise DatasetError(f"{path} holds images but no labels for task {task!r} ({_LAYOUT_HELP})")
    raise DatasetError(f"no images found in {path} ({_LAYOUT_HELP})")


# ----------------------------------------------------------------------------------------------
# Decode once into memory


def _cache_key(dataset: FaceDataset, size: int) -> str:
    """Hash of (size, every path with its byte size and modification time): a changed file invalidates it."""
    digest = hashlib.sha256(f"facial_perception-faces-v1\n{size}\n".encode())
    for sample in dataset.samples:
        try:
            stat = sample.path.stat()
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{sample.path}\0{stamp}\n".encode())
    return digest.hexdigest()


def _cache_file(cache: Path, key: str, size: int) -> Path:
    if cache.suffix == ".npz":
        return cache
    return cache / f"faces-{size}px-{key[:16]}.npz"


def _read_cache(path: Path, key: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                log.info("image cache %s belongs to other files or size; rebuilding it", path)
                return None
            images, kept = data["images"], data["kept"]
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring unusable image cache %s (%s)", path, exc)
        return None
    if kept.ndim != 1 or (kept.size and (kept.min() < 0 or kept.max() >= n)) or images.shape[0] != kept.size:
        log.warning("ignoring inconsistent image cache %s", path)
        return None
    return images, kept


def _write_cache(path: Path, key: str, images: np.ndarray, kept: np.ndarray) -> None:
    """Atomic write, so an interrupted run never leaves a half cache behind."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, images=images, kept=kept, key=np.array(key))


def load_images(
    dataset: FaceDataset,
    size: int | None = None,
    workers: int = 2,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every image once: ``(uint8 grey (K, size, size), int64 labels (K,), kept indices (K,))``.

    Uses a thread pool (OpenCV releases the GIL while decoding) and a tqdm bar. Unreadable files are
    logged, left out and counted in one summary line; ``kept`` maps rows back to dataset indices.
    With ``cache`` (an ``.npz`` file or a folder for one) the decoded images are stored and reused
    while the paths, their sizes/mtimes and ``size`` are unchanged. Labels always come from the
    dataset, so changing a labelling rule never needs a new cache.
    """
    size = dataset.size if size is None else int(size)
    if size < 1:
        raise DatasetError(f"image size must be a positive integer, got {size}")
    all_labels = dataset.labels()
    key = _cache_key(dataset, size) if cache is not None else ""
    cache_path = _cache_file(Path(cache).expanduser(), key, size) if cache is not None else None
    if cache_path is not None and cache_path.is_file():
        cached = _read_cache(cache_path, key, len(dataset))
        if cached is not None:
            images, kept = cached
            log.info("loaded %d decoded images from cache %s", len(kept), cache_path)
            return images, all_labels[kept], kept

    paths = [s.path for s in dataset.samples]
    images = np.empty((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    loader: Callable[[Path], np.ndarray | None] = functools.partial(_load_grey_resized, size=size)
    from tqdm.auto import tqdm

    with (
        ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool,
        tqdm(
            total=len(paths),
            desc=f"decoding {dataset.task} images",
            unit="img",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        for i, grey in enumerate(pool.map(loader, paths)):
            if grey is not None:
                images[i] = grey
                ok[i] = True
            bar.update(1)
    kept = np.flatnonzero(ok).astype(np.int64)
    if len(kept) < len(paths):
        log.warning("skipped %d unreadable images of %d", len(paths) - len(kept), len(paths))
        images = images[kept]
    if cache_path is not None:
        _write_cache(cache_path, key, images, kept)
        log.info("wrote image cache %s", cache_path)
    return images, all_labels[kept], kept


def load_into_memory(
    dataset: FaceDataset,
    size: int | None = None,
    workers: int = 2,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> FaceDataset:
    """:func:`load_images`, returned as a dataset of the readable samples that serves items from memory."""
    size = dataset.size if size is None else int(size)
    images, _, kept = load_images(dataset, size, workers, cache, progress)
    skipped = dict(dataset.skipped)
    if len(kept) < len(dataset):
        skipped["unreadable image"] = skipped.get("unreadable image", 0) + len(dataset) - len(kept)
    if len(kept) == 0:
        raise DatasetError(
            f"no readable images in {dataset.root} ({len(dataset)} files could not be decoded)"
        )
    return FaceDataset(
        [dataset.samples[i] for i in kept],
        dataset.label_names,
        dataset.task,
        size,
        dataset.root,
        skipped,
        images,
    )
