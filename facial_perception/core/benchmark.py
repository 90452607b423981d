"""Model speed benchmark: faces/s, per-face latency, GFLOP/s against this machine's matmul peak.

Run ``facial-perception benchmark`` or ``python -m facial_perception.core.benchmark``; results go to
``docs/benchmark_model.json`` and ``docs/BENCHMARK_MODEL.md``.  Timings are medians over repeats
after a warm-up; the dense-matmul peak is measured in the same process, interleaved with the model
runs, and its best value is used so that the reported share of peak is conservative.  The load
average before and after is recorded because the CPU may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from facial_perception.core.config import get_config
from facial_perception.core.devices import resolve_device, tune_cpu_allocator
from facial_perception.core.fileio import atomic_write_text
from facial_perception.core.flops import model_info
from facial_perception.core.fused_columns import FusedColumns
from facial_perception.core.progressive import ProgressiveNet, default_task_specs

TARGETS = {
    "paper_batch16_share_of_matmul_peak": 0.75,
    "lite_batch16_faces_per_s": 500.0,
    "shared_vs_independent_speedup": 2.5,
}


# ---------------------------------------------------------------------------------------------- helpers
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, library versions (and the GPU when one is used)."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "simd": sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_summary() -> str:
    """One line for benchmark reports: CPU, its SIMD flags (shared VMs move between hosts, and an
    AVX2 host runs this model about half as fast as an AVX-512 one), cores, torch, Python."""
    m = machine_info(torch.device("cpu"))
    simd = ", ".join(m["simd"]) or "SIMD flags unknown"
    return (
        f"{m['cpu']} ({simd}), {m['usable_cores']} usable cores, torch {m['torch']}, Python {m['python']}, "
        f"{platform.machine()}"
    )


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    device: torch.device,
    repeats: int = 7,
    warmup_s: float = 0.5,
    min_block_s: float = 0.2,
) -> list[dict[str, Any]]:
    """Seconds per call of each function, measured in alternating blocks of >= ``min_block_s``.

    Alternating the functions inside every repeat makes ratios between them robust to other
    processes that load the CPU for a while.  Each function is warmed up first (>= 3 calls and
    ``warmup_s``).  Returns per function: median and best seconds per call and the samples.
    """
    blocks = []
    for fn in fns:
        start = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - start < warmup_s:
            fn()
            calls += 1
        _sync(device)
        per_call = (time.perf_counter() - start) / calls
        blocks.append(max(1, int(min_block_s / max(per_call, 1e-6))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(blocks[index]):
                fn()
            _sync(device)
            samples[index].append((time.perf_counter() - t0) / blocks[index])
    return [
        {"median_s": statistics.median(x), "best_s": min(x), "samples": x, "calls_per_block": b}
        for x, b in zip(samples, blocks, strict=True)
    ]


def time_call(fn: Callable[[], Any], device: torch.device, **kwargs: Any) -> dict[str, Any]:
    """:func:`time_interleaved` for a single function."""
    return time_interleaved([fn], device, **kwargs)[0]


def paired_speedup(
    slow: Callable[[], Any], fast: Callable[[], Any], device: torch.device, repeats: int
) -> tuple[float, float, float]:
    """``(slow ms, fast ms, speed-up)``: medians of :func:`time_interleaved` and of the paired ratios."""
    t_slow, t_fast = time_interleaved([slow, fast], device, repeats=repeats)
    ratios = [a / b for a, b in zip(t_slow["samples"], t_fast["samples"], strict=True)]
    return 1e3 * t_slow["median_s"], 1e3 * t_fast["median_s"], statistics.median(ratios)


def matmul_peak(device: torch.device, sizes: Sequence[int] = (1024, 2048, 3072)) -> dict[str, Any]:
    """Best dense fp32 ``torch.mm`` GFLOP/s over a few square sizes.

    BLAS worker threads keep spinning for a while after a call and would slow down whatever is
    timed next, so this pauses briefly before returning.
    """
    results = {}
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        timing = time_call(lambda a=a, b=b: torch.mm(a, b), device, repeats=5, warmup_s=0.3, min_block_s=0.1)
        results[str(n)] = 2 * n**3 / timing["best_s"] / 1e9
    time.sleep(0.5)
    return {"gflops": max(results.values()), "by_size": results}


def _prepare(model: ProgressiveNet, device: torch.device, half: bool) -> ProgressiveNet:
    model = model.eval().requires_grad_(False).to(device)
    if half:
        model.half()
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def _input(config_size: int, batch: int, device: torch.device, half: bool) -> torch.Tensor:
    x = torch.rand(batch, 1, config_size, config_size, device=device) * 2 - 1
    if half:
        x = x.half()
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# ---------------------------------------------------------------------------------------------- benchmark
def benchmark_config(
    name: str,
    batches: Sequence[int],
    device: torch.device,
    half: bool,
    peaks: list[float],
    repeats: int,
    log: Callable[[str], None],
    matmul_sizes: Sequence[int] = (1024, 2048, 3072),
) -> dict[str, Any]:
    """Throughput per batch size, shared-vs-independent and fused-vs-one-by-one columns speed-ups
    for one configuration."""
    config = get_config(name)
    specs = default_task_specs()
    info = model_info(config, specs)
    gflop = info["gflop_per_face"]["shared_total"]
    torch.manual_seed(0)
    shared = _prepare(ProgressiveNet(config, specs), device, half)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = _input(config.input_size, batch, device, half)
            t = time_call(lambda x=x: shared(x), device, repeats=repeats)
            rows.append(
                {
                    "batch": batch,
                    "ms_per_batch": 1e3 * t["median_s"],
                    "ms_per_face": 1e3 * t["median_s"] / batch,
                    "faces_per_s": batch / t["median_s"],
                    "faces_per_s_best": batch / t["best_s"],
                    "gflops_achieved": gflop * batch / t["median_s"],
                }
            )
            log(f"{name} batch {batch}: {rows[-1]['faces_per_s']:.1f} faces/s")
        peaks.append(matmul_peak(device, matmul_sizes)["gflops"])

        independents = [
            _prepare(ProgressiveNet(config, [replace(spec, laterals=[])]), device, half) for spec in specs
        ]
        comparison = []
        for batch in sorted({min(batches), max(batches)}):
            x = _input(config.input_size, batch, device, half)
            indep_ms, shared_ms, speedup = paired_speedup(
                lambda x=x: [m(x) for m in independents], lambda x=x: shared(x), device, repeats
            )
            comparison.append(
                {
                    "batch": batch,
                    "shared_ms_per_batch": shared_ms,
                    "independent_ms_per_batch": indep_ms,
                    "speedup": speedup,
                }
            )
            log(f"{name} batch {batch}: shared is {speedup:.2f}x faster than 4 independent")

        # the columns alone on encoder features: one by one (as trained) vs fused (as the predictor runs them)
        fused = FusedColumns(shared)
        if device.type == "cpu":
            fused.to(memory_format=torch.channels_last)
        fusion = []
        for batch in sorted({min(batches), max(batches)}):
            features = shared.encoder.forward_features(_input(config.input_size, batch, device, half))
            plain_ms, fused_ms, speedup = paired_speedup(
                lambda f=features: shared.forward_features(f), lambda f=features: fused(f), device, repeats
            )
            fusion.append(
                {
                    "batch": batch,
                    "columns_ms_per_batch": plain_ms,
                    "fused_ms_per_batch": fused_ms,
                    "speedup": speedup,
                }
            )
            log(f"{name} batch {batch}: fused columns {speedup:.2f}x faster than one by one")
    return {
        "config": name,
        "input": info["input"],
        "gflop_per_face": gflop,
        "independent_gflop_per_face": info["gflop_per_face"]["independent_total"],
        "params": info["params"]["inference_total"],
        "rows": rows,
        "shared_vs_independent": comparison,
        "fused_vs_columns": fusion,
    }


def run_benchmark(
    out_json: str | Path = "docs/benchmark_model.json",
    out_md: str | Path = "docs/BENCHMARK_MODEL.md",
    configs: Sequence[str] = ("paper", "lite"),
    batches: Sequence[int] = (1, 4, 16),
    device: str | torch.device = "auto",
    threads: int | None = None,
    repeats: int = 7,
    tune_allocator: bool = True,
    log: Callable[[str], None] = print,
    matmul_sizes: Sequence[int] = (1024, 2048, 3072),
) -> dict[str, Any]:
    """Measure every config at every batch size, evaluate the targets, write JSON and Markdown."""
    resolved = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    allocator = tune_cpu_allocator() if tune_allocator and resolved.type == "cpu" else False
    # Random weights can drive deep activations into denormals, which real weights do not; avoid that.
    torch.set_flush_denormal(True)
    half = resolved.type == "cuda"
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(resolved),
        "settings": {
            "precision": "fp16" if half else "fp32",
            "memory_format": "channels_last" if resolved.type == "cpu" else "contiguous",
            "glibc_allocator_tuned": allocator,
            "flush_denormal": True,
            "repeats": repeats,
            "tasks": [s.to_dict() | {"labels": len(s.labels)} for s in default_task_specs()],
        },
        "load_average_before": _load(),
    }
    peaks: list[float] = [matmul_peak(resolved, matmul_sizes)["gflops"]]
    result["configs"] = [
        benchmark_config(c, batches, resolved, half, peaks, repeats, log, matmul_sizes) for c in configs
    ]
    peaks.append(matmul_peak(resolved, matmul_sizes)["gflops"])
    peak = max(peaks)
    result["matmul_peak_gflops"] = peak
    result["matmul_peak_samples"] = peaks
    result["load_average_after"] = _load()
    for entry in result["configs"]:
        for row in entry["rows"]:
            row["share_of_matmul_peak"] = row["gflops_achieved"] / peak
    result["targets"] = evaluate_targets(result)
    atomic_write_text(out_json, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_md, to_markdown(result))
    return result


def _row(result: dict[str, Any], config: str, batch: int) -> dict[str, Any] | None:
    for entry in result["configs"]:
        if entry["config"] == config:
            return next((r for r in entry["rows"] if r["batch"] == batch), None)
    return None


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three targets, each with the measured value and pass/fail."""
    targets = []
    paper = _row(result, "paper", 16)
    if paper:
        value = paper["share_of_matmul_peak"]
        goal = TARGETS["paper_batch16_share_of_matmul_peak"]
        targets.append(
            {
                "target": "paper, batch 16: share of matmul peak",
                "goal": f">= {goal:.0%}",
                "value": f"{value:.0%}",
                "met": value >= goal,
            }
        )
    lite = _row(result, "lite", 16)
    if lite:
        value = lite["faces_per_s"]
        goal = TARGETS["lite_batch16_faces_per_s"]
        targets.append(
            {
                "target": "lite, batch 16: faces/s (4 tasks)",
                "goal": f">= {goal:.0f}",
                "value": f"{value:.0f}",
                "met": value >= goal,
            }
        )
    goal = TARGETS["shared_vs_independent_speedup"]
    for entry in result["configs"]:
        for cmp in entry["shared_vs_independent"]:
            if cmp["batch"] == max(c["batch"] for c in entry["shared_vs_independent"]):
                targets.append(
                    {
                        "target": f"{entry['config']}, batch {cmp['batch']}: shared vs 4 independent",
                        "goal": f">= {goal}x",
                        "value": f"{cmp['speedup']:.2f}x",
                        "met": cmp["speedup"] >= goal,
                    }
                )
    return targets


def to_markdown(result: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    m, s = result["machine"], result["settings"]
    lines = [
        "# Model speed benchmark",
        "",
        f"Measured {result['created']} by `facial-perception benchmark` "
        "(`python -m facial_perception.core.benchmark`). Randomly initialised weights (speed does not",
        "depend on the values); the four tasks of the paper as a progressive chain "
        "(gender; age <- gender; emotion <- gender, age; identity (62) <- gender, age, emotion).",
        "",
        "## Machine",
        "",
        "| item | value |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({', '.join(m['simd']) or 'no SIMD flags read'}) |",
        f"| cores | {m['usable_cores']} usable of {m['logical_cores']} logical |",
        f"| torch | {m['torch']}, {m['torch_threads']} threads, oneDNN {'on' if m['mkldnn'] else 'off'} |",
        f"| device | {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''} |",
        f"| settings | {s['precision']}, {s['memory_format']}, glibc allocator tuned: "
        f"{s['glibc_allocator_tuned']}, flush denormals |",
        f"| load average before / after | {result['load_average_before']} / {result['load_average_after']} |",
        f"| dense fp32 matmul peak (`torch.mm`, best of {len(result['matmul_peak_samples'])} samples "
        f"through the run) | {result['matmul_peak_gflops']:.1f} GFLOP/s |",
        "",
        "## Throughput (median of repeats after warm-up)",
        "",
        "| config | input | GFLOP/face | batch | ms/batch | ms/face | faces/s (best) | GFLOP/s "
        "| share of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["configs"]:
        for row in entry["rows"]:
            lines.append(
                f"| {entry['config']} | {entry['input']} | {entry['gflop_per_face']:.3f} | {row['batch']} | "
                f"{row['ms_per_batch']:.1f} | {row['ms_per_face']:.2f} | "
                f"{row['faces_per_s']:.0f} ({row['faces_per_s_best']:.0f}) | "
                f"{row['gflops_achieved']:.1f} | {row['share_of_matmul_peak']:.0%} |"
            )
    lines += [
        "",
        "## Shared encoder + 4 columns vs 4 independent encoder+column models",
        "",
        "| config | batch | GFLOP/face shared / independent | shared ms/batch | independent ms/batch "
        "| speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for entry in result["configs"]:
        for cmp in entry["shared_vs_independent"]:
            lines.append(
                f"| {entry['config']} | {cmp['batch']} | {entry['gflop_per_face']:.3f} / "
                f"{entry['independent_gflop_per_face']:.3f} | {cmp['shared_ms_per_batch']:.1f} | "
                f"{cmp['independent_ms_per_batch']:.1f} | {cmp['speedup']:.2f}x |"
            )
    lines += [
        "",
        "## The columns alone: fused (as the predictor runs them) vs one by one (as trained)",
        "",
        "On the encoder's feature maps; `FusedColumns` stacks the frozen columns into wide layers with "
        "BatchNorm folded (docs/PIPELINE.md). Same results; the speed-up is the median of paired ratios.",
        "",
        "| config | batch | one by one ms/batch | fused ms/batch | speed-up |",
        "|---|---|---|---|---|",
    ]
    for entry in result["configs"]:
        for cmp in entry.get("fused_vs_columns", []):
            lines.append(
                f"| {entry['config']} | {cmp['batch']} | {cmp['columns_ms_per_batch']:.2f} | "
                f"{cmp['fused_ms_per_batch']:.2f} | {cmp['speedup']:.2f}x |"
            )
    lines += ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    lines += [
        "",
        "Notes: the share of peak divides the model's achieved GFLOP/s (convolutions, linear layers and",
        "lateral adapters; multiply-add = 2 FLOP) by the best `torch.mm` rate measured in the same run",
        "(at the start, after each configuration and at the end). Speed-ups are medians of paired ratios",
        "timed in alternating blocks, which keeps them meaningful when other processes load the CPU.",
        "oneDNN's convolution kernels can exceed the `torch.mm` rate on some CPUs, so a share above 100%",
        "is possible. The load average shows whether other processes shared the CPU during the run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark model speed; writes JSON and Markdown reports.")
    parser.add_argument("--out-json", default="docs/benchmark_model.json")
    parser.add_argument("--out-md", default="docs/BENCHMARK_MODEL.md")
    parser.add_argument("--configs", nargs="+", default=["paper", "lite"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-allocator-tuning", action="store_true")
    parser.add_argument(
        "--matmul-sizes",
        nargs="+",
        type=int,
        default=[1024, 2048, 3072],
        help="square sizes of the torch.mm peak measurement",
    )
    args = parser.parse_args(argv)
    try:
        result = run_benchmark(
            args.out_json,
            args.out_md,
            args.configs,
            args.batches,
            args.device,
            args.threads,
            args.repeats,
            not args.no_allocator_tuning,
            matmul_sizes=args.matmul_sizes,
        )
    except ValueError as exc:  # ConfigError, DeviceError: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for t in result["targets"]:
        print(f"{t['target']}: {t['value']} (goal {t['goal']}) {'met' if t['met'] else 'MISSED'}")
    print(f"wrote {args.out_json} and {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
