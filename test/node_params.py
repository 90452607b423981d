"""Parameters for a perception node under test: CPU, reliable camera QoS, its files in the test's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def perception_test_params(tmp: Path, image_topic: str, **extra: Any) -> dict[str, Any]:
    """The node's parameters for a test: gallery and added columns under ``tmp``, no smoothing."""
    params: dict[str, Any] = {
        "image_topic": image_topic,
        "image_reliability": "reliable",
        "device": "cpu",
        "gallery_path": str(tmp / "gallery.db"),
        "columns_dir": str(tmp / "columns"),
        "diagnostics_period": 1.0,
        "smoothing": 0.0,
    }
    params.update(extra)
    return params
