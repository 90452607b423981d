"""Model tests: configs, shapes and gradient flow, freezing, laterals, BEGAN dynamics, FLOP counts."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY, one_thread  # noqa: F401 - one_thread is an autouse fixture

from facial_perception.core.began import BEGAN, BEGANState, Decoder, began_step, reconstruction_loss
from facial_perception.core.config import (
    LITE,
    PAPER,
    PRESETS,
    ColumnConfig,
    ConfigError,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    get_config,
)
from facial_perception.core.devices import DeviceError, resolve_device
from facial_perception.core.flops import format_model_info, model_info
from facial_perception.core.progressive import (
    ModelError,
    ProgressiveNet,
    TaskSpec,
    default_task_specs,
)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(name: str, tmp_path: Path) -> None:
    config = get_config(name)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_json(config.to_json()) == config
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert get_config(str(path)) == config


def test_paper_preset_follows_the_published_tables() -> None:
    enc = PAPER.encoder
    assert (PAPER.input_size, PAPER.in_channels) == (128, 1)
    assert (enc.feature_channels, enc.feature_size, enc.latent_dim) == (256, 16, 128)
    assert PAPER.decoder.channels * PAPER.decoder.base_size**2 == 1024  # FC 128 -> 16x8x8
    assert (LITE.input_size, LITE.in_channels) == (64, 1)


def test_mid_preset_is_lite_with_a_wider_encoder() -> None:
    mid = get_config("mid")
    assert (mid.input_size, mid.column, mid.decoder) == (LITE.input_size, LITE.column, LITE.decoder)
    widths = [c for c, _ in mid.encoder.stages]
    assert widths == [3 * c // 2 for c, _ in LITE.encoder.stages]
    net = ProgressiveNet(mid, [TaskSpec("gender", ["female", "male"])]).eval()
    with torch.inference_mode():
        features = net.encoder.forward_features(torch.zeros(2, 1, 64, 64))
        probabilities = net.predict(torch.zeros(2, 1, 64, 64))["gender"].probabilities
    assert tuple(features.shape) == (2, 192, 8, 8) and tuple(probabilities.shape) == (2, 2)
    mid_flops, lite_flops = model_info("mid"), model_info("lite")
    assert 2.0 < mid_flops["gflop_per_face"]["encoder"] / lite_flops["gflop_per_face"]["encoder"] < 2.5


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"name": "x", "bogus": 1}, "unknown model config key"),
        ({"encoder": {"input_size": 100}}, "multiple of 8"),
        ({"encoder": {"stages": "nope"}}, "encoder.stages"),
        ({"column": {"dropout": 1.5}}, "dropout"),
        ({"column": {"widths": [1]}}, "unknown key"),
        ({"encoder": {"activation": "tanh"}}, "activation"),
        (
            {"encoder": {"input_size": 16, "stages": [[8, 1], [8, 1], [8, 1], [8, 1]]}},
            "max-pools",
        ),
    ],
)
def test_invalid_configs_give_one_clear_error(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        ModelConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_get_config_rejects_unknown_names_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model config"):
        get_config("huge")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        get_config(bad)


# ------------------------------------------------------------------------------------------ FLOPs
def test_flop_count_matches_hand_count_and_lite_is_10x_cheaper() -> None:
    info = model_info(TINY, [TaskSpec("a", ["x", "y"])])
    # conv 1->4 @16x16, strided conv 4->4 @8x8, conv 4->8 @8x8 (3x3 each), in multiply-adds.
    encoder_macs = 9 * (1 * 4 * 256 + 4 * 4 * 64 + 4 * 8 * 64)
    assert info["gflop_per_face"]["encoder"] == pytest.approx(2 * encoder_macs / 1e9)
    # column: conv 8->8 @8x8 twice, FC 8*4*4 -> 12, FC 12 -> 2
    column_macs = 2 * 9 * 8 * 8 * 64 + 128 * 12 + 12 * 2
    assert info["gflop_per_face"]["columns"]["a"] == pytest.approx(2 * column_macs / 1e9)
    assert info["params"]["encoder_features"] == sum(
        p.numel() for p in ProgressiveNet(TINY).encoder.features.parameters()
    )

    paper, lite = model_info("paper"), model_info("lite")
    assert lite["gflop_per_face"]["shared_total"] * 10 <= paper["gflop_per_face"]["shared_total"]
    # laterals cost FLOPs: the identity column (3 sources) costs more than the gender column (none)
    cols = paper["gflop_per_face"]["columns"]
    assert cols["identity"] > cols["gender"]
    table = format_model_info(lite)
    assert "independent" in table and "lite" in table


# ------------------------------------------------------------------------------------------ shapes, gradients
@pytest.mark.parametrize("config, batch", [(LITE, 2), (PAPER, 2)], ids=["lite", "paper"])
def test_shapes_and_gradient_flow(config: ModelConfig, batch: int) -> None:
    torch.manual_seed(0)
    net = ProgressiveNet(config, default_task_specs(num_identities=5)).train()
    x = torch.rand(batch, 1, config.input_size, config.input_size) * 2 - 1
    out = net(x)
    assert list(out) == ["gender", "age", "emotion", "identity"]
    for name, result in out.items():
        assert result.logits.shape == (batch, net.specs[name].num_classes)
        assert result.embedding.shape == (batch, config.column.fc_dim)
    features = net.encoder.forward_features(x)
    assert features.shape == (batch, *net.encoder.feature_shape)
    assert net.encoder(x).shape == (batch, config.encoder.latent_dim)

    sum(o.logits.logsumexp(1).sum() for o in out.values()).backward()
    newest = net.columns["identity"]
    grads = [p.grad for p in newest.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in net.encoder.parameters())
    for name in ("gender", "age", "emotion"):
        assert all(p.grad is None for p in net.columns[name].parameters())
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in newest.parameters()}


@pytest.mark.parametrize("config", [LITE, PAPER], ids=["lite", "paper"])
def test_decoder_reproduces_input_size(config: ModelConfig) -> None:
    decoder = Decoder(config.decoder, config.encoder.latent_dim, config.input_size)
    image = decoder(torch.rand(1, config.encoder.latent_dim) * 2 - 1)
    assert image.shape == (1, 1, config.input_size, config.input_size)


def test_retrained_encoder_receives_gradients() -> None:
    net = ProgressiveNet(TINY)
    net.add_column(TaskSpec("a", ["x", "y"]), train_encoder=True)
    net.train()
    net(torch.randn(3, 1, 16, 16))["a"].logits.sum().backward()
    assert all(p.grad is not None for p in net.encoder.features.parameters())
    assert net.encoder.training


# ------------------------------------------------------------------------------------------ composition
def test_add_column_validation_and_remove_rules() -> None:
    net = ProgressiveNet(TINY, [TaskSpec("a", ["x", "y"])])
    with pytest.raises(ModelError, match="unknown lateral source"):
        net.add_column(TaskSpec("b", ["x", "y"], ["nope"]))
    with pytest.raises(ModelError, match="already exists"):
        net.add_column(TaskSpec("a", ["x", "y"]))
    with pytest.raises(ValueError, match="at least 2 labels"):
        TaskSpec("c", ["only"])
    with pytest.raises(ValueError, match="reserved"):
        TaskSpec("keys", ["x", "y"])
    with pytest.raises(ValueError, match="must start with a letter"):
        TaskSpec("bad.name", ["x", "y"])
    net.add_column(TaskSpec("b", ["x", "y", "z"], ["a"]))
    with pytest.raises(ModelError, match="lateral source of"):
        net.remove_column("a")
    net.remove_column("b")
    net.remove_column("a")
    assert net.task_names == []


def test_rename_column_keeps_order_outputs_freezing_and_lateral_users() -> None:
    torch.manual_seed(3)
    net = ProgressiveNet(TINY, [TaskSpec("a", ["x", "y"]), TaskSpec("b", ["p", "q", "r"], ["a"])]).eval()
    x = torch.randn(3, 1, 16, 16)
    before = net(x)
    net.rename_column("a", "first")
    assert net.task_names == ["first", "b"] and net.specs["b"].laterals == ["first"]
    assert net.specs["first"].name == "first" and net.is_frozen("first")
    after = net(x)
    torch.testing.assert_close(after["first"].logits, before["a"].logits)
    torch.testing.assert_close(after["b"].logits, before["b"].logits)
    assert all(key.startswith(("encoder.", "columns.first.", "columns.b.")) for key in net.state_dict())
    with pytest.raises(ModelError, match="already exists"):
        net.rename_column("b", "first")
    with pytest.raises(ModelError, match="no column named"):
        net.rename_column("a", "c")
    with pytest.raises(ModelError, match="must start with a letter"):
        net.rename_column("b", "9b")
    assert net.task_names == ["first", "b"]  # failed renames change nothing


def test_mirror_average_averages_face_and_mirror_probabilities_only_where_asked() -> None:
    torch.manual_seed(5)
    specs = [TaskSpec("a", ["x", "y"], mirror_average=True)]
    specs.append(TaskSpec("b", ["p", "q", "r"], ["a"], kind="identity"))
    net = ProgressiveNet(TINY, specs).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.inference_mode():
        out = net.predict(x)
        plain, mirrored = net(x), net(x.flip(-1))
    soft = lambda o, name: torch.softmax(o[name].logits, dim=1)  # noqa: E731
    torch.testing.assert_close(out["a"].probabilities, (soft(plain, "a") + soft(mirrored, "a")) / 2)
    encoded = net.encode(x)  # the same in two halves (a pipeline runs them in two threads)
    assert encoded.count == 3 and encoded.mirrored and encoded.features.shape[0] == 6
    with torch.inference_mode():
        halves = net.predict_encoded(encoded)
    for name in ("a", "b"):
        torch.testing.assert_close(halves[name].probabilities, out[name].probabilities)
        torch.testing.assert_close(halves[name].embedding, out[name].embedding)
    assert not net.encode(x, mirror=False).mirrored and not net.encode(x, ["b"]).mirrored
    assert not torch.allclose(out["a"].probabilities, soft(plain, "a"))  # the mirror pass changed it
    torch.testing.assert_close(out["b"].probabilities, soft(plain, "b"))  # not asked: the face only
    torch.testing.assert_close(out["b"].embedding, plain["b"].embedding)  # embeddings never mirrored
    net.rename_column("a", "c")
    assert net.specs["c"].mirror_average  # a renamed column keeps its inference setting
    only_b = net.predict(x, ["b"])  # its lateral source is mirror-averaged, b is not: one plain pass
    torch.testing.assert_close(only_b["b"].probabilities, soft(plain, "b"))
    round_trip = TaskSpec.from_dict(net.specs["c"].to_dict())
    assert round_trip.mirror_average and round_trip == net.specs["c"]
    legacy = {"name": "g", "labels": ["m", "f"], "laterals": [], "kind": "classification"}
    assert TaskSpec.from_dict(legacy).mirror_average is False  # checkpoints written before the option
    with pytest.raises(ModelError, match="mirror_average must be true or false"):
        TaskSpec.from_dict(legacy | {"mirror_average": "yes"})


def _reinitialised(net: ProgressiveNet, name: str, seed: int) -> ProgressiveNet:
    """A copy of ``net`` whose column ``name`` has other weights: a column "trained with another seed"."""
    other = copy.deepcopy(net)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.columns[name].parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return other


def test_ensemble_column_averages_its_members_and_survives_a_checkpoint(tmp_path: Path) -> None:
    from facial_perception.core.checkpoint import load_model, save_model
    from facial_perception.core.training import TrainingError, prepare_column

    torch.manual_seed(4)
    specs = [TaskSpec("a", ["x", "y"]), TaskSpec("b", ["p", "q", "r"], ["a"], kind="identity")]
    specs.append(TaskSpec("c", ["u", "v"]))
    net = ProgressiveNet(TINY, specs).eval()
    seeds = [_reinitialised(net, "b", seed) for seed in (1, 2)]
    x = torch.randn(5, 1, 16, 16)
    with torch.inference_mode():
        singles = [m.predict(x) for m in (net, *seeds)]
    net.join_members("b", [m.columns["b"] for m in seeds])
    assert net.task_names == ["a", "b", "c"] and net.specs["b"].members == 3 and net.is_frozen("b")
    with torch.inference_mode():
        joined = net.predict(x)
    mean = sum(s["b"].probabilities for s in singles) / 3
    torch.testing.assert_close(joined["b"].probabilities, mean)
    torch.testing.assert_close(joined["a"].probabilities, singles[0]["a"].probabilities)  # others untouched
    embedding = joined["b"].embedding
    assert embedding.shape == (5, 3 * TINY.column.fc_dim)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(5))
    unit = [torch.nn.functional.normalize(s["b"].embedding, dim=1) for s in singles]
    member_cosines = sum(u[0] @ u[1] for u in unit) / 3
    torch.testing.assert_close(embedding[0] @ embedding[1], member_cosines)  # gallery: mean similarity
    assert not torch.allclose(joined["b"].probabilities, singles[0]["b"].probabilities)

    path = tmp_path / "ensemble.safetensors"
    save_model(path, net)
    loaded, _meta = load_model(path)
    assert loaded.specs["b"].members == 3
    with torch.inference_mode():
        again = loaded.eval().predict(x)
    torch.testing.assert_close(again["b"].probabilities, joined["b"].probabilities)
    torch.testing.assert_close(again["b"].embedding, joined["b"].embedding)
    loaded.rename_column("b", "who")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(x)["who"].probabilities, joined["b"].probabilities)

    # a lateral source joined into an ensemble keeps feeding its users from the column they were trained with
    other_a = _reinitialised(net, "a", 7)
    net.join_members("a", [other_a.columns["a"]])
    with torch.inference_mode():
        both = net.predict(x)
        other_a_alone = other_a.predict(x)
    torch.testing.assert_close(both["b"].probabilities, joined["b"].probabilities)
    mean_a = (singles[0]["a"].probabilities + other_a_alone["a"].probabilities) / 2
    torch.testing.assert_close(both["a"].probabilities, mean_a)
    net.add_column(TaskSpec("d", ["k", "l"], ["b"]))  # laterals from an ensemble: its first member's
    net.eval()
    with torch.inference_mode():
        features = net.encoder.forward_features(x)
        a_acts = net.columns["a"](features)[2]
        b_first_acts = net.columns["b"].members[0](features, {"a": a_acts})[2]
        torch.testing.assert_close(
            net(x, ["d"])["d"].logits, net.columns["d"](features, {"b": b_first_acts})[0]
        )
    net.remove_column("d")
    with pytest.raises(ModelError, match="other laterals"):
        net.join_members("c", [seeds[0].columns["b"]])  # another task's column does not fit
    assert net.specs["c"].members == 1 and net.task_names == ["a", "b", "c"]
    with pytest.raises(TrainingError, match="one member at a time"):
        prepare_column(net, TaskSpec("b", ["p", "q", "r"], ["a"], kind="identity"), False, True)
    with pytest.raises(ModelError, match="members must be a whole number"):
        TaskSpec("e", ["x", "y"], members=0)
    assert "members" not in specs[0].to_dict()  # single columns: the metadata earlier versions read
    assert TaskSpec.from_dict(net.specs["b"].to_dict()).members == 3


def test_standalone_member_weighs_as_much_as_the_column_and_survives_a_checkpoint(tmp_path: Path) -> None:
    from facial_perception.core.checkpoint import (
        CheckpointError,
        _serialize,
        load_model,
        read_checkpoint,
        save_model,
    )

    torch.manual_seed(5)
    specs = [TaskSpec("a", ["x", "y"]), TaskSpec("b", ["p", "q", "r"], ["a"], mirror_average=True)]
    net = ProgressiveNet(TINY, specs).eval()
    wider = dataclasses.replace(TINY, column=dataclasses.replace(TINY.column, fc_dim=20))
    alone = [ProgressiveNet(config, [TaskSpec("b", ["p", "q", "r"])]).eval() for config in (TINY, wider)]
    x = torch.randn(4, 1, 16, 16)

    def probs(model: ProgressiveNet, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(images, ["b"])["b"].logits, dim=1)

    with torch.inference_mode():
        column_only = net.predict(x)
    for member in alone:
        net.add_standalone("b", member)
    assert list(net.standalone) == ["b"] and len(net.standalone["b"]) == 2
    with torch.inference_mode():
        got = net.predict(x)
        faces = (probs(net, x) + probs(alone[0], x) + probs(alone[1], x)) / 3
        mirrors = (probs(net, x.flip(-1)) + probs(alone[0], x.flip(-1)) + probs(alone[1], x.flip(-1))) / 3
    torch.testing.assert_close(got["b"].probabilities, (faces + mirrors) / 2)
    torch.testing.assert_close(got["a"].probabilities, column_only["a"].probabilities)  # others untouched
    members = (
        probs(alone[0], x) + probs(alone[1], x) + probs(alone[0], x.flip(-1)) + probs(alone[1], x.flip(-1))
    ) / 4
    torch.testing.assert_close(got["b"].members, members)  # what a pipeline holds for a tracked face
    assert got["a"].members is None
    # the members on faces 1 and 3 only; faces 0 and 2 bring their members' probabilities of before
    with torch.inference_mode():
        encoded = net.encode(x, standalone_rows=[3, 1])
        assert encoded.standalone_rows == (1, 3) and encoded.standalone["b"][0].shape[0] == 4  # 2 + mirrors
        held = torch.zeros_like(members)
        held[[0, 2]] = members[[0, 2]]
        partial = net.predict_encoded(encoded, held_members={"b": held})
        torch.testing.assert_close(partial["b"].probabilities, got["b"].probabilities)
        torch.testing.assert_close(partial["b"].members, members)
        stale = net.predict_encoded(encoded, held_members={"b": torch.full_like(members, 1 / 3)})
        assert not torch.allclose(stale["b"].probabilities[[0, 2]], got["b"].probabilities[[0, 2]], atol=1e-4)
        torch.testing.assert_close(stale["b"].probabilities[[1, 3]], got["b"].probabilities[[1, 3]])
        with pytest.raises(ModelError, match=r"ran on 2 of 4 faces; the others need held_members\['b'\]"):
            net.predict_encoded(encoded)
        with pytest.raises(ModelError, match=r"standalone_rows must be within 0\.\.3"):
            net.encode(x, standalone_rows=[4])
        assert net.encode(x, standalone_rows=range(4)).standalone_rows is None  # every face
        none_run = net.predict_encoded(net.encode(x, standalone_rows=[]), held_members={"b": members})
        torch.testing.assert_close(none_run["b"].probabilities, got["b"].probabilities)
    torch.testing.assert_close(got["b"].embedding, column_only["b"].embedding)  # the column's embedding
    with torch.inference_mode():  # forward (training, feature caches) runs the columns only
        torch.testing.assert_close(torch.softmax(net(x)["b"].logits, dim=1), probs(net, x))
        torch.testing.assert_close(
            net(x)["b"].logits, net.forward_features(net.encoder.forward_features(x))["b"].logits
        )

    net.train()  # standalone members stay frozen: no gradient, BatchNorm statistics never updated
    assert not any(p.requires_grad for p in net.standalone.parameters())
    assert not any(m.training for m in net.standalone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net.eval()

    path = tmp_path / "standalone.safetensors"
    save_model(path, net)
    assert [c["column"]["fc_dim"] for c in read_checkpoint(path).meta["standalone"]["b"]] == [12, 20]
    loaded, _meta = load_model(path)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(x)["b"].probabilities, got["b"].probabilities)
    loaded.rename_column("b", "who")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(x)["who"].probabilities, got["b"].probabilities)
    loaded.drop_standalone("who")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(x)["who"].probabilities, column_only["b"].probabilities)
    save_model(tmp_path / "plain.safetensors", loaded)
    assert (
        "standalone" not in read_checkpoint(tmp_path / "plain.safetensors").meta
    )  # what earlier versions read

    with pytest.raises(ModelError, match="other labels"):
        net.add_standalone("a", ProgressiveNet(TINY, [TaskSpec("a", ["x", "z"])]))
    with pytest.raises(ModelError, match="must stand alone"):
        net.add_standalone("b", ProgressiveNet(TINY, specs))
    with pytest.raises(ModelError, match="no column 'a'"):
        net.add_standalone("a", alone[0])
    bigger = dataclasses.replace(TINY, encoder=dataclasses.replace(TINY.encoder, input_size=32))
    with pytest.raises(ModelError, match="reads 1x32px faces"):
        net.add_standalone("b", ProgressiveNet(bigger, [TaskSpec("b", ["p", "q", "r"])]))
    assert len(net.standalone["b"]) == 2  # nothing half-added
    with pytest.raises(ModelError, match="lacks the encoder maps"):  # features of another network
        net.predict_encoded(ProgressiveNet(TINY, specs).eval().encode(x))
    net.remove_column("b")
    assert "b" not in net.standalone

    # a checkpoint whose standalone list names no column, or holds no config: one line
    broken = tmp_path / "broken.safetensors"
    contents = read_checkpoint(path)
    for listed, fragment in (
        ({"zzz": []}, "column 'zzz'"),
        ({"b": [{"name": 1}]}, "invalid standalone member"),
    ):
        meta = {k: v for k, v in contents.meta.items() if k != "sha256"}
        broken.write_bytes(_serialize(contents.tensors, {**meta, "standalone": listed}))
        with pytest.raises(CheckpointError, match=fragment):
            load_model(broken)


def test_embedding_whitening_applies_at_prediction_survives_a_checkpoint_and_goes_with_the_weights(
    tmp_path: Path,
) -> None:
    from facial_perception.core.checkpoint import (
        CheckpointError,
        _serialize,
        load_model,
        read_checkpoint,
        save_model,
    )
    from facial_perception.core.inference import FacePredictor

    torch.manual_seed(6)
    specs = [TaskSpec("a", ["x", "y"]), TaskSpec("who", ["p", "q", "r"], kind="identity")]
    net = ProgressiveNet(TINY, specs).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.inference_mode():
        raw = net.predict(x)["who"].embedding
    dim = TINY.column.fc_dim
    mean, projection = torch.randn(dim), torch.randn(dim, 7)
    net.set_whitening("who", mean, projection)
    assert net.embedding_dim("who") == 7 and net.embedding_dim("a") == dim
    with torch.inference_mode():
        got = net.predict(x)
        fused = FacePredictor(net, device="cpu", fuse_columns=True).predict(x)
    torch.testing.assert_close(got["who"].embedding, (raw - mean) @ projection)
    torch.testing.assert_close(
        torch.from_numpy(np.stack([face.embedding for face in fused])),
        torch.nn.functional.normalize((raw - mean) @ projection, dim=1),
        rtol=1e-4,
        atol=1e-5,
    )
    with torch.inference_mode():  # training and feature caches see the column's own layer
        torch.testing.assert_close(net(x)["who"].embedding, raw)

    path = tmp_path / "whitened.safetensors"
    save_model(path, net)
    assert read_checkpoint(path).meta["whitening"] == {"who": [dim, 7]}
    loaded, _meta = load_model(path)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(x)["who"].embedding, got["who"].embedding)
    loaded.rename_column("who", "person")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(x)["person"].embedding, got["who"].embedding)
    loaded.drop_whitening("person")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict(x)["person"].embedding, raw)
    save_model(tmp_path / "plain.safetensors", loaded)
    assert (
        "whitening" not in read_checkpoint(tmp_path / "plain.safetensors").meta
    )  # what earlier versions read

    # new weights, stale whitening: joining members or removing the column forgets it
    net.join_members("who", [_reinitialised(net, "who", 3).columns["who"]])
    assert "who" not in net.whitening and net.embedding_dim("who") == 2 * dim
    with pytest.raises(ModelError, match=f"gives {2 * dim}-d embeddings"):
        net.set_whitening("who", mean, projection)
    net.set_whitening("who", torch.zeros(2 * dim), torch.eye(2 * dim)[:, :3])
    net.remove_column("who")
    assert not net.whitening
    with pytest.raises(ModelError, match="no column"):
        net.set_whitening("who", mean, projection)
    with pytest.raises(ModelError, match="must be finite"):
        net.set_whitening("a", torch.full((dim,), float("nan")), projection)
    with pytest.raises(ModelError, match="mean"):
        net.set_whitening("a", mean, torch.randn(dim + 1, 2))

    # a checkpoint whose whitening list is broken: one line
    broken = tmp_path / "broken.safetensors"
    contents = read_checkpoint(path)
    for listed, fragment in (
        ({"zzz": [dim, 7]}, "no column named 'zzz'"),
        ({"who": [dim]}, "invalid whitening shape"),
    ):
        meta = {k: v for k, v in contents.meta.items() if k != "sha256"}
        broken.write_bytes(_serialize(contents.tensors, {**meta, "whitening": listed}))
        with pytest.raises(CheckpointError, match=fragment):
            load_model(broken)


def test_embedding_fingerprint_follows_exactly_the_weights_behind_the_embedding() -> None:
    """A gallery trusts this hash: it must change with anything that moves the identity embedding
    (encoder, the column, its lateral sources, its whitening) and nothing else."""
    torch.manual_seed(3)
    specs = [
        TaskSpec("a", ["x", "y"]),
        TaskSpec("b", ["x", "y"]),
        TaskSpec("who", ["p", "q", "r"], kind="identity", laterals=["a"]),
    ]
    net = ProgressiveNet(TINY, specs).eval()
    base = net.embedding_fingerprint("who")
    assert len(base) == 16 and base == copy.deepcopy(net).embedding_fingerprint("who")
    assert net.embedding_fingerprint("a") != base

    def changed(edit) -> bool:
        other = copy.deepcopy(net)
        with torch.no_grad():
            edit(other)
        return other.embedding_fingerprint("who") != base

    assert changed(lambda m: m.encoder.state_dict()[next(iter(m.encoder.state_dict()))].add_(1e-3))
    assert changed(lambda m: next(m.columns["who"].parameters()).mul_(1.001))
    assert changed(lambda m: next(m.columns["a"].parameters()).mul_(1.001))  # a lateral source
    assert not changed(lambda m: next(m.columns["b"].parameters()).mul_(2.0))  # no path to "who"
    assert not changed(lambda m: m.add_column(TaskSpec("later", ["x", "y"], laterals=["who"])))
    dim = TINY.column.fc_dim
    assert changed(lambda m: m.set_whitening("who", torch.zeros(dim), torch.eye(dim)[:, :4]))
    assert changed(lambda m: m.join_members("who", [copy.deepcopy(m.columns["who"])]))
    with pytest.raises(ModelError, match="no column named 'nobody'"):
        net.embedding_fingerprint("nobody")


def test_task_subsets_run_their_lateral_sources_and_cached_features_match() -> None:
    torch.manual_seed(1)
    net = ProgressiveNet(TINY, [TaskSpec("a", ["x", "y"]), TaskSpec("b", ["p", "q", "r"], ["a"])]).eval()
    x = torch.randn(4, 1, 16, 16)
    full = net(x)
    only_b = net(x, tasks=["b"])
    assert list(only_b) == ["b"]
    torch.testing.assert_close(only_b["b"].logits, full["b"].logits)
    cached = net.forward_features(net.encoder.forward_features(x))
    for name in ("a", "b"):
        torch.testing.assert_close(cached[name].logits, full[name].logits)
    with pytest.raises(ModelError, match="unknown task"):
        net(x, tasks=["c"])


def test_frozen_columns_stay_bit_identical_while_a_new_column_trains() -> None:
    torch.manual_seed(2)
    net = ProgressiveNet(TINY, [TaskSpec("a", ["x", "y"])])
    net.train()
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
    for _ in range(3):  # give column a non-trivial weights and BatchNorm statistics
        x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x)["a"].logits, y).backward()
        opt.step()

    net.add_column(TaskSpec("b", ["p", "q", "r"], ["a"]))
    encoder_before, a_before = _state(net.encoder), _state(net.columns["a"])
    b_before = _state(net.columns["b"])
    net.train()  # must not put frozen parts back into training mode
    assert not net.columns["a"].training and not net.encoder.training and net.columns["b"].training
    assert all(not p.requires_grad for p in net.columns["a"].parameters())
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
    for _ in range(5):
        x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x)["b"].logits, y).backward()
        opt.step()

    for before, module in ((encoder_before, net.encoder), (a_before, net.columns["a"])):
        after = module.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(value, after[key]), key  # weights and BN running stats alike
    b_after = net.columns["b"].state_dict()
    assert not torch.equal(b_before["norms.0.running_mean"], b_after["norms.0.running_mean"])
    assert not torch.equal(b_before["laterals.1.proj.weight"], b_after["laterals.1.proj.weight"])


def _quadrant_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise images with a bright 6x6 square in one of four quadrants (label 0..3)."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.rand(n, 1, 16, 16, generator=generator) * 0.6 - 0.8
    for i, label in enumerate(labels.tolist()):
        top, left = (label // 2) * 8 + 1, (label % 2) * 8 + 1
        images[i, 0, top : top + 6, left : left + 6] = 0.9
    return images, labels


def test_lateral_connected_column_learns_a_synthetic_task() -> None:
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    net = ProgressiveNet(TINY, [TaskSpec("side", ["left", "right"])])
    # Column "side" learns left/right; the lateral column then learns the full quadrant.
    images, quadrant = _quadrant_images(256, gen)
    test_images, test_quadrant = _quadrant_images(128, gen)

    def fit(task: str, targets: torch.Tensor, steps: int) -> None:
        net.train()
        opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
        for step in range(steps):
            idx = torch.arange(step * 32, step * 32 + 32) % images.shape[0]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(images[idx])[task].logits, targets[idx])
            loss.backward()
            opt.step()
        net.eval()

    fit("side", quadrant % 2, 40)
    net.add_column(TaskSpec("quadrant", ["tl", "tr", "bl", "br"], ["side"]))
    scales_before = net.columns["quadrant"].laterals["1"].scales.detach().clone()
    fit("quadrant", quadrant, 60)
    with torch.no_grad():
        predicted = net(test_images)["quadrant"].logits.argmax(1)
    accuracy = (predicted == test_quadrant).float().mean().item()
    assert accuracy >= 0.9, accuracy
    assert not torch.equal(scales_before, net.columns["quadrant"].laterals["1"].scales)


# ------------------------------------------------------------------------------------------ BEGAN
def _real_face_crops(root: Path, count: int, size: int) -> torch.Tensor:
    files = sorted(root.glob("*/*.jpg"))[:count]
    assert len(files) == count, f"need {count} images under {root}"
    crops = []
    for file in files:
        with Image.open(file) as image:
            grey = image.convert("L").resize((size, size), Image.Resampling.BOX)
        crops.append(np.asarray(grey, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(crops))[:, None]


def test_began_keeps_k_in_unit_interval_and_m_global_falls(shared_datasets: Path) -> None:
    torch.manual_seed(4)
    faces = _real_face_crops(shared_datasets / "lfw_unlabeled", 64, 32)
    config = ModelConfig(
        name="began-tiny",
        encoder=EncoderConfig(input_size=32, stages=((8, 1), (16, 1), (16, 1)), latent_dim=16),
        decoder=DecoderConfig(channels=8, base_size=8, convs_per_block=1),
        column=ColumnConfig(layers=((8, True),), fc_dim=8),
    )
    began = BEGAN(config)
    opt_d = torch.optim.Adam(began.discriminator_parameters(), lr=5e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(began.generator_parameters(), lr=5e-4, betas=(0.5, 0.999))
    state = BEGANState()
    rng = torch.Generator().manual_seed(4)
    history = []
    for step in range(100):
        batch = faces[(step * 16) % 64 : (step * 16) % 64 + 16]
        stats = began_step(began, batch, opt_d, opt_g, state, gamma=0.5, lambda_k=0.01, rng=rng)
        assert 0.0 <= stats["k"] <= 1.0
        assert stats["m_global"] == pytest.approx(
            stats["loss_real"] + abs(0.5 * stats["loss_real"] - stats["loss_fake"])
        )
        history.append(stats["m_global"])
    assert state.step == 100 and 0.0 <= state.k <= 1.0
    first, last = np.mean(history[:10]), np.mean(history[-10:])
    print(f"M_global first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    assert last < 0.8 * first, (history[:10], history[-10:])


def test_began_generator_gradients_never_reach_the_discriminator() -> None:
    torch.manual_seed(5)
    began = BEGAN(TINY)
    reference = copy.deepcopy(began)
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    state = BEGANState(k=0.4)

    # Expected gradients, computed independently: D sees a detached G(z); G sees a fixed D.
    z = reference.sample_z(4, generator=torch.Generator().manual_seed(9))
    fake = reference.generator(z)
    d_params = reference.discriminator_parameters()
    loss_d = reconstruction_loss(real, reference.reconstruct(real)) - 0.4 * reconstruction_loss(
        fake.detach(), reference.reconstruct(fake.detach())
    )
    expected_d = torch.autograd.grad(loss_d, d_params)
    expected_g = torch.autograd.grad(
        reconstruction_loss(fake, reference.reconstruct(fake)), reference.generator_parameters()
    )

    opt_d = torch.optim.SGD(began.discriminator_parameters(), lr=0.0)
    opt_g = torch.optim.SGD(began.generator_parameters(), lr=0.0)
    stats = began_step(began, real, opt_d, opt_g, state, rng=torch.Generator().manual_seed(9))
    for got, want in zip([p.grad for p in began.discriminator_parameters()], expected_d, strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip([p.grad for p in began.generator_parameters()], expected_g, strict=True):
        torch.testing.assert_close(got, want)
    assert stats["loss_d"] == pytest.approx(loss_d.item())
    expected_k = min(max(0.4 + 0.001 * (0.5 * stats["loss_real"] - stats["loss_fake"]), 0.0), 1.0)
    assert state.k == pytest.approx(expected_k)


# ------------------------------------------------------------------------------------------ devices
def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_default_specs_are_a_progressive_chain() -> None:
    specs = default_task_specs()
    assert [s.name for s in specs] == ["gender", "age", "emotion", "identity"]
    assert [len(s.labels) for s in specs] == [2, 8, 8, 62]
    assert specs[-1].kind == "identity"
    assert json.loads(json.dumps([s.to_dict() for s in specs]))[1]["laterals"] == ["gender"]
    assert TaskSpec.from_dict(specs[2].to_dict()) == specs[2]
