"""Bag tooling: make labelled bags from real faces, evaluate them offline, reject bad bags cleanly.

Real parts only: real face photos (skimage astronaut, matplotlib Grace Hopper) and real UTKFace
files, real rosbags sqlite3/mcap storage, the real BlazeFace detector and a real (tiny, untrained)
torch model behind ``FacePredictor``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facial_perception.bags.bag_io import (
    FACE_ARRAY_TYPE,
    FACES_TOPIC,
    GROUND_TRUTH_TOPIC,
    BagError,
    BagReader,
    BagWriter,
    GroundTruthFace,
    GroundTruthFrame,
    get_typestore,
    stamp_to_ns,
)
from facial_perception.bags.evaluate_bag import BagEvaluator, PredictedFace, evaluate_offline, match_faces
from facial_perception.bags.make_bag import MakeBagOptions, make_bag
from facial_perception.bags.report import write_report

REPO = Path(__file__).resolve().parents[1]
#: Face boxes (x0, y0, x1, y1) in the two photos of the ``real_faces`` fixture.
FACE_BOXES = [(178, 83, 273, 178), (171, 147, 366, 341)]
PEOPLE = ["astronaut", "hopper"]
#: Crops keep 30 % of the face side around the face, so the face is this part of each crop.
MARGIN = 0.3
REGION = (
    MARGIN / (1 + 2 * MARGIN),
    MARGIN / (1 + 2 * MARGIN),
    (1 + MARGIN) / (1 + 2 * MARGIN),
    (1 + MARGIN) / (1 + 2 * MARGIN),
)


@pytest.fixture(scope="module")
def people_dataset(tmp_path_factory: pytest.TempPathFactory, real_faces: list[np.ndarray]) -> Path:
    """Identity folders ``<name>/<name>_000N.jpg``: 3 slightly varied crops of each real face."""
    root = tmp_path_factory.mktemp("people")
    for name, image, (x0, y0, x1, y1) in zip(PEOPLE, real_faces, FACE_BOXES, strict=True):
        side = x1 - x0
        m = round(MARGIN * side)
        crop = image[max(y0 - m, 0) : y1 + m, max(x0 - m, 0) : x1 + m]
        (root / name).mkdir()
        for i, gain in enumerate((1.0, 0.85, 1.15)):
            varied = np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{name}_{i + 1:04d}.jpg"), varied[..., ::-1])
    return root


@pytest.fixture(scope="module")
def utk_dataset(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> Path:
    """12 real UTKFace files (labels in the names), of several races and both genders."""
    root = tmp_path_factory.mktemp("utk")
    files = sorted((shared_datasets / "utkface").glob("*.jpg"))
    picked: dict[tuple[str, str], int] = {}
    for path in files:
        _, gender, race = path.name.split("_")[:3]
        if picked.get((gender, race), 0) < 2 and len(list(root.iterdir())) < 12:
            picked[(gender, race)] = picked.get((gender, race), 0) + 1
            shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="module")
def predictor(people_dataset: Path):
    """A tiny untrained model (lite encoder) with an identity-like classifier over the two people."""
    import torch

    from facial_perception.core.config import get_config
    from facial_perception.core.inference import FacePredictor
    from facial_perception.core.progressive import ProgressiveNet, TaskSpec

    torch.manual_seed(0)
    specs = [
        TaskSpec("identity", PEOPLE, [], kind="classification"),
        TaskSpec("gender", ["male", "female"], ["identity"]),
    ]
    model = ProgressiveNet(get_config("lite"), specs).eval()
    return FacePredictor(model, device="cpu")


def _pipeline(predictor):
    from facial_perception.bags.evaluate_bag import PipelineSettings, build_pipeline

    return build_pipeline(PipelineSettings(), predictor)


def _opts(storage: str, image_type: str, **kw) -> MakeBagOptions:
    base = dict(
        storage=storage,
        image_type=image_type,
        frames=12,
        faces_per_frame=(1, 2),
        face_size=(120, 160),
        track_length=4,
        motion=2.0,
        background="blur",
        face_region=REGION,
        seed=3,
    )
    base.update(kw)
    return MakeBagOptions(**base)


# ------------------------------------------------------------------------------------------------ make


@pytest.mark.parametrize("storage,image_type", [("sqlite3", "raw"), ("mcap", "compressed")])
def test_make_bag_writes_images_and_matching_ground_truth(tmp_path, people_dataset, storage, image_type):
    out = tmp_path / "bag"
    summary = make_bag(people_dataset, out, ["identity"], _opts(storage, image_type), progress=False)
    assert summary.frames == 12 and summary.tasks == ["identity"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    with BagReader(out, storage) as reader:
        assert reader.storage == storage
        topic = reader.image_topic()
        assert reader.topics[topic].endswith("CompressedImage" if image_type == "compressed" else "/Image")
        gt = reader.read_ground_truth()
        stamps = [im.stamp_ns for im in reader.images(topic)]
    assert stamps == sorted(gt) and len(stamps) == 12
    faces = [f for frame in gt.values() for f in frame.faces]
    assert summary.faces == len(faces)
    for frame in gt.values():
        assert 1 <= len(frame.faces) <= 2
        boxes = [f.box for f in frame.faces]
        assert not match_faces(boxes[:1], boxes[1:], 0.01), "pasted faces overlap"
        for face in frame.faces:
            x0, y0, x1, y1 = face.box
            assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
            assert face.labels["identity"] in PEOPLE
            assert face.attributes["person"] == face.labels["identity"]
        # the file names in `source` name the labelled people, in order
        assert [s.split("/")[0] for s in frame.source.split(",")] == [
            f.labels["identity"] for f in frame.faces
        ]
    # each ground-truth track lasts track_length frames
    lengths: dict[str, int] = {}
    for face in faces:
        lengths[face.track] = lengths.get(face.track, 0) + 1
    assert set(lengths.values()) == {4} and len(lengths) == summary.tracks


def test_make_bag_failure_leaves_nothing(tmp_path, people_dataset):
    broken = tmp_path / "broken"
    shutil.copytree(people_dataset, broken)
    for path in (broken / "hopper").iterdir():
        path.write_bytes(b"not a jpeg")
    out = tmp_path / "out_bag"
    with pytest.raises(BagError, match="unreadable dataset image"):
        make_bag(broken, out, ["identity"], _opts("sqlite3", "raw", faces_per_frame=(2, 2)), progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"], "partial output left behind"


def test_make_bag_rejects_bad_options(tmp_path, people_dataset):
    with pytest.raises(BagError, match="do not fit"):
        make_bag(
            people_dataset,
            tmp_path / "b",
            None,
            _opts("sqlite3", "raw", face_size=(300, 400), height=200, width=200),
            progress=False,
        )
    with pytest.raises(BagError, match="dataset"):
        make_bag(tmp_path / "missing", tmp_path / "c", None, _opts("sqlite3", "raw"), progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ metrics


def test_evaluator_counts_accuracy_recall_and_id_switches():
    def gt(stamp, boxes_labels):
        return GroundTruthFrame(
            stamp,
            [
                GroundTruthFace(b, {"gender": lab}, {"race": race, "gt_track": tr})
                for b, lab, race, tr in boxes_labels
            ],
        )

    ev = BagEvaluator(iou_threshold=0.5, min_group=1)
    a, b = (0, 0, 100, 100), (300, 0, 400, 100)
    # frame 1: both found, one label wrong
    ev.add(
        1,
        gt(1, [(a, "male", "x", "1"), (b, "female", "y", "2")]),
        [
            PredictedFace(7, (2, 2, 100, 100), 0.9, {"gender": "male"}),
            PredictedFace(8, (300, 0, 400, 98), 0.9, {"gender": "male"}),
        ],
        10.0,
    )
    # frame 2: track 1 switches id (7 -> 9), face b missed, one false positive far away
    ev.add(
        2,
        gt(2, [(a, "male", "x", "1"), (b, "female", "y", "2")]),
        [
            PredictedFace(9, (0, 0, 100, 100), 0.9, {"gender": "male"}),
            PredictedFace(10, (500, 300, 600, 400), 0.9, {"gender": "female"}),
        ],
        20.0,
    )
    # frame 3: dropped (no result)
    ev.add(3, gt(3, [(a, "male", "x", "1")]), None)
    s = ev.result({"mode": "test"}, elapsed_s=1.0).summary
    assert s["frames"] == {"total": 3, "processed": 2, "dropped": 1, "dropped_fraction": 1 / 3, "labelled": 3}
    assert s["detection"]["recall"] == pytest.approx(3 / 4)
    assert s["detection"]["precision"] == pytest.approx(3 / 4)
    assert s["tracking"]["id_switches"] == 1 and s["tracking"]["gt_tracks"] == 2
    gender = s["tasks"]["gender"]
    assert (gender["evaluated"], gender["correct"]) == (3, 2)
    assert gender["accuracy"] == pytest.approx(2 / 3) and gender["accuracy_end_to_end"] == pytest.approx(
        2 / 4
    )
    race = gender["subgroups"]["race"]
    assert {tuple(r["group"]): r["accuracy"] for r in race["rows"]} == {("x",): 1.0, ("y",): 0.0}
    assert gender["largest_gap"]["gap"] == pytest.approx(1.0)
    assert s["latency_ms"]["count"] == 2 and s["latency_ms"]["max"] == 20.0


# ------------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("storage,image_type", [("sqlite3", "raw"), ("mcap", "compressed")])
def test_make_then_evaluate_offline(tmp_path, people_dataset, predictor, storage, image_type):
    bag = tmp_path / "bag"
    summary = make_bag(people_dataset, bag, ["identity"], _opts(storage, image_type), progress=False)
    out_bag = tmp_path / "faces_out"
    evaluation = evaluate_offline(
        bag, _pipeline(predictor), storage=storage, output_bag=out_bag, progress=False
    )
    s = evaluation.summary
    assert s["mode"] == "offline" and s["labelled"] and s["storage"] == storage
    assert s["frames"]["total"] == s["frames"]["processed"] == 12 and s["frames"]["dropped"] == 0
    assert s["detection"]["gt_faces"] == summary.faces
    assert s["detection"]["recall"] >= 0.9, s["detection"]  # pasted real faces are found where pasted
    assert s["detection"]["precision"] >= 0.9, s["detection"]
    assert s["tracking"]["gt_tracks"] == summary.tracks
    assert s["latency_ms"]["count"] == 12 and s["throughput_fps"] > 0
    # accuracy is recomputed from the per-face rows, whose true labels come from the dataset files
    rows = [r for r in evaluation.matches if r["labels"]["identity"]["pred"] is not None]
    assert all(
        r["labels"]["identity"]["true"] in PEOPLE and r["labels"]["identity"]["pred"] in PEOPLE for r in rows
    )
    correct = sum(r["labels"]["identity"]["true"] == r["labels"]["identity"]["pred"] for r in rows)
    assert s["tasks"]["identity"]["accuracy"] == pytest.approx(correct / len(rows))
    matrix, labels = evaluation.confusions["identity"]
    assert labels[:2] == PEOPLE and matrix.sum() == len(rows) and np.trace(matrix) == correct
    assert "gender" in s["predictions"]["label_histograms"]  # unlabelled task: statistics only

    # the node-format output bag holds one FaceArray per frame, with the image stamps
    store = get_typestore()
    with BagReader(out_bag) as reader:
        assert reader.topics == {FACES_TOPIC: FACE_ARRAY_TYPE}
        arrays = [
            store.deserialize_cdr(raw, FACE_ARRAY_TYPE) for _, _, raw in reader.raw_messages([FACES_TOPIC])
        ]
        with BagReader(bag) as source:
            stamps = sorted(source.read_ground_truth())
    assert sorted(stamp_to_ns(a.header.stamp) for a in arrays) == stamps
    assert {(a.image_width, a.image_height) for a in arrays} == {(640, 480)}  # the bag's frames
    faces = [f for a in arrays for f in a.faces]
    assert faces and all(len(f.keypoints) == 6 for f in faces)  # BlazeFace's, as the node sends them
    assert all(f.roi_normalized.x_min <= f.keypoints[2].x <= f.roi_normalized.x_max for f in faces)  # nose
    track_ids = {r["pred_track"] for r in evaluation.matches if r["pred_track"] is not None}
    assert track_ids <= {f.track_id for a in arrays for f in a.faces}

    report = write_report(evaluation, tmp_path / "report")
    names = {p.name for p in report.iterdir()}
    assert {"report.md", "report.json", "latency_hist.png", "confusion_identity.png"} <= names
    text = (report / "report.md").read_text()
    assert "## Detection" in text and "## Track-id stability" in text and "| identity |" in text


def test_utkface_bag_reports_subgroups(tmp_path, utk_dataset, predictor):
    bag = tmp_path / "utk_bag"
    make_bag(
        utk_dataset,
        bag,
        ["gender", "age"],
        _opts("sqlite3", "raw", frames=8, track_length=2, faces_per_frame=(1, 1), face_region=None),
        progress=False,
    )
    with BagReader(bag) as reader:
        face = next(iter(reader.read_ground_truth().values())).faces[0]
    assert set(face.labels) == {"gender", "age"} and {"race", "gender", "age"} <= set(face.attributes)
    evaluation = evaluate_offline(bag, _pipeline(predictor), progress=False)
    s = evaluation.summary
    assert s["detection"]["recall"] >= 0.75
    gender = s["tasks"]["gender"]
    assert gender["evaluated"] > 0 and "race" in gender["subgroups"]
    rows = gender["subgroups"]["race"]["rows"]
    assert sum(r["count"] for r in rows) == gender["evaluated"]
    assert "age" in s["tasks"] and s["tasks"]["age"]["evaluated"] == 0  # the model has no age column
    assert any("'age'" in w for w in s["warnings"])
    report = write_report(evaluation, tmp_path / "report")
    assert (report / "groups_gender_race.png").is_file()


def test_unlabelled_bag_reports_statistics(tmp_path, people_dataset, predictor):
    """A robot-style bag: only an image topic with another name, no ground truth."""
    bag = tmp_path / "labelled"
    make_bag(people_dataset, bag, ["identity"], _opts("mcap", "raw", frames=4), progress=False)
    robot = tmp_path / "robot"
    with BagReader(bag) as reader, BagWriter(robot, "mcap") as writer:
        for topic, stamp, raw in reader.raw_messages([reader.image_topic()]):
            writer.write_raw("/head_camera/rgb/image_raw", stamp, raw, reader.topics[topic])
    s = evaluate_offline(robot, _pipeline(predictor), progress=False).summary
    assert not s["labelled"] and "detection" not in s
    assert s["image_topic"] == "/head_camera/rgb/image_raw" and s["frames"]["processed"] == 4
    assert sum(s["predictions"]["label_histograms"]["identity"].values()) == s["predictions"]["faces"] > 0


# ------------------------------------------------------------------------------------------------ bad bags


@pytest.fixture(scope="module")
def small_bags(tmp_path_factory, people_dataset) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small")
    bags = {}
    for storage in ("sqlite3", "mcap"):
        make_bag(
            people_dataset, root / storage, ["identity"], _opts(storage, "raw", frames=6), progress=False
        )
        bags[storage] = root / storage
    return bags


def _read_all(path: Path, topic: str | None = None) -> None:
    with BagReader(path) as reader:
        reader.read_ground_truth()
        for _ in reader.images(reader.image_topic(topic)):
            pass


@pytest.mark.parametrize("storage,suffix", [("sqlite3", ".db3"), ("mcap", ".mcap")])
@pytest.mark.parametrize("fraction", [0.3, 0.8])
def test_truncated_bag_is_a_clear_error(tmp_path, small_bags, storage, suffix, fraction):
    bag = tmp_path / "bag"
    shutil.copytree(small_bags[storage], bag)
    (data,) = bag.glob(f"*{suffix}")
    os.truncate(data, int(data.stat().st_size * fraction))
    with pytest.raises(BagError, match="corrupt or truncated") as info:
        _read_all(bag)
    assert "\n" not in str(info.value)


def test_corrupt_sqlite_pages_are_a_clear_error(tmp_path, small_bags):
    bag = tmp_path / "bag"
    shutil.copytree(small_bags["sqlite3"], bag)
    (data,) = bag.glob("*.db3")
    raw = bytearray(data.read_bytes())
    rng = np.random.default_rng(0)
    raw[100:4096] = rng.integers(0, 256, 3996, dtype=np.uint8).tobytes()  # schema page
    data.write_bytes(bytes(raw))
    with pytest.raises(BagError, match="corrupt"):
        _read_all(bag)


def test_wrong_storage_plugin(tmp_path, small_bags):
    with pytest.raises(BagError, match="uses storage 'mcap', not 'sqlite3'"):
        BagReader(small_bags["mcap"], storage="sqlite3")
    bag = tmp_path / "bag"
    shutil.copytree(small_bags["mcap"], bag)
    meta = bag / "metadata.yaml"
    meta.write_text(meta.read_text().replace("storage_identifier: mcap", "storage_identifier: sqlite3"))
    with pytest.raises(BagError, match=r"wrong storage plugin: metadata\.yaml says 'sqlite3'"):
        BagReader(bag)
    renamed = tmp_path / "renamed.db3"
    shutil.copy(next(small_bags["mcap"].glob("*.mcap")), renamed)
    with pytest.raises(BagError, match="wrong storage plugin"):
        BagReader(renamed)


def test_not_a_bag(tmp_path):
    garbage = tmp_path / "garbage.db3"
    garbage.write_bytes(os.urandom(2048))
    with pytest.raises(BagError, match="not a ROS 2 bag"):
        BagReader(garbage)
    with pytest.raises(BagError, match="not a ROS 2 bag"):
        BagReader(REPO / "msg")
    with pytest.raises(BagError, match="no such file"):
        BagReader(tmp_path / "missing")


def test_missing_topics_and_unknown_types(tmp_path, small_bags):
    with pytest.raises(BagError, match="topic /nope not in the bag"):
        _read_all(small_bags["sqlite3"], topic="/nope")
    with pytest.raises(BagError, match="not an image type"):
        _read_all(small_bags["sqlite3"], topic=GROUND_TRUTH_TOPIC)
    # a bag without any image topic
    store = get_typestore()
    bag = tmp_path / "strings"
    with BagWriter(bag, "sqlite3") as writer:
        writer.write("/chatter", 1, store.types["std_msgs/msg/String"](data="hi"))
    with pytest.raises(BagError, match="no sensor_msgs/Image or CompressedImage topic"):
        _read_all(bag)
    # a ground-truth topic with a foreign message type
    mixed = tmp_path / "mixed"
    with BagReader(small_bags["mcap"]) as reader, BagWriter(mixed, "mcap") as writer:
        for topic, stamp, raw in reader.raw_messages([reader.image_topic()]):
            writer.write_raw(topic, stamp, raw, reader.topics[topic])
        writer.write(GROUND_TRUTH_TOPIC, 1, store.types["std_msgs/msg/String"](data="labels"))
    with pytest.raises(BagError, match="expected facial_perception/msg/GroundTruthArray"):
        _read_all(mixed)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    garbage = tmp_path / "x.mcap"
    garbage.write_bytes(b"\x89MCAP0\r\n" + os.urandom(64))
    report = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "facial_perception.bags.cli",
            "evaluate",
            str(garbage),
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not report.exists()


def test_bad_pipeline_options_are_one_line_errors_and_write_no_report(tmp_path, small_bags, capsys):
    from facial_perception.bags.cli import main as bag_main

    report = tmp_path / "report"
    args = ["evaluate", str(small_bags["sqlite3"]), "--report", str(report), "--no-progress"]
    assert bag_main([*args, "--detect-every", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "detect_every must be >= 1" in err[0]
    assert not report.exists()


def test_overlapped_stages_give_the_same_results_as_sequential(tmp_path, people_dataset, predictor):
    """Detecting frame t+1 (and encoding it, in a third thread) while the model's columns run on
    frame t must not change a single result."""
    from facial_perception.bags.evaluate_bag import PipelineSettings

    bag = tmp_path / "bag"
    options = _opts("sqlite3", "raw", frames=16, track_length=8, motion=12.0)
    make_bag(people_dataset, bag, ["identity"], options, progress=False)
    runs = {}
    for name, settings in (
        ("three threads", PipelineSettings()),
        ("two threads", PipelineSettings(encoder_stage=False)),
        ("sequential", PipelineSettings(overlap=False, cpu_threads=0)),
    ):
        runs[name] = evaluate_offline(bag, _pipeline(predictor), settings=settings, progress=False)
    assert "encode" in runs["three threads"].summary["stage_ms_mean"]  # the encoder stage ran
    assert "encode" not in runs["two threads"].summary["stage_ms_mean"]
    sequential = runs.pop("sequential")
    for run in runs.values():
        assert len(run.matches) == len(sequential.matches) > 0
        for a, b in zip(run.matches, sequential.matches, strict=True):
            assert a["pred_track"] == b["pred_track"]
            assert a["iou"] == b["iou"]  # boxes of frame t, not of the frame prepared meanwhile
            assert a["labels"] == b["labels"]
        assert run.summary["detection"] == sequential.summary["detection"]
        assert run.summary["tracking"] == sequential.summary["tracking"]


def test_first_stage_in_a_worker_process_gives_the_same_results(tmp_path, people_dataset):
    """The default offline run reads, detects and tracks in a worker process (its own GIL): every
    result must equal the one-thread run's, and the worker must be gone afterwards."""
    import multiprocessing

    from facial_perception.bags.evaluate_bag import PipelineSettings

    bag = tmp_path / "bag"
    options = _opts("mcap", "compressed", frames=16, track_length=8, motion=12.0)
    make_bag(people_dataset, bag, ["identity"], options, progress=False)
    out = tmp_path / "faces.mcap"
    worker = evaluate_offline(bag, settings=PipelineSettings(), output_bag=out, progress=False)
    one_thread = PipelineSettings(overlap=False, cpu_threads=0)
    sequential = evaluate_offline(bag, settings=one_thread, progress=False)
    assert worker.summary["first_stage"] == "worker process"
    assert "first_stage" not in sequential.summary
    assert len(worker.matches) == len(sequential.matches) > 0
    for a, b in zip(worker.matches, sequential.matches, strict=True):
        assert (a["pred_track"], a["iou"], a["labels"]) == (b["pred_track"], b["iou"], b["labels"])
    assert worker.summary["detection"] == sequential.summary["detection"]
    assert worker.summary["tracking"] == sequential.summary["tracking"]
    with BagReader(out) as written:  # stamps and frame ids came through the worker
        assert written.message_count("/facial_perception/faces") == 16
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("storage,suffix", [("sqlite3", ".db3"), ("mcap", ".mcap")])
def test_a_truncated_bag_fails_in_the_worker_with_one_line(tmp_path, small_bags, storage, suffix):
    import multiprocessing

    bag = tmp_path / "bag"
    shutil.copytree(small_bags[storage], bag)
    (data,) = bag.glob(f"*{suffix}")
    os.truncate(data, int(data.stat().st_size * 0.8))
    with pytest.raises(BagError, match="corrupt or truncated") as info:
        evaluate_offline(bag, progress=False)
    assert "\n" not in str(info.value)
    assert multiprocessing.active_children() == []


def test_a_script_without_the_main_guard_gets_one_line_saying_so(tmp_path, small_bags):
    """The worker is spawned and imports the calling script again: without the guard it cannot start,
    and the evaluation must end with a BagError that names the fix, not hang."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from facial_perception.bags.bag_io import BagError\n"
        "from facial_perception.bags.evaluate_bag import evaluate_offline\n"
        "try:\n"
        f"    evaluate_offline({str(small_bags['mcap'])!r}, progress=False)\n"
        "    print('evaluated')\n"
        "except BagError as exc:\n"
        "    print(f'BagError: {exc}')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("BagError: the first-stage worker process died"), proc.stdout
    assert "if __name__ == '__main__':" in lines[-1] and "first_stage_process=False" in lines[-1]


def test_benchmark_command_writes_consistent_json_and_markdown(tmp_path, small_bags):
    """The benchmark's figures are measured, so only their consistency is checked, never a speed."""
    import json

    from facial_perception.bags.cli import main as bag_main
    from facial_perception.core.checkpoint import DEFAULT_MODEL
    from facial_perception.core.cli import main as core_main

    # the shipped model (v6) averages no column over mirror images; v4 did: a checkpoint that asks for it
    # makes the same run measure it without, too (and the standalone gender member: without it)
    mirrored = tmp_path / "mirrored.safetensors"
    edit = ["columns", "--checkpoint", str(DEFAULT_MODEL), "--out", str(mirrored), "-q"]
    assert core_main([*edit, "--mirror-average", "emotion", "gender", "age"]) == 0
    out_json, out_md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    args = ["benchmark", "--bag", str(small_bags["sqlite3"]), "--json-out", str(out_json)]
    args += ["--markdown", str(out_md), "--compare-detectors", "haar", "--no-progress", "--repeats", "2"]
    assert bag_main([*args, "--checkpoint", str(mirrored)]) == 0
    r = json.loads(out_json.read_text())
    assert r["frames"] == 6 and sum(r["faces_per_frame"].values()) == 6
    assert r["offline_fps"] > 0 and r["model_only_fps"] > 0 and r["sequential_fps"] > 0
    assert r["repeats"] == 2 and len(r["offline_runs_fps"]) == len(r["model_only_passes_s"]) == 2
    pairs = zip(r["offline_runs_fps"], r["model_only_passes_s"], r["paired_ratios"], strict=True)
    for fps, seconds, ratio in pairs:
        assert ratio == pytest.approx(fps / (r["frames"] / seconds))  # each pair: evaluation / model only
    assert r["ratio"] == pytest.approx(float(np.median(r["paired_ratios"])))
    assert r["offline_fps"] == pytest.approx(float(np.median(r["offline_runs_fps"])))
    assert r["cpu_work_ms_per_frame"] == pytest.approx(1000.0 / r["sequential_fps"])
    assert r["bound_fps"] == pytest.approx(r["cores"] * r["sequential_fps"])
    assert r["bound_ratio"] == pytest.approx(r["bound_fps"] / r["model_only_fps"])
    assert set(r["sequential_stage_ms_mean"]) >= {"detect", "model"}
    assert set(r["other_detectors"]) == {"haar"}
    assert (r["detector"], r["detector_backend"]) == ("blazeface_full", "litert")
    text = out_md.read_text()
    assert f"{r['offline_fps']:.1f} frames/s" in text and "upper bound of any schedule" in text
    assert "| haar |" in text and "| blazeface_full (default) |" in text
    plain = r["without_mirror"]
    assert plain["mirror_tasks"] == ["emotion", "gender", "age"] and plain["ratio"] > 0
    assert f"| mirror averaging off | {plain['offline_fps']:.1f} |" in text
    assert r["encoder_stage"] and "encode" in r["stage_ms_mean"]  # three threads by default
    # every configuration was measured in the same rounds, so each has its own paired ratios
    assert r["interleaved_configurations"] == [
        "default",
        "detector:haar",
        "detect_every:2",
        "two_threads",
        "first_stage_thread",
        "unfused_columns",
        "identity_every_1",
        "one_crop",
        "without_mirror",
        "standalone_every_1",
        "without_standalone",
    ]
    # the identity columns' own crop: on a track's 1st and every 3rd frame, on every frame, or no own crop
    faces = sum(int(k) * n for k, n in r["faces_per_frame"].items())
    every, one = r["identity_every_1"], r["one_crop"]
    assert r["identity_every"] == 3 and every["identity_faces_run"] == faces
    assert 0 < r["identity_faces_run"] < faces and one["ratio"] > 0 and every["ratio"] > 0
    assert f"{r['identity_faces_run']} identity crops for {faces} faces | {r['offline_fps']:.1f} |" in text
    assert f"| one crop for every column (`crop_margin`) | {one['offline_fps']:.1f} |" in text
    alone = r["without_standalone"]  # the shipped model averages gender with a standalone member
    assert alone["standalone_tasks"] == ["gender"] and alone["ratio"] > 0
    assert f"| columns alone (`standalone_members: false`) | {alone['offline_fps']:.1f} |" in text
    # that member on a track's 1st and every 3rd frame (default), or on every frame
    members_always = r["standalone_every_1"]
    assert r["standalone_every"] == 3 and members_always["member_faces_run"] == faces
    assert 0 < r["member_faces_run"] < faces and members_always["ratio"] > 0
    assert f"members on {r['member_faces_run']} of {faces} faces | {r['offline_fps']:.1f} |" in text
    threaded = r["first_stage_thread"]  # read, detect and track in a thread instead of a worker process
    assert r["first_stage_process"] and not threaded["first_stage_process"] and threaded["ratio"] > 0
    assert f"| thread | {threaded['offline_fps']:.1f} |" in text
    unfused = r["unfused_columns"]  # the columns one by one, as in training
    assert r["fuse_columns"] and not unfused["fuse_columns"] and unfused["ratio"] > 0
    assert f"| columns one by one | {unfused['offline_fps']:.1f} |" in text
    two = r["two_threads"]  # and in the same run the whole model in one thread
    assert "encode" not in two["stage_ms_mean"] and two["ratio"] > 0
    assert f"| whole model in one thread | {two['offline_fps']:.1f} |" in text
    sparse = r["detect_every"]["2"]  # the detector on every other frame
    assert f"| 2 | {sparse['offline_fps']:.1f} |" in text and 0 < sparse["detection_recall"] <= 1
