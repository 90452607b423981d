"""Build tiny datasets from real face images, in every layout the readers support.

Other tests import these helpers (``from data_fixtures import make_ferplus``) to get small, real
datasets in a temporary folder: the images are copied from the development datasets in
``../shared/datasets`` (FER+ PNGs, UTKFace and LFW JPEGs), only the labels (file names, folders,
label files) are chosen by the helper, so readers, preprocessing and training see real faces.
Every helper is deterministic: the same arguments give byte-identical datasets.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

FERPLUS_EMOTIONS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


class FixtureSourceError(RuntimeError):
    """The shared datasets the fixtures copy real faces from are not where the repository expects them."""


def _source(name: str, source: Path | None) -> Path:
    folder = (source or SHARED_DATASETS) / name
    if not folder.is_dir():
        raise FixtureSourceError(f"{folder} not found: clone the repository beside ../shared")
    return folder


def real_face_files(kind: str, n: int, source: Path | None = None) -> list[Path]:
    """The first ``n`` (sorted) real face files of ``kind`` = "ferplus" (48 px grey PNG), "utkface"
    (100 px RGB JPEG) or "lfw" (112 px RGB JPEG of several people)."""
    if kind == "ferplus":
        files = sorted(_source("ferplus", source).joinpath("FER2013Train").glob("*.png"))
    elif kind == "utkface":
        files = sorted(_source("utkface", source).glob("*.jpg"))
    elif kind == "lfw":
        files = sorted(_source("lfw_identity", source).glob("*/*.jpg"))
    else:
        raise ValueError(f"unknown kind {kind!r}: use ferplus, utkface or lfw")
    if len(files) < n:
        raise FixtureSourceError(f"only {len(files)} {kind} images available, {n} requested")
    # Spread the picks over the sorted list so fixtures are not all near-duplicates of one person.
    step = max(1, len(files) // max(n, 1))
    return [files[i * step] for i in range(n)]


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def clear_majority_votes(n: int) -> list[list[int]]:
    """``n`` FER+ vote rows (10 counts summing to 10), each with a clear winner, cycling the 8 emotions."""
    rows = []
    for i in range(n):
        votes = [0] * 10
        winner = i % 8
        votes[winner] = 7
        votes[(winner + 1) % 8] = 2
        votes[8] = 1
        rows.append(votes)
    return rows


def make_ferplus(
    tmp: Path,
    votes: Sequence[Sequence[int]] | int = 8,
    split: str = "FER2013Train",
    source: Path | None = None,
) -> Path:
    """A FER+ root ``tmp/ferplus/<split>/`` with real FER PNGs and a header-less ``label.csv``.

    ``votes`` is either a number of images (clear-majority votes, :func:`clear_majority_votes`) or
    the 10 vote counts per image (neutral, happiness, surprise, sadness, anger, disgust, fear,
    contempt, unknown, NF). Returns the FER+ root (the folder holding ``<split>/``).
    """
    rows = clear_majority_votes(votes) if isinstance(votes, int) else [list(v) for v in votes]
    root = tmp / "ferplus"
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    with open(split_dir / "label.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for i, (src, row) in enumerate(zip(real_face_files("ferplus", len(rows), source), rows, strict=True)):
            name = f"fer{i:07d}.png"
            _copy(src, split_dir / name)
            writer.writerow([name, "(0, 0, 48, 48)", *row])
    return root


def make_fer2013_folders(
    tmp: Path, per_class: int = 2, classes: Sequence[str] = FER2013_CLASSES, source: Path | None = None
) -> Path:
    """FER2013 class folders (names as given, so tests can vary their case) of real FER PNGs."""
    root = tmp / "fer2013"
    files = iter(real_face_files("ferplus", per_class * len(classes), source))
    for name in classes:
        for j in range(per_class):
            _copy(next(files), root / name / f"{j:05d}.png")
    return root


def utkface_name(age: int, gender: int, race: int, index: int) -> str:
    """A UTKFace file name as in the original release (the date part only has to be unique)."""
    return f"{age}_{gender}_{race}_20170116{index:09d}.jpg.chip.jpg"


def make_utkface(
    tmp: Path,
    labels: Sequence[tuple[int, int, int]] | int = 10,
    malformed_names: Sequence[str] = (),
    source: Path | None = None,
) -> Path:
    """A flat UTKFace folder of real face JPEGs named ``[age]_[gender]_[race]_[date].jpg.chip.jpg``.

    ``labels`` gives (age, gender, race) per image, or a count (ages spread over 1-90, both
    genders, all races). ``malformed_names`` adds more real images under the given (bad) names.
    """
    if isinstance(labels, int):
        labels = [(1 + (i * 13) % 90, i % 2, i % 5) for i in range(labels)]
    root = tmp / "utkface"
    root.mkdir(parents=True, exist_ok=True)
    files = real_face_files("utkface", len(labels) + len(malformed_names), source)
    for i, (age, gender, race) in enumerate(labels):
        _copy(files[i], root / utkface_name(age, gender, race, i))
    for j, name in enumerate(malformed_names):
        _copy(files[len(labels) + j], root / name)
    return root


def make_identity_folders(
    tmp: Path, people: int = 3, per_person: int | Sequence[int] = 4, source: Path | None = None
) -> Path:
    """LFW-style ``<Name>/<Name>_NNNN.jpg`` with real images of real LFW people (each folder one person).

    ``per_person`` is one count for everybody or a count per person; people are taken in name order
    among those with enough images.
    """
    counts = [per_person] * people if isinstance(per_person, int) else list(per_person)
    if len(counts) != people:
        raise ValueError(f"per_person lists {len(counts)} counts for {people} people")
    lfw = _source("lfw_identity", source)
    candidates = sorted(p for p in lfw.iterdir() if p.is_dir())
    root = tmp / "identities"
    chosen = 0
    for folder in candidates:
        if chosen == people:
            break
        images = sorted(folder.glob("*.jpg"))
        need = counts[chosen]
        if len(images) < need:
            continue
        for src in images[:need]:
            _copy(src, root / folder.name / src.name)
        chosen += 1
    if chosen < people:
        raise FixtureSourceError(f"not enough LFW people with the requested image counts {counts}")
    return root


def make_class_folders(
    tmp: Path, classes: Mapping[str, int] | None = None, source: Path | None = None
) -> Path:
    """Generic ``<class>/<image>.jpg`` folders of real UTKFace faces (default: 3 "smile", 3 "calm")."""
    classes = dict(classes or {"smile": 3, "calm": 3})
    root = tmp / "classes"
    files = iter(real_face_files("utkface", sum(classes.values()), source))
    for name, count in classes.items():
        for j in range(count):
            _copy(next(files), root / name / f"img_{j:03d}.jpg")
    return root


ADIENCE_HEADER = (
    "user_id",
    "original_image",
    "face_id",
    "age",
    "gender",
    "x",
    "y",
    "dx",
    "dy",
    "tilt_ang",
    "fiducial_yaw_angle",
    "fiducial_score",
)


def make_adience(
    tmp: Path,
    folds: Sequence[Sequence[tuple[str, str]]] = (
        (("(25, 32)", "m"), ("(0, 2)", "f"), ("(60, 100)", "f")),
        (("(38, 43)", "m"), ("(8, 12)", "u"), ("None", "m")),
    ),
    missing_images: int = 0,
    source: Path | None = None,
) -> tuple[Path, Path]:
    """Adience ``fold_<k>_data.txt`` files + ``faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<image>``.

    ``folds`` lists (age cell, gender cell) per face for each fold, exactly as they appear in the
    Adience files. The last ``missing_images`` rows of the last fold get no image file. Returns
    (folder with the fold files, image root holding ``faces/``), here the same folder.
    """
    root = tmp / "adience"
    rows_total = sum(len(f) for f in folds)
    files = iter(real_face_files("utkface", rows_total, source))
    face_id = 0
    for k, fold in enumerate(folds):
        lines = ["\t".join(ADIENCE_HEADER)]
        for j, (age, gender) in enumerate(fold):
            face_id += 1
            user = f"{1000 + face_id}@N0{k}"
            original = f"{9000 + face_id}_a1b2c3d4e5_o.jpg"
            src = next(files)
            skip = k == len(folds) - 1 and j >= len(fold) - missing_images
            if not skip:
                _copy(src, root / "faces" / user / f"coarse_tilt_aligned_face.{face_id}.{original}")
            lines.append(
                "\t".join([user, original, str(face_id), age, gender, "0", "0", "100", "100", "0", "0", "1"])
            )
        (root / f"fold_{k}_data.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, root


def make_unlabeled(tmp: Path, n: int = 6, source: Path | None = None) -> Path:
    """Real faces in nested folders (half at the top, half one level down), without labels."""
    root = tmp / "unlabeled"
    for i, src in enumerate(real_face_files("lfw", n, source)):
        target = root / (f"part{i % 2}" if i >= n // 2 else "") / f"face_{i:03d}.jpg"
        _copy(src, target)
    return root


def write_corrupt_image(path: Path) -> Path:
    """A file with an image name whose bytes are not an image (a truncated JPEG header then text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"this is not image data " * 8)
    return path
