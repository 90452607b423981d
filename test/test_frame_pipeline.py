"""FramePipeline end to end on real photos with a small untrained ProgressiveNet (real torch and detector)."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from data_fixtures import real_face_files
from PIL import Image

from facial_perception.core import inference
from facial_perception.core.checkpoint import DEFAULT_MODEL
from facial_perception.core.config import get_config
from facial_perception.core.preprocess import preprocess_batch
from facial_perception.core.progressive import ProgressiveNet, TaskSpec, default_task_specs
from facial_perception.pipeline.detection import make_detector
from facial_perception.pipeline.frame_pipeline import (
    FacePipelineError,
    FramePipeline,
    draw_annotations,
    overlapped,
)
from facial_perception.pipeline.framing import DETECTOR_FRAMINGS, Framing, framings_for
from facial_perception.pipeline.gallery import UNKNOWN, GalleryError, IdentityGallery
from facial_perception.pipeline.images import decode_raw, encode_raw
from facial_perception.pipeline.smoothing import PredictionSmoother
from facial_perception.pipeline.tracking import FaceTracker

TASKS = {"gender", "age", "emotion", "identity"}


class CountingPredictor(inference.FacePredictor):
    """The real predictor, recording the batch shape of every forward (to prove one batch per frame)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.batch_shapes: list[tuple[int, ...]] = []

    def predict(self, batch: torch.Tensor, tasks=None, **kwargs):  # type: ignore[override]
        self.batch_shapes.append(tuple(batch.shape))
        return super().predict(batch, tasks, **kwargs)


def _model(extra: list[TaskSpec] | None = None) -> ProgressiveNet:
    torch.manual_seed(0)
    model = ProgressiveNet(get_config("lite"), default_task_specs(num_identities=5))
    for spec in extra or []:
        model.add_column(spec)
    return model.eval()


@pytest.fixture(scope="module")
def predictor() -> CountingPredictor:
    return CountingPredictor(_model(), device="cpu")


@pytest.fixture(scope="module")
def detector():
    det = make_detector("blazeface_full", min_score=0.5)
    yield det
    det.close()


@pytest.fixture(scope="module")
def frame(real_faces: list[np.ndarray]) -> np.ndarray:
    """640x480 camera frame: the astronaut (smaller face, left) and Grace Hopper (larger face, right)."""
    canvas = np.full((480, 640, 3), 90, np.uint8)
    canvas[20:340, 10:330] = cv2.resize(real_faces[0], (320, 320))
    canvas[60:460, 300:640] = cv2.resize(real_faces[1], (340, 400))
    return canvas


def _pipeline(predictor, detector, **kwargs) -> FramePipeline:
    kwargs.setdefault("smoother", PredictionSmoother(alpha=1.0))
    return FramePipeline(predictor, detector, tracker=FaceTracker(max_missed=2), **kwargs)


def test_end_to_end_one_batch_per_frame(predictor, detector, frame: np.ndarray) -> None:
    pipeline = _pipeline(predictor, detector, framings=Framing(0.2, -0.08))
    assert pipeline.input_size == get_config("lite").input_size
    predictor.batch_shapes.clear()
    result = pipeline.process(frame, stamp=12.5)
    assert predictor.batch_shapes == [(2, 1, 64, 64)]  # both faces in ONE forward
    assert result.stamp == 12.5 and (result.width, result.height) == (640, 480)
    assert len(result.faces) == 2
    hopper, astronaut = result.faces  # largest first
    assert hopper.box[0] >= 300 and astronaut.box[2] <= 330
    assert [f.track_id for f in result.faces] == [1, 2]
    for face in result.faces:
        assert set(face.tasks) == TASKS
        for name, task in face.tasks.items():
            assert len(task.probabilities) == len(task.labels)
            assert task.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
            assert task.label == task.labels[int(np.argmax(task.probabilities))], name
            assert task.confidence == pytest.approx(float(task.probabilities.max()))
        assert face.identity == "" and face.identity_confidence == 0.0  # no gallery: identity off
        assert face.embedding is not None and np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
        assert np.allclose(face.box_normalized, face.box / np.array([640, 480, 640, 480]))
        assert 0.5 <= face.detection_score <= 1.0
        # Batching must not mix faces: same probabilities as this face alone through the model.
        alone = predictor.predict(preprocess_batch([pipeline.crop(frame, face.box)], 64))[0]
        for name in TASKS:
            assert np.allclose(face.tasks[name].probabilities, alone.tasks[name].probabilities, atol=1e-5)
    for stage in ("detect", "track", "preprocess", "model", "smooth", "total"):
        assert result.timings[stage] >= 0.0
    assert result.timings["total"] >= result.timings["model"]


def test_decoded_camera_buffer_and_empty_frames(predictor, detector, frame: np.ndarray) -> None:
    pipeline = _pipeline(predictor, detector)
    data, step = encode_raw(frame, "bgr8")
    rgb = decode_raw(data, 640, 480, step, "bgr8")
    result = pipeline.process(rgb, decode_ms=1.5)
    assert len(result.faces) == 2 and result.timings["decode"] == 1.5
    predictor.batch_shapes.clear()
    empty = pipeline.process(np.full((480, 640, 3), 90, np.uint8))
    assert empty.faces == [] and "model" not in empty.timings
    assert predictor.batch_shapes == []  # no model call without faces
    with pytest.raises(FacePipelineError, match="RGB uint8"):
        pipeline.process(np.zeros((480, 640), np.uint8))


def test_track_ids_and_smoothing_over_frames(predictor, detector, frame: np.ndarray) -> None:
    alpha = 0.3
    smoothed = _pipeline(predictor, detector, smoother=PredictionSmoother(alpha=alpha))
    raw = _pipeline(predictor, detector, smoother=PredictionSmoother(alpha=1.0))
    darker = (frame.astype(np.float32) * 0.6).astype(np.uint8)
    shifted = np.roll(darker, 6, axis=1)  # faces move 6 px to the right
    first_raw, second_raw = raw.process(frame), raw.process(shifted)
    first, second = smoothed.process(frame), smoothed.process(shifted)
    assert [f.track_id for f in second.faces] == [f.track_id for f in first.faces] == [1, 2]
    for a, b, s in zip(first_raw.faces, second_raw.faces, second.faces, strict=True):
        for name in ("gender", "emotion"):
            expected = alpha * b.tasks[name].probabilities + (1 - alpha) * a.tasks[name].probabilities
            assert np.allclose(s.tasks[name].probabilities, expected / expected.sum(), atol=1e-5)
        assert not np.allclose(b.tasks["emotion"].probabilities, a.tasks["emotion"].probabilities)

    # The astronaut leaves (covered); after max_missed=2 misses its state is dropped.
    covered = shifted.copy()
    covered[:, :340] = 90
    for _ in range(3):
        result = smoothed.process(covered)
        assert [f.track_id for f in result.faces] == [1]
    assert smoothed.smoother.tracked_ids == {1}
    # Comes back: a new track id.
    assert sorted(f.track_id for f in smoothed.process(shifted).faces) == [1, 3]


def test_gallery_enrolment_and_recognition(predictor, detector, frame: np.ndarray, tmp_path: Path) -> None:
    gallery = IdentityGallery(tmp_path / "people.db", threshold=0.99)
    pipeline = _pipeline(predictor, detector, gallery=gallery, smoother=PredictionSmoother(alpha=0.5))
    before = pipeline.process(frame)
    assert all(f.identity == UNKNOWN for f in before.faces)  # empty gallery

    collector = pipeline.start_enrolment("grace", frames=3)  # largest face: Hopper, track 1
    for _ in range(3):
        pipeline.process(frame)
    assert collector.wait(0) and collector.ok, collector.error
    assert collector.track_id == 1 and collector.count == 3
    assert gallery.counts() == {"grace": 3} and gallery.image_count() == 0

    after = pipeline.process(frame)
    hopper, astronaut = after.faces
    assert hopper.identity == "grace" and hopper.identity_confidence >= 0.99
    # The untrained model's embeddings decide the astronaut; the open-set rule must hold either way.
    similarity = float(gallery.match(astronaut.embedding)[1])
    assert astronaut.identity == ("grace" if similarity >= 0.99 else UNKNOWN)
    assert astronaut.identity_confidence == pytest.approx(similarity, abs=1e-6)

    lost = pipeline.start_enrolment("ghost", frames=2, track_id=99)
    pipeline.process(frame)
    assert lost.done and not lost.ok and "track 99" in lost.error
    late = pipeline.start_enrolment("late", frames=5, timeout_s=0.0)
    pipeline.process(frame)
    assert late.done and "timed out" in late.error
    cancelled = pipeline.start_enrolment("nobody", frames=5)
    cancelled.cancel("operator cancelled")
    pipeline.process(frame)
    assert cancelled.error == "operator cancelled" and "nobody" not in gallery
    waiting = [pipeline.start_enrolment(n, frames=5) for n in ("first", "second")]
    assert pipeline.cancel_enrolments("camera stopped") == 2 and pipeline.cancel_enrolments("again") == 0
    assert all(c.wait(0) and c.error == "camera stopped" for c in waiting)
    pipeline.process(frame)
    assert "first" not in gallery and "second" not in gallery
    with pytest.raises(FacePipelineError, match="non-empty name"):
        pipeline.start_enrolment("  ", frames=2)
    with pytest.raises(FacePipelineError, match="no gallery"):
        _pipeline(predictor, detector).start_enrolment("x", frames=2)
    gallery.close()


def test_a_gallery_of_another_model_is_refused_up_front(predictor, detector, tmp_path: Path) -> None:
    """Another model's embeddings (another length) would fail every match: one error at the start."""
    gallery = IdentityGallery(tmp_path / "other_model.db")
    assert predictor.embedding_dim == 128
    assert _pipeline(predictor, detector, gallery=gallery).gallery is gallery  # empty: any model fits
    rng = np.random.default_rng(0)
    gallery.enrol("ada", rng.normal(size=(2, 640)).astype(np.float32))
    with pytest.raises(GalleryError, match="holds 640-d embeddings of another model, this model makes 128-d"):
        _pipeline(predictor, detector, gallery=gallery)
    ensemble = _model()
    ensemble.join_members("identity", [_model().columns["identity"]] * 4)  # 5 x 128 = 640-d, fits
    fitting = _pipeline(inference.FacePredictor(ensemble, device="cpu"), detector, gallery=gallery)
    with pytest.raises(GalleryError, match="this model makes 128-d"):
        fitting.set_predictor(predictor)
    assert fitting.predictor.embedding_dim == 640 and gallery.counts() == {"ada": 2}  # nothing changed
    gallery.close()


def test_a_gallery_of_another_model_of_the_same_length_is_refused_too(
    predictor, detector, real_faces: list[np.ndarray], tmp_path: Path
) -> None:
    """Same embedding length, other weights: the fingerprint the first enrolment stored tells them apart,
    while a hot swap that only adds a task keeps the gallery."""
    gallery = IdentityGallery(tmp_path / "people.db")
    pipeline = _pipeline(predictor, detector, gallery=gallery)
    embeddings, crops = pipeline.embed_faces(real_faces)
    assert pipeline.enrol("grace", embeddings[1:], crops[1:]) == 1
    assert (
        gallery.fingerprint == predictor.embedding_fingerprint == _model().embedding_fingerprint("identity")
    )
    torch.manual_seed(1)
    retrained = ProgressiveNet(get_config("lite"), default_task_specs(num_identities=5)).eval()
    other = inference.FacePredictor(retrained, device="cpu")
    assert other.embedding_dim == predictor.embedding_dim
    with pytest.raises(GalleryError, match="enrolled with another model"):
        _pipeline(other, detector, gallery=gallery)
    with pytest.raises(GalleryError, match="enrolled with another model"):
        pipeline.set_predictor(other)
    bigger = inference.FacePredictor(_model([TaskSpec("glasses", ["no", "yes"], ["identity"])]), device="cpu")
    pipeline.set_predictor(bigger)
    assert pipeline.enrol("ada", embeddings[:1]) == 1 and gallery.counts() == {"ada": 1, "grace": 1}
    with pytest.raises(FacePipelineError, match="no gallery"):
        _pipeline(predictor, detector).enrol("ada", embeddings[:1])
    gallery.close()


def test_identity_columns_see_a_crop_framed_for_them(
    predictor, detector, frame: np.ndarray, tmp_path
) -> None:
    """With the detector's measured framings the face-attribute columns see the tight crop and the
    identity column the looser one (one forward each); enrolment keeps the identity crops."""
    assert framings_for(detector) == DETECTOR_FRAMINGS["blazeface_full"]
    gallery = IdentityGallery(tmp_path / "people.db")
    pipeline = _pipeline(predictor, detector, gallery=gallery)
    assert pipeline.framings == DETECTOR_FRAMINGS["blazeface_full"] and not pipeline.framings.single
    collector = pipeline.start_enrolment("grace", frames=1)
    predictor.batch_shapes.clear()
    result = pipeline.process(frame)
    assert sorted(predictor.batch_shapes) == [(2, 1, 64, 64), (2, 1, 64, 64)]
    for face in result.faces:
        tight = predictor.predict(preprocess_batch([pipeline.crop(frame, face.box)], 64))[0]
        loose = predictor.predict(preprocess_batch([pipeline.crop_identity(frame, face.box)], 64))[0]
        assert not np.allclose(tight.embedding, loose.embedding, atol=1e-3)  # the two crops differ
        for name in ("gender", "age", "emotion"):
            np.testing.assert_allclose(
                face.tasks[name].probabilities, tight.tasks[name].probabilities, atol=1e-5
            )
        np.testing.assert_allclose(
            face.tasks["identity"].probabilities, loose.tasks["identity"].probabilities, atol=1e-5
        )
        np.testing.assert_allclose(face.embedding, loose.embedding, atol=1e-5)
    assert list(result.faces[0].tasks) == predictor.task_names
    assert collector.wait(0) and collector.ok, collector.error
    np.testing.assert_array_equal(collector.crops[0], pipeline.crop_identity(frame, result.faces[0].box))
    # enrolment from files uses the identity framing too
    embeddings, crops = pipeline.embed_faces([frame])
    np.testing.assert_array_equal(crops[0], collector.crops[0])
    np.testing.assert_allclose(embeddings[0], result.faces[0].embedding, atol=1e-5)
    # one Framing: one crop and one forward for every column
    single = _pipeline(predictor, detector, framings=Framing(0.18, -0.07))
    predictor.batch_shapes.clear()
    same = single.process(frame)
    assert predictor.batch_shapes == [(2, 1, 64, 64)]
    np.testing.assert_allclose(same.faces[0].embedding, result.faces[0].embedding, atol=1e-5)
    with pytest.raises(FacePipelineError, match="CropFramings or a Framing"):
        _pipeline(predictor, detector, framings=(0.1, 0.0))
    gallery.close()


def test_identity_every_nth_frame_of_a_track(predictor, detector, frame: np.ndarray, tmp_path) -> None:
    """identity_every=3: the identity crop goes through the model on a track's 1st and 4th frame only; in
    between the track's last identity stands, and enrolment counts only the frames computed anew."""
    gallery = IdentityGallery(tmp_path / "people.db")
    every = _pipeline(predictor, detector, gallery=gallery, identity_every=3)
    always = _pipeline(predictor, detector)
    collector = every.start_enrolment("grace", frames=2)
    shifted = np.roll(frame, 8, axis=1)  # another crop of the same faces: other identity outputs
    shapes = []
    for i, rgb in enumerate([frame, shifted, shifted, shifted]):
        predictor.batch_shapes.clear()
        got, want = every.process(rgb), always.process(rgb)
        shapes.append(list(predictor.batch_shapes))
        for a, b in zip(got.faces, want.faces, strict=True):
            np.testing.assert_allclose(
                a.tasks["gender"].probabilities, b.tasks["gender"].probabilities, atol=1e-5
            )
            same = np.allclose(a.embedding, b.embedding, atol=1e-6)
            assert same == (i in (0, 3)), i  # frames 2 and 3 keep frame 1's identity
            assert a.identity_fresh == (i in (0, 3)) and b.identity_fresh, i
        assert collector.done == (i == 3)  # two fresh identity frames: the 1st and the 4th
    # all four frames: faces + identity; the middle two only the faces (the 'always' pipeline adds its own)
    assert [len(s) for s in shapes] == [4, 3, 3, 4]
    assert collector.ok and gallery.counts() == {"grace": 2}
    # a benchmark's model-only call does the same work: identity crops only for the faces due
    boxes = [face.box for face in got.faces]
    batch = preprocess_batch([every.crop(frame, box) for box in boxes], 64)
    named = preprocess_batch([every.crop_identity(frame, box) for box in boxes], 64)
    predictor.batch_shapes.clear()
    out = every.run_model(batch, named, identity_rows=1)
    assert predictor.batch_shapes == [(2, 1, 64, 64), (1, 1, 64, 64)]
    assert "identity" in out[0].tasks and out[0].embedding is not None
    assert "identity" not in out[1].tasks and "gender" in out[1].tasks
    with pytest.raises(FacePipelineError, match="identity_rows"):
        every.run_model(batch, named, identity_rows=3)
    with pytest.raises(FacePipelineError, match="identity_every"):
        _pipeline(predictor, detector, identity_every=0)
    gallery.close()


def test_standalone_members_every_nth_frame_of_a_track(detector, frame: np.ndarray) -> None:
    """standalone_every=3: a standalone member (an encoder of its own) runs on a track's 1st and 4th
    frame only; in between its probabilities of the 1st frame are mixed with the column's fresh ones.
    The encoder stage plans the same, and encodes again when the held probabilities are gone."""
    # the shipped model: its gender column has a standalone member (an untrained one would answer
    # about the same for every face)
    predictor = CountingPredictor.from_checkpoint(DEFAULT_MODEL, device="cpu")
    assert list(predictor.model.standalone) == ["gender"]
    every = _pipeline(predictor, detector, standalone_every=3)
    staged = _pipeline(predictor, detector, standalone_every=3)
    always = _pipeline(predictor, detector)
    shifted = np.roll(frame, 8, axis=1)  # another crop of the same faces: other outputs
    for i, rgb in enumerate([frame, shifted, shifted, shifted]):
        got, want = every.process(rgb), always.process(rgb)
        three = staged.complete(staged.encode(staged.prepare(rgb)))
        assert len(got.faces) == len(want.faces) == len(three.faces) == 2
        for a, b, c in zip(got.faces, want.faces, three.faces, strict=True):
            same = np.allclose(a.tasks["gender"].probabilities, b.tasks["gender"].probabilities, atol=1e-5)
            assert same == (i in (0, 3)), i  # frames 2 and 3 mix in frame 1's member
            assert a.members_fresh == (i in (0, 3)) and b.members_fresh and c.members_fresh == a.members_fresh
            for name in ("age", "emotion"):  # columns without members: always fresh
                np.testing.assert_allclose(
                    a.tasks[name].probabilities, b.tasks[name].probabilities, atol=1e-5
                )
            np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
            np.testing.assert_allclose(
                c.tasks["gender"].probabilities, a.tasks["gender"].probabilities, atol=1e-5
            )
    # held probabilities gone between the stages (reset): the frame is encoded again, members fresh
    prepared = staged.encode(staged.prepare(shifted))
    assert prepared.member_rows == []  # 5th frame of both tracks: nothing due
    staged.reset()
    again = staged.complete(prepared)
    assert all(face.members_fresh for face in again.faces)
    for a, b in zip(again.faces, want.faces, strict=True):
        np.testing.assert_allclose(
            a.tasks["gender"].probabilities, b.tasks["gender"].probabilities, atol=1e-5
        )
    # a benchmark's model-only call does the same work: the members only on the first member_rows faces
    boxes = [face.box for face in want.faces]
    batch = preprocess_batch([every.crop(shifted, box) for box in boxes], every.input_size)
    named = preprocess_batch([every.crop_identity(shifted, box) for box in boxes], every.input_size)
    full, part = every.run_model(batch, named), every.run_model(batch, named, member_rows=1)
    np.testing.assert_allclose(
        full[0].tasks["gender"].probabilities, part[0].tasks["gender"].probabilities, atol=1e-5
    )
    np.testing.assert_allclose(part[1].tasks["gender"].members, [0.5, 0.5])  # stand-ins: same work
    with pytest.raises(FacePipelineError, match="member_rows"):
        every.run_model(batch, named, member_rows=3)
    with pytest.raises(FacePipelineError, match="standalone_every"):
        _pipeline(predictor, detector, standalone_every=0)


def test_face_columns_every_nth_frame_of_a_track(detector, frame: np.ndarray) -> None:
    """attributes_every=2: the face columns (the shared encoder, every column but the identity ones on
    their own crop, and their standalone members) run on a track's 1st, 3rd, 5th... frame; in between
    the track's last predictions stand. The identity crop keeps its own schedule, the three-stage path
    plans the same, and a frame whose held predictions are gone (reset) runs the columns again."""
    predictor = CountingPredictor.from_checkpoint(DEFAULT_MODEL, device="cpu")
    every = _pipeline(predictor, detector, attributes_every=2, standalone_every=3)
    staged = _pipeline(predictor, detector, attributes_every=2, standalone_every=3)
    always = _pipeline(predictor, detector, standalone_every=3)
    shifted = np.roll(frame, 8, axis=1)  # another crop of the same faces: other outputs
    last_run = None
    for i, rgb in enumerate([frame, shifted, shifted, frame, frame]):
        predictor.batch_shapes.clear()
        got = every.process(rgb)
        calls = len(predictor.batch_shapes)
        want = always.process(rgb)
        three = staged.complete(staged.encode(staged.prepare(rgb)))
        assert len(got.faces) == len(want.faces) == len(three.faces) == 2
        due = i % 2 == 0
        assert calls == (2 if due else 1), i  # the identity crops on every frame, the faces when due
        last_run = want if due else last_run
        for a, b, c, held in zip(got.faces, want.faces, three.faces, last_run.faces, strict=True):
            assert a.attributes_fresh == c.attributes_fresh == due and b.attributes_fresh, i
            assert a.identity_fresh and c.identity_fresh
            np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)  # identity: its own schedule
            for name in ("age", "emotion", "gender"):  # this frame's (due) or the last due frame's
                np.testing.assert_allclose(
                    a.tasks[name].probabilities, held.tasks[name].probabilities, atol=1e-5
                )
                np.testing.assert_allclose(
                    c.tasks[name].probabilities, a.tasks[name].probabilities, atol=1e-5
                )
    # held predictions gone between the stages (reset): the frame runs the face columns again
    prepared = staged.encode(staged.prepare(shifted))
    assert prepared.attribute_rows == [] and prepared.encoded is None  # 6th frame: nothing due
    staged.reset()
    again = staged.complete(prepared)
    reference = _pipeline(predictor, detector).process(shifted)
    assert all(face.attributes_fresh for face in again.faces)
    for a, b in zip(again.faces, reference.faces, strict=True):
        for name in ("age", "emotion"):
            np.testing.assert_allclose(a.tasks[name].probabilities, b.tasks[name].probabilities, atol=1e-5)
    with pytest.raises(FacePipelineError, match="attributes_every"):
        _pipeline(predictor, detector, attributes_every=0)


def test_held_members_give_way_when_the_column_changes_its_mind(detector, real_faces) -> None:
    """Another person steps into a running track: the column's own answer differs from the one it gave
    when the member ran, so that frame gets the column alone and the member runs again on the next."""
    predictor = inference.FacePredictor.from_checkpoint(DEFAULT_MODEL, device="cpu")
    every = _pipeline(predictor, detector, standalone_every=3)
    always = _pipeline(predictor, detector)

    def scene(face: np.ndarray) -> np.ndarray:
        canvas = np.full((480, 640, 3), 90, np.uint8)
        canvas[60:460, 200:540] = cv2.resize(face, (340, 400))
        return canvas

    def column(rgb: np.ndarray) -> np.ndarray | None:  # what the gender column alone says of the face
        faces = _pipeline(predictor, detector).process(rgb).faces
        if len(faces) != 1:
            return None
        batch = preprocess_batch([every.crop(rgb, faces[0].box)], every.input_size)
        return every.run_model(batch)[0].tasks["gender"].column

    astronaut = scene(real_faces[0])  # the column: a woman
    assert np.argmax(column(astronaut)) == 1
    # a man the column calls a man, among the first UTKFace photos of men (file names: age_gender_race_...)
    men = [p for p in real_face_files("utkface", 30) if p.name.split("_")[1] == "0"]
    scenes = (scene(np.asarray(Image.open(p).convert("RGB"))) for p in men)
    man = next(rgb for rgb in scenes if (said := column(rgb)) is not None and np.argmax(said) == 0)
    first = every.process(astronaut)
    always.process(astronaut)
    second, third = every.process(man), every.process(man)
    always.process(man)
    reference = always.process(man)
    track = first.faces[0].track_id
    assert [f.track_id for f in (*second.faces, *third.faces)] == [track] * 2  # the same track goes on
    assert not second.faces[0].members_fresh  # the 2nd frame of the track: the member is not due...
    np.testing.assert_allclose(second.faces[0].tasks["gender"].probabilities, column(man), atol=1e-5)
    assert third.faces[0].members_fresh  # ...and runs again on the 3rd, out of its schedule
    np.testing.assert_allclose(
        third.faces[0].tasks["gender"].probabilities,
        reference.faces[0].tasks["gender"].probabilities,
        atol=1e-5,
    )


def test_embed_faces_for_enrolment_from_files(predictor, detector, real_faces: list[np.ndarray]) -> None:
    pipeline = _pipeline(predictor, detector)
    embeddings, crops = pipeline.embed_faces(real_faces)
    assert embeddings.shape[0] == 2 and embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert all(c.ndim == 3 and c.shape[0] == c.shape[1] for c in crops)
    with pytest.raises(FacePipelineError, match="no face found in image 1"):
        pipeline.embed_faces([real_faces[0], np.zeros((480, 640, 3), np.uint8)])
    # a tight dataset crop (too little context for the detector) is padded and found
    lfw = np.asarray(Image.open(real_face_files("lfw", 1)[0]).convert("RGB"))
    assert lfw.shape[:2] == (112, 112)
    assert pipeline.embed_faces([lfw])[0].shape[0] == 1
    with pytest.raises(FacePipelineError, match="no face found in image 0"):
        pipeline.embed_faces([np.full((112, 112, 3), 90, np.uint8)])
    assert pipeline.tracker.tracks == []  # file enrolment leaves tracking alone


def test_hot_swap_adds_a_task(predictor, detector, frame: np.ndarray) -> None:
    pipeline = _pipeline(predictor, detector, smoother=PredictionSmoother(alpha=0.5))
    assert set(pipeline.process(frame).faces[0].tasks) == TASKS
    bigger = inference.FacePredictor(_model([TaskSpec("glasses", ["no", "yes"], ["gender"])]), device="cpu")
    pipeline.set_predictor(bigger)
    result = pipeline.process(frame)
    assert set(result.faces[0].tasks) == TASKS | {"glasses"}
    assert [f.track_id for f in result.faces] == [1, 2]  # tracks survive the swap
    alone = bigger.predict(preprocess_batch([pipeline.crop(frame, result.faces[0].box)], 64))[0]
    # Smoothing restarted at the swap: the first frame after it is the raw prediction.
    assert np.allclose(
        result.faces[0].tasks["glasses"].probabilities, alone.tasks["glasses"].probabilities, atol=1e-5
    )


def test_draw_annotations(predictor, detector, frame: np.ndarray) -> None:
    pipeline = _pipeline(predictor, detector)
    data, step = encode_raw(frame, "rgb8")
    read_only = decode_raw(data, 640, 480, step, "rgb8")  # zero-copy view of immutable bytes
    result = pipeline.process(read_only)
    drawn = draw_annotations(read_only, result)
    assert drawn.shape == frame.shape and drawn.dtype == np.uint8
    assert np.array_equal(read_only, frame)  # input untouched
    for face in result.faces:
        x1, y1, x2, _ = (round(float(v)) for v in face.box)
        assert not np.array_equal(drawn[y1, x1:x2], frame[y1, x1:x2])  # box edge drawn
        nose_x, nose_y = (round(float(v)) for v in face.keypoints[2])
        assert not np.array_equal(drawn[nose_y, nose_x], frame[nose_y, nose_x])  # key-points drawn
    empty = draw_annotations(frame, pipeline.process(np.full((480, 640, 3), 90, np.uint8)))
    assert np.array_equal(empty, frame)


def test_known_identity_fallback_only_above_threshold(predictor, detector, frame, tmp_path) -> None:
    """The gallery does not know these faces: a confident identity-column class names them instead."""
    gallery = IdentityGallery(tmp_path / "empty.db", threshold=0.5)
    never = _pipeline(predictor, detector, gallery=gallery, known_identity_threshold=1.01).process(frame)
    assert [f.identity for f in never.faces] == ["unknown", "unknown"]
    always = _pipeline(predictor, detector, gallery=gallery, known_identity_threshold=0.0).process(frame)
    for face in always.faces:
        column = face.tasks["identity"]
        assert face.identity == column.label and face.identity_confidence == pytest.approx(column.confidence)
    gallery.close()


# ------------------------------------------------------------------------------------ overlapped stages
def _square_slowly(x: int) -> int:
    time.sleep(0.002 * (x % 3))  # uneven stage times must not reorder anything
    return x * x


def test_overlapped_keeps_order_and_runs_ahead() -> None:
    seen: list[int] = []

    def stage(x: int) -> int:
        seen.append(x)
        return _square_slowly(x)

    out = []
    for item, value in overlapped(range(20), stage):
        time.sleep(0.003)  # a slow consumer: the first stage is already working on the next item
        out.append((item, value))
        assert len(seen) >= len(out)
    assert out == [(i, i * i) for i in range(20)]


def test_overlapped_raises_a_stage_error_at_its_turn() -> None:
    def stage(x: int) -> int:
        if x == 3:
            raise ValueError("bad frame 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad frame 3"):
        for item, _ in overlapped(range(10), stage):
            got.append(item)
    assert got == [0, 1, 2]


def test_overlapped_stops_its_thread_when_the_consumer_stops() -> None:
    before = threading.active_count()
    gen = overlapped(itertools.count(), lambda x: x)
    assert [v for _, v in itertools.islice(gen, 5)] == [0, 1, 2, 3, 4]
    gen.close()
    deadline = time.monotonic() + 5.0
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_overlapped_passes_on_a_failing_source() -> None:
    def source():
        yield 1
        raise OSError("truncated file")

    with pytest.raises(OSError, match="truncated file"):
        list(overlapped(source(), lambda x: x))


def test_prepare_then_complete_equals_process(predictor, detector, frame: np.ndarray) -> None:
    one = FramePipeline(predictor, detector)
    two = FramePipeline(predictor, detector)
    for _ in range(3):
        a = one.process(frame)
        b = two.complete(two.prepare(frame))
        assert [f.track_id for f in a.faces] == [f.track_id for f in b.faces]
        for fa, fb in zip(a.faces, b.faces, strict=True):
            np.testing.assert_allclose(fa.box, fb.box)
            for task in fa.tasks:
                np.testing.assert_allclose(
                    fa.tasks[task].probabilities, fb.tasks[task].probabilities, atol=1e-6
                )


def test_encode_stage_between_prepare_and_complete_changes_nothing(predictor, detector, frame) -> None:
    """prepare -> encode -> complete (three threads in the node) equals process; a model swapped after
    the encoder ran is not mixed with the encoded features: complete runs the new model."""
    one, three = FramePipeline(predictor, detector), FramePipeline(predictor, detector)
    for _ in range(2):
        a = one.process(frame)
        prepared = three.encode(three.prepare(frame))
        assert prepared.encoded is not None and "encode" in prepared.timings
        # two framings: the face columns' crop is encoded here, the identity crop in complete()
        assert prepared.encoded.faces is not None and prepared.encoded.identity is None
        b = three.complete(prepared)
        assert [f.track_id for f in a.faces] == [f.track_id for f in b.faces] == [1, 2]
        for fa, fb in zip(a.faces, b.faces, strict=True):
            for task, answer in fa.tasks.items():
                np.testing.assert_allclose(answer.probabilities, fb.tasks[task].probabilities, atol=1e-6)
            np.testing.assert_allclose(fa.embedding, fb.embedding, atol=1e-6)
    empty = three.encode(three.prepare(np.full((480, 640, 3), 90, np.uint8)))
    assert empty.encoded is None and three.complete(empty).faces == []
    # identity columns only: then their crop is encoded in this stage
    named = inference.FacePredictor(_model(), device="cpu", tasks=["identity"])
    solo_one, solo_three = FramePipeline(named, detector), FramePipeline(named, detector)
    a, prepared = solo_one.process(frame), solo_three.encode(solo_three.prepare(frame))
    assert prepared.encoded.faces is None and prepared.encoded.rows == [0, 1]
    b = solo_three.complete(prepared)
    for fa, fb in zip(a.faces, b.faces, strict=True):
        assert list(fb.tasks) == ["identity"]
        np.testing.assert_allclose(fa.embedding, fb.embedding, atol=1e-6)
    other = inference.FacePredictor(_model([TaskSpec("glasses", ["no", "yes"], ["gender"])]), device="cpu")
    prepared = three.encode(three.prepare(frame))
    three.set_predictor(other)
    result = three.complete(prepared)
    assert set(result.faces[0].tasks) == TASKS | {"glasses"}
    alone = other.predict(prepared.batch)[0]
    np.testing.assert_allclose(
        result.faces[0].tasks["gender"].probabilities, alone.tasks["gender"].probabilities, atol=1e-6
    )


class CountingDetector:
    """The real detector, counting the frames it is run on."""

    def __init__(self, detector) -> None:
        self.detector, self.calls = detector, 0

    def detect(self, rgb: np.ndarray):
        self.calls += 1
        return self.detector.detect(rgb)


def test_detect_every_runs_the_detector_on_every_nth_frame_and_tracks_between(
    predictor, detector, frame: np.ndarray
) -> None:
    counting = CountingDetector(detector)
    pipeline = _pipeline(predictor, counting, detect_every=3)
    moving = [np.roll(frame, 6 * i, axis=1) for i in range(7)]  # the faces move 6 px right per frame
    results = [pipeline.process(f) for f in moving]
    assert counting.calls == 3  # frames 0, 3 and 6
    assert [[face.track_id for face in r.faces] for r in results] == [[1, 2]] * 7
    x = [[float(face.box[0]) for face in r.faces] for r in results]
    assert x[1] == x[0]  # no motion known yet after one detection
    assert all(a < b for a, b in zip(x[3], x[4], strict=True))  # after two: the faces move on
    for r in results:
        assert all(face.tasks["emotion"].probabilities.sum() == pytest.approx(1.0) for face in r.faces)
    # the same frames, detected every frame: same faces and ids on the detected frames
    every = _pipeline(predictor, detector)
    reference = [every.process(f) for f in moving]
    for i in (0, 3, 6):
        for a, b in zip(results[i].faces, reference[i].faces, strict=True):
            assert a.track_id == b.track_id and np.allclose(a.box, b.box)
    pipeline.reset()  # a new sequence starts with a detection
    pipeline.process(frame)
    assert counting.calls == 4
    with pytest.raises(FacePipelineError, match="detect_every must be >= 1"):
        _pipeline(predictor, detector, detect_every=0)
