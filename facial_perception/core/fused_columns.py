"""All task columns of a frozen :class:`ProgressiveNet` run as one stack of wide layers, for inference.

A progressive network runs its columns one after the other, each layer a handful of small tensor
ops: with four columns on a few faces per frame the time goes more into Python dispatch (and the
GIL that the pipeline's other threads wait on) than into arithmetic. The columns share their layer
widths (one ``ColumnConfig`` per model), so with their weights frozen they can be stacked along
the channel axis and run together:

- the first convs (all on the encoder's map) become one conv with every column's filters;
- each later conv becomes one grouped conv (a group per column), plus, when some column has
  lateral connections, one 1x1 conv from the stacked activations whose weight holds each target's
  lateral adapter in its source columns' block and zeros elsewhere;
- BatchNorm (inference statistics) is folded into the conv weights and a bias, and the adapters'
  learned scales into their weights;
- the FC embeddings run as one batched matmul of the columns' blocks plus a small lateral matrix (a
  dense block-diagonal matrix would read mostly zeros: 33 MB per call for 13 columns), the outputs,
  laterals included, as one block-sparse linear map;
- an ensemble column's members are columns of the stack; their outputs are averaged at the end.

The result equals :meth:`ProgressiveNet.forward_features` up to float rounding (tested) with under a
third of the tensor ops (v4 model: 26 top-level aten ops against 86; v5: 70 against 329). Built once
from a prepared model (eval mode, on its device and dtype); it keeps copies of the folded weights, so
rebuild it after the network's weights change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from facial_perception.core.began import make_activation
from facial_perception.core.progressive import (
    ColumnOutput,
    LateralAdapter,
    ModelError,
    ProgressiveNet,
    TaskColumn,
    average_stacked_members,
    column_members,
)


def _adapter_weight(adapter: LateralAdapter) -> torch.Tensor:
    """The adapter's projection with its per-source scales multiplied in: (out, in) or (out, in, 1, 1)."""
    per_channel = torch.repeat_interleave(adapter.scales.detach(), adapter._repeats)
    weight = adapter.proj.weight.detach()
    return weight * (per_channel.view(1, -1, 1, 1) if adapter.conv else per_channel.view(1, -1))


def _folded_norm(column: TaskColumn, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``norm(x) == x * scale + shift`` for the layer's BatchNorm in eval mode."""
    norm = column.norms[layer]
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias.detach() - norm.running_mean * scale


class FusedColumns(nn.Module):
    """Inference-only stack of the columns ``tasks`` need (and their lateral sources).

    Call it on encoder features ``(N, C, H, W)``; it returns ``{task: ColumnOutput}`` for the
    requested tasks, like ``net.forward_features(features, tasks)``.
    """

    def __init__(self, net: ProgressiveNet, tasks: Iterable[str] | None = None) -> None:
        super().__init__()
        if net.training:
            raise ModelError("FusedColumns folds inference statistics: put the network in eval mode first")
        run, keep = net._resolve(tasks)
        if not run:
            raise ModelError("the network has no columns to fuse")
        self.keep = list(keep)
        # an ensemble's members are stacked like columns of their own; forward() averages them again
        columns = [member for name in run for member in column_members(net.columns[name])]
        self.owners = [name for name in run for _member in column_members(net.columns[name])]
        dtype = columns[0].fc.weight.dtype
        if dtype in (torch.float16, torch.bfloat16):  # fold in float32, store in the network's dtype
            columns = [copy.deepcopy(column).float() for column in columns]
        index: dict[str, int] = {}
        for k, name in enumerate(self.owners):
            index.setdefault(name, k)  # an ensemble feeds laterals from its first member
        sources = [[index[s] for s in net.specs[name].laterals] for name in self.owners]
        self.pools = list(columns[0].pools)
        self.act = make_activation(net.config.column.activation)
        widths = [conv.out_channels for conv in columns[0].convs]
        if any([conv.out_channels for conv in column.convs] != widths for column in columns):
            raise ModelError("FusedColumns needs columns of equal layer widths (one ColumnConfig per model)")
        self.groups = len(columns)
        reference = columns[0].fc.weight

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=reference.dtype, device=reference.device)

        self.conv_weights = nn.ParameterList()
        self.conv_biases = nn.ParameterList()
        # per conv layer with laterals: a 1x1 conv from the channels of the columns up to the last
        # source into the channels of the columns from the first to the last target
        self.lateral_weights = nn.ParameterList()
        self.lateral_slices: dict[int, tuple[int, int, int]] = {}  # layer -> (in_stop, out_start, out_stop)
        targets = [k for k, own in enumerate(sources) if own]
        for layer, width in enumerate(widths):
            weights, biases = [], []
            for column in columns:
                scale, shift = _folded_norm(column, layer)
                weights.append(column.convs[layer].weight.detach() * scale.view(-1, 1, 1, 1))
                biases.append(shift)
            self.conv_weights.append(nn.Parameter(torch.cat(weights), requires_grad=False))
            self.conv_biases.append(nn.Parameter(torch.cat(biases), requires_grad=False))
            if not layer or not targets:
                continue
            previous = widths[layer - 1]
            first, last = targets[0], targets[-1]
            in_stop = (max(max(sources[k]) for k in targets) + 1) * previous
            lateral = zeros((last + 1 - first) * width, in_stop, 1, 1)
            for target in targets:
                column = columns[target]
                scale, _shift = _folded_norm(column, layer)
                weight = _adapter_weight(column.laterals[str(layer)]) * scale.view(-1, 1, 1, 1)
                rows = slice((target - first) * width, (target - first + 1) * width)
                for position, source in enumerate(sources[target]):
                    block = weight[:, position * previous : (position + 1) * previous]
                    lateral[rows, source * previous : (source + 1) * previous] = block
            self.lateral_weights.append(nn.Parameter(lateral, requires_grad=False))
            self.lateral_slices[layer] = (in_stop, first * width, (last + 1) * width)

        fc_layer = len(widths)
        # The FC layer is most of a column's weights: as one dense block-diagonal matrix its zeros grow
        # with the square of the number of columns (13 columns: 33 MB read per call, 3 ms at any batch
        # size), so each column's block is applied by one batched matmul, the laterals by a small matrix.
        blocks = torch.stack([column.fc.weight.detach().t() for column in columns]).contiguous()
        self.fc_blocks = nn.Parameter(blocks, requires_grad=False)  # (columns, in, out)
        bias = torch.cat([column.fc.bias.detach() for column in columns])
        self.fc_bias = nn.Parameter(bias, requires_grad=False)
        self.fc_lateral: nn.Parameter | None = None
        if targets:
            fc_in, fc_out = self.fc_blocks.shape[1:]
            first, last = targets[0], targets[-1]
            in_stop = (max(max(sources[k]) for k in targets) + 1) * fc_in
            lateral = zeros((last + 1 - first) * fc_out, in_stop)
            for target in targets:
                adapter = _adapter_weight(columns[target].laterals[str(fc_layer)])
                rows = slice((target - first) * fc_out, (target - first + 1) * fc_out)
                for position, source in enumerate(sources[target]):
                    block = adapter[:, position * fc_in : (position + 1) * fc_in]
                    lateral[rows, source * fc_in : (source + 1) * fc_in] = block
            self.fc_lateral = nn.Parameter(lateral, requires_grad=False)
            self.fc_lateral_slice = (in_stop, first * fc_out, (last + 1) * fc_out)
        self.out_weight, self.out_bias = _block_linear(columns, sources, fc_layer + 1, zeros)
        self.tasks = list(run)
        self.member_counts = [self.owners.count(name) for name in run]
        first = [columns[self.owners.index(name)] for name in run]
        counted = list(zip(first, self.member_counts, strict=True))
        self.task_embedding_dims = [column.fc.out_features * n for column, n in counted]
        self.task_class_counts = [column.out.out_features * n for column, n in counted]
        self.to(dtype)

    def forward(self, features: torch.Tensor) -> dict[str, ColumnOutput]:
        return self.finish(self.stem(features))

    def stem(self, features: torch.Tensor) -> torch.Tensor:
        """The columns' first conv layer on the encoder's features, the part that reads them all.

        Split from :meth:`finish` so that a pipeline can run it in the encoder's thread: with
        ensembles the columns cost more than the encoder, and this layer is about a third of them.
        """
        h = self.act(F.conv2d(features, self.conv_weights[0], self.conv_biases[0], padding=1))
        return F.max_pool2d(h, 2) if self.pools[0] else h

    def finish(self, stem: torch.Tensor) -> dict[str, ColumnOutput]:
        """The layers after :meth:`stem` on its output: ``{task: ColumnOutput}``."""
        h = stem
        laterals = iter(self.lateral_weights)
        for layer in range(1, len(self.conv_weights)):
            weight, bias = self.conv_weights[layer], self.conv_biases[layer]
            pre = F.conv2d(h, weight, bias, padding=1, groups=self.groups)
            if layer in self.lateral_slices:
                in_stop, out_start, out_stop = self.lateral_slices[layer]
                pre[:, out_start:out_stop] += F.conv2d(h[:, :in_stop], next(laterals))
            h = self.act(pre)
            if self.pools[layer]:
                h = F.max_pool2d(h, 2)
        # column k's channels flatten to the block k of the row, in the column's own (C, H, W) order
        flat = h.flatten(1)
        n, count = flat.shape[0], self.fc_blocks.shape[0]
        per_column = flat.view(n, count, -1).transpose(0, 1)  # (columns, N, in)
        pre = torch.bmm(per_column, self.fc_blocks).transpose(0, 1).reshape(n, -1) + self.fc_bias
        if self.fc_lateral is not None:
            in_stop, out_start, out_stop = self.fc_lateral_slice
            pre[:, out_start:out_stop] += F.linear(flat[:, :in_stop], self.fc_lateral)
        embeddings = self.act(pre)
        logits = F.linear(embeddings, self.out_weight, self.out_bias)
        # an ensemble's members are neighbours in the stack: one (N, K, width) view each
        per_logits = logits.split(self.task_class_counts, dim=1)
        per_embedding = embeddings.split(self.task_embedding_dims, dim=1)
        outputs: dict[str, ColumnOutput] = {}
        for k, (name, count) in enumerate(zip(self.tasks, self.member_counts, strict=True)):
            if name not in self.keep:
                continue
            if count == 1:
                outputs[name] = ColumnOutput(per_logits[k], per_embedding[k])
            else:
                averaged = average_stacked_members(
                    per_logits[k].view(n, count, -1), per_embedding[k].view(n, count, -1)
                )
                outputs[name] = ColumnOutput(*averaged)
        return outputs


def _block_linear(
    columns: Sequence[TaskColumn], sources: Sequence[Sequence[int]], layer: int, zeros
) -> tuple[nn.Parameter, nn.Parameter]:
    """The FC layer (``layer`` = number of convs) or the output layer of all columns as one linear map:
    each column's own weights on the diagonal, its lateral adapter in its sources' blocks (an adapter's
    input is its sources' input to the same layer)."""
    linears = [column.fc if layer == len(column.convs) else column.out for column in columns]
    ins = [linear.in_features for linear in linears]
    outs = [linear.out_features for linear in linears]
    in_starts = [sum(ins[:k]) for k in range(len(ins))]
    out_starts = [sum(outs[:k]) for k in range(len(outs))]
    weight = zeros(sum(outs), sum(ins))
    for k, linear in enumerate(linears):
        rows = slice(out_starts[k], out_starts[k] + outs[k])
        weight[rows, in_starts[k] : in_starts[k] + ins[k]] = linear.weight.detach()
        if sources[k]:
            adapter = _adapter_weight(columns[k].laterals[str(layer)])
            offset = 0
            for source in sources[k]:
                block = adapter[:, offset : offset + ins[source]]
                weight[rows, in_starts[source] : in_starts[source] + ins[source]] = block
                offset += ins[source]
    bias = torch.cat([linear.bias.detach() for linear in linears])
    return nn.Parameter(weight, requires_grad=False), nn.Parameter(bias, requires_grad=False)
