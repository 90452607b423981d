"""Progressive network (Rusu et al. 2016) on top of the shared BEGAN encoder.

Each task gets a column of 3x3 conv + BatchNorm layers, an FC layer (the embedding) and an FC
output.  A later column receives lateral connections from chosen earlier columns: for every layer
``i >= 2`` the source column's activation ``h_{i-1}`` is scaled by a learned scalar, projected
to the target width by a 1x1 conv (or a linear map for FC layers) and added to the target layer's
pre-activation before its BatchNorm / non-linearity::

    h_i^(k) = f( BN( W_i h_{i-1}^(k) + sum_j U_i^(k:j)(alpha_i^(k:j) * h_{i-1}^(j)) ) )

Existing columns (and the encoder, unless re-training is asked for) are frozen: no gradient and
BatchNorm statistics never updated, even after ``model.train()``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from facial_perception.core.began import BEGAN, Encoder, make_activation
from facial_perception.core.config import ColumnConfig, ModelConfig

TASK_KINDS = ("classification", "identity")
ENCODER = "encoder"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ModelError(ValueError):
    """A user mistake when composing a progressive network (one-line message)."""


@dataclass
class TaskSpec:
    """What a column predicts: its name, ordered label names, lateral sources and kind.

    ``mirror_average``: at inference, average the class probabilities of the face and of its
    mirror image (test-time augmentation: one more encoder pass per face, a fraction of a point
    of accuracy for emotion and gender on our validation splits; off for identity, where the
    mirror image hurt). Training ignores it.

    ``members``: the column is an ensemble of this many columns of the same task, trained apart
    (other seeds) and joined afterwards (:meth:`ProgressiveNet.join_members`); their class
    probabilities are averaged. Why: the columns are cheap next to the shared encoder, and columns
    of different seeds err on different faces (three identity columns: +2 points on validation).
    """

    name: str
    labels: list[str]
    laterals: list[str] = field(default_factory=list)
    kind: str = "classification"
    mirror_average: bool = False
    members: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name) or self.name == ENCODER:
            raise ModelError(
                f"task name {self.name!r} must start with a letter and use only letters, digits, '_' or '-'"
                f" (and not be {ENCODER!r})"
            )
        if hasattr(nn.ModuleDict, self.name):
            raise ModelError(
                f"task name {self.name!r} is reserved (a torch ModuleDict attribute); choose another"
            )
        if isinstance(self.labels, str) or not isinstance(self.labels, Iterable):
            raise ModelError(f"task {self.name!r}: labels must be a list of strings")
        self.labels = [str(label) for label in self.labels]
        if len(self.labels) < 2:
            raise ModelError(f"task {self.name!r} needs at least 2 labels, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ModelError(f"task {self.name!r} has duplicate labels")
        if isinstance(self.laterals, str):
            raise ModelError(f"task {self.name!r}: laterals must be a list of column names")
        self.laterals = [str(source) for source in self.laterals]
        if len(set(self.laterals)) != len(self.laterals):
            raise ModelError(f"task {self.name!r} lists a lateral source twice")
        if self.name in self.laterals:
            raise ModelError(f"task {self.name!r} cannot be its own lateral source")
        if self.kind not in TASK_KINDS:
            raise ModelError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if not isinstance(self.mirror_average, bool):
            raise ModelError(f"task {self.name!r}: mirror_average must be true or false")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ModelError(f"task {self.name!r}: members must be a whole number >= 1, got {self.members!r}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "labels": list(self.labels),
            "laterals": list(self.laterals),
            "kind": self.kind,
            "mirror_average": self.mirror_average,
        }
        if self.members != 1:  # single columns keep the metadata that earlier versions read
            data["members"] = self.members
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        if not isinstance(data, Mapping):
            raise ModelError(f"task spec must be an object, got {type(data).__name__}")
        unknown = set(data) - {"name", "labels", "laterals", "kind", "mirror_average", "members"}
        if unknown or "name" not in data or "labels" not in data:
            raise ModelError(
                "task spec needs name and labels (optional laterals, kind, mirror_average, members);"
                f" got keys {sorted(data)}"
            )
        return cls(
            name=data["name"],
            labels=list(data["labels"]),
            laterals=list(data.get("laterals", [])),
            kind=data.get("kind", "classification"),
            mirror_average=data.get("mirror_average", False),
            members=data.get("members", 1),
        )


# Label sets of the four tasks of the paper (identity uses the 62 people of the LFW subset by default).
AGE_GROUPS = ["0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+"]
GENDERS = ["male", "female"]
EMOTIONS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]


def default_task_specs(num_identities: int = 62) -> list[TaskSpec]:
    """The four tasks as a progressive chain: each column has laterals from every earlier one."""
    identities = [f"person_{i:03d}" for i in range(num_identities)]
    return [
        TaskSpec("gender", GENDERS),
        TaskSpec("age", AGE_GROUPS, ["gender"]),
        TaskSpec("emotion", EMOTIONS, ["gender", "age"]),
        TaskSpec("identity", identities, ["gender", "age", "emotion"], kind="identity"),
    ]


class ColumnOutput(NamedTuple):
    """Per-task result of :meth:`ProgressiveNet.forward`."""

    logits: torch.Tensor
    embedding: torch.Tensor


class TaskProbabilities(NamedTuple):
    """Per-task result of :meth:`ProgressiveNet.predict`."""

    probabilities: torch.Tensor
    embedding: torch.Tensor
    # (N, C): the mean of the column's standalone members' probabilities per face, fresh or as held
    # (:meth:`ProgressiveNet.predict_encoded`); None: no members answered
    members: torch.Tensor | None = None
    # (N, C): the column's own probabilities when members were mixed in (else None)
    column: torch.Tensor | None = None


class EncodedFaces(NamedTuple):
    """Encoder output of :meth:`ProgressiveNet.encode`, the input of :meth:`ProgressiveNet.predict_encoded`.

    ``features`` holds ``count`` faces, followed by their mirror images when ``mirrored`` (the
    encoder's map; ``FacePredictor`` also runs its fused columns' first layer on it:
    ``FusedColumns.stem``);
    ``tasks`` are the columns to report; ``standalone`` holds, per reported task with standalone
    members (:meth:`ProgressiveNet.add_standalone`), each member's own encoder map of the same batch
    (None: encoded without them, the columns alone answer), of the faces ``standalone_rows`` only
    when given (and their mirror images, in that order).
    """

    features: torch.Tensor
    count: int
    mirrored: bool
    tasks: tuple[str, ...]
    standalone: Mapping[str, tuple[torch.Tensor, ...]] | None = None
    standalone_rows: tuple[int, ...] | None = None


class LateralAdapter(nn.Module):
    """Lateral input of one target layer from all its source columns.

    Each source activation gets its own learned scalar scale (Rusu et al.); the scaled activations
    are concatenated and reduced to the target width by one 1x1 conv (conv targets) or one linear
    map (FC targets).  This equals the sum of one projection per source, but runs as a single op.
    """

    def __init__(
        self, source_features: Sequence[int], out_features: int, conv: bool, init_scale: float = 1.0
    ) -> None:
        super().__init__()
        if not source_features:
            raise ModelError("a lateral adapter needs at least one source")
        self.conv = conv
        self.source_features = [int(n) for n in source_features]
        self.in_features = sum(self.source_features)
        self.out_features = out_features
        self.scales = nn.Parameter(torch.full((len(self.source_features),), float(init_scale)))
        self.proj: nn.Module
        if conv:
            self.proj = nn.Conv2d(self.in_features, out_features, kernel_size=1, bias=False)
        else:
            self.proj = nn.Linear(self.in_features, out_features, bias=False)
        self.register_buffer(
            "_repeats", torch.tensor(self.source_features, dtype=torch.long), persistent=False
        )

    def forward(self, activations: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(activations) != len(self.source_features):
            raise ModelError(
                f"lateral adapter expects {len(self.source_features)} sources, got {len(activations)}"
            )
        if not self.conv:
            activations = [a.flatten(1) for a in activations]
        x = activations[0] if len(activations) == 1 else torch.cat(list(activations), dim=1)
        # Scaling the input channels of the (small) weight equals scaling each source activation.
        per_channel = torch.repeat_interleave(self.scales, self._repeats, output_size=self.in_features)
        if self.conv:
            return F.conv2d(x, self.proj.weight * per_channel.view(1, -1, 1, 1))
        return F.linear(x, self.proj.weight * per_channel.view(1, -1))


class TaskColumn(nn.Module):
    """One task column; ``forward`` returns ``(logits, embedding, activations)``.

    ``activations[i]`` is the output ``h_i`` of layer ``i`` (conv layers after pooling, then the FC
    embedding); a later column feeds ``activations[i - 1]`` of its sources into its layer ``i``.
    """

    def __init__(
        self,
        spec: TaskSpec,
        config: ColumnConfig,
        feature_shape: tuple[int, int, int],
        sources: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.sources = list(sources)
        channels, height, width = feature_shape
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.pools: list[bool] = []
        act_shapes: list[tuple[int, ...]] = []
        for out_channels, pool in config.layers:
            self.convs.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=False))
            self.norms.append(nn.BatchNorm2d(out_channels))
            self.pools.append(bool(pool))
            channels = out_channels
            if pool:
                height, width = height // 2, width // 2
            act_shapes.append((channels, height, width))
        flat = channels * height * width
        self.fc = nn.Linear(flat, config.fc_dim)
        act_shapes.append((config.fc_dim,))
        self.act = make_activation(config.activation)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.fc_dim, spec.num_classes)
        self.activation_shapes = act_shapes

        # laterals[str(i)] feeds layer i; layer 0 (first conv) sees only the shared encoder map.
        targets = [c for c, _p in config.layers] + [config.fc_dim, spec.num_classes]
        n_conv = len(config.layers)
        self.laterals = nn.ModuleDict()
        if self.sources:
            for layer in range(1, len(targets)):
                source_shape = act_shapes[layer - 1]
                conv = layer < n_conv
                per_source = source_shape[0] if conv else _prod(source_shape)
                self.laterals[str(layer)] = LateralAdapter(
                    [per_source] * len(self.sources), targets[layer], conv
                )

    @property
    def num_classes(self) -> int:
        return self.out.out_features

    @property
    def embedding_dim(self) -> int:
        return self.fc.out_features

    def _with_laterals(self, layer: int, pre: torch.Tensor, sources: Mapping[str, list[torch.Tensor]]):
        if not self.sources:
            return pre
        adapter = self.laterals[str(layer)]
        return pre + adapter([sources[name][layer - 1] for name in self.sources])

    def forward(
        self, features: torch.Tensor, sources: Mapping[str, list[torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        sources = sources or {}
        missing = [s for s in self.sources if s not in sources]
        if missing:
            raise ModelError(f"column {self.name!r} needs the activations of {missing}")
        h = features
        activations: list[torch.Tensor] = []
        for layer, (conv, norm, pool) in enumerate(zip(self.convs, self.norms, self.pools, strict=True)):
            pre = self._with_laterals(layer, conv(h), sources) if layer else conv(h)
            h = self.act(norm(pre))
            if pool:
                h = self.pool(h)
            activations.append(h)
        fc_layer = len(self.convs)
        embedding = self.act(self._with_laterals(fc_layer, self.fc(h.flatten(1)), sources))
        activations.append(embedding)
        logits = self._with_laterals(fc_layer + 1, self.out(self.dropout(embedding)), sources)
        return logits, embedding, activations


class ColumnEnsemble(nn.Module):
    """Columns of one task trained apart, run side by side; ``forward`` has :class:`TaskColumn`'s shape.

    - logits: the log of the members' mean class probabilities (so a softmax gives that mean and a
      cross-entropy scores the ensemble);
    - embedding: the members' unit-norm embeddings concatenated and scaled by ``1/sqrt(members)``,
      a unit vector whose cosine similarity to another is the mean of the members' similarities;
    - activations: the first member's. A column joined into an ensemble stays its first member, so a
      later column keeps getting the lateral inputs it was trained with.
    """

    def __init__(self, name: str, members: Sequence[TaskColumn]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ModelError(f"an ensemble of column {name!r} needs at least 2 members, got {len(members)}")
        self.name = name
        self.members = nn.ModuleList(members)

    @property
    def sources(self) -> list[str]:
        return list(self.members[0].sources)

    @sources.setter
    def sources(self, names: Sequence[str]) -> None:
        for member in self.members:
            member.sources = list(names)

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def embedding_dim(self) -> int:
        return sum(member.embedding_dim for member in self.members)

    def forward(
        self, features: torch.Tensor, sources: Mapping[str, list[torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        outputs = [member(features, sources) for member in self.members]
        logits, embeddings = [out[0] for out in outputs], [out[1] for out in outputs]
        return (*average_member_outputs(logits, embeddings), outputs[0][2])


def average_member_outputs(
    logits: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log mean softmax, scaled concatenation of unit embeddings) of an ensemble's members."""
    return average_stacked_members(torch.stack(list(logits), dim=1), torch.stack(list(embeddings), dim=1))


def average_stacked_members(
    logits: torch.Tensor, embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`average_member_outputs` of members stacked on dim 1: logits (N, K, C), embeddings (N, K, D)."""
    count = logits.shape[1]
    mean_log_probs = torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(count)
    units = F.normalize(embeddings, dim=2).flatten(1) / math.sqrt(count)
    return mean_log_probs, units


def column_members(column: nn.Module) -> list[TaskColumn]:
    """The single columns a column is made of: itself, or an ensemble's members."""
    return list(column.members) if isinstance(column, ColumnEnsemble) else [column]


def _prod(shape: Iterable[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


class EmbeddingWhitening(nn.Module):
    """``(embedding - mean) @ projection``: an identity column's embedding made fit for open-set matching.

    The column's embeddings (ReLU features) all point one way: on people the shipped model never saw,
    any two faces scored a cosine similarity near 0.6 and a gallery let every stranger through at the
    old threshold of 0.5. Centring and whitening them with statistics of the column's own training
    faces (``fit_embedding_whitening``) spreads them out, so a threshold can keep strangers out while
    it still names enrolled people (docs/MODEL_CARD.md, "Strangers"). Fixed buffers, never trained.
    """

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor) -> None:
        super().__init__()
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0]:
            raise ModelError(
                f"an embedding whitening needs a mean (D,) and a projection (D, K), got"
                f" {tuple(mean.shape)} and {tuple(projection.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(projection).all()):
            raise ModelError("an embedding whitening must be finite")
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("projection", projection.detach().float().clone())

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[1])

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return (embedding.float() - self.mean) @ self.projection


class ProgressiveNet(nn.Module):
    """Shared encoder + ordered task columns (``columns``: insertion order = column order).

    ``standalone[task]``: optional small networks with their own encoder, trained end to end on that
    task alone, whose probabilities :meth:`predict` averages with the column's (see
    :meth:`add_standalone`); training and :meth:`forward` never use them. ``whitening[task]``: an
    optional :class:`EmbeddingWhitening` that :meth:`predict` applies to the column's embedding (see
    :meth:`set_whitening`); dropped whenever the column's weights change.
    """

    def __init__(self, config: ModelConfig, specs: Iterable[TaskSpec] = ()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder)
        self.columns = nn.ModuleDict()
        self.standalone = nn.ModuleDict()  # task -> ModuleList of one-column ProgressiveNets
        self.whitening = nn.ModuleDict()  # task -> EmbeddingWhitening of its embedding (set_whitening)
        self.specs: dict[str, TaskSpec] = {}
        self._frozen: set[str] = set()
        for spec in specs:
            self.add_column(spec)

    # ------------------------------------------------------------------ composition
    @property
    def task_names(self) -> list[str]:
        return list(self.columns.keys())

    def add_column(self, spec: TaskSpec, train_encoder: bool = False) -> TaskColumn:
        """Append a column; freeze the encoder (unless ``train_encoder``) and every earlier column."""
        if not isinstance(spec, TaskSpec):
            raise ModelError(f"add_column expects a TaskSpec, got {type(spec).__name__}")
        spec = dataclasses.replace(spec)  # the network's own copy: editing it never changes the caller's
        if spec.name in self.columns:
            raise ModelError(f"a column named {spec.name!r} already exists (columns: {self.task_names})")
        unknown = [s for s in spec.laterals if s not in self.columns]
        if unknown:
            raise ModelError(
                f"task {spec.name!r}: unknown lateral source(s) {unknown}; columns: {self.task_names}"
            )
        if spec.num_classes < 2:
            raise ModelError(f"task {spec.name!r} needs at least 2 labels")
        members = [
            TaskColumn(spec, self.config.column, self.encoder.feature_shape, spec.laterals)
            for _ in range(spec.members)
        ]
        column = members[0] if len(members) == 1 else ColumnEnsemble(spec.name, members)
        reference = next(self.encoder.parameters())
        column.to(device=reference.device, dtype=reference.dtype)
        column.train(self.training)
        for name in self.task_names:
            self.freeze(name)
        if train_encoder:
            self.unfreeze(ENCODER)
        else:
            self.freeze(ENCODER)
        self.columns[spec.name] = column
        self.specs[spec.name] = spec
        return column

    def remove_column(self, name: str) -> None:
        """Drop a column that no other column uses as a lateral source."""
        if name not in self.columns:
            raise ModelError(f"no column named {name!r} (columns: {self.task_names})")
        users = [other for other, spec in self.specs.items() if name in spec.laterals]
        if users:
            raise ModelError(f"cannot remove column {name!r}: it is a lateral source of {users}")
        del self.columns[name]
        del self.specs[name]
        self._frozen.discard(name)
        if name in self.standalone:
            del self.standalone[name]
        self._forget_whitening(name)

    def add_standalone(self, name: str, net: ProgressiveNet) -> None:
        """Average column ``name``'s probabilities at inference with those of ``net``'s column ``name``.

        ``net`` is a network with an encoder of its own, trained end to end on the task alone (e.g.
        ``train-task --config lite --train-encoder``): it errs on partly other faces than columns on
        the shared frozen encoder, which all err together. Why weigh each such member as much as the
        whole column (ensemble): on our gender validation split, one end-to-end network averaged 50/50
        with the four-member gender column scored 92.5 % (another seed: 92.4 %), against 91.7 and 91.3 %
        alone, and 92.1-92.2 % when it counted as a fifth member (docs/MODEL_CARD.md). Its encoder and
        that column (which must have no laterals) are copied in and frozen; they cost one more encoder
        pass per face for this task.
        """
        if name not in self.columns:
            raise ModelError(f"no column named {name!r} (columns: {self.task_names})")
        if not isinstance(net, ProgressiveNet):
            raise ModelError(f"a standalone member must be a ProgressiveNet, got {type(net).__name__}")
        if name not in net.specs:
            raise ModelError(f"the standalone member has no column {name!r} (columns: {net.task_names})")
        mine, theirs = self.specs[name], net.specs[name]
        if (theirs.labels, theirs.kind) != (mine.labels, mine.kind):
            raise ModelError(f"the standalone member's {name!r} column has other labels or another kind")
        if theirs.members != 1:
            raise ModelError(
                f"the standalone member's {name!r} column is an ensemble: add its networks one by one instead"
            )
        if theirs.laterals:
            raise ModelError(
                f"a standalone member's {name!r} column must stand alone,"
                f" not take laterals from {theirs.laterals}"
            )
        ours = (self.config.input_size, self.config.in_channels)
        if (net.config.input_size, net.config.in_channels) != ours:
            raise ModelError(
                f"the standalone member reads {net.config.in_channels}x{net.config.input_size}px faces,"
                f" this network {ours[1]}x{ours[0]}px"
            )
        member = ProgressiveNet(net.config)
        member.encoder.load_state_dict(net.encoder.state_dict())
        member.add_column(dataclasses.replace(theirs, mirror_average=False))
        member.columns[name].load_state_dict(net.columns[name].state_dict())
        reference = next(self.encoder.parameters())
        member.to(device=reference.device, dtype=reference.dtype)
        member.freeze(ENCODER)
        member.freeze(name)
        if name not in self.standalone:
            self.standalone[name] = nn.ModuleList()
        self.standalone[name].append(member)

    def drop_standalone(self, name: str) -> None:
        """Forget column ``name``'s standalone members (its probabilities are the column's again)."""
        if name not in self.columns:
            raise ModelError(f"no column named {name!r} (columns: {self.task_names})")
        if name not in self.standalone:
            raise ModelError(f"column {name!r} has no standalone members")
        del self.standalone[name]

    def standalone_configs(self) -> dict[str, list[ModelConfig]]:
        """Per task, the configs of its standalone members (what a checkpoint needs to rebuild them)."""
        return {name: [member.config for member in members] for name, members in self.standalone.items()}

    def set_whitening(self, name: str, mean: torch.Tensor, projection: torch.Tensor) -> None:
        """Whiten column ``name``'s embedding at inference (:class:`EmbeddingWhitening`; replaces any)."""
        if name not in self.columns:
            raise ModelError(f"no column named {name!r} (columns: {self.task_names})")
        whitening = EmbeddingWhitening(mean, projection)
        expected = self.columns[name].embedding_dim
        if whitening.in_dim != expected:
            raise ModelError(
                f"column {name!r} gives {expected}-d embeddings, the whitening expects {whitening.in_dim}-d"
            )
        self.whitening[name] = whitening.to(next(self.encoder.parameters()).device)

    def drop_whitening(self, name: str) -> None:
        """Give column ``name``'s raw embedding again."""
        if name not in self.whitening:
            raise ModelError(f"column {name!r} has no embedding whitening")
        del self.whitening[name]

    def _forget_whitening(self, name: str) -> None:
        """The column's weights changed: its whitening no longer fits."""
        if name in self.whitening:
            del self.whitening[name]

    def whitening_shapes(self) -> dict[str, list[int]]:
        """Per task, ``[in_dim, out_dim]`` of its whitening (what a checkpoint needs to rebuild it)."""
        return {name: [w.in_dim, w.out_dim] for name, w in self.whitening.items()}

    def embedding_dim(self, name: str) -> int:
        """Length of the embeddings :meth:`predict` gives for column ``name`` (after any whitening)."""
        if name in self.whitening:
            return self.whitening[name].out_dim
        return self._module(name).embedding_dim

    def embedding_fingerprint(self, name: str) -> str:
        """A short hash of every weight and buffer that shapes column ``name``'s embedding: the encoder,
        the column (all its members), the columns that reach it through laterals, and its whitening.

        Why: two models can give embeddings of the same length that mean different things (another
        training run, another whitening); an identity gallery stores this hash with its first enrolment
        so that a model it does not fit is refused instead of naming people at random. Columns added
        later, or changes to other columns, leave it unchanged. Values are hashed as float32 on the CPU, so
        the same weights hash the same on any device (``FacePredictor`` hashes before any half cast).
        """
        import hashlib

        if name not in self.columns:
            raise ModelError(f"no column named {name!r} (columns: {self.task_names})")
        prefixes = (
            f"{ENCODER}.",
            *(f"columns.{source}." for source in [*self.lateral_sources(name), name]),
            f"whitening.{name}.",
        )
        digest = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            if not key.startswith(prefixes):
                continue
            values = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{key}:{tuple(values.shape)};".encode())
            digest.update(values.numpy().tobytes())
        return digest.hexdigest()[:16]

    def join_members(self, name: str, others: Iterable[nn.Module]) -> None:
        """Make column ``name`` an ensemble of itself and ``others``: columns (or ensembles) of the same
        task, labels and laterals trained apart on this very encoder (the caller checks the encoder).

        The members are copied in; the column keeps its place, spec (``members`` updated) and freezing,
        and stays the first member: the one that feeds the laterals of later columns.
        """
        if name not in self.columns:
            raise ModelError(f"no column named {name!r} (columns: {self.task_names})")
        reference = column_members(self.columns[name])[0]
        expected = {k: v.shape for k, v in reference.state_dict().items()}
        members = column_members(self.columns[name])
        for other in others:
            for member in column_members(other):
                if not isinstance(member, TaskColumn):
                    kind = type(member).__name__
                    raise ModelError(f"a member of {name!r} must be a task column, got {kind}")
                shapes = {k: v.shape for k, v in member.state_dict().items()}
                if shapes != expected or member.sources != reference.sources:
                    raise ModelError(
                        f"a member for {name!r} has another shape or other laterals ({member.sources}) than "
                        f"the column it joins ({reference.sources}): same config, labels and laterals needed"
                    )
                weight = reference.fc.weight
                members.append(copy.deepcopy(member).to(device=weight.device, dtype=weight.dtype))
        for member in members:
            member.name = name
        ensemble = ColumnEnsemble(name, members)
        ensemble.train(self.training)
        self.columns[name] = ensemble  # an existing key keeps its place in the order
        self.specs[name].members = len(members)
        self._forget_whitening(name)
        if name in self._frozen:
            self.freeze(name)
        else:
            self.unfreeze(name)

    def keep_members(self, name: str, count: int) -> None:
        """Keep the first ``count`` members of column ``name`` (1: a single column again), e.g. for speed."""
        if name not in self.columns:
            raise ModelError(f"no column named {name!r} (columns: {self.task_names})")
        members = column_members(self.columns[name])
        if not 1 <= count <= len(members):
            total = len(members)
            raise ModelError(f"column {name!r} has {total} member(s): keep 1 to {total}, not {count}")
        self.columns[name] = members[0] if count == 1 else ColumnEnsemble(name, members[:count])
        self.specs[name].members = count
        self._forget_whitening(name)
        if name in self._frozen:
            self.freeze(name)
        else:
            self.unfreeze(name)

    def rename_column(self, old: str, new: str) -> None:
        """Give column ``old`` the name ``new``, keeping its place, weights, freezing and lateral users.

        Laterals are keyed by layer and source order, not by name, so only the specs change.
        """
        if old not in self.columns:
            raise ModelError(f"no column named {old!r} (columns: {self.task_names})")
        if new in self.columns:
            raise ModelError(f"a column named {new!r} already exists (columns: {self.task_names})")
        spec = self.specs[old]
        renamed = dataclasses.replace(spec, name=new)  # validates the new name
        columns = [(new if name == old else name, module) for name, module in self.columns.items()]
        self.columns = nn.ModuleDict(columns)
        self.columns[new].name = new
        for member in column_members(self.columns[new]):
            member.name = new
        self.specs = {(new if name == old else name): s for name, s in self.specs.items()}
        self.specs[new] = renamed
        for name, other in self.specs.items():
            other.laterals = [new if source == old else source for source in other.laterals]
            self.columns[name].sources = list(other.laterals)
        if old in self._frozen:
            self._frozen.discard(old)
            self._frozen.add(new)
        if old in self.standalone:
            for member in self.standalone[old]:
                member.rename_column(old, new)
            self.standalone = nn.ModuleDict(
                [(new if name == old else name, members) for name, members in self.standalone.items()]
            )
        if old in self.whitening:
            self.whitening = nn.ModuleDict(
                [(new if name == old else name, w) for name, w in self.whitening.items()]
            )

    def _module(self, name: str) -> nn.Module:
        if name == ENCODER:
            return self.encoder
        if name in self.columns:
            return self.columns[name]
        raise ModelError(f"no column named {name!r} (columns: {self.task_names})")

    def freeze(self, name: str) -> None:
        """No gradient and BatchNorm/dropout in eval mode for ``encoder`` or a column, even after train()."""
        module = self._module(name)
        module.requires_grad_(False)
        module.eval()
        self._frozen.add(name)

    def unfreeze(self, name: str) -> None:
        module = self._module(name)
        module.requires_grad_(True)
        module.train(self.training)
        self._frozen.discard(name)

    def is_frozen(self, name: str) -> bool:
        self._module(name)
        return name in self._frozen

    def train(self, mode: bool = True) -> ProgressiveNet:
        super().train(mode)
        for name in self._frozen:
            self._module(name).eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Only the parameters that receive gradients (the newest column, plus the encoder if re-trained)."""
        return (p for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ encoder transfer
    def init_encoder_from(self, source: Encoder | BEGAN | Mapping[str, torch.Tensor]) -> None:
        """Copy encoder weights from a BEGAN, an Encoder or an encoder state dict (shapes must match)."""
        if isinstance(source, BEGAN):
            source = source.encoder
        state = source.state_dict() if isinstance(source, nn.Module) else source
        try:
            self.encoder.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ModelError(
                f"encoder weights do not match this config: {' '.join(first[:2])[:300]}"
            ) from exc

    @classmethod
    def from_began(cls, path: str | Path, specs: Iterable[TaskSpec] = ()) -> ProgressiveNet:
        """A network whose encoder is the encoder of a BEGAN checkpoint (see ``checkpoint.save_began``)."""
        from facial_perception.core.checkpoint import load_began

        began, _state, _meta = load_began(path)
        net = cls(began.config)
        net.init_encoder_from(began)
        for spec in specs:
            net.add_column(spec)
        return net

    def lateral_sources(self, name: str) -> list[str]:
        """Every column whose activations reach column ``name`` through laterals (directly or not), in
        column order; not ``name`` itself."""
        seen: set[str] = set()
        stack = list(self.specs[name].laterals)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.specs[current].laterals)
        return [n for n in self.task_names if n in seen]

    # ------------------------------------------------------------------ forward
    def _resolve(self, tasks: Iterable[str] | None) -> tuple[list[str], list[str]]:
        """(columns to run in order, columns to return): requested tasks plus their lateral ancestors."""
        if tasks is None:
            return self.task_names, self.task_names
        wanted = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [t for t in wanted if t not in self.columns]
        if unknown:
            raise ModelError(f"unknown task(s) {unknown}; columns: {self.task_names}")
        needed: set[str] = set()
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name not in needed:
                needed.add(name)
                stack.extend(self.specs[name].laterals)
        return [n for n in self.task_names if n in needed], [n for n in self.task_names if n in wanted]

    def forward_features(
        self, features: torch.Tensor, tasks: Iterable[str] | None = None
    ) -> dict[str, ColumnOutput]:
        """Run the columns on (possibly cached) encoder feature maps."""
        run, keep = self._resolve(tasks)
        activations: dict[str, list[torch.Tensor]] = {}
        outputs: dict[str, ColumnOutput] = {}
        for name in run:
            spec = self.specs[name]
            logits, embedding, acts = self.columns[name](features, {s: activations[s] for s in spec.laterals})
            activations[name] = acts
            if name in keep:
                outputs[name] = ColumnOutput(logits, embedding)
        return outputs

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, ColumnOutput]:
        """Encoder once, then the columns in order (laterals come from the same input)."""
        return self.forward_features(self.encoder.forward_features(x), tasks)

    def encode(
        self,
        x: torch.Tensor,
        tasks: Iterable[str] | None = None,
        mirror: bool = True,
        standalone: bool = True,
        standalone_rows: Sequence[int] | None = None,
    ) -> EncodedFaces:
        """Inference, first half: the encoder's feature maps of a batch ``x`` (and of its mirror images
        when a requested column averages over them; see :meth:`predict`), and those of the requested
        columns' standalone members unless ``standalone`` is False (faster: the columns alone answer).
        ``standalone_rows``: the members run on these faces only (default all); the others need their
        members' earlier probabilities in :meth:`predict_encoded` (a tracked face, whose members need
        not look again on every frame).

        Split from :meth:`predict_encoded` so that a pipeline can run the encoder of one batch in
        one thread while the columns of the previous batch run in another.
        """
        _, keep = self._resolve(tasks)
        count = x.shape[0]
        rows = None
        if standalone_rows is not None:
            rows = tuple(sorted({int(row) for row in standalone_rows}))
            if rows and (rows[0] < 0 or rows[-1] >= count):
                raise ModelError(f"standalone_rows must be within 0..{count - 1}, got {list(rows)}")
        mirrored = mirror and any(self.specs[name].mirror_average for name in keep)
        if mirrored:
            both = torch.cat([x, x.flip(-1)])
            if x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4:
                both = both.contiguous(memory_format=torch.channels_last)
            x = both
        maps = None
        if standalone:
            members_x = x
            if rows is not None and len(rows) < count:
                index = list(rows) + ([row + count for row in rows] if mirrored else [])
                members_x = x[index]
                if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
                    members_x = members_x.contiguous(memory_format=torch.channels_last)  # the CPU layout
            maps = {
                name: tuple(member.encoder.forward_features(members_x) for member in self.standalone[name])
                for name in keep
                if name in self.standalone
            }
        if rows is not None and len(rows) == count:
            rows = None  # every face
        return EncodedFaces(
            self.encoder.forward_features(x), count, mirrored, tuple(keep), maps, rows if maps else None
        )

    def predict_encoded(
        self,
        encoded: EncodedFaces,
        columns: Callable[[torch.Tensor], Mapping[str, ColumnOutput]] | None = None,
        held_members: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, TaskProbabilities]:
        """Inference, second half: the columns on :meth:`encode`'s features -> probabilities, embeddings.

        ``columns``: what runs the columns on the features, returning exactly ``encoded.tasks``
        (e.g. a ``FusedColumns`` of this network); default :meth:`forward_features`.
        ``held_members``: per column with standalone members, (N, C) members' mean probabilities
        (:attr:`TaskProbabilities.members` of an earlier call) for the faces ``encoded`` did not run
        them on (``standalone_rows``); the other rows are not read.
        """
        n, mirrored = encoded.count, encoded.mirrored
        result: dict[str, TaskProbabilities] = {}
        if columns is None:
            outputs = self.forward_features(encoded.features, encoded.tasks)
        else:
            outputs = columns(encoded.features)
            if tuple(outputs) != tuple(encoded.tasks):
                raise ModelError(
                    f"the columns returned {list(outputs)}, the encoded batch asks for {list(encoded.tasks)}"
                )
        for name, out in outputs.items():
            probs = torch.softmax(out.logits.float(), dim=1)
            averaged = mirrored and self.specs[name].mirror_average
            if mirrored:
                probs = (probs[:n] + probs[n:]) / 2 if averaged else probs[:n]
            members = column = None
            if name in self.standalone and encoded.standalone is not None:
                held = held_members.get(name) if held_members is not None else None
                members = self._standalone_probabilities(name, encoded, averaged, held)
                # the mean of the column's and each member's probabilities (equal weights); mirror
                # averaging first or last gives the same, it is linear
                k = len(self.standalone[name])
                column, probs = probs, (probs + k * members) / (k + 1)
            embedding = out.embedding[:n]
            if name in self.whitening:
                embedding = self.whitening[name](embedding)
            result[name] = TaskProbabilities(probs, embedding, members, column)
        return result

    def _standalone_probabilities(
        self, name: str, encoded: EncodedFaces, averaged: bool, held: torch.Tensor | None
    ) -> torch.Tensor:
        """(N, C) the mean of column ``name``'s standalone members' probabilities (mirror-averaged when
        ``averaged``): run on ``encoded.standalone_rows``, taken from ``held`` for the other faces."""
        members = self.standalone[name]
        maps = encoded.standalone.get(name) if encoded.standalone is not None else None
        if maps is None or len(maps) != len(members):
            raise ModelError(
                f"the encoded batch lacks the encoder maps of {name!r}'s standalone members:"
                " encode it with this very network"
            )
        parts = []
        for member, features in zip(members, maps, strict=True):
            logits = member.forward_features(features, [name])[name].logits
            parts.append(torch.softmax(logits.float(), dim=1))
        fresh = torch.stack(parts).mean(dim=0)
        n, rows = encoded.count, encoded.standalone_rows
        m = n if rows is None else len(rows)
        if encoded.mirrored:
            fresh = (fresh[:m] + fresh[m:]) / 2 if averaged else fresh[:m]
        if rows is None:
            return fresh
        if held is None or tuple(held.shape) != (n, fresh.shape[1]):
            got = "none" if held is None else f"shape {tuple(held.shape)}"
            raise ModelError(
                f"column {name!r}: its standalone members ran on {m} of {n} faces; the others need"
                f" held_members[{name!r}] of shape ({n}, {fresh.shape[1]}), got {got}"
            )
        members = held.to(device=fresh.device, dtype=fresh.dtype).clone()
        members[list(rows)] = fresh
        return members

    def predict(
        self,
        x: torch.Tensor,
        tasks: Iterable[str] | None = None,
        mirror: bool = True,
        standalone: bool = True,
    ) -> dict[str, TaskProbabilities]:
        """Inference: class probabilities (float32) and embeddings of ``tasks`` for a batch ``x``.

        Columns whose spec asks for ``mirror_average`` get the mean of the probabilities of the
        faces and of their mirror images (one forward pass over both) unless ``mirror`` is False
        (faster: faces only); embeddings always come from the faces as given (whitened where the column
        has a whitening, :meth:`set_whitening`). Columns with standalone
        members average theirs in too unless ``standalone`` is False. Call under
        ``torch.inference_mode()`` in eval mode.
        """
        return self.predict_encoded(self.encode(x, tasks, mirror, standalone))
