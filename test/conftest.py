"""Shared test set-up: ROS isolation per test run, bounded CPU use, real face photos."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# One DDS domain per test run so that parallel runs on one machine never see each other's topics.
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 101)))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
# Child processes (nodes started by tests) import the sources under test.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
except ImportError:  # pragma: no cover - torch is a hard dependency, this only keeps collection readable
    pass


@pytest.fixture(scope="session")
def real_faces() -> list[np.ndarray]:
    """Real RGB photos of faces shipped by ordinary packages (no dataset needed)."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return [data.astronaut(), hopper]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The development datasets beside the repository (CI clones the repo next to ../shared)."""
    if not SHARED_DATASETS.is_dir():
        pytest.fail(f"datasets not found at {SHARED_DATASETS}: clone the repo beside ../shared")
    return SHARED_DATASETS
