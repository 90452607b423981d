"""Bag evaluation reports: ``report.json``, ``report.md`` and PNG plots, written atomically.

The report folder is assembled in a hidden temporary folder beside the target and renamed into
place at the end, so an interrupted or failed run never leaves a half-written report (and an
existing report is only replaced by a complete new one).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from facial_perception.bags.bag_io import BagError
from facial_perception.bags.evaluate_bag import BagEvaluation
from facial_perception.core.fileio import jsonable

__all__ = ["render_markdown", "write_report"]


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(evaluation: BagEvaluation, plots: dict[str, str] | None = None) -> str:
    """The human-readable report (tables of every metric; plot links when ``plots`` is given)."""
    s = evaluation.summary
    plots = plots or {}
    frames = s["frames"]
    lines = [
        f"# Bag evaluation ({s.get('mode', '?')})",
        "",
        f"- bag: `{s.get('bag')}` ({s.get('storage')}), "
        f"topic `{s.get('image_topic')}` ({s.get('image_type')})",
        f"- frames: {frames['total']} total, {frames['processed']} processed, {frames['dropped']} dropped "
        f"({_pct(frames['dropped_fraction'])}), {frames['labelled']} labelled",
    ]
    if s.get("rate") is not None:
        lines.append(f"- replay rate: x{s['rate']:g}")
    if s.get("output_bag"):
        lines.append(f"- node output written to `{s['output_bag']}`")
    fps = s.get("throughput_fps")
    lines.append(f"- throughput: {_num(fps, 1)} frames/s over {s['elapsed_s']:.1f} s")
    lat = s["latency_ms"]
    lines += [
        "",
        "## Latency (ms)",
        "",
        "| count | mean | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|",
        f"| {lat['count']} | {_ms(lat['mean'])} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} "
        f"| {_ms(lat['max'])} |",
    ]
    if s.get("node_reported_latency_ms"):
        nl = s["node_reported_latency_ms"]
        lines.append(
            f"\nNode-reported latency (`latency_ms` of FaceArray): "
            f"p50 {_ms(nl['p50'])}, p90 {_ms(nl['p90'])}."
        )
    if s.get("stage_ms_mean"):
        stages = ", ".join(f"{k} {v:.2f}" for k, v in s["stage_ms_mean"].items())
        lines.append(f"\nMean time per stage (ms): {stages}.")
    if "latency" in plots:
        lines += ["", f"![latency histogram]({plots['latency']})"]

    if s.get("labelled"):
        det, trk = s["detection"], s["tracking"]
        lines += [
            "",
            "## Detection",
            "",
            f"IoU >= {det['iou_threshold']:g} against the ground-truth face boxes (dropped frames excluded).",
            "",
            "| ground-truth faces | matched | recall | precision | mean IoU |",
            "|---|---|---|---|---|",
            f"| {det['gt_faces']} | {det['matched']} | {_pct(det['recall'])} | {_pct(det['precision'])} | "
            f"{_num(det['mean_iou'])} |",
            "",
            "## Track-id stability",
            "",
            "| GT tracks | id switches | switches per track | tracks without switch | ids per GT track "
            "| never detected |",
            "|---|---|---|---|---|---|",
            f"| {trk['gt_tracks']} | {trk['id_switches']} | "
            f"{_num(trk['id_switches_per_track'], 3)} | "
            f"{_pct(trk['tracks_without_switch'])} | "
            f"{_num(trk['predicted_ids_per_gt_track'])} | "
            f"{trk['tracks_never_detected']} |",
            "",
            "## Accuracy per task",
            "",
            "Accuracy is over ground-truth faces matched to a detection; "
            "end-to-end counts missed faces as wrong.",
            "",
            "| task | GT faces | evaluated | accuracy | end-to-end | largest subgroup gap |",
            "|---|---|---|---|---|---|",
        ]
        for task, entry in s["tasks"].items():
            gap = entry.get("largest_gap")
            gap_text = "-"
            if gap:
                ci = gap.get("gap_ci95")
                interval = f", 95% interval {100 * ci[0]:.1f}-{100 * ci[1]:.1f}" if ci else ""
                gap_text = (
                    f"{100 * gap['gap']:.1f} pts ({gap['attribute']}: {' / '.join(gap['best'])} vs "
                    f"{' / '.join(gap['worst'])}{interval})"
                )
            lines.append(
                f"| {task} | {entry['gt_faces']} | {entry['evaluated']} | {_pct(entry['accuracy'])} | "
                f"{_pct(entry['accuracy_end_to_end'])} | {gap_text} |"
            )
        for task in s["tasks"]:
            if f"confusion_{task}" in plots:
                lines += ["", f"![{task} confusion matrix]({plots[f'confusion_{task}']})"]
        for task, tables in evaluation.subgroups.items():
            for attribute, table in tables.items():
                lines += ["", f"### {task} accuracy per {attribute}", "", table.to_markdown()]
                key = f"groups_{task}_{attribute}"
                if key in plots:
                    lines += ["", f"![{task} per {attribute}]({plots[key]})"]

    pred = s["predictions"]
    lines += [
        "",
        "## Predictions",
        "",
        f"{pred['faces']} faces in {frames['processed']} frames, {pred['tracks']} track ids "
        f"(mean {pred['mean_track_length']:.1f} frames each).",
        "",
        "Faces per frame: " + ", ".join(f"{k}: {v}" for k, v in pred["faces_per_frame"].items()),
    ]
    for task, histogram in pred["label_histograms"].items():
        top = ", ".join(f"{label} {count}" for label, count in list(histogram.items())[:12])
        lines.append(f"- {task}: {top}")
    warnings = list(s.get("warnings", []))
    if s.get("warning"):
        warnings.append(s["warning"])
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def _plots(evaluation: BagEvaluation, folder: Path) -> dict[str, str]:
    """PNG plots into ``folder``; returns name -> file name (relative to the report)."""
    from matplotlib.figure import Figure

    from facial_perception.core.plots import plot_confusion_matrix, plot_group_accuracy

    out: dict[str, str] = {}
    if evaluation.latencies_ms:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        values = np.asarray(evaluation.latencies_ms)
        ax.hist(values, bins=min(50, max(5, values.size // 4)), color="tab:blue")
        for q, style in ((50, "--"), (90, ":")):
            ax.axvline(float(np.percentile(values, q)), color="k", linestyle=style, label=f"p{q}")
        ax.set(xlabel="latency (ms)", ylabel="frames", title="latency per frame")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "latency_hist.png", dpi=110)
        out["latency"] = "latency_hist.png"
    for task, (matrix, labels) in evaluation.confusions.items():
        name = f"confusion_{_safe(task)}.png"
        plot_confusion_matrix(matrix, labels, folder / name, title=f"{task} confusion matrix")
        out[f"confusion_{task}"] = name
    for task, tables in evaluation.subgroups.items():
        for attribute, table in tables.items():
            name = f"groups_{_safe(task)}_{_safe(attribute)}.png"
            plot_group_accuracy(table, folder / name, title=f"{task} accuracy per {attribute}")
            out[f"groups_{task}_{attribute}"] = name
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(
    evaluation: BagEvaluation,
    out_dir: str | os.PathLike[str],
    *,
    plots: bool = True,
    overwrite: bool = True,
    include_matches: bool = True,
) -> Path:
    """Write ``report.json``, ``report.md`` and the PNGs into ``out_dir`` (replaced atomically)."""
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise BagError(f"report folder {target} exists and is not a folder")
    if target.exists() and not overwrite:
        raise BagError(f"report folder {target} exists already")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise BagError(f"cannot create the report folder {target}: {exc.strerror or exc}") from None
    try:
        made = _plots(evaluation, staging) if plots else {}
        data = dict(evaluation.summary)
        data["plots"] = made
        if include_matches:
            data["matches"] = evaluation.matches
        (staging / "report.json").write_text(json.dumps(jsonable(data), indent=2) + "\n", encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(evaluation, made), encoding="utf-8")
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BagError(f"cannot write the report to {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
