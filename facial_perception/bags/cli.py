"""``facial-perception-bag``: make labelled bags from datasets, inspect bags, evaluate them.

    python -m facial_perception.bags.cli make DATASET OUT_BAG [--task T ...] [--storage mcap] ...
    python -m facial_perception.bags.cli info BAG
    python -m facial_perception.bags.cli evaluate BAG [--mode offline|live] [--report DIR] ...

Exit codes: 0 success, 2 a user error (bad bag, bad option, missing model: one line on stderr),
130 interrupted.  :func:`add_subcommands` lets the main ``facial-perception`` command mount the
same sub-commands under ``facial-perception bag ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from facial_perception.bags.bag_io import STORAGES, BagError, BagReader

__all__ = ["add_subcommands", "build_parser", "main", "run"]


def _range(text: str) -> tuple[int, int]:
    """``"3"`` -> (3, 3); ``"1..3"`` or ``"1-3"`` -> (1, 3)."""
    for sep in ("..", "-", ":"):
        if sep in text:
            lo, hi = text.split(sep, 1)
            try:
                return int(lo), int(hi)
            except ValueError:
                break
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or A..B, got {text!r}") from None
    return value, value


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None


def _region(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 fractions, got {text!r}")
    return values  # type: ignore[return-value]


def add_subcommands(subparsers: Any) -> None:
    """Add ``make``, ``info`` and ``evaluate`` to an argparse sub-parser collection."""
    make = subparsers.add_parser("make", help="turn a labelled dataset into a ROS 2 bag")
    make.add_argument("dataset", help="dataset folder (FER+, UTKFace, identity folders, ...)")
    make.add_argument("output", help="bag folder to create")
    make.add_argument(
        "--task", action="append", help="labelled task (repeat for several, e.g. gender and age)"
    )
    make.add_argument("--storage", choices=STORAGES, default="sqlite3")
    make.add_argument("--image-type", choices=("raw", "compressed"), default="raw")
    make.add_argument("--fps", type=float, default=10.0)
    make.add_argument("--size", type=_size, default=(640, 480), help="frame size WIDTHxHEIGHT (640x480)")
    make.add_argument("--faces-per-frame", type=_range, default=(1, 1), help="N or A..B faces per frame")
    make.add_argument("--face-size", type=_range, default=(112, 200), help="pasted face side in pixels, A..B")
    make.add_argument("--track-length", type=int, default=1, help="frames each pasted face stays (tracking)")
    make.add_argument("--motion", type=float, default=3.0, help="max drift of a face per frame, pixels")
    make.add_argument("--background", choices=("gradient", "noise", "blur", "photo"), default="gradient")
    make.add_argument("--frames", type=int, help="number of frames (default: every selected sample once)")
    make.add_argument("--max-samples", type=int, default=200, help="samples drawn from the dataset")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--jpeg-quality", type=int, default=90)
    make.add_argument("--topic", help="image topic (default /camera/image_raw[/compressed])")
    make.add_argument("--face-region", type=_region, help="face box inside a crop as x0,y0,x1,y1 fractions")
    make.add_argument("--overwrite", action="store_true", help="replace an existing bag (atomically)")
    make.add_argument("--no-progress", action="store_true")
    make.set_defaults(bag_command="make")

    info = subparsers.add_parser("info", help="topics, counts and ground-truth summary of a bag")
    info.add_argument("bag")
    info.add_argument("--storage", choices=STORAGES, help="expected storage plugin")
    info.set_defaults(bag_command="info")

    ev = subparsers.add_parser("evaluate", help="evaluate a bag offline or live against the node")
    ev.add_argument("bag")
    ev.add_argument("--mode", choices=("offline", "live"), default="offline")
    ev.add_argument("--report", help="report folder (report.md, report.json, PNGs); default <bag>_report")
    ev.add_argument("--no-plots", action="store_true")
    ev.add_argument("--topic", help="image topic (default: auto-detected)")
    ev.add_argument("--storage", choices=STORAGES, help="expected storage plugin")
    ev.add_argument("--iou", type=float, default=0.5, help="IoU for matching faces to ground truth")
    ev.add_argument("--max-frames", type=int)
    ev.add_argument("--output-bag", help="write the results (FaceArray) into this new bag")
    ev.add_argument("--json", action="store_true", help="print the summary as JSON")
    ev.add_argument("--no-progress", action="store_true")
    off = ev.add_argument_group("offline")
    off.add_argument("--checkpoint", help="model .safetensors (default: the shipped default model)")
    off.add_argument("--detector", default="blazeface_full")
    off.add_argument("--detection-threshold", type=float, default=0.6)
    off.add_argument("--max-faces", type=int, default=10)
    off.add_argument("--smoothing", type=float, default=0.6)
    off.add_argument(
        "--crop-margin",
        type=float,
        default=-1.0,
        help="one crop margin for every column (the node's crop_margin); < 0: measured per detector",
    )
    off.add_argument("--crop-offset-y", type=float, default=0.0, help="with --crop-margin: crop centre shift")
    off.add_argument("--gallery", help="identity gallery (SQLite) for identity labels")
    off.add_argument("--device", default="cpu")
    off.add_argument(
        "--no-overlap", action="store_true", help="detect the next frame only after the model ran on this one"
    )
    off.add_argument(
        "--no-encoder-stage",
        action="store_true",
        help="with overlapping stages, run the whole model in one thread (default: its encoder in a third)",
    )
    off.add_argument(
        "--no-first-stage-process",
        action="store_true",
        help="with overlapping stages, read, detect and track in a thread (default: in a worker process)",
    )
    off.add_argument(
        "--no-fuse-columns",
        action="store_true",
        help="run the columns one after the other (default: as one stack of wide layers; same results)",
    )
    off.add_argument(
        "--identity-every",
        type=int,
        default=3,
        help="identity columns on a track's first frame, then every n-th (node: identity_every; "
        "1 for bags of one frame per face)",
    )
    off.add_argument(
        "--standalone-every",
        type=int,
        default=3,
        help="the columns' standalone members on a track's first frame, then every n-th "
        "(node: standalone_every)",
    )
    off.add_argument(
        "--attributes-every",
        type=int,
        default=1,
        help="the face columns (all but the identity ones on their own crop) on a track's first frame, "
        "then every n-th (node: attributes_every)",
    )
    off.add_argument(
        "--detect-every",
        type=int,
        default=1,
        help="detector on every n-th frame, faces follow their tracks in between (node: detect_every)",
    )
    off.add_argument(
        "--no-mirror-average",
        action="store_true",
        help="faces only: ignore the columns' mirror averaging (the node's mirror_average false)",
    )
    off.add_argument(
        "--no-standalone",
        action="store_true",
        help="the columns alone: ignore their standalone members (the node's standalone_members false)",
    )
    off.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="torch threads on CPU (0 = torch default)",
    )
    live = ev.add_argument_group("live")
    live.add_argument("--rate", type=float, default=1.0, help="replay speed factor (2 = twice as fast)")
    live.add_argument("--publish-topic", help="topic to publish images on (default: the bag topic)")
    live.add_argument("--faces-topic", default="/facial_perception/faces")
    live.add_argument(
        "--activate",
        nargs="?",
        const="/facial_perception",
        help="configure+activate this lifecycle node first (default /facial_perception)",
    )
    live.add_argument("--clock-hz", type=float, default=100.0, help="/clock publication rate")
    live.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    live.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the node")
    live.add_argument(
        "--drain", type=float, default=5.0, help="seconds to wait for results after the last frame"
    )
    ev.set_defaults(bag_command="evaluate")

    bench = subparsers.add_parser("benchmark", help="offline throughput vs model-only throughput")
    bench.add_argument("--bag", help="existing bag (default: make one from --dataset in a temporary folder)")
    bench.add_argument(
        "--dataset", default=str(Path(__file__).resolve().parents[3] / "shared/datasets/lfw_identity")
    )
    bench.add_argument("--task", default="identity")
    bench.add_argument("--frames", type=int, default=1000)
    bench.add_argument(
        "--storage",
        choices=STORAGES,
        default="mcap",
        help="storage of the made bag (default mcap: what `ros2 bag record` writes on Jazzy and Kilted)",
    )
    bench.add_argument("--image-type", choices=("raw", "compressed"), default="raw")
    bench.add_argument(
        "--repeats", type=int, default=3, help="evaluation + model-only pairs per configuration (median)"
    )
    bench.add_argument("--checkpoint", help="model (default: the shipped default, else untrained lite)")
    bench.add_argument(
        "--compare-detectors",
        nargs="*",
        default=["blazeface"],
        metavar="NAME",
        help="also measure with these detectors (default: blazeface, the short-range model)",
    )
    bench.add_argument(
        "--compare-detect-every",
        nargs="*",
        type=int,
        default=[2],
        metavar="N",
        help="also measure with the detector on every N-th frame only (default: 2)",
    )
    bench.add_argument(
        "--no-compare-stages",
        action="store_true",
        help="skip the same-run measurement with the whole model in one thread (encoder_stage off)",
    )
    bench.add_argument(
        "--no-compare-first-stage",
        action="store_true",
        help="skip the same-run measurement with the first stage in a thread (first_stage_process off)",
    )
    bench.add_argument(
        "--no-compare-fused",
        action="store_true",
        help="skip the same-run measurement with the columns run one by one (fuse_columns off)",
    )
    bench.add_argument(
        "--no-compare-mirror",
        action="store_true",
        help="skip the same-run measurement of the model with mirror averaging off",
    )
    bench.add_argument(
        "--no-compare-standalone",
        action="store_true",
        help="skip the same-run measurement of the model without its standalone members",
    )
    bench.add_argument(
        "--no-compare-framing",
        action="store_true",
        help="skip the same-run measurements with the identity columns on every frame (identity_every 1) "
        "and with one crop for every column (crop_margin)",
    )
    bench.add_argument("--json-out", default="docs/benchmark_bags.json")
    bench.add_argument("--markdown", default="docs/BENCHMARK_BAGS.md")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(bag_command="benchmark")


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone ``facial-perception-bag`` parser."""
    parser = argparse.ArgumentParser(prog="facial-perception-bag", description=__doc__.split("\n\n")[0])
    add_subcommands(parser.add_subparsers(dest="bag_command", required=True))
    return parser


def _make(args: argparse.Namespace) -> int:
    from facial_perception.bags.make_bag import MakeBagOptions, make_bag

    options = MakeBagOptions(
        storage=args.storage,
        image_type=args.image_type,
        fps=args.fps,
        width=args.size[0],
        height=args.size[1],
        faces_per_frame=args.faces_per_frame,
        face_size=args.face_size,
        track_length=args.track_length,
        motion=args.motion,
        background=args.background,
        frames=args.frames,
        max_samples=args.max_samples,
        seed=args.seed,
        jpeg_quality=args.jpeg_quality,
        topic=args.topic,
        face_region=args.face_region,
    )
    summary = make_bag(
        args.dataset, args.output, args.task, options, overwrite=args.overwrite, progress=not args.no_progress
    )
    print(
        f"wrote {summary.path} ({summary.storage}): {summary.frames} frames, {summary.faces} faces, "
        f"{summary.tracks} tracks of {summary.samples} samples; tasks {', '.join(summary.tasks)}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    with BagReader(args.bag, args.storage) as reader:
        print(f"{args.bag}: storage {reader.storage}, {reader.duration_s:.2f} s")
        for topic, msgtype in sorted(reader.topics.items()):
            print(f"  {topic}  {msgtype}  {reader.message_count(topic)} messages")
        gt = reader.read_ground_truth()
        if gt:
            faces = [f for frame in gt.values() for f in frame.faces]
            tasks = sorted({t for f in faces for t in f.labels})
            tracks = {f.track for f in faces if f.track}
            print(
                f"  ground truth: {len(gt)} frames, {len(faces)} faces, {len(tracks)} tracks, tasks {tasks}"
            )
        else:
            print("  no ground truth (unlabelled bag)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from facial_perception.bags.evaluate_bag import PipelineSettings, evaluate_live, evaluate_offline
    from facial_perception.bags.report import write_report

    progress = not args.no_progress
    if args.mode == "offline":
        settings = PipelineSettings(
            checkpoint=args.checkpoint,
            detector=args.detector,
            detection_threshold=args.detection_threshold,
            max_faces=args.max_faces,
            smoothing=args.smoothing,
            crop_margin=args.crop_margin,
            crop_offset_y=args.crop_offset_y,
            device=args.device,
            gallery=args.gallery,
            overlap=not args.no_overlap,
            encoder_stage=not args.no_encoder_stage,
            first_stage_process=not args.no_first_stage_process,
            fuse_columns=not args.no_fuse_columns,
            cpu_threads=max(0, args.cpu_threads),
            mirror_average=not args.no_mirror_average,
            standalone_members=not args.no_standalone,
            detect_every=args.detect_every,
            identity_every=args.identity_every,
            standalone_every=args.standalone_every,
            attributes_every=args.attributes_every,
        )
        evaluation = evaluate_offline(
            args.bag,
            settings=settings,
            topic=args.topic,
            storage=args.storage,
            iou_threshold=args.iou,
            max_frames=args.max_frames,
            output_bag=args.output_bag,
            progress=progress,
        )
    else:
        evaluation = evaluate_live(
            args.bag,
            rate=args.rate,
            topic=args.topic,
            publish_topic=args.publish_topic,
            faces_topic=args.faces_topic,
            storage=args.storage,
            clock=not args.no_clock,
            wait_for_node=args.wait,
            drain=args.drain,
            iou_threshold=args.iou,
            max_frames=args.max_frames,
            output_bag=args.output_bag,
            progress=progress,
            activate=args.activate,
            clock_hz=args.clock_hz,
        )
    report_dir = Path(args.report) if args.report else Path(str(Path(args.bag)).rstrip("/") + "_report")
    write_report(evaluation, report_dir, plots=not args.no_plots)
    s = evaluation.summary
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "matches"}, indent=2, default=str))
    else:
        fps = s.get("throughput_fps")
        line = f"{s['frames']['processed']}/{s['frames']['total']} frames"
        line += f", {fps:.1f} frames/s" if fps else ""
        line += f", latency p50 {s['latency_ms']['p50']:.1f} ms" if s["latency_ms"]["p50"] is not None else ""
        if s.get("labelled"):
            recall = s["detection"]["recall"]
            line += f", detection recall {100 * recall:.1f}%" if recall is not None else ""
            for task, entry in s["tasks"].items():
                if entry["accuracy"] is not None:
                    line += f", {task} accuracy {100 * entry['accuracy']:.1f}%"
        print(line)
    print(f"report: {report_dir / 'report.md'}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    import tempfile

    from facial_perception.bags.evaluate_bag import PipelineSettings, benchmark_offline_configs
    from facial_perception.bags.make_bag import MakeBagOptions, make_bag
    from facial_perception.core.benchmark import machine_summary
    from facial_perception.core.fileio import atomic_write_text
    from facial_perception.pipeline.framing import framings_for

    progress = not args.no_progress
    with tempfile.TemporaryDirectory(prefix="fp-bag-bench-") as tmp:
        bag = args.bag
        made = ""
        if bag is None:
            bag = str(Path(tmp) / "bench_bag")
            options = MakeBagOptions(
                storage=args.storage,
                image_type=args.image_type,
                frames=args.frames,
                faces_per_frame=(1, 3),
                track_length=10,
                max_samples=None,
                background="photo",
            )
            make_bag(args.dataset, bag, [args.task], options, progress=progress)
            made = (
                f"made from `{Path(args.dataset).name}` ({args.task}): {args.frames} frames "
                f"640x480 {args.image_type}, 1-3 faces per frame, tracks of 10 frames, {args.storage}"
            )
        # every configuration measured in the same rounds (interleaved): comparisons between them hold
        # even when the machine's speed drifts during the run
        configs: dict[str, PipelineSettings] = {"default": PipelineSettings(checkpoint=args.checkpoint)}
        for detector in args.compare_detectors:
            configs[f"detector:{detector}"] = PipelineSettings(checkpoint=args.checkpoint, detector=detector)
        for n in args.compare_detect_every:
            configs[f"detect_every:{n}"] = PipelineSettings(checkpoint=args.checkpoint, detect_every=n)
        if not args.no_compare_stages:  # the whole model in one thread: what the encoder stage changes
            configs["two_threads"] = PipelineSettings(checkpoint=args.checkpoint, encoder_stage=False)
        if not args.no_compare_first_stage:  # read, detect and track in a thread instead of a process
            in_thread = PipelineSettings(checkpoint=args.checkpoint, first_stage_process=False)
            configs["first_stage_thread"] = in_thread
        if not args.no_compare_fused:  # the columns one by one, as in training: what fusing them changes
            configs["unfused_columns"] = PipelineSettings(checkpoint=args.checkpoint, fuse_columns=False)
        mirror_tasks, standalone_tasks, identity_tasks = _columns_with_options(_model_path(args.checkpoint))
        if identity_tasks and not args.no_compare_framing:  # what the identity columns' own crop costs
            configs["identity_every_1"] = PipelineSettings(checkpoint=args.checkpoint, identity_every=1)
            faces = framings_for(PipelineSettings().detector).faces  # the face columns' crop for all
            configs["one_crop"] = PipelineSettings(
                checkpoint=args.checkpoint, crop_margin=faces.margin, crop_offset_y=faces.offset_y
            )
        mirror_tasks = [] if args.no_compare_mirror else mirror_tasks
        standalone_tasks = [] if args.no_compare_standalone else standalone_tasks
        if mirror_tasks:  # the model averages some columns over mirror images: measure it without, too
            configs["without_mirror"] = PipelineSettings(checkpoint=args.checkpoint, mirror_average=False)
        if standalone_tasks:  # columns with standalone members (own encoders): on every frame and without
            configs["standalone_every_1"] = PipelineSettings(checkpoint=args.checkpoint, standalone_every=1)
            alone = PipelineSettings(checkpoint=args.checkpoint, standalone_members=False)
            configs["without_standalone"] = alone
        measured = dict(
            zip(
                configs,
                benchmark_offline_configs(
                    bag, list(configs.values()), progress=progress, repeats=args.repeats
                ),
                strict=True,
            )
        )
        result = measured.pop("default")
        compared = {name: {k: other[k] for k in _COMPARED} for name, other in measured.items()}
        result["other_detectors"] = {
            n.split(":", 1)[1]: o for n, o in compared.items() if n.startswith("detector:")
        }
        result["detect_every"] = {
            n.split(":", 1)[1]: o for n, o in compared.items() if n.startswith("detect_every:")
        }
        result["two_threads"] = compared.get("two_threads")
        result["unfused_columns"] = compared.get("unfused_columns")
        result["first_stage_thread"] = compared.get("first_stage_thread")
        result["without_mirror"] = (
            compared["without_mirror"] | {"mirror_tasks": mirror_tasks}
            if "without_mirror" in compared
            else None
        )
        result["without_standalone"] = (
            compared["without_standalone"] | {"standalone_tasks": standalone_tasks}
            if "without_standalone" in compared
            else None
        )
        for key in ("identity_every_1", "one_crop", "standalone_every_1"):
            result[key] = compared.get(key)
        result["interleaved_configurations"] = list(configs)
    result["bag_description"] = made or f"`{args.bag}`"
    result["machine"] = machine_summary()
    atomic_write_text(Path(args.json_out), json.dumps(result, indent=2) + "\n")
    atomic_write_text(Path(args.markdown), _benchmark_markdown(result, args.json_out))
    print(
        f"offline {result['offline_fps']:.1f} frames/s, model-only {result['model_only_fps']:.1f} frames/s, "
        f"ratio {100 * result['ratio']:.1f}% (target 70%)"
    )
    return 0


_COMPARED = (
    "paired_ratios",
    "offline_fps",
    "model_only_fps",
    "ratio",
    "detection_recall",
    "detection_precision",
    "stage_ms_mean",
    "cpu_work_ms_per_frame",
    "bound_ratio",
    "fuse_columns",
    "first_stage_process",
    "identity_faces_run",
    "member_faces_run",
)


def _model_path(checkpoint: str | None) -> str:
    """The checkpoint the benchmark loads: ``--checkpoint`` or the shipped default model."""
    from facial_perception.core.checkpoint import DEFAULT_MODEL

    return str(Path(checkpoint).expanduser()) if checkpoint else str(DEFAULT_MODEL)


def _columns_with_options(model_path: str) -> tuple[list[str], list[str], list[str]]:
    """(columns with mirror averaging, columns with standalone members, identity columns) of the checkpoint
    at ``model_path``: the options the benchmark also measures switched off (all [] for an untrained
    stand-in)."""
    from facial_perception.core.checkpoint import load_model

    if not Path(model_path).is_file():
        return [], [], []
    model, _ = load_model(model_path)
    names = model.task_names
    return (
        [name for name in names if model.specs[name].mirror_average],
        list(model.standalone),
        [name for name in names if model.specs[name].kind == "identity"],
    )


def _model_table(intro: str, column: str, runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Same-run comparison rows: throughput, ratio, the model stages' times, CPU work and bound."""
    rows = [
        "",
        intro,
        "",
        f"| {column} | offline frames/s | model only frames/s | ratio | encoder + columns ms (overlapped) "
        "| CPU work ms/frame | bound ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, o in runs:
        stage = o["stage_ms_mean"]
        model = (
            f"{stage.get('encode', 0):.1f} + {stage.get('model', 0):.1f}"
            if "encode" in stage
            else (f"{stage.get('model', 0):.1f} (one thread)")
        )
        rows.append(
            f"| {name} | {o['offline_fps']:.1f} | {o['model_only_fps']:.1f} | {100 * o['ratio']:.1f}% | "
            f"{model} | {o['cpu_work_ms_per_frame']:.2f} | {100 * o['bound_ratio']:.0f}% |"
        )
    return "\n".join(rows) + "\n"


#: Same-run comparisons of the benchmarked configuration: result key -> (intro, column title, row labels).
_MODEL_COMPARISONS: dict[str, tuple[str, str, tuple[str, str]]] = {
    "two_threads": (
        "Where the model runs, same bag, same run: its encoder in a third thread and its columns in the "
        "second (`encoder_stage`, the default), or the whole model in the second thread:",
        "model stages",
        ("encoder, then columns: three threads (default)", "whole model in one thread"),
    ),
    "first_stage_thread": (
        "Where the first stage (read, decode, detect, track, crop) runs, same bag, same run: in a worker "
        "process (`first_stage_process`, the default offline; its Python has its own GIL) or in a thread "
        "of the model's process, as in the node:",
        "first stage",
        ("worker process (default offline)", "thread"),
    ),
    "unfused_columns": (
        "How the columns run, same bag, same run: as one stack of wide layers (`fuse_columns`, the "
        "default; `FusedColumns` in docs/PIPELINE.md) or one column after the other as in training:",
        "columns",
        ("fused columns (default)", "columns one by one"),
    ),
}


def _model_comparison_tables(r: dict[str, Any]) -> str:
    return "".join(
        _versus_table(r, key, intro, column, labels)
        for key, (intro, column, labels) in _MODEL_COMPARISONS.items()
    )


#: Options of the model measured switched off when the model uses them: result key -> (key of the
#: columns using it, intro, label of the benchmarked model given those columns, label switched off).
_MODEL_OPTIONS = {
    "without_mirror": (
        "mirror_tasks",
        "The same model with mirror averaging off (each face once through the network instead of twice; "
        "docs/MODEL_CARD.md), same bag, same run:",
        "as benchmarked: mirror averaging on {tasks}",
        "mirror averaging off",
    ),
}


def _model_option_tables(r: dict[str, Any]) -> str:
    tables = []
    for key, (columns_key, intro, on, off) in _MODEL_OPTIONS.items():
        tasks = ", ".join((r.get(key) or {}).get(columns_key, []))
        tables.append(_versus_table(r, key, intro, "model", (on.format(tasks=tasks), off)))
    return "".join(tables)


def _members_table(r: dict[str, Any]) -> str:
    """The standalone members on a track's first and every n-th frame, on every frame, or not at all."""
    alone, every = r.get("without_standalone"), r.get("standalone_every_1")
    if not alone and not every:
        return ""
    faces = sum(int(k) * n for k, n in r["faces_per_frame"].items())
    tasks = ", ".join((alone or {}).get("standalone_tasks", []))

    def runs(o: dict[str, Any]) -> str:
        return f"members on {o.get('member_faces_run', 0)} of {faces} faces"

    rows = [(f"`standalone_every: {r.get('standalone_every', 3)}` (default): {runs(r)}", r)]
    if every:
        rows.append((f"`standalone_every: 1`: {runs(every)}", every))
    if alone:
        rows.append(("columns alone (`standalone_members: false`)", alone))
    intro = (
        f"The standalone members of {tasks or 'the columns'} (networks with an encoder of their own, "
        "averaged with their column; docs/MODEL_CARD.md), same bag, same run: on a track's first frame and "
        "then every n-th, their last probabilities standing in between (default), on every frame, or not "
        "at all; each model-only pass runs the members where its evaluation ran them:"
    )
    return _model_table(intro, "standalone members", rows)


def _framing_table(r: dict[str, Any]) -> str:
    """The identity columns' own crop every ``identity_every``-th frame against every frame and one crop."""
    faces = sum(int(k) * n for k, n in r["faces_per_frame"].items())

    def crops(o: dict[str, Any]) -> str:
        return f"{o.get('identity_faces_run', 0)} identity crops for {faces} faces"

    every, one = r.get("identity_every_1"), r.get("one_crop")
    default = f"two crops, `identity_every: {r.get('identity_every', 3)}` (default): {crops(r)}"
    runs = [(default, r)]
    if every:
        runs.append((f"two crops, identity every frame (`identity_every: 1`): {crops(every)}", every))
    if one:
        runs.append(("one crop for every column (`crop_margin`)", one))
    if len(runs) < 2:
        return ""
    intro = (
        "How the faces are cropped, same bag, same run (docs/PIPELINE.md, FramePipeline): the face-attribute "
        "columns on a tight crop and the identity columns on a looser one of their own on a track's first "
        "frame and then every n-th (default), on every frame, or one tight crop for every column (cheaper; "
        "identity and age less accurate: docs/MODEL_CARD.md); each model-only pass runs the crops its "
        "evaluation ran:"
    )
    return _model_table(intro, "crops", runs)


def _versus_table(r: dict[str, Any], key: str, intro: str, column: str, labels: tuple[str, str]) -> str:
    """The benchmarked configuration against the one measured under ``key`` ("" when not measured)."""
    other = r.get(key)
    return _model_table(intro, column, [(labels[0], r), (labels[1], other)]) if other else ""


def _detection_table(intro: str, column: str, runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Same-run comparison rows: throughput, ratio, detection recall / precision, detector time."""
    rows = [
        "",
        intro,
        "",
        f"| {column} | offline frames/s | model only frames/s | ratio | detection recall / precision "
        "| detect ms | CPU work ms/frame | bound ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, o in runs:
        recall, precision = o["detection_recall"] or 0, o.get("detection_precision") or 0
        rows.append(
            f"| {name} | {o['offline_fps']:.1f} | {o['model_only_fps']:.1f} | {100 * o['ratio']:.1f}% | "
            f"{100 * recall:.1f}% / {100 * precision:.1f}% | {o['stage_ms_mean'].get('detect', 0):.1f} | "
            f"{o['cpu_work_ms_per_frame']:.2f} | {100 * o['bound_ratio']:.0f}% |"
        )
    return "\n".join(rows) + "\n"


def _detect_every_table(r: dict[str, Any]) -> str:
    others = r.get("detect_every") or {}
    intro = (
        "The detector on every n-th frame only (node parameter `detect_every`; in between the faces follow "
        "their tracks), same bag, same run; recall counts a face found late as missed in the frames before:"
    )
    return _detection_table(intro, "detect_every", [("1 (default)", r), *others.items()]) if others else ""


def _other_detectors_table(r: dict[str, Any]) -> str:
    others = r.get("other_detectors") or {}
    intro = (
        "Other detectors, same bag, same run (the node's default is `blazeface_full`, the full-range "
        "model for faces up to ~5 m; `blazeface` is the short-range model, faces within ~2 m):"
    )
    runs = [("blazeface_full (default)", r), *others.items()]
    return _detection_table(intro, "detector", runs) if others else ""


def _verdict_paragraph(r: dict[str, Any]) -> str:
    """Why the ratio is where it is, from the figures of this run."""
    detect = r["sequential_stage_ms_mean"].get("detect", 0.0)
    model = r["sequential_stage_ms_mean"].get("model", 0.0)
    text = (
        f"On {r['cores']} CPU cores the pipeline does the model's work *and* the detector's (BlazeFace "
        f"{r.get('detector', '')} {detect:.1f} ms of CPU per frame beside the model's {model:.1f} ms on one "
        "thread), decoding, tracking, cropping, smoothing and scoring, while the model-only reference "
        "spends both cores on the model alone. The bound above is what perfect overlap of the "
        f"stages would give ({100 * r['bound_ratio']:.0f}%); the overlapped run reaches "
        f"{100 * r['offline_fps'] / r['bound_fps']:.0f}% of it: each stage is slower beside the others "
        "(shared caches, three threads on the cores, and the stages' Python parts take turns on one GIL). "
    )
    plain = r.get("without_mirror")
    if plain:
        text += (
            f"The benchmarked model averages {', '.join(plain['mirror_tasks'])} over each face and its "
            "mirror image, so the model does twice the work per face; the pipeline's own work per frame "
            "does not change, and its "
            f"share falls: without mirror averaging the ratio is {100 * plain['ratio']:.1f}% in this run "
            f"(bound {100 * plain['bound_ratio']:.0f}%), with it {100 * r['ratio']:.1f}%, while the absolute "
            f"throughput falls from {plain['offline_fps']:.1f} to {r['offline_fps']:.1f} frames/s. "
        )
    two = r.get("two_threads")
    if two:
        text += (
            "With the whole model in one thread (two stages) this run reached "
            f"{two['offline_fps']:.1f} frames/s (ratio {100 * two['ratio']:.1f}%); with the encoder in a "
            f"stage of its own, {r['offline_fps']:.1f} frames/s ({100 * r['ratio']:.1f}%). "
        )
    pairs = r.get("paired_ratios") or [r["ratio"]]
    text += (
        f"Within this run the {len(pairs)} evaluation/model-only pairs gave ratios from "
        f"{100 * min(pairs):.1f}% to {100 * max(pairs):.1f}%: differences between configurations smaller "
        "than that spread are noise of the machine, not of the pipeline. "
    )
    if r["ratio"] >= r["target_ratio"]:
        return text + "The median meets the target."
    return text + "The median misses the target."


def _benchmark_markdown(r: dict[str, Any], json_path: str) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_ms_mean"].items())
    verdict = "meets" if r["ratio"] >= r["target_ratio"] else "misses"
    passes = ", ".join(f"{r['frames'] / t:.1f}" for t in r["model_only_passes_s"])
    runs = ", ".join(f"{fps:.1f}" for fps in r["offline_runs_fps"])
    paired = ", ".join(f"{100 * x:.1f}%" for x in r["paired_ratios"])
    target = f"{100 * r['target_ratio']:.0f}%"
    threads = f"pipeline {r['pipeline_torch_threads']}, model only {r['model_only_torch_threads']}"
    sequential = f"{r['sequential_fps']:.1f} frames/s (ratio {100 * r['sequential_ratio']:.1f}%)"
    seq_stages = ", ".join(f"{k} {v:.2f}" for k, v in r["sequential_stage_ms_mean"].items() if k != "total")
    bound = (
        f"{r['cores']} / {r['cpu_work_ms_per_frame']:.2f} ms = {r['bound_fps']:.0f} frames/s = "
        f"**{100 * r['bound_ratio']:.0f}%** of model only"
    )
    return f"""# Bag evaluation benchmark

Offline bag evaluation (`facial-perception-bag evaluate --mode offline`) runs the node's whole
pipeline per frame: read + decode the image, detect (BlazeFace; docs/PIPELINE.md), track, crop, one
model batch, smooth, score against the ground truth. Three stages overlap, as in the node
(`overlap_stages`, `encoder_stage`): a worker process (`first_stage_process`; in the node, a thread)
reads, decodes, detects, tracks and crops frame t+2, a thread runs the model's encoder (and the
fused columns' first layer) on frame t+1 and another the rest of the columns (and smoothing,
scoring) on frame t (torch, 1 thread each). Its throughput is compared with the model alone
(`FacePredictor.predict` on preprocessed real face crops, torch's default threads, back to back)
called with **the same sequence of batch sizes** (faces per frame): the ratio is the pipeline's
efficiency, `1 - ratio` its overhead. All passes run in the same process, in {r["repeats"]} rounds;
each round measures every configuration of this file once, an evaluation followed at once by its
model-only pass (this VM's speed drifts by tens of percent within minutes: pairs taken back to back
see the same machine, and interleaved configurations see the same drift; the ratio is the median of
the paired ratios, the throughputs the medians). Then, once per configuration, the evaluation with
one stage after the other on one thread, whose time per frame is the **CPU work per frame**: no
schedule of the stages can beat `cores / work` frames/s on this machine (the bound below).

Reproduce: `python -m facial_perception.bags.cli benchmark` (writes `{json_path}` and this file).

| | value |
|---|---|
| bag | {r["bag_description"]} |
| frames | {r["frames"]} (faces per frame: {r["faces_per_frame"]}) |
| model | {r["model"]} |
| detector | {r.get("detector", "?")} ({r.get("detector_backend", "?")} back-end) |
| device | {r["device"]}; torch threads: {threads} |
| machine | {r["machine"]} |
| offline evaluation (overlapped stages) | **{r["offline_fps"]:.1f} frames/s** (runs: {runs}) |
| model only, same batch sizes | **{r["model_only_fps"]:.1f} frames/s** (passes: {passes}) |
| ratio (median of the pairs) | **{100 * r["ratio"]:.1f}%** (pairs: {paired}; target >= {target}: {verdict}) |
| offline evaluation, stages one after the other (1 thread) | {sequential} |
| CPU work per frame (ms, that run: {seq_stages}, + scoring) | {r["cpu_work_ms_per_frame"]:.2f} |
| upper bound of any schedule on this machine | {bound} |
| detection recall on the bag | {100 * (r["detection_recall"] or 0):.1f}% |
| latency per frame p50 / p90 (ms, overlapped) | {r["latency_ms"]["p50"]:.1f} / {r["latency_ms"]["p90"]:.1f} |

Mean time per stage (ms, overlapped run; the stages run at the same time on {r["cores"]} cores): {stages}.
{_model_comparison_tables(r)}{_framing_table(r)}{_model_option_tables(r)}{_members_table(r)}{_detect_every_table(r)}{_other_detectors_table(r)}
{_verdict_paragraph(r)}
What was tried (measured on this machine; earlier runs of this file are in git): BlazeFace on the
LiteRT interpreter instead of the mediapipe graph (same faces, ~1 ms less per frame: the default
since 2026-12-02); the first stage in a separate process instead of a thread (no shared GIL; the
model ran faster, but reading and deserializing the bag then sat with the detector: 131.6 vs 143.4
frames/s on a 400-frame bag); pre-resized frames for the detector (no saving); two torch threads
in the overlapped run (slower); the model's batch split over two threads (faces and their mirror
images at once, one torch thread each: 18.6 vs 16.9 ms per 2-face frame alone, 21.9 vs 17.9 ms beside
the detector, AVX2 host; an ad-hoc timing, not part of this command); the detector on every 2nd
frame only (`detect_every`, table above). With two stages the model's thread set the pace (the
detector's thread waited for it), hence the encoder stage (2026-12-02): the model split at the
encoder's output into two threads, so that three stages of comparable cost share the two cores.
OpenCV on one thread instead of two (`cv2.setNumThreads(1)`; paired runs of 500 frames: no change,
0.999x; an ad-hoc check, not part of this command).

2026-12-03: the columns fused into one stack of wide layers (`fuse_columns`, table above): the
pipeline gains frames/s, but the model-only reference gains more, so the ratio does not rise when
the model gets faster. Ad-hoc checks on the 1,000-frame bag, three stages, interleaved rounds (not
part of this command; frames/s per round): the detector on two LiteRT threads (46.7 / 60.0 / 62.2
against 61.3 / 57.8 / 65.0 with one); TorchScript-frozen encoder and columns, one GIL-free call each
(70.8 / 72.7 / 67.2 against 58.7 / 74.3 / 65.6 eager); the first stage in a separate process again,
now with the encoder and columns in two threads of the main one (62.7 / 68.4 / 71.3 against 68.4 /
60.4 / 67.3 with threads); hand-over queues of depth 1, 2, 4, 8 (medians of four rounds 66.2, 66.0,
66.6, 69.7, every depth's rounds spread over 10 frames/s or more). None is outside the machine's noise:
the GIL is not what limits the overlap. The process uses 1.4-1.7 of the 2 cores (CPU time / wall
time) and each stage runs 1.5-2x slower beside the others than alone; vmstat shows 16-19 % idle and
2-8 % steal during the run.

Later the same day, more ad-hoc checks (not part of this command): the two cores are real, not two
halves of one: two single-thread torch processes together do 1.9-2.0x the work of one (256x256
matmuls 4,801 and 4,992 against 2,506 and 2,568 per second; small convolutions 28 and 31 against 14
and 13). Per-thread CPU during an overlapped run at 66 frames/s: 0.58, 0.57 and 0.46 cores (first
stage, encoder, columns with scoring; 1.61 in all), i.e. 24.3 ms of CPU per frame against 21.4 ms
with the stages one after the other: overlapping adds ~14 % work and leaves ~0.4 core idle. Python's
GIL switch interval (`sys.setswitchinterval`) 0.5, 1 and 5 ms (the default): medians of four rounds
63.7, 67.9 and 67.0 frames/s (ratios 66.3, 67.8 and 63.0 %); the first stage's thread at nice +5 or
+10, or the encoder's at +5: 61.3, 62.7 and 64.6 against 66.7 frames/s (three rounds). BlazeFace
alone: 6.7 ms per 640x480 frame, of which 5.2 ms is the LiteRT network itself.

2026-12-03, with the v5 model (13 columns, of which 12 in ensembles): the columns now cost more than
the encoder (CPU time inside the stages, ad hoc: first stage 8.5, encoder 6.0, columns with scoring
11.1 ms per frame), so the columns' thread set the pace; the fused columns' first layer moved into
the encoder's stage (8.1-8.4 / 8.6-8.9 / 7.3-7.7 ms). With the stages balanced, the first stage in a
worker process (`first_stage_process`, now the offline default) gains where it did not before: same
bag, 6 interleaved rounds (`benchmark --repeats 6 --no-compare-stages --no-compare-fused
--compare-detectors --compare-detect-every`): 68.8 against 62.4 frames/s, ratio 75.0 % against
68.9 % (paired ratios 75.2 / 68.0 / 77.5 / 76.9 / 74.8 / 65.0 against 75.2 / 70.5 / 62.0 / 71.9 /
67.3 / 65.1 %); the model's stages run faster beside a process than beside a thread (encoder 11.3
against 14.2 ms, columns 9.8 against 11.9 ms, overlapped). Its price is latency: up to 4 prepared
frames wait in the queue from the worker (offline only; the node keeps a thread).

2026-12-07: the identity columns got a crop of their own (docs/PIPELINE.md), on a track's first frame
and every third. The model-only pass now runs the crops its evaluation ran (the identity crop only for
the faces whose identity was due: `FaceResult.identity_fresh`; before, for every face, which made the
model-only side slower than the pipeline's model and the ratio too kind: 88.0 % then, 64.0 % at once
with a faithful pass). With both crops encoded in the encoder stage that stage set the pace (21.1 ms
against 12.8 ms for the columns); the identity crop now goes through the model in the columns' stage
(table above: 20.2 + 19.1 ms). Three alternating runs of the code before and after (ad hoc, one
1,000-frame bag, `--repeats 1`): 37.6 against 42.8 frames/s (medians); the node, same comparison:
docs/ros_benchmark_runs/identity_stage.md. One encoder call over both crops of a frame (concatenated)
instead of two would save 0.4, 3.3 and 3.2 ms of the shared encoder's 6.0, 10.8 and 15.3 ms at 1, 2
and 3 faces (ad hoc, one thread, medians of 200 calls), only on frames where an identity is due, and
would put the identity crop back into the encoder stage: not done.
"""


def run(args: argparse.Namespace) -> int:
    """Execute parsed arguments; user errors print one line to stderr and return 2."""
    handlers = {"make": _make, "info": _info, "evaluate": _evaluate, "benchmark": _benchmark}
    try:
        return handlers[args.bag_command](args)
    except BagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``facial-perception-bag``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
