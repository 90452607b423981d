"""FusedColumns: the frozen columns as one stack of wide layers give the columns' own results."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import TINY, one_thread  # noqa: F401 - one_thread is an autouse fixture

from facial_perception.core.checkpoint import DEFAULT_MODEL, load_model
from facial_perception.core.config import get_config
from facial_perception.core.fused_columns import FusedColumns
from facial_perception.core.inference import FacePredictor, InferenceError
from facial_perception.core.preprocess import preprocess_batch
from facial_perception.core.progressive import ModelError, ProgressiveNet, TaskSpec

# laterals of every shape: none, from the first column, from two, from a non-adjacent one only
SPECS = [
    TaskSpec("emotion", ["neutral", "happy", "sad"]),
    TaskSpec("gender", ["male", "female"], ["emotion"]),
    TaskSpec("age", ["young", "adult", "old", "older"]),
    TaskSpec("mood", ["calm", "tense"], ["emotion", "age"]),
    TaskSpec("identity", [f"p{i}" for i in range(7)], ["gender"], kind="identity"),
]


def _trained_looking(config, specs=SPECS, seed: int = 0) -> ProgressiveNet:
    """Random weights and BatchNorm statistics far from (0, 1), so that folding them is exercised."""
    torch.manual_seed(seed)
    net = ProgressiveNet(config, specs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn_like(module.running_mean))
                module.running_var.copy_(torch.rand_like(module.running_var) * 3 + 0.1)
    return net.eval()


@pytest.mark.parametrize("activation", ["relu", "elu"])
@pytest.mark.parametrize("tasks", [None, ["identity"], ["age", "gender"], ["mood"]])
def test_fused_columns_equal_the_columns_one_by_one(activation: str, tasks: list[str] | None) -> None:
    config = dataclasses.replace(TINY, column=dataclasses.replace(TINY.column, activation=activation))
    net = _trained_looking(config)
    features = net.encoder.forward_features(torch.rand(5, 1, 16, 16) * 2 - 1).detach()
    with torch.no_grad():
        expected = net.forward_features(features, tasks)
        fused = FusedColumns(net, tasks)(features)
    assert list(fused) == list(expected)  # the requested tasks, in column order
    for name, out in expected.items():
        torch.testing.assert_close(fused[name].logits, out.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused[name].embedding, out.embedding, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tasks", [None, ["mood"], ["identity", "age"]])
def test_fused_columns_average_ensemble_members_like_the_network(tasks: list[str] | None) -> None:
    """Members run as columns of their own in the stack; laterals into every member stay theirs."""
    net = _trained_looking(TINY)
    others = [_trained_looking(TINY, seed=seed) for seed in (1, 2)]
    net.join_members("mood", [m.columns["mood"] for m in others])  # members with two lateral sources
    net.join_members("identity", [others[0].columns["identity"]])
    net.join_members("emotion", [others[1].columns["emotion"]])  # a lateral source of gender and mood
    features = net.encoder.forward_features(torch.rand(4, 1, 16, 16) * 2 - 1).detach()
    with torch.no_grad():
        expected = net.forward_features(features, tasks)
        fused = FusedColumns(net, tasks)(features)
    assert list(fused) == list(expected)
    for name, out in expected.items():
        torch.testing.assert_close(fused[name].logits, out.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused[name].embedding, out.embedding, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_predictor_averages_standalone_members_like_the_network(fuse: bool) -> None:
    """The predictor's split halves (encode in one thread, columns in another) carry the standalone
    members' own encoder maps along; a subset without their task, or standalone_members False, does
    not run them."""
    net = _trained_looking(TINY)
    plain = _trained_looking(TINY, [dataclasses.replace(SPECS[1], laterals=[])], seed=5)
    net.add_standalone("gender", plain)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = net.predict(x)
    predictor = FacePredictor(net, device="cpu", fuse_columns=fuse)
    got = np.stack([face.tasks["gender"].probabilities for face in predictor.predict(x)])
    np.testing.assert_allclose(got, expected["gender"].probabilities.numpy(), atol=1e-5)
    without = copy.deepcopy(net)
    without.drop_standalone("gender")
    with torch.no_grad():
        column_alone = without.predict(x)["gender"].probabilities.numpy()
    assert not np.allclose(got, column_alone, atol=1e-3)  # the member did count
    encoded = FacePredictor(net, device="cpu", tasks=["age"], fuse_columns=fuse).encode(x)
    assert all(not chunk.standalone for chunk in encoded.chunks)
    faster = FacePredictor(net, device="cpu", fuse_columns=fuse, standalone_members=False)
    alone = np.stack([face.tasks["gender"].probabilities for face in faster.predict(x)])
    np.testing.assert_allclose(alone, column_alone, atol=1e-5)  # the columns alone, members kept in the model
    assert len(faster.model.standalone["gender"]) == 1
    # the members on face 1 only (chunks of 2 faces: rows are the frame's, not the chunk's); faces 0
    # and 2 mix in their members' probabilities of an earlier call, as a pipeline does for a track
    full = FacePredictor(net, device="cpu", fuse_columns=fuse).predict(x)
    held = {i: {"gender": full[i].tasks["gender"].members} for i in (0, 2)}
    chunked = FacePredictor(net, device="cpu", fuse_columns=fuse, max_batch=2)
    partial = chunked.predict(x, standalone_rows=[1], held_members=held)
    for a, b in zip(full, partial, strict=True):
        for name in a.tasks:
            np.testing.assert_allclose(a.tasks[name].probabilities, b.tasks[name].probabilities, atol=1e-5)
        np.testing.assert_allclose(a.tasks["gender"].members, b.tasks["gender"].members, atol=1e-5)
    assert full[0].tasks["age"].members is None
    with pytest.raises(InferenceError, match="face 2: its 'gender' standalone members did not run"):
        chunked.predict(x, standalone_rows=[1], held_members={0: held[0]})
    with pytest.raises(InferenceError, match=r"standalone_rows must be within 0\.\.2"):
        chunked.predict(x, standalone_rows=[3])


def test_fused_columns_of_the_lite_model_in_channels_last() -> None:
    """The preset the node runs, in the memory layout the CPU predictor uses."""
    net = _trained_looking(get_config("lite"), seed=1)
    x = (torch.rand(3, 1, 64, 64) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        features = net.encoder.forward_features(x)
        expected = net.forward_features(features)
        fused = FusedColumns(net).to(memory_format=torch.channels_last)(features)
    for name, out in expected.items():
        torch.testing.assert_close(fused[name].logits, out.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_columns_keep_the_network_dtype(dtype: torch.dtype) -> None:
    """Half-precision networks (CUDA fp16) are folded in float32 and stored in their own dtype."""
    net = _trained_looking(TINY, seed=2)
    features = net.encoder.forward_features(torch.rand(4, 1, 16, 16) * 2 - 1).detach()
    with torch.no_grad():
        expected = net.forward_features(features)  # float32 reference
        fused = FusedColumns(net.to(dtype))
        assert {p.dtype for p in fused.parameters()} == {dtype}
        out = fused(features.to(dtype))
    tolerance = 1e-5 if dtype == torch.float64 else 0.1
    for name, reference in expected.items():
        torch.testing.assert_close(out[name].logits.float(), reference.logits, atol=tolerance, rtol=tolerance)


def test_predict_encoded_refuses_fused_columns_of_other_tasks() -> None:
    net = _trained_looking(TINY, seed=3)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        encoded = net.encode(x, ["age"])
        probabilities = net.predict_encoded(encoded, FusedColumns(net, ["age"]))
        assert list(probabilities) == ["age"]
        with pytest.raises(ModelError, match="the encoded batch asks for \\['age'\\]"):
            net.predict_encoded(encoded, FusedColumns(net, ["gender"]))


def test_fused_columns_refuse_a_network_in_training_mode() -> None:
    net = _trained_looking(TINY).train()
    with pytest.raises(ModelError, match="eval mode"):
        FusedColumns(net)
    with pytest.raises(ModelError, match="unknown task"):
        FusedColumns(net.eval(), ["nope"])


def test_fused_and_unfused_predictors_agree_on_the_shipped_model(real_faces: list[np.ndarray]) -> None:
    model, _meta = load_model(DEFAULT_MODEL)
    batch = preprocess_batch(real_faces, model.config.input_size)
    fused = FacePredictor(model, device="cpu").predict(batch)
    plain = FacePredictor(model, device="cpu", fuse_columns=False).predict(batch)
    assert len(fused) == len(plain) == len(real_faces)
    for a, b in zip(fused, plain, strict=True):
        assert list(a.tasks) == list(b.tasks) == model.task_names
        for name in a.tasks:
            np.testing.assert_allclose(a.tasks[name].probabilities, b.tasks[name].probabilities, atol=1e-4)
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-4)


def _top_level_ops(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(1 for event in prof.events() if event.cpu_parent is None)


def test_fused_columns_run_under_a_third_of_the_ops_on_the_shipped_model(capsys) -> None:
    """Why they exist: far fewer tensor ops (each one a Python dispatch holding the GIL)."""
    model, _meta = load_model(DEFAULT_MODEL)
    model.eval()
    with torch.inference_mode():
        features = model.encode(torch.rand(2, 1, 64, 64) * 2 - 1).features
        fused = FusedColumns(model)
        plain_ops = _top_level_ops(lambda: model.forward_features(features))
        fused_ops = _top_level_ops(lambda: fused(features))
    with capsys.disabled():
        print(f"\ntop-level aten ops, shipped model: one by one {plain_ops}, fused {fused_ops}")
    assert 0 < 3 * fused_ops < plain_ops
