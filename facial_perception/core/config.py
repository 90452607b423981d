"""Model configurations: frozen dataclasses with a JSON round trip and three named presets.

``paper`` follows the published Tables I-III (128x128 grey input); ``lite`` is a 64x64 design
with more than 10x fewer FLOPs per face so that all four tasks run in real time on a small CPU;
``mid`` is ``lite`` with 1.5x the encoder's channels (about 2.2x its FLOPs), the next step when the
lite encoder caps the later tasks' accuracy.
The reading of the published tables is documented in ``docs/MODELS.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ACTIVATIONS = ("elu", "relu")


class ConfigError(ValueError):
    """An invalid model configuration or an unknown preset/config file (one-line message)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _as_pairs(value: Any, what: str, second: type) -> tuple[tuple[int, Any], ...]:
    """Normalise a JSON list of 2-element lists into a tuple of tuples, validating the types."""
    try:
        pairs = tuple((int(a), second(b)) for a, b in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{what} must be a list of [channels, {second.__name__}] pairs, got {value!r}"
        ) from exc
    return pairs


@dataclass(frozen=True)
class EncoderConfig:
    """BEGAN encoder: stages of 3x3 convs; a strided 3x3 conv halves the size between stages.

    ``stages`` holds ``(channels, number_of_convs)`` per resolution; the final stage's output is the
    feature map shared by all task columns, followed by an FC layer to the latent code.
    """

    input_size: int = 128
    in_channels: int = 1
    stages: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (128, 3), (256, 3))
    latent_dim: int = 128
    activation: str = "elu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", _as_pairs(self.stages, "encoder.stages", int))
        _require(self.in_channels >= 1, f"encoder.in_channels must be >= 1, got {self.in_channels}")
        _require(len(self.stages) >= 1, "encoder.stages must hold at least one (channels, convs) stage")
        for channels, convs in self.stages:
            _require(
                channels >= 1 and convs >= 1,
                f"encoder stage ({channels}, {convs}) needs channels >= 1, convs >= 1",
            )
        factor = 2 ** (len(self.stages) - 1)
        _require(
            self.input_size >= factor and self.input_size % factor == 0,
            f"encoder.input_size {self.input_size} must be a multiple of {factor} (2^(stages-1))",
        )
        _require(self.latent_dim >= 1, f"encoder.latent_dim must be >= 1, got {self.latent_dim}")
        _require(self.activation in ACTIVATIONS, f"encoder.activation must be one of {ACTIVATIONS}")

    @property
    def feature_channels(self) -> int:
        """Channels of the final feature map (the columns' input)."""
        return self.stages[-1][0]

    @property
    def feature_size(self) -> int:
        """Height = width of the final feature map."""
        return self.input_size // 2 ** (len(self.stages) - 1)


@dataclass(frozen=True)
class DecoderConfig:
    """BEGAN decoder / generator: FC to ``channels x base_size^2``, then conv blocks with x2 up-sampling."""

    channels: int = 16
    base_size: int = 8
    convs_per_block: int = 2
    activation: str = "elu"

    def __post_init__(self) -> None:
        _require(self.channels >= 1, f"decoder.channels must be >= 1, got {self.channels}")
        _require(self.base_size >= 1, f"decoder.base_size must be >= 1, got {self.base_size}")
        _require(
            self.convs_per_block >= 1, f"decoder.convs_per_block must be >= 1, got {self.convs_per_block}"
        )
        _require(self.activation in ACTIVATIONS, f"decoder.activation must be one of {ACTIVATIONS}")


@dataclass(frozen=True)
class ColumnConfig:
    """Task column: ``layers`` of ``(channels, max_pool_after)`` 3x3 conv+BN blocks, FC, dropout, FC out."""

    layers: tuple[tuple[int, bool], ...] = ((128, False), (256, False), (256, True), (256, True))
    fc_dim: int = 200
    dropout: float = 0.5
    activation: str = "relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _as_pairs(self.layers, "column.layers", bool))
        _require(len(self.layers) >= 1, "column.layers must hold at least one (channels, pool) layer")
        for channels, _pool in self.layers:
            _require(channels >= 1, f"column layer channels must be >= 1, got {channels}")
        _require(self.fc_dim >= 1, f"column.fc_dim must be >= 1, got {self.fc_dim}")
        _require(0.0 <= self.dropout < 1.0, f"column.dropout must be in [0, 1), got {self.dropout}")
        _require(self.activation in ACTIVATIONS, f"column.activation must be one of {ACTIVATIONS}")

    @property
    def num_pools(self) -> int:
        return sum(1 for _c, pool in self.layers if pool)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the networks; stored inside every checkpoint."""

    name: str = "custom"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    column: ColumnConfig = field(default_factory=ColumnConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name) and isinstance(self.name, str), "config name must be a non-empty string")
        size, base = self.encoder.input_size, self.decoder.base_size
        ratio = size // base
        _require(
            size % base == 0 and ratio >= 1 and ratio & (ratio - 1) == 0,
            f"decoder.base_size {base} must reach input_size {size} by doubling",
        )
        feat = self.encoder.feature_size
        _require(
            feat % (2**self.column.num_pools) == 0,
            f"column has {self.column.num_pools} 2x2 max-pools but the feature map is only {feat}x{feat}",
        )

    @property
    def input_size(self) -> int:
        return self.encoder.input_size

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        parts: dict[str, Any] = {}
        sections = {"encoder": EncoderConfig, "decoder": DecoderConfig, "column": ColumnConfig}
        for key, value in data.items():
            if key == "name":
                parts["name"] = value
            elif key in sections:
                parts[key] = _section(sections[key], key, value)
            else:
                raise ConfigError(
                    f"unknown model config key {key!r} (expected name, encoder, decoder, column)"
                )
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def with_name(self, name: str) -> ModelConfig:
        return replace(self, name=name)


def _section(kind: type, key: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"model config section {key!r} must be a JSON object")
    known = set(kind.__dataclass_fields__)
    unknown = set(value) - known
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in config section {key!r}; known: {sorted(known)}"
        )
    try:
        return kind(**value)
    except TypeError as exc:
        raise ConfigError(f"bad value in config section {key!r}: {exc}") from exc


PAPER = ModelConfig(
    name="paper",
    encoder=EncoderConfig(input_size=128, stages=((64, 2), (128, 2), (128, 3), (256, 3)), latent_dim=128),
    decoder=DecoderConfig(channels=16, base_size=8, convs_per_block=2),
    column=ColumnConfig(
        layers=((128, False), (256, False), (256, True), (256, True)), fc_dim=200, dropout=0.5
    ),
)

LITE = ModelConfig(
    name="lite",
    encoder=EncoderConfig(input_size=64, stages=((16, 1), (32, 1), (64, 2), (128, 2)), latent_dim=64),
    decoder=DecoderConfig(channels=16, base_size=8, convs_per_block=2),
    column=ColumnConfig(layers=((32, False), (64, True), (96, True)), fc_dim=128, dropout=0.3),
)

MID = ModelConfig(
    name="mid",
    encoder=EncoderConfig(input_size=64, stages=((24, 1), (48, 1), (96, 2), (192, 2)), latent_dim=64),
    decoder=DecoderConfig(channels=16, base_size=8, convs_per_block=2),
    column=ColumnConfig(layers=((32, False), (64, True), (96, True)), fc_dim=128, dropout=0.3),
)

PRESETS: dict[str, ModelConfig] = {"paper": PAPER, "lite": LITE, "mid": MID}


def get_config(name_or_path: str | Path | ModelConfig) -> ModelConfig:
    """A preset by name, or a config JSON file (as written by ``ModelConfig.to_json``)."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read model config {path}: {exc}") from exc
        return ModelConfig.from_json(text)
    raise ConfigError(f"unknown model config {key!r}: use one of {sorted(PRESETS)} or a path to a JSON file")
