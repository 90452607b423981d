"""The ``facial-perception`` command: model info, training, evaluation, ablations, benchmark, few-shot.

Run ``facial-perception <command> --help`` (or ``python -m facial_perception.core.cli``). Every
training command also runs under ``torchrun --nproc_per_node N`` (see docs/TRAINING.md).
User mistakes (a missing dataset, a bad option, a damaged checkpoint) print one line starting with
``error:`` on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from facial_perception.core.datasets import FaceSample

PROG = "facial-perception"


class CLIError(ValueError):
    """A command-line mistake found after parsing (conflicting or incomplete options)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2) instead of usage dumps."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "the user asked for something impossible" (no traceback)."""
    errors: list[type[BaseException]] = [CLIError, FileNotFoundError, NotADirectoryError, PermissionError]
    modules = {
        "facial_perception.core.config": ["ConfigError"],
        "facial_perception.core.progressive": ["ModelError"],
        "facial_perception.core.checkpoint": ["CheckpointError"],
        "facial_perception.core.datasets": ["DatasetError"],
        "facial_perception.core.preprocess": ["PreprocessError"],
        "facial_perception.core.training": ["TrainingError"],
        "facial_perception.core.evaluation": ["EvaluationError"],
        "facial_perception.core.features": ["FeatureCacheError"],
        "facial_perception.core.distributed": ["DistributedError"],
        "facial_perception.core.ablation": ["AblationError"],
        "facial_perception.core.devices": ["DeviceError"],
        "facial_perception.core.benchmark": ["BenchmarkError"],
    }
    import importlib

    for module_name, names in modules.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors += [getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)]
    return tuple(errors)


# --------------------------------------------------------------------------------------------------
# Shared option groups
# --------------------------------------------------------------------------------------------------


def _bounded(kind: type, minimum: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that must be > (strict) or >= ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _bounded(int, 1, False, "a positive integer")
_non_negative_int = _bounded(int, 0, False, "an integer >= 0")
_positive_float = _bounded(float, 0.0, True, "a positive number")
_non_negative_float = _bounded(float, 0.0, False, "a number >= 0")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _similarity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in [-1, 1], got {text!r}")
    return value


def _add_runtime(p: argparse.ArgumentParser, workers_default: int = 2) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument(
        "--workers", type=_non_negative_int, default=workers_default, help="image decoding / loader workers"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (python, numpy, torch, sampler)")
    p.add_argument("--image-cache", metavar="DIR", help="keep decoded images here (.npz) for later runs")
    p.add_argument(
        "--threads", type=_positive_int, metavar="N",
        help="torch CPU threads (default: torch's, one per core); 1 per job when jobs share a small machine",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _add_model_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="CKPT", help="output model checkpoint (.safetensors)")
    p.add_argument("--work-dir", metavar="DIR", help="logs, plots, resume state (default: beside --out)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a state file exists")


def _add_model_source(p: argparse.ArgumentParser, required: bool = False, encoder_from: bool = False) -> None:
    if encoder_from:
        p.add_argument(
            "--encoder-from",
            metavar="FILE",
            help="with --config: copy the encoder of this model/BEGAN checkpoint (e.g. other column widths)",
        )
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--checkpoint", metavar="FILE", help="model (.safetensors) or BEGAN encoder checkpoint to start from"
    )
    group.add_argument(
        "--config",
        metavar="NAME|FILE",
        help="start from a random encoder: preset (lite, paper) or config JSON",
    )


def _add_column_training(p: argparse.ArgumentParser, feature_cache: bool = True) -> None:
    p.add_argument("--epochs", type=_positive_int, default=35, help="maximum epochs (paper: 35)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="per process (paper: 32)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument(
        "--lr-patience",
        type=_positive_int,
        default=2,
        help="halve the lr after this many epochs w/o val-loss gain",
    )
    p.add_argument(
        "--patience",
        type=_non_negative_int,
        default=8,
        help="early stopping: epochs without a better val accuracy",
    )
    p.add_argument(
        "--val-fraction", type=_fraction, default=0.1, help="stratified validation share (default 0.1)"
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument(
        "--max-images", type=_positive_int, help="use a stratified subset of this many training images"
    )
    p.add_argument("--no-augment", action="store_true", help="no flips / affine / brightness augmentation")
    if feature_cache:
        p.add_argument(
            "--no-feature-cache",
            action="store_true",
            help="run the frozen encoder every step (no feature cache)",
        )
        p.add_argument(
            "--feature-cache",
            metavar="DIR",
            help="keep the frozen encoder's maps here (default: WORK_DIR/feature_cache): columns trained "
            "on the same encoder and images (ensemble members, other seeds) then compute them once",
        )
        p.add_argument(
            "--augmented-views",
            type=_non_negative_int,
            default=0,
            metavar="K",
            help="also cache the encoder maps of K shifted/scaled/rotated copies of every training image "
            "(K encoder passes once): columns that cope with off-centre faces (default 0)",
        )


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _say(args: argparse.Namespace, text: str) -> None:
    if _is_main():
        print(text, flush=True)


def _check_exists(path: str | None) -> None:
    if path is not None and not Path(path).expanduser().exists():
        raise CLIError(f"dataset not found: {path}")


def _check_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file's path, or a one-line error before any work starts."""
    target = Path(path).expanduser()
    if not target.is_file():
        raise CLIError(f"checkpoint not found: {path}")
    return target


def _load_base(args: argparse.Namespace) -> Any:
    """A ProgressiveNet from ``--checkpoint`` (model or BEGAN) or a fresh one from ``--config``."""
    from facial_perception.core.config import get_config
    from facial_perception.core.progressive import ProgressiveNet

    if getattr(args, "checkpoint", None):
        if getattr(args, "encoder_from", None):
            raise CLIError("--encoder-from goes with --config (a --checkpoint already holds its encoder)")
        return load_model_or_encoder(args.checkpoint)
    import torch

    torch.manual_seed(getattr(args, "seed", 0))  # the same random encoder on every torchrun rank
    model = ProgressiveNet(get_config(args.config or "lite"))
    if getattr(args, "encoder_from", None):
        from facial_perception.core.progressive import ModelError

        source = load_model_or_encoder(args.encoder_from)
        if source.config.encoder != model.config.encoder:
            raise CLIError(
                f"--encoder-from {args.encoder_from}: its encoder config differs from --config's "
                f"({source.config.encoder} vs {model.config.encoder})"
            )
        try:
            model.init_encoder_from(source.encoder)
        except ModelError as exc:
            raise CLIError(f"--encoder-from {args.encoder_from}: {exc}") from exc
    return model


def load_model_or_encoder(path: str | os.PathLike[str]) -> Any:
    """A ProgressiveNet from a model checkpoint, or with the encoder of a BEGAN checkpoint (no columns)."""
    from facial_perception.core.checkpoint import load_model

    model, meta = load_model(_check_checkpoint(path))
    if isinstance(meta.get("training"), dict) and meta.get("kind") != "began":
        model.training_meta = dict(meta["training"])
    return model


def _resolve(device: str) -> Any:
    from facial_perception.core.devices import resolve_device

    return resolve_device(device)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not _is_main():
        logging.getLogger().setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from facial_perception.core.config import get_config
    from facial_perception.core.flops import format_model_info, model_info

    specs, standalone, whitening = None, None, {}
    if args.checkpoint:
        model = load_model_or_encoder(args.checkpoint)
        config, specs = model.config, list(model.specs.values()) or None
        standalone, whitening = model.standalone_configs(), model.whitening_shapes()
    else:
        config = get_config(args.config or "lite")
    if args.print_config:  # a starting point for a custom config file (e.g. other column widths)
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    info = model_info(config, specs, standalone)
    if whitening:  # fixed buffers, ~0.0002 GFLOP per face: not in the tables
        info["whitening"] = whitening
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_model_info(info))
        for name, (d_in, d_out) in whitening.items():
            print(f"{name} embedding whitened {d_in}-d -> {d_out}-d for the gallery (command `whiten`)")
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    import numpy as np

    from facial_perception.core import datasets as ds
    from facial_perception.core.config import get_config
    from facial_perception.core.distributed import init_distributed, shutdown
    from facial_perception.core.training import train_encoder

    if (args.epochs is None) == (args.steps is None):
        raise CLIError("give exactly one of --epochs or --steps")
    for folder in args.data:
        _check_exists(folder)
    config = get_config(args.config)
    ctx = init_distributed(_resolve(args.device))
    try:
        dataset = ds.read_unlabeled(args.data, size=config.input_size)
        if args.max_images and args.max_images < len(dataset):
            pick = np.random.default_rng(args.seed).choice(len(dataset), args.max_images, replace=False)
            dataset = dataset.subset(sorted(pick.tolist()))
        images, _labels, _kept = ds.load_images(
            dataset,
            config.input_size,
            args.workers,
            args.image_cache,
            progress=not args.quiet and ctx.is_main,
        )
        result = train_encoder(
            config,
            images,
            args.out,
            epochs=args.epochs,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            min_lr=args.min_lr,
            gamma=args.gamma,
            lambda_k=args.lambda_k,
            device=args.device,
            resume=not args.no_resume,
            seed=args.seed,
            workers=0,
            log_every=args.log_every,
            sample_every=args.sample_every,
            checkpoint_every=args.checkpoint_every,
            progress=not args.quiet,
        )
    finally:
        shutdown(ctx)
    _say(
        args,
        f"BEGAN: {result.steps} steps, k={result.k:.4f}, M_global={result.m_global:.4f}; "
        f"encoder checkpoint {result.checkpoint}, log {result.log}",
    )
    return 0


def cmd_train_task(args: argparse.Namespace) -> int:
    from facial_perception.core.distributed import init_distributed, shutdown
    from facial_perception.core.progressive import TaskSpec
    from facial_perception.core.training import load_task_split, train_column

    _check_exists(args.data)
    _check_exists(args.val_data)
    model = _load_base(args)
    if args.init_from is not None and args.init_from not in model.specs:
        raise CLIError(
            f"--init-from: no column {args.init_from!r} in the checkpoint (columns: {model.task_names})"
        )
    size = model.config.input_size
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / f"{out.stem}_{args.task}_work"
    ctx = init_distributed(_resolve(args.device))
    try:
        train, val = load_task_split(
            args.data,
            args.task,
            size,
            layout=args.layout,
            target=args.target,
            label_names=args.labels,
            val_path=args.val_data,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            max_images=args.max_images,
            holdout_people=args.holdout_people,
            workers=args.workers,
            image_cache=args.image_cache,
            progress=not args.quiet and ctx.is_main,
        )
        kind = args.kind or (
            "identity" if args.task.startswith("identity") or args.layout == "identity" else None
        )
        laterals = args.laterals
        if args.init_from is not None:  # fine-tuning keeps the source's inputs and kind (checked above)
            source = model.specs[args.init_from]
            laterals = source.laterals if laterals is None else laterals
            kind = kind or source.kind
        spec = TaskSpec(args.task, train.label_names or [], list(laterals or []), kind or "classification")
        _say_sizes(args, args.task, train, val)
        result = train_column(
            model,
            spec,
            train,
            val,
            work,
            train_encoder=args.train_encoder,
            use_feature_cache=not args.no_feature_cache,
            soft_targets=args.soft_labels,
            balance_by=args.balance_by,
            ema_decay=args.ema,
            augmented_views=args.augmented_views,
            init_from=args.init_from,
            cache_dir=args.feature_cache,
            workers=args.workers if args.loader_workers else 0,
            checkpoint_path=out,
            **_schedule(args),
        )
    finally:
        shutdown(ctx)
    _say(
        args,
        f"{args.task}: best validation accuracy {100 * result.best_val_acc:.2f}% "
        f"at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs run{', stopped early' if result.stopped_early else ''}); "
        f"checkpoint {out}; logs and plots in {work}",
    )
    return 0


def _schedule(args: argparse.Namespace, one_run: bool = True) -> dict[str, Any]:
    """Training options from ``_add_column_training`` and runtime flags; ``one_run`` adds seed, resume."""
    options: dict[str, Any] = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "patience_lr": args.lr_patience,
        "early_stopping": args.patience or None,
        "augment": not args.no_augment,
        "device": args.device,
        "progress": not args.quiet,
    }
    if one_run:
        options.update(seed=args.seed, resume=not args.no_resume)
    return options


def _say_sizes(args: argparse.Namespace, task: str, train: Any, val: Any) -> None:
    classes = len(train.label_names or [])
    _say(args, f"{task}: {len(train)} training / {len(val)} validation images, {classes} classes")


def _holdout_fraction(text: str) -> float:
    """A fraction in [0, 1) as a ValueError (``_named_values`` turns it into a one-line error)."""
    try:
        return _fraction(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def _named_values(items: Sequence[str] | None, what: str, convert: Any = str) -> dict[str, Any]:
    """``NAME=VALUE`` items -> {name: convert(value)} with a one-line error on a bad item."""
    values: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise CLIError(f"{what} expects NAME=VALUE, got {item!r}")
        try:
            values[name] = convert(value)
        except ValueError as exc:
            raise CLIError(f"{what} {item!r}: {exc}") from None
    return values


def cmd_train_joint(args: argparse.Namespace) -> int:
    from facial_perception.core.joint import JointTask, train_jointly
    from facial_perception.core.progressive import TaskSpec
    from facial_perception.core.training import load_task_split

    parsed = _parse_task_data(args.data)
    names = [name for name, _path, _target in parsed]
    val_paths = _named_values(args.val_data, "--val-data")
    weights = _named_values(args.weight, "--weight", float)
    holdout = _named_values(args.holdout_people, "--holdout-people", _holdout_fraction)
    for option, keys in (
        ("--val-data", val_paths),
        ("--weight", weights),
        ("--soft-labels", args.soft_labels or []),
        ("--holdout-people", holdout),
    ):
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise CLIError(f"{option} names tasks that are not in --data: {', '.join(unknown)}")
    for path in val_paths.values():
        _check_exists(path)
    model = _load_base(args)
    tasks = []
    for name, path, target in parsed:
        train, val = load_task_split(
            path,
            name,
            model.config.input_size,
            target=target,
            val_path=val_paths.get(name),
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            max_images=args.max_images,
            holdout_people=holdout.get(name, 0.0),
            workers=args.workers,
            image_cache=args.image_cache,
            progress=not args.quiet,
        )
        kind = "identity" if name.startswith("identity") else "classification"
        tasks.append(
            JointTask(
                TaskSpec(name, train.label_names or [], [], kind),
                train,
                val,
                soft_targets=name in (args.soft_labels or []),
                weight=weights.get(name, 1.0),
            )
        )
        _say_sizes(args, name, train, val)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / f"{out.stem}_joint_work"
    result = train_jointly(
        model, tasks, work, steps_per_epoch=args.steps_per_epoch, checkpoint_path=out, **_schedule(args)
    )
    per_task = ", ".join(f"{n} {100 * a:.2f}%" for n, a in result.best_val_acc.items())
    early = ", stopped early" if result.stopped_early else ""
    _say(
        args,
        f"joint: best validation accuracy {per_task} (mean {100 * result.best_score:.2f}%) at epoch "
        f"{result.best_epoch} ({result.epochs_run} epochs run{early}); "
        f"checkpoint {out}; logs and plots in {work}",
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from facial_perception.core.evaluation import evaluate_checkpoint

    _check_exists(args.data)
    _check_checkpoint(args.checkpoint)
    subgroups: Any = (
        "auto" if args.subgroups is None else (None if args.subgroups == "none" else args.subgroups)
    )
    report = evaluate_checkpoint(
        args.checkpoint,
        args.task,
        args.data,
        args.out_json,
        layout=args.layout,
        target=args.target,
        split=args.split,
        subgroups=subgroups,
        plots_dir=args.plots,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        image_cache=args.image_cache,
        min_group_count=args.min_group,
        shift_pixels=args.shift_test,
        progress=not args.quiet,
    )
    print(report.to_markdown(), end="")
    if args.out_json:
        print(f"\nJSON written to {args.out_json}")
    return 0


def _parse_task_data(items: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """``NAME=PATH[:TARGET]`` -> (name, path, target)."""
    parsed = []
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not name or not rest:
            raise CLIError(f"--data expects NAME=PATH[:TARGET], got {item!r}")
        path, _colon, target = rest.partition(":")
        _check_exists(path)
        parsed.append((name, path, target or None))
    names = [n for n, _p, _t in parsed]
    if len(set(names)) != len(names):
        raise CLIError(f"task names repeat in --data: {names}")
    return parsed


def cmd_ablation(args: argparse.Namespace) -> int:
    from facial_perception.core import ablation
    from facial_perception.core.training import load_task_split

    if args.experiment == "encoder" and args.augmented_views:
        raise CLIError("--augmented-views needs a frozen encoder; the encoder ablation also re-trains it")
    specs = _parse_task_data(args.data)
    model = _load_base(args)
    size = model.config.input_size
    tasks = []
    for name, path, target in specs:
        train, val = load_task_split(
            path,
            name,
            size,
            target=target,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            max_images=args.max_images,
            workers=args.workers,
            image_cache=args.image_cache,
            progress=not args.quiet,
        )
        tasks.append(ablation.task_data_from_split(name, train, val))
    kwargs = {
        **_schedule(args, one_run=False),
        "use_feature_cache": not args.no_feature_cache,
        "augmented_views": args.augmented_views,
    }
    if args.feature_cache:
        kwargs["cache_dir"] = args.feature_cache
    if args.experiment == "encoder":
        result = ablation.frozen_vs_retrained(model, tasks, args.out, args.runs, args.seed, **kwargs)
    elif args.experiment == "laterals":
        if not args.target:
            raise CLIError("ablation laterals needs --target TASK (one of the --data names)")
        by_name = {t.name: t for t in tasks}
        if args.target not in by_name:
            raise CLIError(f"--target {args.target!r} is not among the --data tasks {sorted(by_name)}")
        sources = [t for t in tasks if t.name != args.target]
        result = ablation.lateral_subsets(
            model, by_name[args.target], sources, args.out, args.runs, args.seed, args.max_sources, **kwargs
        )
    else:
        result = ablation.lateral_curves(model, tasks, args.out, args.runs, args.seed, **kwargs)
    print(result.to_markdown(), end="")
    print("\nfiles: " + ", ".join(sorted(result.files.values())))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from facial_perception.core.benchmark import run_benchmark

    kwargs: dict[str, Any] = {"device": args.device, "repeats": args.repeats, "threads": args.threads}
    if args.configs:
        kwargs["configs"] = args.configs
    if args.batch_sizes:
        kwargs["batches"] = args.batch_sizes
    if args.out_json:
        kwargs["out_json"] = args.out_json
    if args.out_md:
        kwargs["out_md"] = args.out_md
    run_benchmark(**kwargs)
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    from facial_perception.core.evaluation import fewshot_checkpoint
    from facial_perception.core.fileio import atomic_write_text

    _check_exists(args.data)
    _check_checkpoint(args.checkpoint)
    result = fewshot_checkpoint(
        args.checkpoint,
        args.data,
        task=args.task,
        shots=args.shots,
        trials=args.trials,
        holdout_fraction=args.holdout_fraction,
        split_seed=args.split_seed,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        image_cache=args.image_cache,
        progress=not args.quiet,
        open_set_people=args.open_set,
        threshold=args.threshold,
    )
    print(result.to_markdown(), end="")
    if args.out_json:
        atomic_write_text(Path(args.out_json), json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"\nJSON written to {args.out_json}")
    if args.plot and result.open_set is not None:
        from facial_perception.core.plots import plot_open_set

        print(f"plot written to {plot_open_set(result.open_set, args.plot)}")
    return 0


def cmd_whiten(args: argparse.Namespace) -> int:
    """Fit the identity column's embedding whitening on its training faces (open-set matching)."""
    from facial_perception.core.evaluation import whiten_checkpoint

    _check_exists(args.data)
    _check_checkpoint(args.checkpoint)
    summary = whiten_checkpoint(
        args.checkpoint,
        args.data,
        args.out,
        task=args.task,
        shrinkage=args.shrinkage,
        holdout_fraction=args.holdout_fraction,
        split_seed=args.split_seed,
        device=args.device,
        workers=args.workers,
        image_cache=args.image_cache,
        progress=not args.quiet,
    )
    _say(
        args,
        f"{args.out}: {summary['task']} embeddings whitened {summary['in_dim']}-d -> {summary['out_dim']}-d"
        f" (fit on {summary['faces']} faces of {summary['people']} people)",
    )
    return 0


def cmd_columns(args: argparse.Namespace) -> int:
    """Drop or rename task columns of a model checkpoint (e.g. to swap in a re-trained column)."""
    from facial_perception.core.checkpoint import save_model
    from facial_perception.core.progressive import ModelError

    model = load_model_or_encoder(args.checkpoint)
    meta = dict(getattr(model, "training_meta", {}) or {})
    try:
        for name in args.drop or []:
            model.remove_column(name)
            meta.pop(name, None)
        for pair in args.rename or []:
            old, sep, new = pair.partition("=")
            if not sep or not old or not new:
                raise CLIError(f"--rename takes OLD=NEW, got {pair!r}")
            model.rename_column(old, new)
            if old in meta:
                meta[new] = meta.pop(old)
        for task, *files in args.ensemble or []:
            _join_members(model, meta, task, files, args.checkpoint)
        for task, *files in args.standalone or []:
            _add_standalone(model, meta, task, files)
        for name in args.drop_whitening or []:
            model.drop_whitening(name)
        for name in args.drop_standalone or []:
            model.drop_standalone(name)
            if isinstance(meta.get(name), dict):
                meta[name] = {k: v for k, v in meta[name].items() if k != "standalone_members"}
        for pair in args.keep_members or []:
            name, sep, count = pair.partition("=")
            if not sep or not count.isdigit():
                raise CLIError(f"--keep-members takes TASK=COUNT, got {pair!r}")
            model.keep_members(name, int(count))
            if isinstance(meta.get(name), dict) and "joined_members" in meta[name]:
                meta[name] = dict(meta[name], joined_members=meta[name]["joined_members"][: int(count) - 1])
        for names, on in ((args.mirror_average or [], True), (args.no_mirror_average or [], False)):
            for name in names:
                if name not in model.specs:
                    raise ModelError(f"no column named {name!r} (columns: {model.task_names})")
                model.specs[name].mirror_average = on
    except ModelError as exc:
        raise CLIError(str(exc)) from exc
    save_model(args.out, model, meta)
    columns = ", ".join(
        f"{name} (laterals: {', '.join(model.specs[name].laterals) or 'none'}"
        f"{'; mirror averaging' if model.specs[name].mirror_average else ''}"
        f"{f'; {model.specs[name].members} members' if model.specs[name].members > 1 else ''}"
        f"{f'; {len(model.standalone[name])} standalone' if name in model.standalone else ''}"
        f"{f'; whitened to {model.embedding_dim(name)}-d' if name in model.whitening else ''})"
        for name in model.task_names
    )
    _say(args, f"{args.out}: {columns or 'no columns'}")
    return 0


def _join_members(model: Any, meta: dict[str, Any], task: str, files: list[str], base: str) -> None:
    """Join the ``task`` columns of ``files`` to ``model``'s as ensemble members (``columns --ensemble``).

    Each file must hold the same encoder and the same lateral sources as ``model``: a column only
    means something on the features (and lateral activations) it was trained on.
    """
    import torch

    from facial_perception.core.progressive import ModelError

    if task not in model.specs:
        raise ModelError(f"no column named {task!r} to join members to (columns: {model.task_names})")
    if not files:
        raise CLIError(f"--ensemble {task} needs at least one checkpoint holding another {task!r} column")
    spec = model.specs[task]
    shared = ["encoder", *model.lateral_sources(task)]
    joined = []
    for path in files:
        other = load_model_or_encoder(path)
        if task not in other.specs:
            names = ", ".join(other.task_names) or "none"
            raise CLIError(f"{path} has no column {task!r} (columns: {names})")
        theirs = other.specs[task]
        if (theirs.labels, theirs.laterals, theirs.kind) != (spec.labels, spec.laterals, spec.kind):
            raise CLIError(f"{path}: its {task!r} column has other labels, laterals or kind than in {base}")
        for part in shared:  # a source joined into an ensemble earlier feeds from its first member
            mine = _first_member(model, part).state_dict()
            known = part == "encoder" or part in other.columns
            yours = _first_member(other, part).state_dict() if known else {}
            same = mine.keys() == yours.keys() and all(
                mine[k].shape == yours[k].shape and torch.equal(mine[k], yours[k].to(mine[k].device))
                for k in mine
            )
            if not same:
                raise CLIError(
                    f"{path}: its {part} differs from {base}'s; a member must be trained on the same "
                    f"{'encoder' if part == 'encoder' else 'lateral source columns'}"
                )
        model.join_members(task, [other.columns[task]])
        joined.append((getattr(other, "training_meta", {}) or {}).get(task, {}))
    _append_records(meta, task, "joined_members", joined)


def _add_standalone(model: Any, meta: dict[str, Any], task: str, files: list[str]) -> None:
    """Average ``model``'s ``task`` column with the ``task`` column (and own encoder) of each file
    (``columns --standalone``): networks trained end to end on the task alone."""
    from facial_perception.core.progressive import ModelError

    if not files:
        raise CLIError(f"--standalone {task} needs at least one checkpoint holding a {task!r} column")
    trained = []
    for path in files:
        other = load_model_or_encoder(path)
        try:
            model.add_standalone(task, other)
        except ModelError as exc:
            raise CLIError(f"{path}: {exc}") from exc
        trained.append((getattr(other, "training_meta", {}) or {}).get(task, {}))
    _append_records(meta, task, "standalone_members", trained)


def _append_records(meta: dict[str, Any], task: str, key: str, records: list[dict[str, Any]]) -> None:
    """Add the training records of joined networks to ``meta[task][key]`` (a copy: the caller's stay)."""
    entry = dict(meta.get(task, {}))
    entry[key] = list(entry.get(key, [])) + records
    meta[task] = entry


def _first_member(model: Any, part: str) -> Any:
    from facial_perception.core.progressive import column_members

    module = model._module(part)
    return module if part == "encoder" else column_members(module)[0]


def cmd_split(args: argparse.Namespace) -> int:
    """Deterministic train/validation folders (symlinks) so that every split-based figure is reproducible."""
    from facial_perception.core.datasets import FaceSample, open_dataset, split_per_person, stratified_split

    source = Path(args.data).resolve()
    if not source.is_dir():
        raise CLIError(f"dataset not found: {args.data}")
    if (source / "label.csv").is_file() or any(source.glob("FER2013*/label.csv")):
        raise CLIError("FER+ comes with its own splits: train on FER2013Train, validate on FER2013Valid")
    data = open_dataset(source)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"output folder is not empty: {out}")
    if args.by_person:
        train, val = split_per_person(data.samples, args.val_fraction, seed=args.seed, min_train=2)
    else:
        # stratify by label and by every known attribute (UTKFace: race, gender, age group), so
        # per-subgroup accuracies on the validation part rest on proportional counts
        keyed = [FaceSample(s.path, _strata_key(s), s.attributes) for s in data.samples]
        index = {id(k): s for k, s in zip(keyed, data.samples, strict=True)}
        train_k, val_k = stratified_split(keyed, args.val_fraction, seed=args.seed)
        train, val = [index[id(k)] for k in train_k], [index[id(k)] for k in val_k]
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for part, samples in (("train", train), ("val", val)):
        for sample in samples:
            link = staging / part / Path(sample.path).resolve().relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(sample.path).resolve())
    out.mkdir(parents=True, exist_ok=True)
    for part in ("train", "val"):
        os.replace(staging / part, out / part)
    staging.rmdir()
    print(f"{len(train)} training and {len(val)} validation images linked under {out}/train and {out}/val")
    return 0


def _strata_key(sample: FaceSample) -> int:
    parts = [str(sample.label)]
    for name in ("race", "gender", "age"):
        value = sample.attributes.get(name)
        if value is not None:
            parts.append(str(_age_bin(value)) if name == "age" else str(value))
    return zlib.crc32("|".join(parts).encode())  # stable across processes, unlike hash()


def _age_bin(age: object) -> int:
    bins = (3, 13, 20, 30, 40, 50, 60)
    return sum(int(age) >= edge for edge in bins)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Facial encoder (BEGAN) + progressive task columns: info, training, evaluation, "
        "ablations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters and GFLOP per face of a configuration or checkpoint")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--config", metavar="NAME|FILE", help="preset (lite, paper) or config JSON (default lite)"
    )
    source.add_argument("--checkpoint", metavar="FILE", help="a model or BEGAN checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--print-config", action="store_true", help="print the model config JSON and exit")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train-encoder", help="unsupervised BEGAN training of the facial encoder")
    p.add_argument(
        "--data", nargs="+", required=True, metavar="DIR", help="folders of face images (no labels)"
    )
    p.add_argument(
        "--config", default="lite", metavar="NAME|FILE", help="lite, mid, paper or config JSON (default lite)"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (checkpoint, state, log, samples)"
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, help="passes over the images")
    length.add_argument("--steps", type=_positive_int, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="Adam lr (beta1 0.5), halved on plateaus")
    p.add_argument("--min-lr", type=_positive_float, default=1e-5, help="floor of the lr halving")
    p.add_argument("--gamma", type=float, default=0.5, help="BEGAN diversity ratio")
    p.add_argument("--lambda-k", type=float, default=0.001, help="BEGAN k_t learning rate")
    p.add_argument("--max-images", type=_positive_int, help="train on a random subset of this many images")
    p.add_argument("--log-every", type=_positive_int, default=50)
    p.add_argument(
        "--sample-every", type=_non_negative_int, default=500, help="sample grid PNG every N steps"
    )
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=500)
    p.add_argument("--no-resume", action="store_true", help="start over even if a state file exists")
    _add_runtime(p)
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser(
        "train-task", help="train one task column (optionally with laterals) and save the model"
    )
    _add_model_source(p, encoder_from=True)
    p.add_argument("--task", required=True, help="task (column) name, e.g. emotion, age, gender, identity")
    p.add_argument("--data", required=True, metavar="PATH", help="dataset folder")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "ferplus", "utkface", "identity", "folders", "fer2013", "adience"],
    )
    p.add_argument(
        "--target", help="label to use: utkface age8|age7|gender|race; ferplus majority|distribution"
    )
    p.add_argument("--split", help="FER+ / FER2013 split folder name (e.g. FER2013Train)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="label names/order (default: the dataset's)")
    p.add_argument(
        "--laterals",
        nargs="*",
        metavar="COLUMN",
        help="existing columns to connect from (default: none, or those of --init-from's column)",
    )
    p.add_argument(
        "--init-from",
        metavar="COLUMN",
        help="fine-tune: start from this existing column's weights (it stays frozen and unchanged)",
    )
    p.add_argument("--kind", choices=["classification", "identity"], help="default: identity for identity*")
    p.add_argument("--val-data", metavar="PATH", help="separate validation dataset (else --val-fraction)")
    p.add_argument(
        "--holdout-people", type=_fraction, default=0.0, help="identity: leave this share of people out"
    )
    p.add_argument("--soft-labels", action="store_true", help="train on FER+ vote distributions")
    p.add_argument(
        "--balance-by",
        type=lambda text: [a for a in text.split(",") if a],
        default=[],
        metavar="ATTR[,ATTR]",
        help="weight the loss so every (attribute, label) cell counts the same, e.g. race (UTKFace)",
    )
    p.add_argument("--train-encoder", action="store_true", help="re-train the encoder with the column")
    p.add_argument(
        "--ema",
        type=_fraction,
        metavar="DECAY",
        help="validate and keep a moving average of the column's weights (e.g. 0.999; frozen encoder)",
    )
    p.add_argument("--loader-workers", action="store_true", help="also use --workers for the batch loader")
    _add_column_training(p)
    _add_model_outputs(p)
    _add_runtime(p)
    p.set_defaults(func=cmd_train_task)

    p = sub.add_parser(
        "train-joint", help="re-train the encoder with one new column per task, all tasks at once"
    )
    _add_model_source(p, encoder_from=True)
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="NAME=PATH[:TARGET]",
        help="one training dataset per task, e.g. emotion=FER2013Train gender=utk/train:gender",
    )
    p.add_argument(
        "--val-data", nargs="+", metavar="NAME=PATH", help="validation datasets (else --val-fraction)"
    )
    p.add_argument(
        "--soft-labels", nargs="+", metavar="NAME", help="tasks trained on FER+ vote distributions"
    )
    p.add_argument("--weight", nargs="+", metavar="NAME=W", help="loss weights (default 1 each)")
    p.add_argument(
        "--holdout-people",
        nargs="+",
        metavar="NAME=F",
        help="identity tasks: leave this share of the people out (kept unseen for `fewshot`)",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        help="optimizer steps per epoch, each one batch of every task (default: the largest set once)",
    )
    _add_column_training(p, feature_cache=False)
    _add_model_outputs(p)
    _add_runtime(p)
    p.set_defaults(func=cmd_train_joint)

    p = sub.add_parser("evaluate", help="accuracy, per-class recall, macro-F1, subgroups, calibration")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, metavar="PATH")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "ferplus", "utkface", "identity", "folders", "fer2013", "adience"],
    )
    p.add_argument("--target", help="label to use where a layout has several (see train-task)")
    p.add_argument("--split", help="FER+ / FER2013 split folder name")
    p.add_argument(
        "--subgroups",
        metavar="A,B",
        help="attributes for per-group tables (default: race,gender when present; none)",
    )
    p.add_argument(
        "--min-group", type=_positive_int, default=1, help="smallest group that counts for the gap"
    )
    p.add_argument("--out-json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plots", metavar="DIR", help="write confusion / reliability / subgroup PNGs here")
    p.add_argument(
        "--shift-test",
        type=_non_negative_int,
        default=0,
        metavar="PX",
        help="also shift every face PX pixels (at the model's input size) right, left, down and up: "
        "accuracy of each, and the share of faces whose label no shift changes (default 0 = off)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=128)
    _add_runtime(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ablation", help="Table IV / Table V / Fig. 5 experiments, N runs each")
    p.add_argument(
        "experiment",
        choices=["encoder", "laterals", "curves"],
        help="encoder: frozen vs re-trained; laterals: every subset of sources; "
        "curves: with vs without laterals",
    )
    _add_model_source(p)
    p.add_argument("--data", nargs="+", required=True, metavar="NAME=PATH[:TARGET]", help="one per task")
    p.add_argument("--target", help="laterals: the task whose column gets the laterals")
    p.add_argument("--max-sources", type=_non_negative_int, help="laterals: largest subset size")
    p.add_argument("--runs", type=_positive_int, default=3, help="runs per setting (seeds seed..seed+N-1)")
    _add_column_training(p)
    p.add_argument("--out", required=True, metavar="DIR")
    _add_runtime(p)
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("benchmark", help="speed benchmark (JSON + Markdown in docs/)")
    p.add_argument("--configs", nargs="+", metavar="NAME", help="configs to measure (default: paper lite)")
    p.add_argument("--batch-sizes", nargs="+", type=_positive_int, metavar="N", help="default: 1 4 16")
    p.add_argument(
        "--repeats", type=_positive_int, default=7, help="timed repeats per case (median reported)"
    )
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out-json", metavar="FILE", help="default docs/benchmark_model.json")
    p.add_argument("--out-md", metavar="FILE", help="default docs/BENCHMARK_MODEL.md")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_benchmark)

    from facial_perception.core.evaluation import DEFAULT_IDENTITY_THRESHOLD

    p = sub.add_parser("fewshot", help="enrol K photos of unseen people, report rank-1 on their other photos")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--data", required=True, metavar="DIR", help="identity folders <Name>/<Name>_NNNN.jpg")
    p.add_argument("--task", help="identity column (default: the last identity-kind column)")
    p.add_argument("--shots", type=_positive_int, default=5)
    p.add_argument("--trials", type=_positive_int, default=10, help="random enrolment draws")
    p.add_argument("--holdout-fraction", type=_fraction, help="the --holdout-people value used in training")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument(
        "--open-set",
        type=_positive_int,
        metavar="N",
        help="also enrol N of the people and keep the others as strangers: how many strangers each "
        "threshold lets through (FAR) and how many enrolled faces it still names (DIR)",
    )
    p.add_argument(
        "--threshold",
        type=_similarity,
        default=DEFAULT_IDENTITY_THRESHOLD,
        help=f"threshold to report with --open-set (default: the node's, {DEFAULT_IDENTITY_THRESHOLD})",
    )
    p.add_argument("--plot", metavar="PNG", help="with --open-set: DIR and FAR against the threshold")
    p.add_argument("--out-json", metavar="FILE")
    _add_runtime(p)
    p.set_defaults(func=cmd_fewshot)

    from facial_perception.core.evaluation import WHITENING_SHRINKAGE

    p = sub.add_parser(
        "whiten",
        help="fit the identity embedding's whitening on the column's training faces (keeps strangers out)",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--data", required=True, metavar="DIR", help="identity folders the column was trained on")
    p.add_argument("--task", help="identity column (default: the last identity-kind column)")
    p.add_argument(
        "--shrinkage",
        type=_non_negative_float,
        default=WHITENING_SHRINKAGE,
        help=f"ridge added to every variance, times the largest (default {WHITENING_SHRINKAGE})",
    )
    p.add_argument("--holdout-fraction", type=_fraction, help="the --holdout-people value used in training")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="FILE", help="the model with the whitening (atomic write)")
    _add_runtime(p)
    p.set_defaults(func=cmd_whiten)

    p = sub.add_parser(
        "columns",
        help="drop, rename, ensemble or set mirror averaging of task columns; written to a new file",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model checkpoint to edit")
    p.add_argument("--drop", nargs="+", metavar="TASK", help="columns to remove (not lateral sources)")
    p.add_argument("--rename", nargs="+", metavar="OLD=NEW", help="columns to rename (after --drop)")
    p.add_argument(
        "--mirror-average", nargs="+", metavar="TASK",
        help="at inference, average these columns' probabilities over the face and its mirror image",
    )  # fmt: skip
    p.add_argument("--no-mirror-average", nargs="+", metavar="TASK", help="turn mirror averaging off")
    p.add_argument(
        "--ensemble", nargs="+", action="append", metavar=("TASK", "FILE"),
        help="join the TASK columns of these checkpoints (other seeds on the same encoder) to this one's: "
        "their probabilities are averaged at inference (repeatable; after --rename)",
    )  # fmt: skip
    p.add_argument(
        "--standalone", nargs="+", action="append", metavar=("TASK", "FILE"),
        help="average the TASK column at inference with the TASK column of these checkpoints, networks "
        "with their own encoder trained end to end on the task alone (train-task --train-encoder); each "
        "weighs as much as the whole column (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--drop-standalone", nargs="+", metavar="TASK", help="forget these columns' standalone members"
    )
    p.add_argument(
        "--drop-whitening", nargs="+", metavar="TASK", help="give these columns' raw embeddings (see whiten)"
    )
    p.add_argument(
        "--keep-members", nargs="+", metavar="TASK=COUNT",
        help="keep the first COUNT members of an ensemble column (1: a single column again; faster)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="FILE", help="the edited model (written atomically)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_columns)

    p = sub.add_parser(
        "split", help="deterministic train/validation folders (symlinks), for reproducible figures"
    )
    p.add_argument("--data", required=True, metavar="DIR", help="UTKFace, identity or class folders")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder: OUT/train and OUT/val")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--by-person", action="store_true", help="identity folders: every person in both parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_split)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    if getattr(args, "threads", None):
        import torch

        # Two column trainings side by side on 2 cores took 200 s per epoch with torch's default threads
        # and 2 loader workers each, 25 s with one thread and no workers each (threads spin on each other).
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
