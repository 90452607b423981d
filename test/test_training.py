"""Column and encoder training on tiny real-face data: learning, outputs, resume, feature cache."""

from __future__ import annotations

import csv
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_unlabeled
from PIL import Image

from facial_perception.core.checkpoint import load_model
from facial_perception.core.config import ColumnConfig, get_config
from facial_perception.core.datasets import load_images, read_unlabeled
from facial_perception.core.features import cached_features, compute_features, encoder_fingerprint
from facial_perception.core.progressive import ProgressiveNet, TaskSpec
from facial_perception.core.training import ColumnData, TrainingError, train_column, train_encoder

# Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls.
torch.set_num_threads(1)

LABELS = ["original", "inverted"]


def inversion_task(tmp: Path, n: int = 24, size: int = 64) -> tuple[ColumnData, ColumnData]:
    """A task a random encoder can learn: real faces vs the same faces with inverted grey levels."""
    images, _, _ = load_images(read_unlabeled([make_unlabeled(tmp, n)]), size, workers=1, progress=False)
    x = np.concatenate([images, 255 - images])
    y = np.array([0] * len(images) + [1] * len(images))
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.75 * len(x))
    return ColumnData(x[:cut], y[:cut], label_names=LABELS), ColumnData(x[cut:], y[cut:], label_names=LABELS)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> tuple[ColumnData, ColumnData]:
    return inversion_task(tmp_path_factory.mktemp("faces"))


# The loop is tested on a fixed architecture (the lite encoder with the narrow columns these
# thresholds were calibrated on), so that a change of the lite preset does not move them.
NARROW_COLUMNS = ColumnConfig(layers=((32, False), (48, True), (64, True)), fc_dim=128)
TEST_CONFIG = replace(get_config("lite"), name="test", column=NARROW_COLUMNS)


def fresh_model(seed: int = 0) -> ProgressiveNet:
    torch.manual_seed(seed)
    return ProgressiveNet(TEST_CONFIG)


FAST = {"batch_size": 4, "lr": 1e-3, "device": "cpu", "progress": False}


def test_train_column_learns_and_writes_outputs(task_data, tmp_path):
    train, val = task_data
    model = fresh_model()
    seen: list[tuple[int, int, float, float]] = []
    result = train_column(
        model,
        TaskSpec("inverted", LABELS),
        train,
        val,
        tmp_path,
        epochs=8,
        callback=lambda *args: seen.append(args),
        **FAST,
    )
    losses = [h["train_loss"] for h in result.history]
    assert result.epochs_run == 8 and len(seen) == 8 and seen[-1][:2] == (8, 8)
    assert losses[-1] < 0.5 * losses[0]
    assert result.best_val_acc >= 0.8 > result.history[0]["val_acc"]
    # CSV log: one row per epoch with the documented columns.
    with open(tmp_path / "inverted_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(rows[0])
    for png in ("inverted_curves.png", "inverted_confusion.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG"
    # Checkpoint: the whole net with the best weights; the reloaded model predicts the same.
    loaded, meta = load_model(result.checkpoint)
    assert loaded.task_names == ["inverted"]
    assert meta["training"]["inverted"]["best_epoch"] == result.best_epoch
    x = torch.from_numpy(val.images[:6]).float().div(127.5).sub(1).unsqueeze(1)
    model.eval()
    with torch.inference_mode():
        expected = model(x, ["inverted"])["inverted"].logits
        got = loaded(x, ["inverted"])["inverted"].logits
    torch.testing.assert_close(got, expected)
    assert int(np.sum(result.confusion)) == len(val)


def test_resume_continues_where_it_stopped(task_data, tmp_path):
    train, val = task_data
    spec = TaskSpec("inverted", LABELS)
    straight = train_column(fresh_model(), spec, train, val, tmp_path / "a", epochs=4, plots=False, **FAST)
    first = train_column(fresh_model(), spec, train, val, tmp_path / "b", epochs=2, plots=False, **FAST)
    assert first.epochs_run == 2
    resumed = train_column(fresh_model(), spec, train, val, tmp_path / "b", epochs=4, plots=False, **FAST)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    # The interrupted-and-resumed run is the uninterrupted run (optimizer, scheduler, seeds restored).
    np.testing.assert_allclose(
        [h["train_loss"] for h in resumed.history], [h["train_loss"] for h in straight.history], rtol=1e-4
    )
    # resume=False starts over.
    again = train_column(fresh_model(), spec, train, val, tmp_path / "b", epochs=1, resume=False, **FAST)
    assert again.epochs_run == 1


def test_resume_refuses_another_task_definition(task_data, tmp_path):
    train, val = task_data
    train_column(
        fresh_model(), TaskSpec("inverted", LABELS), train, val, tmp_path, epochs=1, plots=False, **FAST
    )
    with pytest.raises(TrainingError, match="other labels"):
        train_column(
            fresh_model(),
            TaskSpec("inverted", ["a", "b"]),
            train,
            val,
            tmp_path,
            epochs=2,
            plots=False,
            **FAST,
        )


def test_feature_cache_gives_the_full_forward_logits(task_data, tmp_path):
    train, _ = task_data
    model = fresh_model()
    model.add_column(TaskSpec("inverted", LABELS))
    model.eval()
    cache = tmp_path / "cache"
    first = cached_features(model.encoder, train.images, cache, flip=True, progress=False)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and encoder_fingerprint(model.encoder)[:20] in files[0].name
    second = cached_features(model.encoder, train.images, cache, flip=True, progress=False)
    assert torch.equal(first.features, second.features) and first.features.dtype == torch.float16
    x = torch.from_numpy(train.images).float().div(127.5).sub(1).unsqueeze(1)
    with torch.inference_mode():
        full = model(x, ["inverted"])["inverted"].logits
        cached = model.forward_features(first.features.float(), ["inverted"])["inverted"].logits
        mirrored = model(torch.flip(x, dims=[3]), ["inverted"])["inverted"].logits
        cached_flip = model.forward_features(first.flipped.float(), ["inverted"])["inverted"].logits
    scale = full.abs().max()
    assert (cached - full).abs().max() <= 2e-2 * scale
    assert (cached_flip - mirrored).abs().max() <= 2e-2 * scale
    # Other weights -> another cache entry, never a stale one.
    with torch.no_grad():
        next(model.encoder.parameters()).add_(0.01)
    cached_features(model.encoder, train.images, cache, flip=True, progress=False)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_augmented_views_are_the_encoder_maps_of_augmented_copies(task_data, tmp_path):
    from facial_perception.core.features import FeatureCacheError
    from facial_perception.core.preprocess import Augment, normalise_tensor

    train, _ = task_data
    model = fresh_model().eval()
    cache = tmp_path / "cache"
    feats = cached_features(model.encoder, train.images, cache, flip=True, progress=False, views=2)
    assert feats.num_views == 2 and feats.views.shape == (2, *feats.features.shape)
    # copy 1 is the encoder's map of the images augmented with the generator seeded 0 + 1
    x = normalise_tensor(torch.from_numpy(train.images).unsqueeze(1))
    with torch.inference_mode():
        expected = model.encoder.forward_features(Augment()(x, generator=torch.Generator().manual_seed(1)))
    assert (feats.views[1].float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert not torch.equal(feats.views[0], feats.views[1]) and not torch.equal(feats.views[0], feats.features)
    # a cache entry of its own, read back whole; the plain entry is another file
    again = cached_features(model.encoder, train.images, cache, flip=True, progress=False, views=2)
    assert torch.equal(again.views, feats.views)
    plain = cached_features(model.encoder, train.images, cache, flip=True, progress=False)
    assert plain.num_views == 0 and len(list(cache.glob("*.safetensors"))) == 2
    # an entry that lost its views (an old or foreign file under the views name) is computed again
    from safetensors.torch import save_file

    views_file = next(p for p in cache.glob("*.safetensors") if "views2" in p.name)
    save_file({"features": feats.features, "flipped": feats.flipped}, str(views_file))
    again = cached_features(model.encoder, train.images, cache, flip=True, progress=False, views=2)
    assert again.num_views == 2 and torch.equal(again.views, feats.views)
    # batch(): view k >= 0 picks copy k of that image, -1 keeps its own (or mirrored) maps
    idx = torch.tensor([3, 5, 7])
    got = feats.batch(idx, torch.tensor([True, False, False]), torch.tensor([-1, 0, 1]))
    assert torch.equal(got[0], feats.flipped[3].float()) and torch.equal(got[1], feats.views[0, 5].float())
    assert torch.equal(got[2], feats.views[1, 7].float())
    with pytest.raises(FeatureCacheError, match="views"):
        compute_features(model.encoder, train.images, views=-1, progress=False)


def test_column_training_with_augmented_views(task_data, tmp_path):
    train, val = task_data
    model = fresh_model()
    result = train_column(
        model, TaskSpec("inverted", LABELS), train, val, tmp_path / "run", epochs=8, plots=False,
        augmented_views=2, **FAST,
    )  # fmt: skip
    # the task stays learnable from a mix of plain and augmented maps
    assert result.best_val_acc >= 0.8 > result.history[0]["val_acc"]
    assert any("views2" in f.name for f in (tmp_path / "run" / "feature_cache").glob("*.safetensors"))
    _, meta = load_model(tmp_path / "run" / "inverted.safetensors")
    assert meta["training"]["inverted"]["augmented_views"] == 2
    for bad in ({"train_encoder": True}, {"use_feature_cache": False}, {"augment": False}):
        with pytest.raises(TrainingError, match="augmented views"):
            train_column(
                fresh_model(), TaskSpec("x", LABELS), train, val, tmp_path / "bad", epochs=1, plots=False,
                augmented_views=1, **{**FAST, **bad},
            )  # fmt: skip


def test_feature_cache_memory_check(task_data):
    from facial_perception.core.features import FeatureCacheError

    model = fresh_model()
    with pytest.raises(FeatureCacheError, match="GiB"):
        compute_features(model.encoder, task_data[0].images, memory_limit=1000, progress=False)


def test_frozen_column_stays_identical_while_a_lateral_column_trains(task_data, tmp_path):
    train, val = task_data
    model = fresh_model()
    train_column(model, TaskSpec("first", LABELS), train, val, tmp_path / "1", epochs=1, plots=False, **FAST)
    before = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith(("encoder.", "columns.first."))
    }
    result = train_column(
        model,
        TaskSpec("second", LABELS, ["first"]),
        train,
        val,
        tmp_path / "2",
        epochs=4,
        plots=False,
        **FAST,
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]  # the new column did learn


def test_retraining_the_encoder_changes_it(task_data, tmp_path):
    train, val = task_data
    model = fresh_model()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    train_column(
        model,
        TaskSpec("inverted", LABELS),
        train,
        val,
        tmp_path,
        epochs=1,
        train_encoder=True,
        plots=False,
        **FAST,
    )
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())


def test_soft_targets_and_cancel(task_data, tmp_path):
    train, val = task_data
    soft = np.full((len(train), 2), 0.1, dtype=np.float32)
    soft[np.arange(len(train)), train.labels] = 0.9
    soft_train = ColumnData(train.images, train.labels, soft, label_names=LABELS)
    result = train_column(
        fresh_model(), TaskSpec("inverted", LABELS), soft_train, val, tmp_path / "soft", epochs=10,
        soft_targets=True, plots=False, **FAST,
    )  # fmt: skip
    # (the first epochs hover at chance on some CPUs; 8 epochs sufficed on AVX2 and AVX-512 hosts)
    losses = [h["train_loss"] for h in result.history]
    assert result.epochs_run == 10 and losses[-1] < losses[0] and result.best_val_acc >= 0.8
    stop = threading.Event()
    stop.set()
    cancelled = train_column(
        fresh_model(), TaskSpec("inverted", LABELS), train, val, tmp_path / "c", epochs=3, cancel=stop, **FAST
    )
    assert cancelled.cancelled and cancelled.epochs_run == 0 and cancelled.checkpoint is None


def test_bad_labels_are_one_clear_error(task_data, tmp_path):
    train, val = task_data
    wrong = ColumnData(train.images, np.full(len(train), 5), label_names=LABELS)
    with pytest.raises(TrainingError, match=r"labels must be in 0\.\.1"):
        train_column(fresh_model(), TaskSpec("inverted", LABELS), wrong, val, tmp_path, epochs=1, **FAST)


def test_train_encoder_steps_checkpoint_and_exact_resume(task_data, tmp_path):
    from facial_perception.core.checkpoint import load_began

    images = task_data[0].images[:16]
    kwargs = {"batch_size": 4, "device": "cpu", "progress": False, "log_every": 1, "sample_every": 2}
    straight = train_encoder("lite", images, tmp_path / "a", steps=4, checkpoint_every=0, **kwargs)
    assert straight.steps == 4 and 0.0 <= straight.k <= 1.0
    with open(straight.log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(0.0 <= float(r["k"]) <= 1.0 for r in rows)
    assert (tmp_path / "a" / "samples" / "step_0000004.png").is_file()
    _began, state, _meta = load_began(straight.checkpoint)
    assert state.step == 4 and state.k == pytest.approx(straight.k)

    partial = train_encoder("lite", images, tmp_path / "b", steps=2, checkpoint_every=1, **kwargs)
    assert partial.steps == 2
    resumed = train_encoder("lite", images, tmp_path / "b", steps=4, checkpoint_every=1, **kwargs)
    assert resumed.steps == 4
    assert resumed.m_global == pytest.approx(straight.m_global, rel=1e-4)
    assert resumed.k == pytest.approx(straight.k, rel=1e-4)
    with pytest.raises(TrainingError, match="another configuration"):
        train_encoder("paper", np.zeros((4, 128, 128), np.uint8), tmp_path / "b", steps=1, **kwargs)


def test_train_encoder_rejects_wrong_image_size(tmp_path):
    with pytest.raises(TrainingError, match="64px"):
        train_encoder(
            "lite", np.zeros((4, 32, 32), np.uint8), tmp_path, steps=1, progress=False, device="cpu"
        )


def test_group_balance_weights_equalise_cells_and_train(task_data, tmp_path):
    from facial_perception.core.training import group_balance_weights

    train, val = task_data
    n = len(train.labels)
    groups = ["a" if i % 4 == 0 else "b" for i in range(n)]  # group "a" is 3x rarer
    train = replace(train, attributes={"race": groups})
    w = group_balance_weights(train, ["race"])
    assert w.shape == (n,) and float(w.mean()) == pytest.approx(1.0, abs=1e-5)
    cells: dict[tuple[str, int], float] = {}
    for i in range(n):
        key = (groups[i], int(train.labels[i]))
        cells[key] = cells.get(key, 0.0) + float(w[i])
    assert max(cells.values()) == pytest.approx(min(cells.values()), rel=1e-4)  # every cell weighs the same
    assert float(w[0]) > float(w[1])  # a face of the rare group counts more
    with pytest.raises(TrainingError, match="cannot balance by"):
        group_balance_weights(train, ["age"])

    model = fresh_model()
    result = train_column(
        model, TaskSpec("inversion", LABELS), train, val, tmp_path, epochs=10, balance_by=["race"], **FAST
    )
    assert result.best_val_acc >= 0.8


def _column_weights(model: ProgressiveNet, task: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.columns[task].state_dict().items()}


def test_ema_column_is_validated_saved_and_resumed(task_data, tmp_path):
    """With ``ema_decay`` the column that is validated, kept and saved is the moving average: the saved
    checkpoint reproduces the logged best validation accuracy, differs from the raw trained weights,
    and an interrupted run resumes to the same average."""
    from facial_perception.core.training import load_state

    train, val = task_data
    spec = TaskSpec("inverted", LABELS)
    opts = {"plots": False, "ema_decay": 0.9, "early_stopping": None, **FAST}
    straight = train_column(fresh_model(), spec, train, val, tmp_path / "a", epochs=4, **opts)
    saved_state = load_state(tmp_path / "a" / "inverted_state.pt", "column")
    raw, averaged = saved_state["trainable"], saved_state["ema"]
    weight = "columns.inverted.fc.weight"
    assert weight in raw and not torch.allclose(raw[weight], averaged["module.fc.weight"])

    loaded, _ = load_model(straight.checkpoint)
    x = torch.from_numpy(val.images).float().div(127.5).sub(1).unsqueeze(1)
    with torch.inference_mode():
        pred = loaded(x, ["inverted"])["inverted"].logits.argmax(1).numpy()
    assert np.mean(pred == val.labels) == pytest.approx(straight.best_val_acc)
    if straight.best_epoch == 4:  # the last epoch's average is what was saved
        torch.testing.assert_close(loaded.columns["inverted"].fc.weight, averaged["module.fc.weight"])

    train_column(fresh_model(), spec, train, val, tmp_path / "b", epochs=2, **opts)
    resumed = train_column(fresh_model(), spec, train, val, tmp_path / "b", epochs=4, **opts)
    np.testing.assert_allclose(
        [h["val_loss"] for h in resumed.history], [h["val_loss"] for h in straight.history], rtol=1e-4
    )
    with pytest.raises(TrainingError, match="EMA decay"):
        train_column(fresh_model(), spec, train, val, tmp_path / "b", epochs=5, **{**opts, "ema_decay": None})


def test_ema_refuses_bad_decay_and_a_trained_encoder(task_data, tmp_path):
    train, val = task_data
    spec = TaskSpec("inverted", LABELS)
    cases = ((1.0, {}, "in \\(0, 1\\)"), (0.9, {"train_encoder": True}, "frozen encoder"))
    for decay, kwargs, message in cases:
        with pytest.raises(TrainingError, match=message):
            train_column(
                fresh_model(), spec, train, val, tmp_path, epochs=1, ema_decay=decay, **kwargs, **FAST
            )
    assert not (tmp_path / "inverted_state.pt").exists()
