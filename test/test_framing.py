"""Crop framing per detector: measured with the real detectors on real dataset crops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import real_face_files
from PIL import Image

from facial_perception.pipeline.detection import make_detector
from facial_perception.pipeline.framing import (
    DETECTOR_FRAMINGS,
    FALLBACK_FRAMINGS,
    Framing,
    FramingError,
    detector_key,
    framings_for,
    measure_framing,
)

REPO = Path(__file__).resolve().parents[1]


def _images(kind: str, n: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in real_face_files(kind, n)]


@pytest.mark.parametrize("name", ["blazeface", "blazeface_full"])
def test_the_shipped_framings_are_what_the_detectors_measure(name: str) -> None:
    """The constants the pipeline crops with must match a fresh measurement on real crops (here 24 per
    dataset, the constants come from 300 training images: a loose tolerance)."""
    detector = make_detector(name, min_score=0.5, min_face_size=8)
    try:
        faces = measure_framing(detector, _images("utkface", 24), dataset="utkface")
        named = measure_framing(detector, _images("lfw", 24), dataset="lfw_identity")
    finally:
        detector.close()
    assert faces.detector == name and faces.found >= 20 and named.found >= 20
    expected = DETECTOR_FRAMINGS[name]
    assert abs(faces.margin - expected.faces.margin) < 0.04
    assert abs(faces.offset_y - expected.faces.offset_y) < 0.04
    assert abs(named.margin - expected.identity.margin) < 0.04
    assert abs(named.offset_y - expected.identity.offset_y) < 0.04
    # LFW's crops are looser than UTKFace's for every detector: the identity crop needs more margin
    assert named.margin > faces.margin + 0.1 and named.box_to_crop < faces.box_to_crop


def test_framing_values_and_lookup() -> None:
    assert framings_for("blazeface_full") == DETECTOR_FRAMINGS["blazeface_full"]
    assert framings_for("no_such_detector") == FALLBACK_FRAMINGS and FALLBACK_FRAMINGS.single
    detector = make_detector("haar")
    assert detector_key(detector) == "haar" and framings_for(detector) == DETECTOR_FRAMINGS["haar"]
    with pytest.raises(FramingError, match="margin must be >= 0"):
        Framing(-0.1, 0.0)
    with pytest.raises(FramingError, match="finite"):
        Framing(0.1, float("nan"))
    blank = [np.full((100, 100, 3), 90, np.uint8)] * 3
    with pytest.raises(FramingError, match="no face in any of the 3 images"):
        measure_framing(detector, blank)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facial_perception.pipeline.framing", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_framing_command_writes_json_and_refuses_bad_input(tmp_path: Path) -> None:
    folder = tmp_path / "utk"
    folder.mkdir()
    for path in real_face_files("utkface", 8):
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "framing.json"
    done = _run("--data", f"utk={folder}", "--detector", "blazeface", "--max-images", "8", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "| blazeface | utk |" in done.stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["dataset"] == "utk" and result["images"] == 8 and result["found"] >= 6
    missing = _run("--data", f"utk={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: dataset not found")
    bad = _run("--data", "just_a_folder")
    assert bad.returncode == 2 and "NAME=DIR" in bad.stderr
