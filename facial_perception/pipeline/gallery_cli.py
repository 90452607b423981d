"""``facial-perception-gallery``: the identity gallery from the command line, without ROS.

Enrol people from photos before the robot runs (or while it does: the node sees the change at its
next frame), list who is enrolled, check who a photo shows, forget a person::

    facial-perception-gallery enrol "Ada Lovelace" photos/ada/            # a folder or image files
    facial-perception-gallery list
    facial-perception-gallery identify photos/visitor.jpg
    facial-perception-gallery forget "Ada Lovelace"

The gallery is the node's (``--gallery``, default the node's ``gallery_path``) and the embeddings
are made as the node makes them: the largest face of each photo, found by the node's detector and
framed with its identity crop, through the same model (``--checkpoint``, default the shipped one).
A gallery enrolled with another model refuses new embeddings with one line. Photos are not stored
unless ``--store-face-images`` is given (docs/PRIVACY.md). Every error is one line and leaves the
gallery as it was: each enrolment is one transaction, made after every photo has been read.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facial_perception.core.checkpoint import DEFAULT_MODEL, CheckpointError
from facial_perception.core.datasets import IMAGE_EXTENSIONS, UnreadableImageError, read_image
from facial_perception.pipeline.detection import DetectorError, make_detector
from facial_perception.pipeline.frame_pipeline import FacePipelineError, FramePipeline
from facial_perception.pipeline.framing import framings_for
from facial_perception.pipeline.gallery import DEFAULT_IDENTITY_THRESHOLD, GalleryError, IdentityGallery

__all__ = ["DEFAULT_GALLERY", "GalleryCommandError", "image_files", "main"]

#: The perception node's default ``gallery_path``.
DEFAULT_GALLERY = "~/.local/share/facial_perception/gallery.db"


class GalleryCommandError(RuntimeError):
    """A request the command cannot carry out; its message is the one line printed."""


def image_files(paths: Sequence[str]) -> list[Path]:
    """Files as given, and the images of each folder (sorted, not recursive)."""
    files: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise GalleryCommandError(f"{path}: no images in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise GalleryCommandError(f"{path}: no such file or folder")
    return files


def _read_photos(files: Sequence[Path]) -> list[np.ndarray]:
    photos = []
    for path in files:
        try:
            image = read_image(path)
        except (UnreadableImageError, OSError) as exc:
            message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
            raise GalleryCommandError(f"cannot read {message}") from None
        photos.append(np.dstack([image] * 3) if image.ndim == 2 else image)
    return photos


def _pipeline(args: argparse.Namespace, gallery: IdentityGallery) -> FramePipeline:
    """The node's detector, identity framing and model, on ``gallery``."""
    from facial_perception.core.inference import FacePredictor

    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else DEFAULT_MODEL
    if not checkpoint.is_file():
        raise GalleryCommandError(f"checkpoint not found: {checkpoint}")
    try:
        predictor = FacePredictor.from_checkpoint(checkpoint, device=args.device)
        detector = make_detector(args.detector)
    except (CheckpointError, DetectorError, ValueError) as exc:
        raise GalleryCommandError(str(exc)) from None
    try:
        return FramePipeline(predictor, detector, gallery=gallery, framings=framings_for(detector))
    except GalleryError as exc:  # enrolled with another model
        raise GalleryCommandError(str(exc)) from None


def _embed(pipeline: FramePipeline, files: Sequence[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    try:
        return pipeline.embed_faces(_read_photos(files))
    except FacePipelineError as exc:
        message = str(exc)
        for i, path in reversed(list(enumerate(files))):  # name the file rather than its index
            message = message.replace(f"image {i}", str(path))
        raise GalleryCommandError(message) from None


def _enrol(args: argparse.Namespace, gallery: IdentityGallery) -> None:
    files = image_files(args.photos)
    pipeline = _pipeline(args, gallery)
    embeddings, crops = _embed(pipeline, files)
    total = pipeline.enrol(args.name, embeddings, crops)
    stored = " (face crops stored)" if gallery.store_images else ""
    print(f"enrolled {args.name!r} from {len(files)} photo(s); {total} sample(s) in {gallery.path}{stored}")


def _identify(args: argparse.Namespace, gallery: IdentityGallery) -> None:
    files = image_files(args.photos)
    pipeline = _pipeline(args, gallery)
    embeddings, _ = _embed(pipeline, files)
    for path, (name, confidence) in zip(files, gallery.match(embeddings), strict=True):
        print(f"{path}: {name} ({confidence:.2f})")


def _list(args: argparse.Namespace, gallery: IdentityGallery) -> None:
    counts = gallery.counts()
    mode = stat.S_IMODE(os.stat(gallery.path).st_mode)
    model = f", {gallery.dim}-d embeddings of model {gallery.fingerprint}" if counts else ""
    people = f"{len(counts)} {'person' if len(counts) == 1 else 'people'}"
    print(f"{gallery.path} (mode {mode:04o}): {people}, {sum(counts.values())} samples{model}")
    for name, count in sorted(counts.items()):
        images = gallery.image_count(name)
        print(f"  {name}: {count} sample(s)" + (f", {images} face image(s)" if images else ""))


def _forget(args: argparse.Namespace, gallery: IdentityGallery) -> None:
    if not gallery.forget(args.name):
        raise GalleryCommandError(f"{args.name!r} is not enrolled in {gallery.path}")
    print(f"forgot {args.name!r}: every sample (and face image) deleted from {gallery.path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facial-perception-gallery",
        description="The identity gallery from the command line, without ROS.",
    )
    parser.add_argument(
        "--gallery", default=DEFAULT_GALLERY, help="SQLite gallery (the node's gallery_path; created 0600)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_model(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--checkpoint", default=None, help="model (default: the shipped one, as the node)")
        sub.add_argument(
            "--detector", default="blazeface_full", help="the node's detector (default %(default)s)"
        )
        sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default %(default)s)")

    enrol = commands.add_parser("enrol", help="add a person from photos (files or folders of images)")
    enrol.add_argument("name", help="the person's name, as the node will report it")
    enrol.add_argument("photos", nargs="+", help="image files or folders; the largest face of each is used")
    enrol.add_argument(
        "--store-face-images", action="store_true", help="keep the face crops in the gallery (off: privacy)"
    )
    with_model(enrol)
    identify = commands.add_parser("identify", help="who each photo shows (name or unknown, confidence)")
    identify.add_argument("photos", nargs="+", help="image files or folders")
    identify.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_IDENTITY_THRESHOLD,
        help="open-set threshold, the node's identity_threshold (default %(default)s)",
    )
    with_model(identify)
    commands.add_parser("list", help="enrolled people and their sample counts")
    forget = commands.add_parser("forget", help="delete a person and all their samples")
    forget.add_argument("name")
    return parser


_COMMANDS: dict[str, Any] = {"enrol": _enrol, "identify": _identify, "list": _list, "forget": _forget}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``facial-perception-gallery``; 0 on success, 1 with one error line otherwise."""
    args = build_parser().parse_args(argv)
    path = Path(args.gallery).expanduser()
    if args.command in ("list", "forget", "identify") and not path.is_file():
        print(f"facial-perception-gallery: error: no gallery at {path}", file=sys.stderr)
        return 1
    try:
        gallery = IdentityGallery(
            path,
            threshold=getattr(args, "threshold", DEFAULT_IDENTITY_THRESHOLD),
            store_images=getattr(args, "store_face_images", False),
        )
    except GalleryError as exc:
        print(f"facial-perception-gallery: error: {exc}", file=sys.stderr)
        return 1
    try:
        _COMMANDS[args.command](args, gallery)
    except (GalleryCommandError, GalleryError, FacePipelineError) as exc:
        print(f"facial-perception-gallery: error: {exc}", file=sys.stderr)
        return 1
    finally:
        gallery.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
