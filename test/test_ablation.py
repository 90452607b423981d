"""Ablations (Table IV, Table V, Fig. 5) through the library API on tiny real-face tasks."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import LABELS, inversion_task

from facial_perception.core.ablation import (
    AblationError,
    AblationResult,
    RunRecord,
    TaskData,
    format_mean_std,
    frozen_vs_retrained,
    lateral_curves,
    lateral_subsets,
)
from facial_perception.core.config import get_config
from facial_perception.core.progressive import ProgressiveNet
from facial_perception.core.training import ColumnData

torch.set_num_threads(1)
FAST = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[TaskData]:
    train, val = inversion_task(tmp_path_factory.mktemp("abl"), n=12)

    # A second task on the same faces: left/right mirrored or not.
    def mirrored(data: ColumnData) -> ColumnData:
        odd = np.arange(len(data)) % 2
        images = np.where(odd[:, None, None] == 1, data.images[:, :, ::-1], data.images)
        return ColumnData(images, odd, label_names=["as-is", "mirrored"])

    flipped, flipped_val = mirrored(train), mirrored(val)
    return [
        TaskData("inverted", LABELS, train, val),
        TaskData("mirrored", ["as-is", "mirrored"], flipped, flipped_val),
    ]


@pytest.fixture
def base() -> ProgressiveNet:
    torch.manual_seed(0)
    return ProgressiveNet(get_config("lite"))


def test_summary_mean_and_std_by_hand(tmp_path):
    records = [
        RunRecord("x", "age", "frozen", 0, 0, 0.80, 3, 5),
        RunRecord("x", "age", "frozen", 1, 1, 0.90, 4, 5),
        RunRecord("x", "age", "re-trained", 0, 0, 0.70, 2, 5),
    ]
    result = AblationResult("x", records)
    rows = {r["setting"]: r for r in result.summary()}
    assert rows["frozen"]["mean_acc"] == pytest.approx(0.85)
    assert rows["frozen"]["std_acc"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert rows["re-trained"]["std_acc"] == 0.0
    assert "85.00 ± 7.07" in result.to_markdown()
    assert format_mean_std([0.8, 0.9]) == "85.00 ± 7.07"
    files = result.write(tmp_path)
    with open(files["runs_csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_frozen_vs_retrained_two_runs(tasks, base, tmp_path):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = frozen_vs_retrained(base, tasks[:1], tmp_path, runs=2, **FAST)
    settings = {(r.setting, r.run) for r in result.records}
    assert settings == {(s, r) for s in ("frozen encoder", "re-trained encoder") for r in (0, 1)}
    assert {r.seed for r in result.records} == {0, 1}
    assert all(0.0 <= r.best_val_acc <= 1.0 and r.epochs_run == 1 for r in result.records)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base is never modified
    md = (tmp_path / "frozen_vs_retrained.md").read_text()
    assert "frozen encoder" in md and "re-trained encoder" in md and "±" in md


def test_lateral_subsets_and_curves(tasks, base, tmp_path):
    result = lateral_subsets(base, tasks[0], tasks[1:], tmp_path / "t5", runs=2, **FAST)
    assert sorted({r.setting for r in result.records}) == ["mirrored", "no laterals"]
    assert len(result.records) == 4
    with open(tmp_path / "t5" / "laterals_inverted_summary.csv", newline="") as f:
        assert [row["runs"] for row in csv.DictReader(f)] == ["2", "2"]
    curves = lateral_curves(base, tasks, tmp_path / "f5", runs=1, **{**FAST, "epochs": 2})
    assert {r.task for r in curves.records} == {"inverted", "mirrored"}
    assert all(len(r.val_acc_curve) == 2 for r in curves.records)
    for task in ("inverted", "mirrored"):
        with Image.open(tmp_path / "f5" / f"curves_{task}.png") as im:
            assert im.format == "PNG"


def test_ablation_mistakes(tasks, base, tmp_path):
    with pytest.raises(AblationError, match="runs"):
        frozen_vs_retrained(base, tasks, tmp_path, runs=0)
    with pytest.raises(AblationError, match="own lateral source"):
        lateral_subsets(base, tasks[0], tasks, tmp_path, runs=1)
    with pytest.raises(AblationError, match="at least two tasks"):
        lateral_curves(base, tasks[:1], tmp_path, runs=1)
