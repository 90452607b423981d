"""Parameter and FLOP counts per face of a configuration (for the CLI ``info`` command and the benchmark).

FLOPs are counted for the multiply-adds of every convolution and linear layer actually run by the
inference forward pass (encoder feature path, task columns, lateral adapters), with one
multiply-add = 2 FLOP.  Element-wise work (BatchNorm, activations, pooling) is not counted, as
usual.  Counting runs the real modules on PyTorch's ``meta`` device, so it is instant and
allocates no weights even for large configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from facial_perception.core.began import BEGAN
from facial_perception.core.config import ModelConfig, get_config
from facial_perception.core.progressive import LateralAdapter, ProgressiveNet, TaskSpec, default_task_specs


def _macs_hook(counter: list[int]):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        per_sample = output.shape[0]
        if isinstance(module, LateralAdapter):  # runs its projection functionally (hooks below never fire)
            counter[0] += output.numel() // per_sample * module.in_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            counter[0] += output.numel() // per_sample * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            counter[0] += output.numel() // per_sample * module.in_features

    return hook


def count_macs(module: nn.Module, run) -> int:
    """Multiply-adds per sample of conv/linear layers executed by ``run()`` (batch of 1)."""
    counter = [0]
    handles = [
        m.register_forward_hook(_macs_hook(counter))
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, LateralAdapter))
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counter[0]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(
    config: ModelConfig | str,
    specs: Sequence[TaskSpec] | None = None,
    standalone: Mapping[str, Sequence[ModelConfig]] | None = None,
) -> dict[str, Any]:
    """Parameters and GFLOP per face of encoder, each column, the shared model and N independent models.

    ``specs`` defaults to the four tasks as a progressive chain (gender, age, emotion, identity-62);
    ``standalone``: per task, the configs of its standalone members (``ProgressiveNet.standalone_configs``),
    networks with their own encoder that inference runs besides the shared one.
    """
    config = get_config(config)
    specs = list(specs) if specs is not None else default_task_specs()
    size, channels = config.input_size, config.in_channels
    with torch.device("meta"):
        net = ProgressiveNet(config, specs).eval()
        began = BEGAN(config)
        image = torch.empty(1, channels, size, size)
        features = torch.empty(1, *net.encoder.feature_shape)

    encoder_macs = count_macs(net.encoder, lambda: net.encoder.forward_features(image))
    column_macs: dict[str, int] = {}
    for spec in specs:
        # MACs of this column alone (its adapters included), with its sources already computed.
        total_with = count_macs(net, lambda s=spec: net.forward_features(features, [s.name]))
        sources = net.lateral_sources(spec.name)
        total_without = (
            count_macs(net, lambda src=sources: net.forward_features(features, src)) if sources else 0
        )
        column_macs[spec.name] = total_with - total_without

    independent_macs = 0
    independent_params = 0
    for spec in specs:
        alone = replace_laterals(spec)
        with torch.device("meta"):
            single = ProgressiveNet(config, [alone]).eval()
        independent_macs += count_macs(single, lambda m=single: m(image))
        independent_params += _params(single.encoder.features) + _params(single.columns[alone.name])

    standalone_rows = []
    for name, configs in (standalone or {}).items():
        spec = next(s for s in specs if s.name == name)
        alone = replace(spec, laterals=[], members=1, mirror_average=False)
        for member_config in configs:
            with torch.device("meta"):
                member = ProgressiveNet(member_config, [alone]).eval()
            macs = count_macs(member, lambda m=member: m(image))
            member_params = _params(member.encoder.features) + _params(member.columns[name])
            standalone_rows.append({"task": name, "config": member_config.name, "params": member_params,
                                    "gflop": 2.0 * macs / 1e9})  # fmt: skip
    standalone_gflop = sum(row["gflop"] for row in standalone_rows)

    encoder_feature_params = _params(net.encoder.features)
    column_params = {name: _params(col) for name, col in net.columns.items()}
    shared_macs = encoder_macs + sum(column_macs.values())
    gflop = lambda macs: 2.0 * macs / 1e9  # noqa: E731 - one multiply-add = 2 FLOP
    return {
        "config": config.name,
        "input": f"{channels}x{size}x{size}",
        "feature_map": "x".join(str(d) for d in net.encoder.feature_shape),
        "tasks": [spec.to_dict() | {"labels": len(spec.labels)} for spec in specs],
        "params": {
            "encoder_features": encoder_feature_params,
            "encoder_fc": _params(net.encoder.fc),
            "decoder": _params(began.decoder),
            "generator": _params(began.generator),
            "columns": column_params,
            "inference_total": encoder_feature_params + sum(column_params.values()),
            "standalone_total": sum(row["params"] for row in standalone_rows),
            "independent_total": independent_params,
        },
        "gflop_per_face": {
            "encoder": gflop(encoder_macs),
            "columns": {name: gflop(m) for name, m in column_macs.items()},
            "shared_total": gflop(shared_macs),
            "independent_total": gflop(independent_macs),
            # columns with mirror averaging run the whole network a second time on the mirror image
            "inference": (gflop(shared_macs) + standalone_gflop)
            * (2 if any(s.mirror_average for s in specs) else 1),
        },
        "standalone": standalone_rows,
    }


def replace_laterals(spec: TaskSpec) -> TaskSpec:
    """The same task without lateral connections (an independent single-task model)."""
    return replace(spec, laterals=[])


def format_model_info(info: dict[str, Any]) -> str:
    """A plain-text table of :func:`model_info` for terminals."""
    params, gflop = info["params"], info["gflop_per_face"]
    rows = [("encoder (feature path)", params["encoder_features"], gflop["encoder"])]
    for task in info["tasks"]:
        name = task["name"]
        lat = ",".join(task["laterals"]) or "-"
        rows.append(
            (
                f"column {name} ({task['labels']} labels; laterals {lat}"
                + (f"; {task['members']} members)" if task.get("members", 1) > 1 else ")"),
                params["columns"][name],
                gflop["columns"][name],
            )
        )
    standalone = info.get("standalone", [])
    for row in standalone:
        rows.append(
            (f"standalone {row['task']} member (own {row['config']} encoder)", row["params"], row["gflop"])
        )
    rows.append(("shared encoder + columns", params["inference_total"], gflop["shared_total"]))
    rows.append(
        (
            f"{len(info['tasks'])} independent encoder+column models",
            params["independent_total"],
            gflop["independent_total"],
        )
    )
    mirrored = [t["name"] for t in info["tasks"] if t.get("mirror_average")]
    if mirrored:
        rows.append((f"inference with mirror averaging ({', '.join(mirrored)})", "", gflop["inference"]))
    elif standalone:
        total = params["inference_total"] + params["standalone_total"]
        rows.append(("inference (shared model + standalone members)", total, gflop["inference"]))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"config {info['config']}: input {info['input']}, shared feature map {info['feature_map']}",
        f"{'part':<{width}}  {'params':>12}  {'GFLOP/face':>10}",
        f"{'-' * width}  {'-' * 12}  {'-' * 10}",
    ]
    lines += [f"{name:<{width}}  {(f'{n:,}' if n != '' else ''):>12}  {g:>10.4f}" for name, n, g in rows]
    lines.append(
        f"BEGAN training only: encoder FC {params['encoder_fc']:,}, decoder {params['decoder']:,}, "
        f"generator {params['generator']:,} parameters"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    for name in sys.argv[1:] or ["paper", "lite"]:
        print(format_model_info(model_info(name)))
        print()
