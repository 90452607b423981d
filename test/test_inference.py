"""Inference API tests: per-task labels/probabilities, embeddings, checkpoints, hot swap."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY, one_thread  # noqa: F401 - one_thread is an autouse fixture

from facial_perception.core.checkpoint import CheckpointError, save_model
from facial_perception.core.inference import FacePrediction, FacePredictor, InferenceError
from facial_perception.core.preprocess import preprocess_batch
from facial_perception.core.progressive import ProgressiveNet, TaskSpec

SPECS = [
    TaskSpec("gender", ["male", "female"]),
    TaskSpec("emotion", ["neutral", "happy", "sad"], ["gender"]),
    TaskSpec("identity", ["ann", "bob", "cy", "dee"], ["gender"], kind="identity"),
]


def _net(seed: int) -> ProgressiveNet:
    torch.manual_seed(seed)
    net = ProgressiveNet(TINY, SPECS)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # spread the logits so that argmax is meaningful
    return net.eval()


def _reference(net: ProgressiveNet, batch: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = net(batch)
    probs = {n: torch.softmax(o.logits, 1).numpy() for n, o in out.items()}
    probs["_embedding"] = torch.nn.functional.normalize(out["identity"].embedding, dim=1).numpy()
    return probs


def _check(predictions: list[FacePrediction], reference: dict[str, np.ndarray]) -> None:
    for row, face in enumerate(predictions):
        assert list(face.tasks) == ["gender", "emotion", "identity"]
        for name, task in face.tasks.items():
            assert task.probabilities.shape == (len(task.labels),)
            assert task.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
            assert task.index == int(np.argmax(task.probabilities))
            assert task.label == task.labels[task.index]
            assert task.confidence == pytest.approx(float(task.probabilities.max()))
            np.testing.assert_allclose(task.probabilities, reference[name][row], atol=1e-5)
        assert face.embedding is not None and face.embedding.shape == (TINY.column.fc_dim,)
        assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(face.embedding, reference["_embedding"][row], atol=1e-5)


def test_predict_returns_labels_probabilities_and_unit_embeddings() -> None:
    net = _net(0)
    predictor = FacePredictor(net, device="cpu", max_batch=2)  # 5 faces -> chunks of 2, 2, 1
    batch = torch.rand(5, 1, 16, 16) * 2 - 1
    predictions = predictor.predict(batch)
    assert len(predictions) == 5
    _check(predictions, _reference(net, batch))
    assert predictor.predict(torch.empty(0, 1, 16, 16)) == []
    assert predictor.predict_images([]) == []
    # The caller's model is left alone (the predictor works on its own prepared copy).
    assert next(net.parameters()).dtype == torch.float32 and net.encoder.features[0].weight.is_contiguous()


def test_predict_images_uses_the_shared_preprocessing(real_faces: list[np.ndarray]) -> None:
    net = _net(1)
    predictor = FacePredictor(net, device="cpu")
    grey = real_faces[1].mean(axis=2).astype(np.uint8)
    images = [*real_faces, grey]
    predictions = predictor.predict_images(images)
    assert len(predictions) == 3
    _check(predictions, _reference(net, preprocess_batch(images, 16)))


def test_bad_inputs_give_one_clear_error() -> None:
    predictor = FacePredictor(_net(2), device="cpu")
    with pytest.raises(InferenceError, match=r"expects \(N, 1, 16, 16\)"):
        predictor.predict(torch.zeros(2, 1, 32, 32))
    with pytest.raises(InferenceError, match=r"\(N, C, H, W\)"):
        predictor.predict(torch.zeros(16, 16))
    with pytest.raises(InferenceError, match=r"torch\.Tensor"):
        predictor.predict(np.zeros((1, 1, 16, 16)))  # type: ignore[arg-type]
    with pytest.raises(InferenceError, match="needs a CUDA device"):
        FacePredictor(_net(2), device="cpu", half=True)
    with pytest.raises(InferenceError, match="unknown task"):
        FacePredictor(_net(2), device="cpu", tasks=["age"])
    with pytest.raises(InferenceError, match="no task columns"):
        FacePredictor(ProgressiveNet(TINY), device="cpu")


def test_task_subset_without_identity_has_no_embedding() -> None:
    predictor = FacePredictor(_net(3), device="cpu", tasks=["emotion"])
    (face,) = predictor.predict(torch.zeros(1, 1, 16, 16))
    assert list(face.tasks) == ["emotion"] and face.embedding is None
    assert predictor.task_names == ["emotion"]


def test_from_checkpoint_matches_the_in_memory_model(tmp_path: Path) -> None:
    net = _net(4)
    path = tmp_path / "m.safetensors"
    save_model(path, net, {"note": "test"})
    predictor = FacePredictor.from_checkpoint(path, device="cpu")
    assert predictor.metadata["training"] == {"note": "test"}
    batch = torch.rand(3, 1, 16, 16) * 2 - 1
    _check(predictor.predict(batch), _reference(net, batch))
    with pytest.raises(CheckpointError, match="not found"):
        FacePredictor.from_checkpoint(tmp_path / "missing.safetensors", device="cpu")


def test_mirror_averaging_from_a_checkpoint_and_switched_off(tmp_path: Path) -> None:
    net = _net(7)
    net.specs["emotion"].mirror_average = True  # a lateral target: its source gender stays faces-only
    assert not SPECS[1].mirror_average  # the network edits its own copy of the spec
    path = tmp_path / "m.safetensors"
    save_model(path, net)
    batch = torch.rand(3, 1, 16, 16) * 2 - 1
    plain, mirrored = _reference(net, batch), _reference(net, batch.flip(-1))
    expected = dict(plain, emotion=(plain["emotion"] + mirrored["emotion"]) / 2)
    _check(FacePredictor.from_checkpoint(path, device="cpu").predict(batch), expected)
    assert not np.allclose(expected["emotion"], plain["emotion"], atol=1e-4)
    faces_only = FacePredictor.from_checkpoint(path, device="cpu", mirror_average=False)
    _check(faces_only.predict(batch), plain)  # the node's mirror_average:=false


def test_set_model_hot_swaps_while_other_threads_predict() -> None:
    old, new = _net(5), _net(6)
    predictor = FacePredictor(old, device="cpu")
    batch = torch.rand(4, 1, 16, 16) * 2 - 1
    ref_old, ref_new = _reference(old, batch), _reference(new, batch)
    assert not np.allclose(ref_old["emotion"], ref_new["emotion"], atol=1e-3)
    errors: list[BaseException] = []
    seen: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                probs = np.stack([f.tasks["emotion"].probabilities for f in predictor.predict(batch)])
                if np.allclose(probs, ref_old["emotion"], atol=1e-5):
                    seen.append("old")
                elif np.allclose(probs, ref_new["emotion"], atol=1e-5):
                    seen.append("new")
                else:
                    seen.append("mixed")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    while not seen and not errors:
        threading.Event().wait(0.005)
    predictor.set_model(new)
    count = len(seen)
    while len(seen) < count + 4 and not errors:
        threading.Event().wait(0.005)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert "mixed" not in seen and seen[0] == "old" and seen[-1] == "new"
    _check(predictor.predict(batch), ref_new)


def test_encode_then_predict_encoded_equals_predict_and_keeps_its_model() -> None:
    """The two halves a pipeline runs in two threads; a swap in between cannot mix two models."""
    old, new = _net(8), _net(9)
    old.specs["emotion"].mirror_average = True
    predictor = FacePredictor(old, device="cpu", max_batch=2)  # 5 faces: three chunks
    batch = torch.rand(5, 1, 16, 16) * 2 - 1
    expected = predictor.predict(batch)
    encoded = predictor.encode(batch)
    assert encoded.count == 5 and len(encoded.chunks) == 3
    predictor.set_model(new)
    swapped = predictor.predict(batch)[0].tasks["emotion"].probabilities
    assert not np.allclose(swapped, expected[0].tasks["emotion"].probabilities, atol=1e-4)
    reference = {t: np.stack([f.tasks[t].probabilities for f in expected]) for t in expected[0].tasks}
    reference["_embedding"] = np.stack([f.embedding for f in expected])
    _check(predictor.predict_encoded(encoded), reference)  # the old model's answers, as encoded
    assert predictor.predict_encoded(predictor.encode(torch.zeros(0, 1, 16, 16))) == []
    with pytest.raises(InferenceError, match="expects \\(N, 1, 16, 16\\)"):
        predictor.encode(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("fuse", [True, False])
def test_a_subset_of_tasks_answers_as_the_whole_model_does(fuse: bool) -> None:
    """predict(batch, tasks): the pipeline runs the identity column on a crop framed for it; the
    subset (with its lateral sources run but not reported) must give the whole model's answers."""
    net = _net(3)
    predictor = FacePredictor(net, device="cpu", fuse_columns=fuse)
    batch = torch.rand(3, 1, TINY.input_size, TINY.input_size) * 2 - 1
    whole = predictor.predict(batch)
    named = predictor.predict(batch, ["identity"])
    faces = predictor.predict(batch, ["emotion", "gender"])
    for w, n, f in zip(whole, named, faces, strict=True):
        assert list(n.tasks) == ["identity"] and n.embedding is not None
        np.testing.assert_allclose(
            n.tasks["identity"].probabilities, w.tasks["identity"].probabilities, atol=1e-5
        )
        np.testing.assert_allclose(n.embedding, w.embedding, atol=1e-5)
        assert set(f.tasks) == {"gender", "emotion"} and f.embedding is None
        for task in ("gender", "emotion"):
            np.testing.assert_allclose(f.tasks[task].probabilities, w.tasks[task].probabilities, atol=1e-5)
    with pytest.raises(InferenceError, match="unknown task"):
        predictor.predict(batch, ["age"])
    with pytest.raises(InferenceError, match="unknown task"):
        predictor.predict(batch, [])
