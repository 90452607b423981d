"""Column training under torchrun: 2 CPU processes (gloo) against 1, and resume across world sizes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_unlabeled
from PIL import Image

from facial_perception.core.checkpoint import read_checkpoint
from facial_perception.core.datasets import load_images, read_unlabeled
from facial_perception.core.distributed import DistContext, epoch_permutation, shard

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Class folders ``original/`` and ``inverted/`` of real faces (learnable with any encoder)."""
    tmp = tmp_path_factory.mktemp("ddp")
    images, _, _ = load_images(read_unlabeled([make_unlabeled(tmp, 24)]), 64, workers=1, progress=False)
    root = tmp / "inversion"
    for name, batch in (("original", images), ("inverted", 255 - images)):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(batch):
            Image.fromarray(image).save(root / name / f"face_{i:03d}.png")
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return env


def _train(folders: Path, out: Path, work: Path, epochs: int, processes: int) -> None:
    args = ["-m", "facial_perception.core.cli", "train-task", "--config", "lite", "--task", "inverted",
            "--data", str(folders), "--layout", "folders", "--epochs", str(epochs), "--batch-size", "4",
            "--lr", "1e-3", "--val-fraction", "0.25", "--out", str(out), "--work-dir", str(work),
            "--device", "cpu", "--workers", "1", "-q"]  # fmt: skip
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), *args]
    if processes == 1:
        command = [sys.executable, *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _log(work: Path) -> list[dict[str, float]]:
    with open(work / "inverted_log.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_sampler_shards_cover_the_epoch_and_reseed():
    world = [DistContext(rank=r, world_size=2) for r in range(2)]
    parts = [epoch_permutation(10, seed=3, epoch=1, ctx=c) for c in world]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert not torch.equal(epoch_permutation(10, 3, 2, world[0]), parts[0])
    assert sorted(torch.cat([shard(7, c) for c in world]).tolist()) == list(range(7))


def test_two_process_gloo_training_matches_single_process(folders, tmp_path):
    assert TORCHRUN.is_file(), "torchrun is part of torch and must sit beside the venv's python"
    _train(folders, tmp_path / "single.safetensors", tmp_path / "single", epochs=4, processes=1)
    _train(folders, tmp_path / "ddp.safetensors", tmp_path / "ddp", epochs=4, processes=2)

    single = read_checkpoint(tmp_path / "single.safetensors")
    ddp = read_checkpoint(tmp_path / "ddp.safetensors")
    assert {k: tuple(v.shape) for k, v in ddp.tensors.items()} == {
        k: tuple(v.shape) for k, v in single.tensors.items()
    }
    assert ddp.meta["tasks"] == single.meta["tasks"]
    assert ddp.meta["training"]["inverted"]["world_size"] == 2
    # The encoder is frozen: identical on every rank and in both runs (same seed).
    for key, value in single.tensors.items():
        if key.startswith("model.encoder."):
            assert torch.equal(ddp.tensors[key], value)
    # Both converge: the training loss falls clearly.
    for work in (tmp_path / "single", tmp_path / "ddp"):
        log = _log(work)
        assert len(log) == 4 and log[-1]["train_loss"] < 0.7 * log[0]["train_loss"]
    # Rank 0 alone wrote the outputs (no per-rank duplicates or temporary files left).
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.is_file()) == [
        "inverted_confusion.png", "inverted_curves.png", "inverted_log.csv", "inverted_state.pt",
    ]  # fmt: skip

    # Resume the 2-process run in one process: it continues at epoch 5 with the saved history.
    before = _log(tmp_path / "ddp")
    _train(folders, tmp_path / "ddp.safetensors", tmp_path / "ddp", epochs=5, processes=1)
    after = _log(tmp_path / "ddp")
    assert [int(r["epoch"]) for r in after] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["train_loss"] for r in after[:4]], [r["train_loss"] for r in before])
    assert read_checkpoint(tmp_path / "ddp.safetensors").meta["training"]["inverted"]["epochs_run"] == 5
