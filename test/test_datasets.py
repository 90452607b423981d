"""Dataset readers on tiny real-face fixtures, the labelling rules, splits, unreadable files and errors."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    make_adience,
    make_class_folders,
    make_fer2013_folders,
    make_ferplus,
    make_identity_folders,
    make_unlabeled,
    make_utkface,
    utkface_name,
    write_corrupt_image,
)
from torch.utils.data import DataLoader

from facial_perception.core import datasets as D
from facial_perception.core.preprocess import preprocess_face, resize_grey


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- FER+


@pytest.mark.parametrize(
    ("votes", "tie", "expected"),
    [
        ([0, 7, 2, 0, 0, 0, 0, 0, 1, 0], "drop", 1),  # clear happiness
        ([4, 0, 0, 4, 2, 0, 0, 0, 0, 0], "drop", None),  # neutral/sadness tie
        ([4, 0, 0, 4, 2, 0, 0, 0, 0, 0], "first", 0),  # tie -> first in FER+ order
        ([2, 0, 0, 0, 0, 0, 0, 0, 5, 3], "first", None),  # unknown most voted
        ([3, 0, 0, 0, 0, 0, 0, 0, 3, 4], "first", None),  # not-a-face most voted
        ([4, 0, 0, 0, 0, 0, 0, 0, 4, 2], "first", None),  # emotion tied with unknown -> dropped
        ([0, 0, 0, 0, 0, 0, 0, 3, 2, 2], "drop", 7),  # contempt wins with 3 of 7 votes
    ],
)
def test_ferplus_majority_rule(votes: list[int], tie: str, expected: int | None) -> None:
    label, reason = D.ferplus_label(votes, tie=tie)
    assert label == expected
    assert (reason is None) == (expected is not None)


def test_ferplus_min_share_requires_a_real_majority() -> None:
    votes = [5, 4, 0, 0, 0, 0, 0, 0, 1, 0]
    assert D.ferplus_label(votes)[0] == 0
    assert D.ferplus_label(votes, min_share=0.5)[0] is None
    assert D.ferplus_label([6, 4, 0, 0, 0, 0, 0, 0, 0, 0], min_share=0.5)[0] == 0


FER_VOTES = [
    [0, 7, 2, 0, 0, 0, 0, 0, 1, 0],  # happiness
    [4, 0, 0, 4, 2, 0, 0, 0, 0, 0],  # tie neutral/sadness
    [2, 0, 0, 0, 0, 0, 0, 0, 5, 3],  # unknown
    [0, 0, 8, 0, 0, 0, 2, 0, 0, 0],  # surprise
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 9],  # not a face
    [0, 0, 0, 0, 6, 3, 0, 0, 1, 0],  # anger
]


def test_read_ferplus_majority_drops_ties_and_unknown(tmp_path: Path) -> None:
    root = make_ferplus(tmp_path, FER_VOTES)
    data = D.read_ferplus(root, "FER2013Train")
    assert data.task == "emotion" and data.label_names == list(D.FERPLUS_EMOTIONS)
    assert [s.path.name for s in data.samples] == ["fer0000000.png", "fer0000003.png", "fer0000005.png"]
    assert [s.label for s in data.samples] == [1, 2, 4]
    assert data.skipped == {"tied top emotion votes": 1, "unknown or not-a-face is the most voted": 2}
    for sample, row in zip(data.samples, (FER_VOTES[0], FER_VOTES[3], FER_VOTES[5]), strict=True):
        expected = np.array(row[:8], np.float32) / sum(row[:8])
        np.testing.assert_allclose(sample.soft_label, expected, rtol=1e-6)
    soft = data.soft_labels()
    assert soft is not None and soft.shape == (3, 8)
    image, label, index = data[1]
    assert image.shape == (1, 64, 64) and label == 2 and index == 1


def test_read_ferplus_tie_first_and_distribution(tmp_path: Path) -> None:
    root = make_ferplus(tmp_path, FER_VOTES)
    first = D.read_ferplus(root, tie="first")
    assert [s.label for s in first.samples] == [1, 0, 2, 4]
    dist = D.read_ferplus(root, target="distribution")
    assert len(dist) == 4 and dist.samples[1].soft_label[0] == pytest.approx(0.4)
    # A split folder can be given directly, and open_dataset finds the layout either way.
    assert len(D.read_ferplus(root / "FER2013Train")) == 3
    assert len(D.open_dataset(root)) == len(D.open_dataset(root / "FER2013Train" / "label.csv")) == 3
    assert D.open_dataset(root, task="emotion_distribution").soft_labels() is not None


def test_ferplus_errors_are_one_line(tmp_path: Path) -> None:
    root = make_ferplus(tmp_path, 3)
    with pytest.raises(D.DatasetError) as err:
        D.read_ferplus(root, "FER2013Valid")
    assert "FER2013Valid/label.csv" in _one_line(err) and "FER2013Train" in str(err.value)
    with open(root / "FER2013Train" / "label.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["fer0000009.png", "(0, 0, 48, 48)", 1, 2])
    with pytest.raises(D.DatasetError) as err:
        D.read_ferplus(root)
    assert "line 4" in _one_line(err)
    with pytest.raises(D.DatasetError) as err:
        D.read_ferplus(make_ferplus(tmp_path / "all_unknown", [[0] * 8 + [10, 0]] * 2))
    assert "no usable images" in _one_line(err)


def test_ferplus_counts_on_the_shared_valid_split(shared_datasets: Path) -> None:
    """The reader keeps exactly the rows whose single most voted category (of 10) is an emotion."""
    split = shared_datasets / "ferplus" / "FER2013Valid"
    expected = Counter()
    with open(split / "label.csv", newline="") as handle:
        for row in csv.reader(handle):
            votes = [int(v) for v in row[2:]]
            top = max(votes)
            if votes.count(top) == 1 and votes.index(top) < 8:
                expected[votes.index(top)] += 1
    data = D.read_ferplus(split)
    assert Counter(data.labels().tolist()) == expected


def test_fer2013_folders_any_case(tmp_path: Path) -> None:
    classes = ["Angry", "DISGUST", "fear", "happy", "sad", "Surprise", "neutral"]
    root = make_fer2013_folders(tmp_path, per_class=1, classes=classes)
    data = D.read_fer2013_folders(root)
    assert data.label_names == list(D.FER2013_CLASSES) and len(data) == 7
    by_folder = {s.path.parent.name: data.label_names[s.label] for s in data.samples}
    assert all(folder.lower() == label for folder, label in by_folder.items())
    assert D.open_dataset(root).task == "emotion"
    (root / "contempt").mkdir()
    write_corrupt_image(root / "contempt" / "x.png")
    with pytest.raises(D.DatasetError) as err:
        D.read_fer2013_folders(root)
    assert "contempt" in _one_line(err)


# ---------------------------------------------------------------- UTKFace


def test_parse_utkface_names() -> None:
    assert D.parse_utkface_name("26_1_3_20170119180314987.jpg.chip.jpg") == (26, 1, 3)
    assert D.parse_utkface_name("100_0_0_20170112213500903.jpg") == (100, 0, 0)
    for bad in (
        "39_1_20170116174525125.jpg.chip.jpg",
        "a_1_2_3.jpg.chip.jpg",
        "26_2_0_1.jpg.chip.jpg",
        "x.jpg",
    ):
        assert D.parse_utkface_name(bad) is None


def test_read_utkface_targets_and_malformed_names(tmp_path: Path) -> None:
    labels = [(2, 0, 0), (3, 1, 1), (13, 0, 2), (14, 1, 3), (35, 0, 4), (36, 1, 0), (61, 0, 1)]
    root = make_utkface(tmp_path, labels, malformed_names=["39_1_20170116174525125.jpg.chip.jpg", "face.jpg"])
    age8 = D.read_utkface(root)
    assert age8.task == "age" and age8.label_names == list(D.AGE8_GROUPS)
    assert age8.skipped == {"malformed file name": 2}
    by_name = {s.path.name: s for s in age8.samples}
    for i, (age, gender, race) in enumerate(labels):
        sample = by_name[utkface_name(age, gender, race, i)]
        assert sample.label == D.age_to_age8(age)
        assert sample.attributes["age"] == age
        assert sample.attributes["gender"] == D.UTK_GENDERS[gender]
        assert sample.attributes["race"] == D.UTK_RACES[race]
    assert [s.label for s in D.read_utkface(root, "gender").samples] == [
        s.attributes["gender"] == "female" for s in age8.samples
    ]
    assert D.read_utkface(root, "race").label_names == ["White", "Black", "Asian", "Indian", "Others"]
    age7 = D.read_utkface(root, "age7")
    assert [age7.label_names[s.label] for s in age7.samples] == [s.attributes["age7"] for s in age8.samples]
    years = D.read_utkface(root, "age")
    assert years.task == "age_years" and [s.label for s in years.samples] == [
        s.attributes["age"] for s in age8.samples
    ]
    assert D.open_dataset(root, task="gender").task == "gender"


def _nearest_adience_group(age: int) -> int:
    """Independent statement of the documented rule: the nearest group in years, ties to the younger."""
    best, best_distance = 0, float("inf")
    for i, (low, high) in enumerate(D.ADIENCE_AGE_GROUPS):
        distance = (
            0
            if age >= low and (high is None or age <= high)
            else min(abs(age - low), abs(age - (high or low)))
        )
        if distance < best_distance:
            best, best_distance = i, distance
    return best


def test_age8_mapping_is_nearest_group_with_ties_to_younger() -> None:
    for age in range(0, 121):
        assert D.age_to_age8(age) == _nearest_adience_group(age), age
    # The documented partition 0-3, 4-7, 8-13, 14-22, 23-35, 36-45, 46-56, 57+ at its boundaries.
    boundaries = {
        3: 0,
        4: 1,
        7: 1,
        8: 2,
        13: 2,
        14: 3,
        22: 3,
        23: 4,
        35: 4,
        36: 5,
        45: 5,
        46: 6,
        56: 6,
        57: 7,
    }
    assert {age: D.age_to_age8(age) for age in boundaries} == boundaries
    assert D.age_to_age8(28.5) == 4 and D.age_to_age8(2.5) == 0


def test_age7_boundaries() -> None:
    ages = (0, 3, 4, 12, 13, 19, 20, 30, 31, 45, 46, 60, 61, 116)
    expected = ["0-3", "0-3", "4-12", "4-12", "13-19", "13-19", "20-30", "20-30"]
    expected += ["31-45", "31-45", "46-60", "46-60", "61+", "61+"]
    assert [D.AGE7_GROUPS[D.age_to_age7(age)] for age in ages] == expected
    with pytest.raises(ValueError):
        D.age_to_age7(-1)


# ---------------------------------------------------------------- identities and splits


def test_identity_folders_and_per_person_split(tmp_path: Path) -> None:
    root = make_identity_folders(tmp_path, people=4, per_person=[5, 4, 2, 1])
    data = D.read_identity_folders(root)
    assert data.task == "identity" and len(data.label_names) == 4 and len(data) == 12
    assert all(
        s.path.parent.name == data.label_names[s.label] == s.attributes["person"] for s in data.samples
    )
    assert D.open_dataset(root).task == "identity"

    train, val = D.split_per_person(data, 0.25, seed=1)
    assert sorted(map(str, (s.path for s in train.samples + val.samples))) == sorted(
        str(s.path) for s in data.samples
    )
    train_people = Counter(s.attributes["person"] for s in train.samples)
    val_people = Counter(s.attributes["person"] for s in val.samples)
    one_image_person = data.label_names[3]
    assert one_image_person in train_people and one_image_person not in val_people
    assert set(val_people) == set(data.label_names[:3]) and all(train_people[p] >= 1 for p in val_people)
    again, _ = D.split_per_person(data, 0.25, seed=1)
    assert [s.path for s in again.samples] == [s.path for s in train.samples]
    strict_train, _ = D.split_per_person(data.samples, 0.5, seed=1, min_train=2)
    assert isinstance(strict_train, list)
    assert all(
        c >= 2
        for p, c in Counter(s.attributes["person"] for s in strict_train).items()
        if p != one_image_person
    )

    filtered = D.read_identity_folders(root, min_images=4)
    assert len(filtered.label_names) == 2 and filtered.skipped == {"person with fewer than 4 images": 3}


def test_split_people_is_disjoint(tmp_path: Path) -> None:
    data = D.read_identity_folders(make_identity_folders(tmp_path, people=5, per_person=2))
    known, held = D.split_people(data, 0.4, seed=3)
    known_people = {s.attributes["person"] for s in known.samples}
    held_people = {s.attributes["person"] for s in held.samples}
    assert len(held_people) == 2 and len(known_people) == 3 and not known_people & held_people
    assert len(known) + len(held) == len(data)
    assert {s.attributes["person"] for s in D.split_people(data, 0.4, seed=3)[1].samples} == held_people
    with pytest.raises(D.DatasetError):
        D.split_people(data, 1.0, seed=0)


def test_stratified_split_keeps_every_class(tmp_path: Path) -> None:
    data = D.read_class_folders(make_class_folders(tmp_path, {"a": 10, "b": 4, "c": 2}))
    train, val = D.stratified_split(data, 0.3, seed=5)
    assert Counter(val.labels().tolist()) == {0: 3, 1: 1, 2: 1}
    assert Counter(train.labels().tolist()) == {0: 7, 1: 3, 2: 1}
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    assert [s.path for s in D.stratified_split(data, 0.3, seed=5)[1].samples] == [s.path for s in val.samples]
    assert [s.path for s in D.stratified_split(data, 0.3, seed=6)[1].samples] != [s.path for s in val.samples]


# ---------------------------------------------------------------- other layouts


def test_adience_folds(tmp_path: Path) -> None:
    folds = [
        [("(25, 32)", "m"), ("(0, 2)", "f"), ("(60, 100)", "f"), ("(38, 42)", "m")],
        [("35", "m"), ("(8, 12)", "u"), ("None", "f"), ("(48, 53)", "f")],
    ]
    fold_dir, image_root = make_adience(tmp_path, folds, missing_images=1)
    age = D.read_adience_folds(fold_dir, image_root)
    assert age.task == "age" and age.label_names == list(D.AGE8_GROUPS)
    assert [age.label_names[s.label] for s in age.samples] == [
        "25-32",
        "0-2",
        "60+",
        "38-43",
        "25-32",
        "8-12",
    ]
    assert age.skipped == {"no age label": 1, "image file missing": 1}
    assert [s.attributes["fold"] for s in age.samples] == [0, 0, 0, 0, 1, 1]
    gender = D.read_adience_folds([fold_dir / "fold_0_data.txt"], image_root / "faces", target="gender")
    assert [gender.label_names[s.label] for s in gender.samples] == ["male", "female", "female", "male"]
    assert D.open_dataset(fold_dir, task="gender").task == "gender"
    assert len(D.open_dataset(fold_dir)) == len(age)


def test_class_folders_with_requested_labels(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path, {"smile": 2, "calm": 3})
    data = D.read_class_folders(root, task="expression")
    assert data.label_names == ["calm", "smile"] and data.task == "expression"
    ordered = D.read_class_folders(root, label_names=["smile", "calm", "angry"])
    assert [ordered.label_names[s.label] for s in ordered.samples] == ["calm"] * 3 + ["smile"] * 2
    with pytest.raises(D.DatasetError) as err:
        D.read_class_folders(root, label_names=["smile"])
    assert "calm" in _one_line(err)
    remapped = D.open_dataset(root, label_names=["smile", "calm"])
    assert remapped.label_names == ["smile", "calm"] and remapped.class_counts() == {"smile": 2, "calm": 3}
    with pytest.raises(D.DatasetError) as err:
        D.open_dataset(root, label_names=["happy", "sad"])
    assert "not among the requested labels" in _one_line(err)


def test_unlabeled_reads_recursively(tmp_path: Path) -> None:
    root = make_unlabeled(tmp_path, n=6)
    data = D.read_unlabeled([root])
    assert data.task == "unlabeled" and len(data) == 6 and data.label_names == []
    assert all(s.label is None for s in data.samples) and data[0][1] == -1
    assert len(D.open_dataset(root)) == 6  # a folder of images without labels
    identities = make_identity_folders(tmp_path, people=2, per_person=2)
    both = D.read_unlabeled([root, identities])
    assert len(both) == 10 and D.open_dataset(identities, task="unlabeled").task == "unlabeled"


# ---------------------------------------------------------------- errors


def test_missing_and_empty_datasets_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetError) as err:
        D.open_dataset(tmp_path / "nowhere")
    assert "not found" in _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError) as err:
        D.open_dataset(tmp_path / "empty")
    assert _one_line(err).startswith(f"no images found in {tmp_path / 'empty'}")
    for reader in (D.read_utkface, D.read_identity_folders, D.read_class_folders, D.read_fer2013_folders):
        with pytest.raises(D.DatasetError) as err:
            reader(tmp_path / "empty")
        assert str(tmp_path / "empty") in _one_line(err)
    with pytest.raises(D.DatasetError) as err:
        D.read_ferplus(tmp_path / "empty")
    assert "expected FER+ layout" in _one_line(err)
    with pytest.raises(D.DatasetError) as err:
        D.read_unlabeled([tmp_path / "nowhere"])
    assert "not found" in _one_line(err)


def test_unreadable_image_is_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_class_folders(tmp_path, {"a": 3, "b": 2})
    corrupt = write_corrupt_image(root / "a" / "img_999.jpg")
    data = D.read_class_folders(root)
    bad_index = next(i for i, s in enumerate(data.samples) if s.path == corrupt)
    with caplog.at_level(logging.WARNING, logger="facial_perception.core.datasets"):
        assert data[bad_index] is None
    assert any("img_999.jpg" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)

    loader = DataLoader(data, batch_size=4, shuffle=False, collate_fn=D.collate_skip_unreadable)
    batches = list(loader)
    assert sum(b.skipped for b in batches) == 1
    assert sum(len(b.labels) for b in batches) == len(data) - 1
    assert all(bad_index not in b.indices.tolist() for b in batches)
    assert batches[0].images.shape[1:] == (1, 64, 64)
    empty = D.collate_skip_unreadable([None, None])
    assert empty.skipped == 2 and empty.images.shape[0] == 0

    images, labels, kept = D.load_images(data, 32, workers=2, progress=False)
    assert images.shape == (len(data) - 1, 32, 32) and bad_index not in kept.tolist()
    np.testing.assert_array_equal(labels, data.labels()[kept])


def test_load_images_matches_preprocessing_and_caches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = D.read_utkface(make_utkface(tmp_path, 6), target="gender", size=48)
    images, labels, kept = D.load_images(data, workers=2, progress=False, cache=tmp_path / "cache")
    assert images.dtype == np.uint8 and images.shape == (6, 48, 48) and kept.tolist() == list(range(6))
    for row, index in zip(images, kept, strict=True):
        np.testing.assert_array_equal(row, resize_grey(D.read_image(data.samples[index].path), 48))
    cache_files = list((tmp_path / "cache").glob("*.npz"))
    assert len(cache_files) == 1
    with caplog.at_level(logging.INFO, logger="facial_perception.core.datasets"):
        again, again_labels, _ = D.load_images(data, workers=1, progress=False, cache=tmp_path / "cache")
    assert any("from cache" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_labels, labels)
    other_size, _, _ = D.load_images(data, size=32, progress=False, cache=tmp_path / "cache")
    assert other_size.shape == (6, 32, 32) and len(list((tmp_path / "cache").glob("*.npz"))) == 2

    memory = D.load_into_memory(data, workers=2, progress=False)
    for i in range(len(data)):
        from_disk, label, index = data[i]
        from_memory, label_m, index_m = memory[i]
        assert torch.equal(from_disk, from_memory) and (label, index) == (label_m, index_m)
        np.testing.assert_array_equal(
            from_disk.numpy(), preprocess_face(D.read_image(data.samples[i].path), 48)
        )
