"""Checkpoints: one ``.safetensors`` file per model, validated on load, written atomically.

Layout of a model file: every tensor of the :class:`ProgressiveNet` under ``model.``, optional
extra tensors (e.g. a BEGAN decoder) under ``extra.``, and the safetensors metadata key
``facial_perception`` holding JSON ``{format_version, kind, config, tasks, training, sha256}`` (plus
``standalone``, the configs of the columns' standalone members, and ``whitening``, ``{task: [in_dim,
out_dim]}`` of the embedding whitenings, when there are any).
``sha256`` covers the tensor data, so bit rot and truncation are caught, not silently loaded.
Loading never unpickles anything; training-state files (optimizer, scheduler, RNG) use
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from facial_perception.core.began import BEGAN, BEGANState
from facial_perception.core.config import ConfigError, ModelConfig
from facial_perception.core.devices import resolve_device
from facial_perception.core.fileio import atomic_path
from facial_perception.core.progressive import ModelError, ProgressiveNet, TaskSpec

FORMAT_VERSION = 1
META_KEY = "facial_perception"
KIND_MODEL = "progressive"
KIND_BEGAN = "began"
TRAINING_STATE_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024
#: The model shipped inside the package, which the node, the demo and the tools load by default.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default.safetensors"


class CheckpointError(RuntimeError):
    """Any problem reading or writing a checkpoint, as one line naming the file."""


# ---------------------------------------------------------------------------------------------- writing
def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None] | bytes) -> Path:
    """Write via a temporary file in the same folder, fsync, then ``os.replace`` (see ``fileio``).

    A failure at any point leaves the previous file untouched and no temporary file behind.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"cannot write {path}: folder {folder} does not exist")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            if isinstance(write, (bytes, bytearray, memoryview)):
                handle.write(write)
            else:
                write(handle)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot write {path}: {exc}") from exc
    return path


def _cpu_tensors(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"tensor {key!r} is a {type(value).__name__}, not a torch.Tensor")
        # clone: safetensors refuses tensors that share storage (views, tied weights).
        out[prefix + key] = value.detach().to("cpu").contiguous().clone()
    return out


def _data_offset(blob: bytes | memoryview) -> int:
    (header_len,) = struct.unpack("<Q", bytes(blob[:8]))
    return 8 + header_len


def _serialize(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """safetensors bytes whose metadata carries the sha256 of the tensor data section."""
    try:
        draft = st_save(tensors, metadata={META_KEY: json.dumps(meta)})
        digest = hashlib.sha256(memoryview(draft)[_data_offset(draft) :]).hexdigest()
        final = st_save(tensors, metadata={META_KEY: json.dumps({**meta, "sha256": digest})})
    except (TypeError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot serialise checkpoint: {exc}") from exc
    if hashlib.sha256(memoryview(final)[_data_offset(final) :]).hexdigest() != digest:
        raise CheckpointError("cannot serialise checkpoint: tensor data changed between passes")
    return final


def _json_ready(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} must be JSON-serialisable: {exc}") from exc


def save_model(
    path: str | Path,
    model: ProgressiveNet,
    training_metadata: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write config, encoder, every column, task specs and training metadata into one file."""
    if not isinstance(model, ProgressiveNet):
        raise CheckpointError(f"save_model expects a ProgressiveNet, got {type(model).__name__}")
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": KIND_MODEL,
        "config": model.config.to_dict(),
        "tasks": [model.specs[name].to_dict() for name in model.task_names],
        "training": _json_ready(dict(training_metadata or {}), "training metadata"),
    }
    standalone = model.standalone_configs()
    if standalone:  # files without standalone members keep the metadata that earlier versions read
        meta["standalone"] = {name: [c.to_dict() for c in configs] for name, configs in standalone.items()}
    if model.whitening:
        meta["whitening"] = model.whitening_shapes()
    tensors = _cpu_tensors("model.", model.state_dict())
    tensors.update(_cpu_tensors("extra.", extra_tensors or {}))
    return atomic_write(path, _serialize(tensors, meta))


def save_began(
    path: str | Path,
    began: BEGAN,
    state: BEGANState,
    training_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Encoder, decoder and generator weights, the config and the equilibrium state k_t."""
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": KIND_BEGAN,
        "config": began.config.to_dict(),
        "tasks": [],
        "began": {"k": state.k, "m_global": _finite_or_none(state.m_global), "step": state.step},
        "training": _json_ready(dict(training_metadata or {}), "training metadata"),
    }
    return atomic_write(path, _serialize(_cpu_tensors("began.", began.state_dict()), meta))


def _finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class CheckpointContents:
    """The validated raw content of a checkpoint file."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> CheckpointContents:
    """Read and validate header, metadata, version and checksum; never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if len(blob) < 8:
        raise CheckpointError(f"{path} is not a safetensors checkpoint (only {len(blob)} bytes)")
    offset = _data_offset(blob)
    if offset - 8 > _MAX_HEADER or offset > len(blob):
        raise CheckpointError(f"{path} is not a safetensors checkpoint, or its header is truncated")
    try:
        header = json.loads(blob[8:offset].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint (unreadable header)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors checkpoint (header is not an object)")
    raw_meta = (header.get("__metadata__") or {}).get(META_KEY)
    if raw_meta is None:
        raise CheckpointError(f"{path} is a safetensors file but not a facial_perception checkpoint")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is corrupt ({exc.msg})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format version {version!r} (this release reads {FORMAT_VERSION})"
        )
    data = memoryview(blob)[offset:]
    expected = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            expected = max(expected, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}") from exc
    if len(data) < expected:
        raise CheckpointError(f"{path} is truncated: {len(data)} of {expected} bytes of tensor data")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: tensor data checksum mismatch")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt tensor data ({str(exc).splitlines()[0]})") from exc
    device = resolve_device(map_location)
    if device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return CheckpointContents(path, meta, tensors)


def _config_and_specs(contents: CheckpointContents) -> tuple[ModelConfig, list[TaskSpec]]:
    try:
        config = ModelConfig.from_dict(contents.meta.get("config"))
        specs = [TaskSpec.from_dict(t) for t in contents.meta.get("tasks", [])]
    except (ConfigError, ModelError, TypeError) as exc:
        raise CheckpointError(f"{contents.path}: invalid config or task list ({exc})") from exc
    return config, specs


def _add_standalone_members(model: ProgressiveNet, contents: CheckpointContents) -> None:
    """Rebuild the standalone members listed in the metadata (random weights; the file's come next)."""
    listed = contents.meta.get("standalone", {})
    if not isinstance(listed, Mapping):
        raise CheckpointError(f"{contents.path}: invalid standalone member list (not an object)")
    for name, configs in listed.items():
        if name not in model.specs or not isinstance(configs, list):
            raise CheckpointError(f"{contents.path}: invalid standalone members for column {name!r}")
        spec = model.specs[name]
        for data in configs:
            try:
                member = ProgressiveNet(
                    ModelConfig.from_dict(data), [TaskSpec(name, spec.labels, kind=spec.kind)]
                )
                model.add_standalone(name, member)
            except (ConfigError, ModelError, TypeError) as exc:
                problem = f"invalid standalone member of {name!r} ({exc})"
                raise CheckpointError(f"{contents.path}: {problem}") from exc


def _add_whitenings(model: ProgressiveNet, contents: CheckpointContents) -> None:
    """Rebuild the embedding whitenings listed in the metadata (zeros; the file's tensors come next)."""
    listed = contents.meta.get("whitening", {})
    if not isinstance(listed, Mapping):
        raise CheckpointError(f"{contents.path}: invalid whitening list (not an object)")
    for name, shape in listed.items():
        dims = shape if isinstance(shape, list) and len(shape) == 2 else []
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise CheckpointError(f"{contents.path}: invalid whitening shape for column {name!r}: {shape!r}")
        try:
            model.set_whitening(name, torch.zeros(shape[0]), torch.zeros(shape[0], shape[1]))
        except ModelError as exc:
            raise CheckpointError(f"{contents.path}: invalid whitening of {name!r} ({exc})") from exc


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict with a one-line explanation of the first mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) e.g. {unexpected[0]}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"shape mismatch for {k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
            )
        raise CheckpointError(f"{path}: weights do not match the stored config: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ProgressiveNet, dict[str, Any]]:
    """Rebuild the :class:`ProgressiveNet` (eval mode) and return it with the metadata.

    Columns are re-added in their stored order, so the encoder and all but the last column are
    frozen exactly as after training.  A BEGAN checkpoint yields a network with its encoder and no
    columns.  Extra tensors saved with the model are returned in ``metadata["extra_tensors"]``.
    """
    device = resolve_device(map_location)
    contents = read_checkpoint(path)
    config, specs = _config_and_specs(contents)
    kind = contents.meta.get("kind")
    if kind == KIND_BEGAN:
        model = ProgressiveNet(config)
        began_state = contents.section("began.")
        _load_strict(
            model.encoder,
            {k[len("encoder.") :]: v for k, v in began_state.items() if k.startswith("encoder.")},
            contents.path,
        )
    elif kind == KIND_MODEL:
        try:
            model = ProgressiveNet(config, specs)
        except ModelError as exc:
            raise CheckpointError(f"{contents.path}: invalid task list ({exc})") from exc
        _add_standalone_members(model, contents)
        _add_whitenings(model, contents)
        _load_strict(model, contents.section("model."), contents.path)
    else:
        raise CheckpointError(f"{contents.path}: unknown checkpoint kind {kind!r}")
    model.to(device).eval()
    meta = dict(contents.meta)
    extra = contents.section("extra.")
    if extra:
        meta["extra_tensors"] = {k: v.to(device) for k, v in extra.items()}
    return model, meta


def load_began(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[BEGAN, BEGANState, dict[str, Any]]:
    """Rebuild a BEGAN (train mode) and its equilibrium state from :func:`save_began`'s file."""
    device = resolve_device(map_location)
    contents = read_checkpoint(path)
    if contents.meta.get("kind") != KIND_BEGAN:
        raise CheckpointError(
            f"{contents.path} is not a BEGAN checkpoint (kind {contents.meta.get('kind')!r})"
        )
    config, _specs = _config_and_specs(contents)
    began = BEGAN(config)
    _load_strict(began, contents.section("began."), contents.path)
    info = contents.meta.get("began") or {}
    m_global = info.get("m_global")
    state = BEGANState(
        k=float(info.get("k", 0.0)),
        m_global=float("nan") if m_global is None else float(m_global),
        step=int(info.get("step", 0)),
    )
    return began.to(device), state, dict(contents.meta)


# ------------------------------------------------------------------------------------ training state
def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch, CUDA, numpy and Python in a ``weights_only``-loadable form."""
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [int(v) for v in random.getstate()[1]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    scheduler: Any | None = None,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
    include_rng: bool = True,
) -> Path:
    """Everything needed to resume training besides the weights (which live in the model file)."""
    payload = {
        "format_version": TRAINING_STATE_VERSION,
        "epoch": int(epoch),
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state() if include_rng else None,
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    try:
        torch.save(payload, buffer)
    except (TypeError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"cannot serialise training state: {exc}") from exc
    return atomic_write(path, buffer.getvalue())


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training-state file with ``weights_only=True`` (no arbitrary code from the file)."""
    device = resolve_device(map_location)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable training-state file ({first[:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != TRAINING_STATE_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise CheckpointError(f"{path}: unsupported training-state version {version!r}")
    return payload
