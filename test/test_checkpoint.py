"""Checkpoint tests: round trips, every kind of bad file, atomic writes, BEGAN files, training state."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY, one_thread  # noqa: F401 - one_thread is an autouse fixture

from facial_perception.core.began import BEGAN, BEGANState
from facial_perception.core.checkpoint import (
    FORMAT_VERSION,
    META_KEY,
    CheckpointError,
    atomic_write,
    load_began,
    load_model,
    load_training_state,
    read_checkpoint,
    restore_rng_state,
    save_began,
    save_model,
    save_training_state,
)
from facial_perception.core.devices import DeviceError
from facial_perception.core.progressive import ProgressiveNet, TaskSpec

SPECS = [
    TaskSpec("gender", ["male", "female"]),
    TaskSpec("emotion", ["neutral", "happy", "sad"], ["gender"]),
    TaskSpec("identity", ["ann", "bob", "cy", "dee"], ["gender", "emotion"], kind="identity"),
]


def _trained_net(seed: int = 0) -> ProgressiveNet:
    """A network with non-default weights and BatchNorm statistics in every column."""
    torch.manual_seed(seed)
    net = ProgressiveNet(TINY)
    for spec in SPECS:
        net.add_column(spec)
        net.train()
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.1)
            net(torch.randn(6, 1, 16, 16))  # updates the new column's running statistics
    return net.eval()


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, ProgressiveNet]:
    net = _trained_net()
    path = tmp_path / "model.safetensors"
    save_model(path, net, {"epochs": 3, "dataset": "synthetic"}, {"decoder.w": torch.arange(6.0).view(2, 3)})
    return path, net


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_round_trip_gives_identical_outputs_and_metadata(saved: tuple[Path, ProgressiveNet]) -> None:
    path, net = saved
    loaded, meta = load_model(path)
    assert loaded.task_names == net.task_names
    assert [loaded.specs[n] for n in loaded.task_names] == SPECS
    assert loaded.config == TINY
    assert meta["format_version"] == FORMAT_VERSION and meta["training"] == {
        "epochs": 3,
        "dataset": "synthetic",
    }
    assert torch.equal(meta["extra_tensors"]["decoder.w"], torch.arange(6.0).view(2, 3))
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        want, got = net(x), loaded(x)
    for name in net.task_names:
        assert torch.equal(want[name].logits, got[name].logits)
        assert torch.equal(want[name].embedding, got[name].embedding)
    # Frozen exactly as after training: encoder and earlier columns frozen, the last one trainable.
    assert loaded.is_frozen("encoder") and loaded.is_frozen("gender") and loaded.is_frozen("emotion")
    assert not loaded.is_frozen("identity")
    assert not any(name.startswith(".") for name in os.listdir(path.parent))  # no temporary files


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_loading_onto_an_absent_gpu_is_a_clear_error(saved: tuple[Path, ProgressiveNet]) -> None:
    path, _net = saved
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_model(path, map_location="cuda")


def test_missing_garbage_empty_and_plain_safetensors_files(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.safetensors", "not found")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    _one_line_error(garbage, "not a safetensors checkpoint")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _one_line_error(empty, "not a safetensors checkpoint")
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, pickled)
    _one_line_error(pickled, "not a safetensors checkpoint")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, plain)
    _one_line_error(plain, "not a facial_perception checkpoint")


def test_truncated_and_corrupted_files(saved: tuple[Path, ProgressiveNet], tmp_path: Path) -> None:
    path, _net = saved
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[:-100])
    _one_line_error(truncated, "truncated")
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(blob[:50])
    _one_line_error(header_cut, "header is truncated")
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF  # inside the tensor data
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(flipped))
    _one_line_error(corrupt, "checksum mismatch")


def _rewrite_meta(path: Path, target: Path, change) -> None:
    """Rewrite a checkpoint's metadata (tensors kept) with a valid checksum, via the reader."""
    contents = read_checkpoint(path)
    meta = dict(contents.meta)
    meta.pop("sha256")
    change(meta)
    from facial_perception.core.checkpoint import _serialize  # the writer's own serialiser

    target.write_bytes(_serialize(contents.tensors, meta))


def test_unknown_version_and_mismatched_config(saved: tuple[Path, ProgressiveNet], tmp_path: Path) -> None:
    path, _net = saved
    future = tmp_path / "future.safetensors"
    _rewrite_meta(path, future, lambda m: m.update(format_version=99))
    _one_line_error(future, "unsupported checkpoint format version 99")

    wider = tmp_path / "wider.safetensors"
    config = TINY.to_dict()
    config["column"]["fc_dim"] = 20
    _rewrite_meta(path, wider, lambda m: m.update(config=config))
    _one_line_error(wider, "weights do not match the stored config: .*shape mismatch")

    fewer = tmp_path / "fewer.safetensors"
    _rewrite_meta(path, fewer, lambda m: m.update(tasks=m["tasks"][:1]))
    _one_line_error(fewer, "unexpected tensor")

    bad_config = tmp_path / "bad_config.safetensors"
    _rewrite_meta(path, bad_config, lambda m: m.update(config={"encoder": {"input_size": 7}}))
    _one_line_error(bad_config, "invalid config")

    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"w": torch.ones(1)}, bad_json, metadata={META_KEY: "{oops"})
    _one_line_error(bad_json, "metadata is corrupt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(saved: tuple[Path, ProgressiveNet]) -> None:
    path, net = saved
    before = path.read_bytes()

    def half_then_fail(handle) -> None:
        handle.write(before[:100])
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match=r"not a torch\.Tensor"):
        save_model(path, net, {}, {"bad": [1, 2, 3]})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_model(path, net, {"when": object()})
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]
    with pytest.raises(CheckpointError, match="does not exist"):
        save_model(path.parent / "missing" / "m.safetensors", net)


def test_began_checkpoint_and_encoder_transfer(tmp_path: Path) -> None:
    torch.manual_seed(1)
    began = BEGAN(TINY)
    path = tmp_path / "began.safetensors"
    save_began(path, began, BEGANState(k=0.25, m_global=0.1, step=7), {"lr": 1e-4})
    loaded, state, meta = load_began(path)
    assert (state.k, state.m_global, state.step) == (0.25, 0.1, 7) and meta["training"] == {"lr": 1e-4}
    for key, value in began.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key

    net = ProgressiveNet.from_began(path, [SPECS[0]])
    for key, value in began.encoder.state_dict().items():
        assert torch.equal(value, net.encoder.state_dict()[key]), key
    assert net.is_frozen("encoder") and net.task_names == ["gender"]
    encoder_only, meta = load_model(path)  # a BEGAN file gives an encoder without columns
    assert encoder_only.task_names == [] and meta["kind"] == "began"
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(encoder_only.encoder.forward_features(x), began.encoder.forward_features(x))

    model_file = tmp_path / "model.safetensors"
    save_model(model_file, net)
    with pytest.raises(CheckpointError, match="not a BEGAN checkpoint"):
        load_began(model_file)


def test_training_state_round_trip_restores_optimizer_and_rng(tmp_path: Path) -> None:
    net = _trained_net()
    net.train()
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    out = net(torch.randn(4, 1, 16, 16))
    out["identity"].logits.sum().backward()
    opt.step()
    sched.step(1.0)
    path = tmp_path / "state.pt"
    save_training_state(path, optimizer=opt, scheduler=sched, epoch=4, step=120, extra={"best": 0.5})
    expected = (torch.rand(3), np.random.rand(3), random.random())

    state = load_training_state(path)
    assert (state["epoch"], state["step"], state["extra"]) == (4, 120, {"best": 0.5})
    fresh = torch.optim.Adam(net.trainable_parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    for group_state, fresh_state in zip(opt.state.values(), fresh.state.values(), strict=True):
        assert torch.equal(group_state["exp_avg"], fresh_state["exp_avg"])
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_training_state_never_unpickles_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"format_version": 1, "payload": _Evil()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable training-state file"):
        load_training_state(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_training_state(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_training_state(tmp_path / "none.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"format_version": 42}, wrong)
    with pytest.raises(CheckpointError, match="unsupported training-state version 42"):
        load_training_state(wrong)


def test_metadata_is_plain_json_inside_the_file(saved: tuple[Path, ProgressiveNet]) -> None:
    path, _net = saved
    meta = read_checkpoint(path).meta
    assert json.loads(json.dumps(meta)) == meta
    assert [t["name"] for t in meta["tasks"]] == ["gender", "emotion", "identity"]
    assert meta["tasks"][2]["laterals"] == ["gender", "emotion"]
