"""Metrics on hand-checkable arrays, subgroup gaps, calibration, reports and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from facial_perception.core import plots
from facial_perception.core.evaluation import (
    EvaluationError,
    accuracy,
    calibration,
    confusion_matrix,
    evaluate_predictions,
    fit_embedding_whitening,
    macro_f1,
    open_set_identification,
    parse_subgroups,
    per_class_recall,
    subgroup_table,
    top_k_accuracy,
    within_k_accuracy,
)

Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def test_accuracy_and_confusion_by_hand():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.sum() == Y_TRUE.size


def test_recall_and_macro_f1_by_hand():
    recall = per_class_recall(Y_TRUE, Y_PRED, 4)
    assert recall[:3] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert math.isnan(recall[3])  # no samples of class 3
    # F1: class0 p=1 r=2/3 -> 0.8; class1 p=1/2 r=1/2 -> 0.5; class2 p=1/2 r=1 -> 2/3; class 3 skipped
    assert macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_ordinal_and_top_k():
    assert within_k_accuracy([0, 3, 5], [1, 1, 5], k=1) == pytest.approx(2 / 3)
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]])
    assert top_k_accuracy([1, 1, 1], probs, k=1) == 0.0
    assert top_k_accuracy([1, 1, 1], probs, k=2) == pytest.approx(2 / 3)


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(EvaluationError, match="differ in length"):
        accuracy([0, 1], [0])
    with pytest.raises(EvaluationError, match="out of range"):
        confusion_matrix([0, 3], [0, 0], num_classes=2)
    with pytest.raises(EvaluationError, match="not available"):
        subgroup_table([0], [0], {"race": ["a"]}, ("race", "gender"))


def test_subgroup_table_pair_and_gap():
    race = np.array(["A", "A", "A", "A", "B", "B", "B", "B"])
    gender = np.array(["m", "f", "m", "f", "m", "f", "m", "f"])
    y_true = np.zeros(8, dtype=int)
    y_pred = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    pair = subgroup_table(y_true, y_pred, {"race": race, "gender": gender}, ("race", "gender"))
    by_group = {r.group: (r.count, r.accuracy) for r in pair.rows}
    assert by_group == {
        ("A", "f"): (2, 1.0),
        ("A", "m"): (2, 1.0),
        ("B", "f"): (2, 0.0),
        ("B", "m"): (2, 0.5),
    }
    assert pair.largest_gap == pytest.approx(1.0)
    assert pair.worst_group == ("B", "f")
    single = subgroup_table(y_true, y_pred, {"race": race}, "race")
    assert single.largest_gap == pytest.approx(1.0 - 0.25)
    md = pair.to_markdown()
    assert "race \\ gender" in md and "Largest gap" in md
    # A group below min_count is listed but does not define the gap.
    tiny = subgroup_table([0, 0, 0], [0, 0, 1], {"g": ["x", "x", "y"]}, "g", min_count=2)
    assert len(tiny.rows) == 2 and tiny.largest_gap == 0.0


def test_calibration_perfect_and_overconfident():
    y = np.array([0, 1, 0, 1])
    confident_right = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert calibration(confident_right, y, 10).ece == pytest.approx(0.0)
    confident_half_wrong = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    cal = calibration(confident_half_wrong, y, 10)
    assert cal.ece == pytest.approx(0.4)  # confidence 0.9, accuracy 0.5
    assert sum(cal.bin_count) == 4


def test_report_json_and_markdown(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    y = rng.integers(0, 3, size=40)
    logits = rng.normal(size=(40, 3)) + 3 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    groups = {"race": rng.choice(["0", "1"], 40), "gender": rng.choice(["m", "f"], 40)}
    report = evaluate_predictions(
        "age", labels, y, probs, groups, parse_subgroups("race,gender"), ordinal=True
    )
    assert report.accuracy == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    assert [s.attributes for s in report.subgroups] == [("race", "gender"), ("race",), ("gender",)]
    out = tmp_path / "r.json"
    report.to_json(out)
    data = json.loads(out.read_text())
    assert data["num_samples"] == 40 and set(data["per_class_recall"]) == set(labels)
    assert data["subgroups"][0]["attributes"] == ["race", "gender"]
    assert "within one group" in report.to_markdown()


def test_plots_write_real_pngs(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": 0.1 * e, "val_acc": 0.08 * e}
        for e in range(1, 5)
    ]
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    table = subgroup_table(Y_TRUE, Y_PRED, {"g": ["x", "x", "y", "y", "z", "z"]}, "g")
    cal = calibration(np.eye(3)[Y_PRED] * 0.7 + 0.1, Y_TRUE, 5)
    paths = [
        plots.plot_learning_curves(history, tmp_path / "curves.png"),
        plots.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png"),
        plots.plot_reliability(cal, tmp_path / "rel.png"),
        plots.plot_group_accuracy(table, tmp_path / "groups.png"),
        plots.plot_curve_comparison(
            {"with": [[0.1, 0.5], [0.2, 0.6, 0.7]], "without": [[0.1, 0.2]]}, tmp_path / "cmp.png"
        ),
        plots.save_image_grid(np.linspace(-1, 1, 5 * 8 * 8).reshape(5, 1, 8, 8), tmp_path / "grid.png", 3),
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 10
    with Image.open(paths[-1]) as grid:
        assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_subgroup_rows_follow_the_numbers_in_group_names():
    """Age groups read 0-2, 4-6, 8-12, 15-20, ..., 60+ in tables, not in string order."""
    groups = ["60+", "15-20", "0-2", "8-12", "4-6"]
    table = subgroup_table([0] * 5, [0] * 5, {"age8": groups}, "age8")
    assert [r.group[0] for r in table.rows] == ["0-2", "4-6", "8-12", "15-20", "60+"]
    lines = [line for line in table.to_markdown().splitlines() if line.startswith("| ") and "%" in line]
    lines = lines[1:]  # the header: "| age8 | accuracy | 95% interval | n |"
    assert [line.split(" | ")[0][2:] for line in lines] == ["0-2", "4-6", "8-12", "15-20", "60+"]


def test_wilson_interval_by_hand_and_at_the_edges():
    from facial_perception.core.evaluation import wilson_interval

    low, high = wilson_interval(90, 100)  # the textbook case: 0.90 of 100 -> 0.826-0.945
    assert low == pytest.approx(0.8256, abs=1e-4) and high == pytest.approx(0.9448, abs=1e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(np.isnan(wilson_interval(0, 0)))
    narrow, wide = wilson_interval(900, 1000), wilson_interval(9, 10)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5  # 100x the faces: ~10x narrower


def test_gap_interval_holds_the_gap_and_shrinks_with_more_faces():
    from facial_perception.core.evaluation import gap_interval

    small = gap_interval([85, 95], [100, 100])  # a 10-point gap seen on 100 faces per group
    large = gap_interval([8500, 9500], [10000, 10000])
    assert small[0] < 0.10 < small[1] and large[0] < 0.10 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 5
    assert gap_interval([85, 95], [100, 100]) == small  # fixed seed: reproducible reports
    equal = gap_interval([90, 90, 90], [100, 100, 100])  # no true gap: best minus worst of noise > 0
    assert equal[0] >= 0.0 and equal[1] > 0.05
    rows = subgroup_table([1] * 4 + [0] * 4, [1, 1, 1, 0, 0, 0, 0, 0], {"g": list("aaaabbbb")}, "g")
    assert rows.gap_ci is not None and rows.gap_ci[0] <= rows.largest_gap <= rows.gap_ci[1]
    assert "95% bootstrap interval" in rows.to_markdown()
    assert all(r.ci_low <= r.accuracy <= r.ci_high for r in rows.rows)


def test_shift_images_moves_content_and_replicates_the_edge():
    from facial_perception.core.evaluation import shift_images

    faces = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    right = shift_images(faces, 2, 0)
    assert np.array_equal(right[:, :, 2:], faces[:, :, :3])  # content moved 2 px right
    assert np.array_equal(right[:, :, 0], faces[:, :, 0]) and np.array_equal(right[:, :, 1], faces[:, :, 0])
    up = shift_images(faces, 0, -1)
    assert np.array_equal(up[:, :4], faces[:, 1:]) and np.array_equal(up[:, 4], faces[:, 4])
    assert np.array_equal(shift_images(faces, 0, 0), faces) and right.flags.c_contiguous


def _people(rng: np.random.Generator, count: int, photos: int) -> tuple[np.ndarray, list[str]]:
    """Embeddings shaped like the identity column's: a large offset shared by everyone (ReLU features),
    a centre per person in 12 dimensions, and per-photo nuisance (pose, light) that is larger than the
    differences between people but lies in 4 other dimensions."""
    centres = np.concatenate([rng.normal(size=(count, 12)), np.zeros((count, 4))], axis=1) + 4.0
    emb = []
    for centre in centres:
        nuisance = np.concatenate([np.zeros((photos, 12)), 3.0 * rng.normal(size=(photos, 4))], axis=1)
        emb.append(centre + nuisance + 0.3 * rng.normal(size=(photos, 16)))
    return np.concatenate(emb), [f"p{i}" for i in range(count) for _ in range(photos)]


def test_whitening_centres_and_equalises_the_axes_and_drops_dead_ones():
    rng = np.random.default_rng(0)
    scales = np.array([10.0, 3.0, 1.0, 0.3, 0.0, 0.0])  # two dead units, as ReLU features have
    emb = rng.normal(size=(4000, 6)) * scales + 5.0
    mean, projection = fit_embedding_whitening(emb, shrinkage=0.0)
    assert projection.shape == (6, 4)  # the dead axes are dropped
    white = (emb - mean) @ projection
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.eye(4), atol=1e-3)
    _, shrunk = fit_embedding_whitening(emb, shrinkage=0.01)  # the ridge damps the weak axes most
    variances = np.var((emb - mean) @ shrunk, axis=0)
    assert variances[0] > 0.98 and variances[-1] < 0.6 and np.all(np.diff(variances) < 0)
    for bad, fragment in (
        (np.ones((1, 3)), "at least 2"),
        (np.full((5, 3), np.nan), "finite"),
        (np.ones((5, 3)), "differ"),
    ):
        with pytest.raises(EvaluationError, match=fragment):
            fit_embedding_whitening(bad)


def test_open_set_counts_strangers_let_through_and_enrolled_faces_named():
    rng = np.random.default_rng(1)
    emb, names = _people(rng, 30, 8)
    strangers, stranger_names = _people(rng, 40, 1)  # one photo each: never enrolled
    emb, names = np.concatenate([emb, strangers]), names + [f"s{n}" for n in stranger_names]
    raw = open_set_identification(emb, names, enrol_people=10, shots=5, trials=4, threshold=0.5)
    assert raw.enrolled_people == 10 and raw.stranger_people == 60 and raw.known_queries == 30
    assert raw.stranger_queries == 20 * 8 + 40
    dir_, far = raw.at(0.5)
    assert dir_ == raw.rank1 and far == 1.0  # the offset: everyone passes a middling threshold
    assert np.all(np.diff(raw.far) <= 0) and np.all(np.diff(raw.dir) <= 0)  # stricter: fewer of both
    assert raw.at(1.0)[1] == 0.0 and raw.at(-1.0) == (raw.rank1, 1.0)
    # the whitening (fit on other people of the same kind) takes the offset away
    train, _ = _people(np.random.default_rng(2), 50, 8)
    mean, projection = fit_embedding_whitening(train)
    white = open_set_identification((emb - mean) @ projection, names, 10, shots=5, trials=4, threshold=0.5)
    threshold, dir_white, far_white = white.for_far(0.05)
    assert far_white <= 0.05 and dir_white > 0.6 and threshold < 1.0 and white.rank1 > 0.9
    assert raw.for_far(0.05)[1] < 0.2 and raw.rank1 < 0.6  # the nuisance swamps the raw similarity
    report = white.to_dict()
    assert report["at_threshold"]["threshold"] == 0.5 and len(report["operating_points"]) == 3
    assert "FAR <= 5 %" in white.to_markdown()
    with pytest.raises(EvaluationError, match="needs 40 people"):
        open_set_identification(emb, names, enrol_people=40, shots=5)
