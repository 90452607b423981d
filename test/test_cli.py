"""Smoke runs of every ``facial-perception`` command on tiny real-face datasets, and its user errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import make_identity_folders, make_unlabeled, make_utkface
from PIL import Image

from facial_perception.core.checkpoint import load_model
from facial_perception.core.cli import load_model_or_encoder, main
from facial_perception.core.datasets import read_identity_folders, split_people

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "4", "--device", "cpu", "--workers", "1", "-q"]


def _one_epoch_into(out: Path) -> list[str]:
    """The train-task options of the quick runs: one epoch, 30 % validation, tiny batches, to ``out``."""
    return ["--epochs", "1", "--val-fraction", "0.3", "--out", str(out), *TINY]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    return {
        "tmp": tmp,
        "unlabeled": make_unlabeled(tmp, 8),
        "utkface": make_utkface(tmp, 30),
        "identities": make_identity_folders(tmp, people=4, per_person=6),
    }


@pytest.fixture(scope="module")
def encoder(data) -> Path:
    out = data["tmp"] / "encoder"
    code = main(
        [
            "train-encoder",
            "--data",
            str(data["unlabeled"]),
            "--out",
            str(out),
            "--steps",
            "2",
            "--sample-every",
            "1",
            "--checkpoint-every",
            "1",
            *TINY,
        ]
    )
    assert code == 0
    return out / "began.safetensors"


@pytest.fixture(scope="module")
def gender_model(data, encoder) -> Path:
    out = data["tmp"] / "model.safetensors"
    code = main(
        [
            "train-task",
            "--checkpoint",
            str(encoder),
            "--task",
            "gender",
            "--data",
            str(data["utkface"]),
            "--epochs",
            "2",
            "--val-fraction",
            "0.3",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    return out


def test_columns_ensemble_joins_another_seed_on_the_same_encoder_only(data, encoder, gender_model, capsys):
    tmp = data["tmp"]
    seed_1 = tmp / "gender_seed1.safetensors"
    train = ["train-task", "--checkpoint", str(encoder), "--task", "gender", "--data", str(data["utkface"])]
    assert main([*train, "--seed", "1", *_one_epoch_into(seed_1)]) == 0
    joined = tmp / "gender_ensemble.safetensors"
    edit = ["columns", "--checkpoint", str(gender_model), "--out", str(joined)]
    assert main([*edit, "--ensemble", "gender", str(seed_1)]) == 0
    assert "gender (laterals: none; 2 members)" in capsys.readouterr().out
    model, meta = load_model(joined)
    assert model.specs["gender"].members == 2 and meta["training"]["gender"]["joined_members"][0]["seed"] == 1
    assert main(["info", "--checkpoint", str(joined)]) == 0
    assert "column gender (2 labels; laterals -; 2 members)" in capsys.readouterr().out
    single = tmp / "gender_single_again.safetensors"
    keep = ["columns", "--checkpoint", str(joined), "--out", str(single), "--keep-members"]
    assert main([*keep, "gender=1"]) == 0
    again, meta_again = load_model(single)
    original, _ = load_model(gender_model)
    assert again.specs["gender"].members == 1 and meta_again["training"]["gender"]["joined_members"] == []
    x = torch.randn(3, 1, original.config.input_size, original.config.input_size)
    torch.testing.assert_close(again.eval()(x)["gender"].logits, original.eval()(x)["gender"].logits)
    assert main([*keep, "gender=3"]) == 2
    assert "has 2 member(s): keep 1 to 2, not 3" in _one_line_error(capsys)
    report = tmp / "ensemble_eval.json"
    try:
        evaluate = ["evaluate", "--checkpoint", str(joined), "--task", "gender", "--target", "gender"]
        evaluate += ["--data", str(data["utkface"]), "--out-json", str(report), "--threads", "2"]
        assert main([*evaluate, *TINY]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert json.loads(report.read_text())["num_samples"] == 30

    # a lateral source joined first still admits members of its users trained on its first member
    moods = [tmp / f"mood_seed{seed}.safetensors" for seed in (0, 1)]
    for seed, out in enumerate(moods):
        mood = ["train-task", "--checkpoint", str(gender_model), "--task", "mood", "--target", "gender"]
        mood += ["--data", str(data["utkface"]), "--laterals", "gender", "--seed", str(seed)]
        assert main([*mood, *_one_epoch_into(out)]) == 0
    both = tmp / "both_ensembles.safetensors"
    two = ["columns", "--checkpoint", str(moods[0]), "--out", str(both), "--ensemble", "gender", str(seed_1)]
    assert main([*two, "--ensemble", "mood", str(moods[1])]) == 0
    assert "gender (laterals: none; 2 members), mood (laterals: gender; 2 members)" in capsys.readouterr().out

    # a column trained on another encoder means nothing on this one: one line, nothing written
    other_encoder = tmp / "other_encoder.safetensors"
    model, meta = load_model(seed_1)
    with torch.no_grad():
        next(model.encoder.parameters()).add_(0.01)
    from facial_perception.core.checkpoint import save_model

    save_model(other_encoder, model, meta.get("training"))
    refused = tmp / "refused.safetensors"
    bad = ["columns", "--checkpoint", str(gender_model), "--out", str(refused), "--ensemble", "gender"]
    assert main([*bad, str(other_encoder)]) == 2
    assert "its encoder differs" in _one_line_error(capsys)
    assert main([*bad, str(encoder)]) == 2
    assert "has no column 'gender'" in _one_line_error(capsys)
    assert main([*bad]) == 2
    assert "needs at least one checkpoint" in _one_line_error(capsys)
    assert not refused.exists()


def test_info_for_presets_and_checkpoints(capsys, gender_model):
    assert main(["info", "--config", "lite"]) == 0
    text = capsys.readouterr().out
    assert "GFLOP" in text and "encoder" in text
    assert main(["info", "--config", "paper", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == "paper" and info["gflop_per_face"]["shared_total"] > 1.0
    assert main(["info", "--checkpoint", str(gender_model)]) == 0
    assert "gender" in capsys.readouterr().out


def test_train_encoder_writes_checkpoint_log_and_samples(encoder):
    folder = encoder.parent
    assert encoder.is_file() and (folder / "began_state.pt").is_file()
    with open(folder / "began_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and 0.0 <= float(rows[-1]["k"]) <= 1.0
    assert sorted(p.name for p in (folder / "samples").glob("*.png")) == [
        "step_0000001.png",
        "step_0000002.png",
    ]


def test_train_task_then_a_lateral_column(data, gender_model):
    model, meta = load_model(gender_model)
    assert model.task_names == ["gender"] and model.specs["gender"].labels == ["male", "female"]
    assert meta["training"]["gender"]["epochs_run"] == 2
    work = gender_model.parent / "model_gender_work"
    assert (work / "gender_log.csv").is_file() and (work / "gender_confusion.png").is_file()
    out = data["tmp"] / "model2.safetensors"
    code = main(
        [
            "train-task",
            "--checkpoint",
            str(gender_model),
            "--task",
            "age",
            "--data",
            str(data["utkface"]),
            "--target",
            "age8",
            "--laterals",
            "gender",
            "--ema",
            "0.9",
            *_one_epoch_into(out),
        ]
    )
    assert code == 0
    model2, meta2 = load_model(out)
    assert meta2["training"]["age"]["ema_decay"] == 0.9
    assert meta2["training"]["gender"].get("ema_decay") is None
    assert model2.task_names == ["gender", "age"] and model2.specs["age"].laterals == ["gender"]
    assert set(meta2["training"]) == {"gender", "age"}  # earlier columns keep their metadata


def test_train_task_shares_a_feature_cache_with_augmented_views(data, encoder, capsys):
    shared = data["tmp"] / "shared_features"
    runs = []
    args = ["train-task", "--checkpoint", str(encoder), "--task", "gender", "--data", str(data["utkface"])]
    for seed in ("1", "2"):  # two ensemble members: the second reads the maps the first computed
        out = data["tmp"] / f"views_s{seed}.safetensors"
        assert main([*args, "--feature-cache", str(shared), "--augmented-views", "1", "--seed", seed,
                     *_one_epoch_into(out)]) == 0  # fmt: skip
        runs.append({p.name: p.stat().st_mtime_ns for p in shared.glob("*.safetensors")})
        assert load_model(out)[1]["training"]["gender"]["augmented_views"] == 1
    assert runs[0] == runs[1] and any("views1" in name for name in runs[0])  # computed once, then read
    assert main([*args, "--augmented-views", "1", "--no-feature-cache", *_one_epoch_into(out)]) == 2
    assert "augmented views are cached encoder maps" in _one_line_error(capsys)


def test_evaluate_prints_and_writes_json_with_subgroups(data, gender_model, capsys):
    out_json = data["tmp"] / "eval.json"
    plots = data["tmp"] / "plots"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(gender_model),
            "--task",
            "gender",
            "--data",
            str(data["utkface"]),
            "--out-json",
            str(out_json),
            "--plots",
            str(plots),
            "--shift-test",
            "2",
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "race \\ gender" in text and "Largest gap" in text
    assert "faces shifted 2 px right / left / down / up" in text
    assert "label unchanged by every 2 px shift" in text
    report = json.loads(out_json.read_text())
    assert report["num_samples"] == 30 and set(report["per_class_recall"]) == {"male", "female"}
    assert [s["attributes"] for s in report["subgroups"]] == [["race", "gender"], ["race"], ["gender"]]
    assert sum(r["count"] for r in report["subgroups"][0]["rows"]) == 30
    assert {p.name for p in plots.glob("*.png")} >= {"gender_confusion.png", "gender_reliability.png"}
    shift = report["shift"]
    assert shift["pixels"] == 2 and set(shift["accuracy"]) == {"right", "left", "down", "up"}
    assert all(0.0 <= a <= 1.0 for a in shift["accuracy"].values()) and 0.0 <= shift["unchanged"] <= 1.0
    # a shift of half the face or more is refused with one line
    bad = ["evaluate", "--checkpoint", str(gender_model), "--task", "gender", "--data", str(data["utkface"])]
    assert main([*bad, "--shift-test", "32", "--device", "cpu", "-q"]) == 2
    assert "the shift must be 1..31 pixels, got 32" in _one_line_error(capsys)


def test_ablation_laterals_with_two_runs(data, encoder, capsys):
    out = data["tmp"] / "ablation"
    code = main(
        [
            "ablation",
            "laterals",
            "--checkpoint",
            str(encoder),
            "--data",
            f"gender={data['utkface']}",
            f"age={data['utkface']}:age8",
            "--target",
            "gender",
            "--runs",
            "2",
            "--epochs",
            "1",
            "--val-fraction",
            "0.3",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    assert "no laterals" in capsys.readouterr().out
    with open(out / "laterals_gender_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(r["setting"], r["runs"]) for r in summary] == [("no laterals", "2"), ("age", "2")]
    with open(out / "laterals_gender_runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert sorted({r["seed"] for r in runs}) == ["0", "1"]


def test_fewshot_on_people_held_out_from_training(data, gender_model, capsys):
    out = data["tmp"] / "identity.safetensors"
    code = main(
        [
            "train-task",
            "--checkpoint",
            str(gender_model),
            "--task",
            "identity",
            "--data",
            str(data["identities"]),
            "--holdout-people",
            "0.5",
            "--epochs",
            "1",
            "--val-fraction",
            "0.3",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    model, _ = load_model(out)
    assert len(model.specs["identity"].labels) == 2 and model.specs["identity"].kind == "identity"
    capsys.readouterr()
    out_json = data["tmp"] / "fewshot.json"
    code = main(
        [
            "fewshot",
            "--checkpoint",
            str(out),
            "--data",
            str(data["identities"]),
            "--holdout-fraction",
            "0.5",
            "--shots",
            "2",
            "--trials",
            "3",
            "--out-json",
            str(out_json),
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert code == 0
    result = json.loads(out_json.read_text())
    assert result["people"] == 2 and result["shots"] == 2 and 0.0 <= result["rank1"] <= 1.0
    # The enrolled people are exactly those the identity column never saw.
    _known, held = split_people(read_identity_folders(data["identities"]), 0.5, seed=0)
    held_people = {held.label_names[i] for i in held.labels()}
    assert len(held_people) == 2 and not held_people & set(model.specs["identity"].labels)


def test_whiten_then_open_set_fewshot_on_people_held_out_from_training(data, gender_model, capsys):
    """`whiten` fits on the people the column was trained on only; `fewshot --open-set` then enrols some
    of the held-out people and keeps the others as strangers."""
    tmp, people = data["tmp"], data["identities"]
    column = tmp / "identity_for_whitening.safetensors"
    train = ["train-task", "--checkpoint", str(gender_model), "--task", "identity", "--data", str(people)]
    assert main([*train, "--holdout-people", "0.5", *_one_epoch_into(column)]) == 0
    whitened = tmp / "whitened.safetensors"
    args = ["whiten", "--checkpoint", str(column), "--data", str(people), "--holdout-fraction", "0.5"]
    assert main([*args, "--out", str(whitened), "--device", "cpu", "--workers", "1", "-q"]) == 0
    model, meta = load_model(whitened)
    summary = meta["training"]["identity"]["embedding_whitening"]
    assert summary["people"] == 2 and summary["faces"] == 12  # the two trained people's 6 photos each
    assert model.embedding_dim("identity") == summary["out_dim"] <= 11  # at most faces - 1 axes
    capsys.readouterr()

    out_json, plot = tmp / "open_set.json", tmp / "open_set.png"
    fewshot = ["fewshot", "--checkpoint", str(whitened), "--data", str(people), "--holdout-fraction", "0.5"]
    options = ["--shots", "2", "--trials", "3", "--open-set", "1", "--threshold", "0.2", "--plot", str(plot)]
    assert main([*fewshot, *options, "--out-json", str(out_json), "--device", "cpu", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "Open set: 1 people enrolled with 2 photos each, 1 strangers" in printed and "(given)" in printed
    report = json.loads(out_json.read_text())["open_set"]
    assert report["enrolled_people"] == 1 and report["stranger_queries"] == 6 and report["threshold"] == 0.2
    assert report["known_queries"] == 4 and len(report["dir"]) == len(report["thresholds"])
    with Image.open(plot) as png:
        assert png.size[0] > 400

    # bad requests: one line each, nothing written
    capsys.readouterr()
    with pytest.raises(SystemExit) as parse_error:
        main([*fewshot, "--open-set", "1", "--threshold", "2", "-q"])
    assert parse_error.value.code == 2 and "cosine similarity in [-1, 1]" in capsys.readouterr().err
    never = tmp / "never.safetensors"
    assert (
        main(["whiten", "--checkpoint", str(gender_model), "--data", str(people), "--out", str(never)]) == 2
    )
    assert "has no identity column" in capsys.readouterr().err and not never.exists()
    # two held-out people, both enrolled: no stranger left
    assert main([*fewshot, "--open-set", "2", "--shots", "2", "-q"]) == 2
    assert "at least one more person as a stranger" in capsys.readouterr().err


def test_columns_standalone_averages_an_end_to_end_network_until_dropped(data, encoder, gender_model, capsys):
    tmp = data["tmp"]
    plain = tmp / "gender_plain_cnn.safetensors"
    train = [
        "train-task",
        "--config",
        "lite",
        "--train-encoder",
        "--task",
        "gender",
        "--data",
        str(data["utkface"]),
    ]
    assert main([*train, "--seed", "3", *_one_epoch_into(plain)]) == 0
    joined = tmp / "gender_with_standalone.safetensors"
    edit = ["columns", "--checkpoint", str(gender_model), "--out", str(joined)]
    assert main([*edit, "--standalone", "gender", str(plain)]) == 0
    assert "gender (laterals: none; 1 standalone)" in capsys.readouterr().out
    model, meta = load_model(joined)
    original, _ = load_model(gender_model)
    network, _ = load_model(plain)
    assert (
        len(model.standalone["gender"]) == 1
        and meta["training"]["gender"]["standalone_members"][0]["seed"] == 3
    )
    x = torch.rand(4, 1, original.config.input_size, original.config.input_size) * 2 - 1
    with torch.inference_mode():
        mean = (original.predict(x)["gender"].probabilities + network.predict(x)["gender"].probabilities) / 2
        torch.testing.assert_close(model.predict(x)["gender"].probabilities, mean)
    assert main(["info", "--checkpoint", str(joined)]) == 0
    assert "standalone gender member (own lite encoder)" in capsys.readouterr().out
    report = tmp / "standalone_eval.json"
    evaluate = ["evaluate", "--checkpoint", str(joined), "--task", "gender", "--target", "gender"]
    assert main([*evaluate, "--data", str(data["utkface"]), "--out-json", str(report), *TINY]) == 0
    assert json.loads(report.read_text())["num_samples"] == 30

    dropped = tmp / "gender_standalone_dropped.safetensors"
    assert (
        main(["columns", "--checkpoint", str(joined), "--out", str(dropped), "--drop-standalone", "gender"])
        == 0
    )
    again, meta_again = load_model(dropped)
    assert not again.standalone and "standalone_members" not in meta_again["training"]["gender"]
    with torch.inference_mode():
        torch.testing.assert_close(
            again.predict(x)["gender"].probabilities, original.predict(x)["gender"].probabilities
        )

    refused = tmp / "refused_standalone.safetensors"
    bad = ["columns", "--checkpoint", str(gender_model), "--out", str(refused)]
    assert main([*bad, "--standalone", "gender", str(encoder)]) == 2
    assert "has no column 'gender'" in _one_line_error(capsys)
    assert main([*bad, "--standalone", "gender"]) == 2
    assert "needs at least one checkpoint" in _one_line_error(capsys)
    assert main([*bad, "--drop-standalone", "gender"]) == 2
    assert "has no standalone members" in _one_line_error(capsys)
    assert not refused.exists()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_columns_renames_and_drops_and_a_wider_column_reuses_the_encoder(
    data, gender_model, capsys, tmp_path
):
    renamed = tmp_path / "renamed.safetensors"
    assert (
        main(["columns", "--checkpoint", str(gender_model), "--rename", "gender=sex", "--out", str(renamed)])
        == 0
    )
    assert "sex (laterals: none)" in capsys.readouterr().out
    old, _ = load_model(gender_model)
    new, meta = load_model(renamed)
    assert new.task_names == ["sex"] and set(meta["training"]) == {"sex"}
    x = torch.randn(2, 1, old.config.input_size, old.config.input_size)
    torch.testing.assert_close(new(x)["sex"].logits, old(x)["gender"].logits)
    dropped = tmp_path / "encoder_only.safetensors"
    assert main(["columns", "--checkpoint", str(renamed), "--drop", "sex", "--out", str(dropped), "-q"]) == 0
    assert load_model(dropped)[0].task_names == []
    bad = [
        "columns",
        "--checkpoint",
        str(renamed),
        "--rename",
        "sex",
        "--out",
        str(tmp_path / "x.safetensors"),
    ]
    assert main(bad) == 2
    assert "OLD=NEW" in _one_line_error(capsys)
    assert main(["columns", "--checkpoint", str(renamed), "--drop", "age", "--out", str(tmp_path / "y")]) == 2
    assert "no column named 'age'" in _one_line_error(capsys)
    bad = ["columns", "--checkpoint", str(renamed), "--mirror-average", "age", "--out", str(tmp_path / "w")]
    assert main(bad) == 2
    assert "no column named 'age'" in _one_line_error(capsys)
    assert not any((tmp_path / name).exists() for name in ("x.safetensors", "y", "w"))
    mirrored = tmp_path / "mirrored.safetensors"
    edit = ["columns", "--checkpoint", str(renamed), "--out", str(mirrored)]
    assert main([*edit, "--mirror-average", "sex"]) == 0
    assert "sex (laterals: none; mirror averaging)" in capsys.readouterr().out
    assert load_model(mirrored)[0].specs["sex"].mirror_average and not new.specs["sex"].mirror_average
    assert main(["info", "--checkpoint", str(mirrored)]) == 0
    assert "inference with mirror averaging (sex)" in capsys.readouterr().out
    edit[2] = str(mirrored)
    assert main([*edit, "--no-mirror-average", "sex"]) == 0
    assert "sex (laterals: none)" in capsys.readouterr().out
    assert not load_model(mirrored)[0].specs["sex"].mirror_average

    assert main(["info", "--checkpoint", str(gender_model), "--print-config"]) == 0
    wide = json.loads(capsys.readouterr().out)
    assert wide == old.config.to_dict()
    wide["name"] = "wide-columns"
    wide["column"]["fc_dim"] = 2 * wide["column"]["fc_dim"]
    config_file = tmp_path / "wide.json"
    config_file.write_text(json.dumps(wide))
    out = tmp_path / "wide.safetensors"
    args = ["train-task", "--config", str(config_file), "--encoder-from", str(renamed), "--task", "gender"]
    args += ["--data", str(data["utkface"]), *_one_epoch_into(out)]
    assert main(args) == 0
    model, _ = load_model(out)
    assert model.config.column.fc_dim == wide["column"]["fc_dim"]
    for key, value in old.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)  # frozen, copied encoder
    wide["encoder"]["latent_dim"] += 1
    config_file.write_text(json.dumps(wide))
    args[args.index("--out") + 1] = str(tmp_path / "z.safetensors")
    assert main(args) == 2
    assert "encoder config differs" in _one_line_error(capsys)


def test_train_joint_retrains_the_encoder_with_every_task_and_resumes(
    data, encoder, gender_model, tmp_path, capsys
):
    out = tmp_path / "joint.safetensors"
    work = tmp_path / "joint_work"
    utk = str(data["utkface"])
    args = ["train-joint", "--checkpoint", str(encoder), "--data", f"gender={utk}:gender", f"age={utk}:age8"]
    args += [f"identity={data['identities']}", "--weight", "identity=0.5", "--val-fraction", "0.3"]
    args += ["--holdout-people", "identity=0.25"]  # one of the 4 people stays unseen (for fewshot)
    args += ["--val-data", f"identity={data['identities']}"]  # its photos leave validation too
    args += ["--steps-per-epoch", "3", "--epochs", "2", "--out", str(out), "--work-dir", str(work), *TINY]
    assert main(args) == 0
    model, meta = load_model(out)
    assert model.task_names == ["gender", "age", "identity"]
    assert all(model.specs[t].laterals == [] for t in model.task_names)
    _known, held = split_people(read_identity_folders(data["identities"]), 0.25, seed=0)
    unseen = {held.label_names[int(i)] for i in held.labels()}
    assert len(unseen) == 1 and model.specs["identity"].kind == "identity"
    assert len(model.specs["identity"].labels) == 3 and not unseen & set(model.specs["identity"].labels)
    assert meta["training"]["identity"]["loss_weight"] == 0.5 and meta["training"]["age"]["train_encoder"]
    start = load_model_or_encoder(encoder)
    changed = [
        k
        for k, v in start.encoder.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, model.encoder.state_dict()[k])
    ]
    assert changed  # the encoder itself was trained
    with open(work / "joint_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for task in ("gender", "age", "identity"):
        assert 0.0 <= float(rows[-1][f"{task}_val_acc"]) <= 1.0 and (work / f"{task}_confusion.png").is_file()
    mean = sum(float(rows[-1][f"{t}_val_acc"]) for t in ("gender", "age", "identity")) / 3
    assert float(rows[-1]["val_acc"]) == pytest.approx(mean, abs=1e-5)
    assert (work / "joint_curves.png").is_file()

    args[args.index("--epochs") + 1] = "3"  # resumes from the saved state: one more epoch
    assert main(args) == 0
    with open(work / "joint_log.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]

    bad = tmp_path / "bad.safetensors"
    on_columns = [
        "train-joint",
        "--checkpoint",
        str(gender_model),
        "--data",
        f"age={utk}:age8",
        "--out",
        str(bad),
    ]
    assert main([*on_columns, *TINY]) == 2
    assert "already has columns ['gender']" in _one_line_error(capsys)
    unknown = [
        "train-joint",
        "--checkpoint",
        str(encoder),
        "--data",
        f"age={utk}:age8",
        "--weight",
        "gender=2",
    ]
    assert main([*unknown, "--out", str(bad), *TINY]) == 2
    assert "--weight names tasks that are not in --data: gender" in _one_line_error(capsys)
    malformed = ["train-joint", "--checkpoint", str(encoder), "--data", f"age={utk}:age8", "--weight", "age"]
    assert main([*malformed, "--out", str(bad), *TINY]) == 2
    assert "NAME=VALUE" in _one_line_error(capsys)
    assert not bad.exists()


def test_user_mistakes_exit_2_with_one_line(data, gender_model, capsys, tmp_path):
    missing = str(tmp_path / "nowhere")
    assert main(["evaluate", "--checkpoint", str(gender_model), "--task", "gender", "--data", missing]) == 2
    assert _one_line_error(capsys) == f"error: dataset not found: {missing}"
    assert main(["train-task", "--config", "lite", "--task", "gender", "--data", missing, "--out", "x"]) == 2
    assert _one_line_error(capsys) == f"error: dataset not found: {missing}"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(gender_model),
                "--task",
                "emotion",
                "--data",
                str(data["utkface"]),
                "-q",
            ]
        )
        == 2
    )
    assert "no column 'emotion'" in _one_line_error(capsys)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(gender_model.read_bytes()[:200])
    assert main(["info", "--checkpoint", str(corrupt)]) == 2
    message = _one_line_error(capsys)
    assert str(corrupt) in message and ("truncated" in message or "corrupt" in message)
    assert (
        main(
            [
                "train-task",
                "--checkpoint",
                str(gender_model),
                "--task",
                "age",
                "--data",
                str(data["utkface"]),
                "--laterals",
                "emotion",
                "--out",
                str(tmp_path / "m.safetensors"),
                *TINY,
            ]
        )
        == 2
    )
    assert "emotion" in _one_line_error(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["train-task", "--task", "x"])
    assert exc.value.code == 2
    assert "required" in _one_line_error(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["train-encoder", "--data", "x", "--out", "y", "--steps", "0"])
    assert exc.value.code == 2
    assert "positive integer" in _one_line_error(capsys)
    ablation = ["ablation", "encoder", "--checkpoint", str(gender_model)]
    ablation += ["--data", f"gender={data['utkface']}"]
    assert main([*ablation, "--augmented-views", "1", "--out", str(tmp_path / "abl"), *TINY]) == 2
    assert "--augmented-views needs a frozen encoder" in _one_line_error(capsys)
    assert not (tmp_path / "abl").exists()


def test_module_entry_point_error_has_no_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "facial_perception.core.cli",
            "fewshot",
            "--checkpoint",
            missing,
            "--data",
            missing,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: dataset not found: {missing}"


def test_split_writes_deterministic_disjoint_stratified_folders(data, tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        argv = ["split", "--data", str(data["utkface"]), "--out", str(out), "--val-fraction", "0.3", "-q"]
        assert main(argv) == 0
    names = {part: sorted(p.name for p in (first / part).iterdir()) for part in ("train", "val")}
    assert names["val"] == sorted(p.name for p in (second / "val").iterdir())  # same seed, same split
    assert not set(names["train"]) & set(names["val"])
    assert len(names["train"]) + len(names["val"]) == 30
    assert all((first / "val" / n).resolve().parent == data["utkface"].resolve() for n in names["val"])
    assert not (tmp_path / "a.partial").exists()
    # identity folders: every person appears in both parts
    people = tmp_path / "people"
    argv = ["split", "--data", str(data["identities"]), "--out", str(people), "--by-person"]
    assert main(argv) == 0
    assert {p.name for p in (people / "train").iterdir()} == {p.name for p in (people / "val").iterdir()}
    # an existing, non-empty output is refused and left alone
    capsys.readouterr()
    assert main(["split", "--data", str(data["utkface"]), "--out", str(first)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (first / "val").iterdir()) == names["val"]


def test_train_task_init_from_fine_tunes_a_copy_and_leaves_the_source(data, gender_model, capsys):
    source = load_model(gender_model)[0].columns["gender"].state_dict()
    args = [
        "train-task",
        "--checkpoint",
        str(gender_model),
        "--data",
        str(data["utkface"]),
        "--target",
        "gender",
    ]
    args += ["--seed", "5"]  # the source was trained with seed 0: a fresh layer starts elsewhere
    trained = {k: v for k, v in source.items() if "running_" not in k and "num_batches" not in k}
    # a learning rate too small to move a weight: the new column must be the source, layer for layer
    out = data["tmp"] / "fine_tuned.safetensors"
    assert main([*args, "--task", "gender_site", "--init-from", "gender", "--lr", "1e-12",
                 *_one_epoch_into(out)]) == 0  # fmt: skip
    model, meta = load_model(out)
    assert model.task_names == ["gender", "gender_site"] and model.specs["gender_site"].laterals == []
    record = meta["training"]["gender_site"]
    assert record["init_from"] == "gender" and 0.0 <= record["val_acc_before"] <= 1.0
    copy = model.columns["gender_site"].state_dict()
    assert all(torch.allclose(copy[k], v, atol=1e-6) for k, v in trained.items())
    assert all(torch.equal(model.columns["gender"].state_dict()[k], v) for k, v in source.items())
    # the same classes in another order get a fresh output layer; every other layer is copied
    out2 = data["tmp"] / "fine_tuned_relabelled.safetensors"
    assert main([*args, "--task", "gender_swapped", "--labels", "female", "male", "--init-from", "gender",
                 "--lr", "1e-12", *_one_epoch_into(out2)]) == 0  # fmt: skip
    swapped = load_model(out2)[0].columns["gender_swapped"].state_dict()
    assert not torch.allclose(swapped["out.weight"], source["out.weight"], atol=1e-3)
    body = {k: v for k, v in trained.items() if not k.startswith("out.")}
    assert all(torch.allclose(swapped[k], v, atol=1e-6) for k, v in body.items())
    # without --init-from the same run starts elsewhere
    out3 = data["tmp"] / "from_scratch.safetensors"
    assert main([*args, "--task", "gender_new", "--lr", "1e-12", *_one_epoch_into(out3)]) == 0
    scratch = load_model(out3)[0].columns["gender_new"].state_dict()
    assert not torch.allclose(scratch["convs.0.weight"], source["convs.0.weight"], atol=1e-3)
    # mistakes: one line, exit 2, nothing written
    bad = data["tmp"] / "never_written.safetensors"
    assert main([*args, "--task", "x", "--init-from", "nose", *_one_epoch_into(bad)]) == 2
    assert "--init-from: no column 'nose'" in _one_line_error(capsys)
    assert main([*args, "--task", "x", "--init-from", "gender", "--laterals", "gender",
                 *_one_epoch_into(bad)]) == 2  # fmt: skip
    assert "needs its lateral sources []" in _one_line_error(capsys)
    assert not bad.exists()


def test_fine_tuning_keeps_the_starting_weights_when_no_epoch_beats_them(data, capsys):
    """The shipped gender column on real faces, then a learning rate that wrecks every epoch."""
    shipped = REPO / "facial_perception" / "models" / "default.safetensors"
    source = load_model(shipped)[0]
    out = data["tmp"] / "wrecked.safetensors"
    args = ["train-task", "--checkpoint", str(shipped), "--task", "gender_site", "--target", "gender"]
    args += ["--data", str(data["utkface"]), "--init-from", "gender", "--lr", "50", "--epochs", "2"]
    assert main([*args, "--val-fraction", "0.3", "--out", str(out), *TINY]) == 0
    model, meta = load_model(out)
    record = meta["training"]["gender_site"]
    assert record["val_acc_before"] >= 0.7  # the shipped column, on faces it was trained for
    assert record["best_epoch"] == 0 and record["best_val_acc"] == record["val_acc_before"]
    assert model.specs["gender_site"].laterals == source.specs["gender"].laterals == ["emotion"]
    start = source.columns["gender"].members[0].state_dict()  # an ensemble: its first member
    kept = model.columns["gender_site"].state_dict()
    assert all(torch.equal(kept[k], v) for k, v in start.items())
