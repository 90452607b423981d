"""How a live detector box becomes a crop framed like the training images, per detector.

The columns learned from dataset crops with a fixed framing: UTKFace and FER+ crops are tight
(eyebrows to chin), the LFW folders of the identity column are looser (hair and some background).
Each detector draws its box differently around the same face (BlazeFace full range is tighter
than short range; Haar is larger), so the ``margin`` and vertical ``offset_y`` of
:func:`core.preprocess.crop_face` that reproduce a dataset's framing depend on the detector. A
wrong framing costs live accuracy that the validation splits never show (``docs/DATA.md``).

:func:`measure_framing` measures it: every dataset crop is pasted into a larger canvas, detected,
and the margin and offset that turn the detector's box back into the pasted crop are taken (the
median over the crops). :data:`DETECTOR_FRAMINGS` holds the measured values; ``python -m
facial_perception.pipeline.framing`` re-measures them.

The pipeline cuts one crop per face for the columns trained on tight crops and, when it differs,
a second for the identity columns (:class:`CropFramings`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DETECTOR_FRAMINGS",
    "CropFramings",
    "Framing",
    "FramingError",
    "FramingMeasurement",
    "detector_key",
    "framings_for",
    "measure_framing",
]


class FramingError(ValueError):
    """A bad framing value or measurement request, as one line."""


@dataclass(frozen=True)
class Framing:
    """``crop_face(frame, box, margin, square=True, offset_y=offset_y)``: one detector, one dataset style."""

    margin: float
    offset_y: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and math.isfinite(self.offset_y)):
            raise FramingError(f"framing values must be finite, got {self.margin}, {self.offset_y}")
        if self.margin < 0:
            raise FramingError(f"crop margin must be >= 0, got {self.margin}")


@dataclass(frozen=True)
class CropFramings:
    """The framing of the crops for the face-attribute columns (``faces``: emotion, gender, age and any
    column that is not of identity kind) and for the identity columns (``identity``)."""

    faces: Framing
    identity: Framing

    @property
    def single(self) -> bool:
        """True when one crop serves every column."""
        return self.faces == self.identity


#: Measured on the training splits (``python -m facial_perception.pipeline.framing``; docs/DATA.md,
#: "Dataset framing vs live detector crops"): ``faces`` from UTKFace, the framing of the gender and
#: age columns (FER+ lies within 0.04 of it), ``identity`` from the LFW identity folders.
DETECTOR_FRAMINGS: dict[str, CropFramings] = {
    "blazeface": CropFramings(Framing(0.04, -0.03), Framing(0.23, -0.14)),
    "blazeface_full": CropFramings(Framing(0.01, 0.03), Framing(0.18, -0.07)),
    "haar": CropFramings(Framing(0.0, 0.08), Framing(0.14, 0.01)),
}

#: For a detector without a measurement: the old single compromise of the short-range model.
FALLBACK_FRAMINGS = CropFramings(Framing(0.1, -0.08), Framing(0.1, -0.08))


def detector_key(detector: Any) -> str:
    """``blazeface``, ``blazeface_full``, ``haar`` or the detector's ``name`` (``""`` if it has none)."""
    name = str(getattr(detector, "name", "") or "")
    if name == "blazeface" and getattr(detector, "model", "short") == "full":
        return "blazeface_full"
    return name


def framings_for(detector: Any) -> CropFramings:
    """The measured framings of ``detector`` (an object or a name), else :data:`FALLBACK_FRAMINGS`."""
    key = detector if isinstance(detector, str) else detector_key(detector)
    return DETECTOR_FRAMINGS.get(key, FALLBACK_FRAMINGS)


@dataclass
class FramingMeasurement:
    """Where a detector's box lies in a dataset's crops, and the framing that reproduces them."""

    detector: str
    dataset: str
    images: int
    found: int
    box_to_crop: float  # median longer box side / crop side
    margin: float  # median margin that makes the square box as large as the crop
    offset_y: float  # median vertical shift of the box centre to the crop centre, in box heights
    offset_x: float  # the same horizontally, in box widths (crop_face has no x offset: reported only)
    margin_iqr: tuple[float, float]
    offset_y_iqr: tuple[float, float]

    def framing(self) -> Framing:
        """The measured framing, rounded to 0.01 (negative margins, a box larger than the crop, give 0)."""
        return Framing(max(0.0, round(self.margin, 2)), round(self.offset_y, 2))


def measure_framing(
    detector: Any,
    images: Iterable[np.ndarray],
    side: int = 160,
    canvas_scale: float = 3.0,
    detector_name: str | None = None,
    dataset: str = "",
) -> FramingMeasurement:
    """Paste each dataset crop (uint8 RGB or grey), resized to ``side`` pixels, into the centre of a
    grey canvas ``canvas_scale`` times larger, detect, and measure the framing that turns the
    detector's box back into the crop. Crops without a detection whose centre lies on the crop are
    skipped (counted in ``found``)."""
    if side < 16 or canvas_scale < 1.5:
        raise FramingError(f"side must be >= 16 and canvas_scale >= 1.5, got {side}, {canvas_scale}")
    canvas_side = round(side * canvas_scale)
    x0 = y0 = (canvas_side - side) // 2
    centre = x0 + side / 2.0
    margins, offsets_y, offsets_x, ratios = [], [], [], []
    count = 0
    for image in images:
        count += 1
        rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        face = cv2.resize(
            rgb, (side, side), interpolation=cv2.INTER_AREA if rgb.shape[0] > side else cv2.INTER_LINEAR
        )
        canvas = np.full((canvas_side, canvas_side, 3), 127, np.uint8)
        canvas[y0 : y0 + side, x0 : x0 + side] = face
        on_crop = []
        for d in detector.detect(canvas):
            x1, y1, x2, y2 = (float(v) for v in d.box)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            if x0 <= cx <= x0 + side and y0 <= cy <= y0 + side and x2 > x1 and y2 > y1:
                on_crop.append((x1, y1, x2, y2))
        if not on_crop:
            continue
        x1, y1, x2, y2 = max(on_crop, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        longer = max(x2 - x1, y2 - y1)
        ratios.append(longer / side)
        margins.append((side / longer - 1.0) / 2.0)
        offsets_y.append((centre - (y1 + y2) / 2) / (y2 - y1))
        offsets_x.append((centre - (x1 + x2) / 2) / (x2 - x1))
    if not margins:
        raise FramingError(
            f"the detector found no face in any of the {count} images of {dataset or 'the dataset'}"
        )

    def iqr(values: list[float]) -> tuple[float, float]:
        low, high = np.percentile(values, [25, 75])
        return float(low), float(high)

    return FramingMeasurement(
        detector=detector_name or detector_key(detector),
        dataset=dataset,
        images=count,
        found=len(margins),
        box_to_crop=float(np.median(ratios)),
        margin=float(np.median(margins)),
        offset_y=float(np.median(offsets_y)),
        offset_x=float(np.median(offsets_x)),
        margin_iqr=iqr(margins),
        offset_y_iqr=iqr(offsets_y),
    )


def _dataset_images(path: Path, limit: int, seed: int) -> Iterable[np.ndarray]:
    """Up to ``limit`` images of a dataset folder (any layout the library reads), drawn with ``seed``."""
    from facial_perception.core import datasets as ds

    dataset = ds.open_dataset(path)
    order = np.random.default_rng(seed).permutation(len(dataset.samples))[:limit]
    for i in order:
        try:
            yield ds.read_image(dataset.samples[int(i)].path)
        except ds.UnreadableImageError:
            continue


def markdown_table(results: Sequence[FramingMeasurement]) -> str:
    """The measurements as a Markdown table."""
    rows = [
        "| detector | dataset | faces found | box side / crop side | margin (IQR) | offset_y (IQR)"
        " | offset_x |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.detector} | {r.dataset} | {r.found}/{r.images} | {r.box_to_crop:.2f} "
            f"| {r.margin:.2f} ({r.margin_iqr[0]:.2f}-{r.margin_iqr[1]:.2f}) "
            f"| {r.offset_y:.2f} ({r.offset_y_iqr[0]:.2f}-{r.offset_y_iqr[1]:.2f}) | {r.offset_x:.2f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m facial_perception.pipeline.framing --data utkface=DIR --detector blazeface_full ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m facial_perception.pipeline.framing",
        description="measure the crop margin and offset that reproduce each dataset's framing per detector",
    )
    parser.add_argument("--data", nargs="+", required=True, metavar="NAME=DIR", help="dataset folders")
    parser.add_argument("--detector", nargs="+", default=["blazeface", "blazeface_full", "haar"])
    parser.add_argument("--max-images", type=int, default=300, help="images drawn per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="write the measurements here")
    args = parser.parse_args(argv)

    from facial_perception.core.fileio import atomic_write_text
    from facial_perception.pipeline.detection import DetectorError, make_detector

    datasets = []
    for item in args.data:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--data wants NAME=DIR, got {item!r}")
        if not Path(folder).is_dir():
            print(f"error: dataset not found: {folder}", file=sys.stderr)
            return 2
        datasets.append((name, Path(folder)))
    results = []
    for det_name in args.detector:
        try:
            detector = make_detector(det_name, min_score=0.5, min_face_size=8)
        except DetectorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name, folder in datasets:
            try:
                results.append(
                    measure_framing(
                        detector,
                        _dataset_images(folder, args.max_images, args.seed),
                        detector_name=det_name,
                        dataset=name,
                    )
                )
            except FramingError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
    print(markdown_table(results), end="")
    if args.json:
        payload = {"max_images": args.max_images, "seed": args.seed, "results": [asdict(r) for r in results]}
        atomic_write_text(args.json, json.dumps(payload, indent=1) + "\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
