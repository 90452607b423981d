"""torchrun / DistributedDataParallel support for the training loops.

Launch any training command under ``torchrun --nproc_per_node N`` and :func:`init_distributed`
picks the ``env://`` rendezvous that torchrun sets up (gloo on CPU, NCCL on CUDA). Without
torchrun everything here degrades to a single-process no-op, so the training code has one path.

Conventions (shared with ``training.py``):
- ``batch_size`` is per process (as with DDP in general); the effective batch is ``N x batch_size``.
- Only the trainable parts are wrapped in DDP (the new column, plus the encoder when re-trained);
  frozen modules are never registered with DDP, so they are neither broadcast nor all-reduced.
- Checkpoints and logs are written by rank 0 only; every rank then meets at a barrier.
- States are saved unwrapped (no ``module.`` prefix) and samplers are re-seeded from the epoch,
  so a run can resume under a different number of processes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """torchrun environment present but unusable (bad variables, backend not available)."""


@dataclass
class DistContext:
    """Rank information of this process; ``world_size == 1`` means plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Sum of a vector over all ranks (float64 on CPU for gloo, moved for NCCL)."""
        tensor = torch.as_tensor(values, dtype=torch.float64).clone()
        if not self.enabled:
            return tensor
        work = tensor.cuda() if self.backend == "nccl" else tensor
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.cpu()

    def all_reduce_mean(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(values) / self.world_size

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (decisions such as "stop now" must agree everywhere)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from exc


def init_distributed(device: torch.device | str = "cpu", timeout_s: float = 600.0) -> DistContext:
    """Join the torchrun process group if ``WORLD_SIZE > 1``; otherwise a single-process context.

    The backend follows the device: NCCL for CUDA, gloo for CPU. An already initialised default
    group (e.g. from a notebook or a test harness) is reused and left open.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(
            dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend(), False
        )
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot join the torchrun process group ({backend}): {exc}") from exc
    return DistContext(rank, world, local_rank, backend, True)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """Each torchrun process drives its own GPU (``cuda:LOCAL_RANK``); CPU stays CPU."""
    if device.type == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return device


def wrap_ddp(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP around ``module`` when distributed and it has trainable parameters; else ``module``."""
    if not ctx.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (states are always saved unwrapped)."""
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def epoch_permutation(
    n: int, seed: int, epoch: int, ctx: DistContext, drop_last: bool = False
) -> torch.Tensor:
    """This rank's shuffled indices for ``epoch`` (the ``DistributedSampler`` rule).

    The permutation depends only on ``seed + epoch``; ranks take every ``world_size``-th index
    (padding by wrap-around so every rank gets the same count). With one process it is simply
    a seeded permutation, so resuming with another world size keeps the epoch's data order.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def shard(n: int, ctx: DistContext) -> torch.Tensor:
    """Disjoint evaluation shard of ``range(n)`` for this rank (no padding: metrics stay exact)."""
    return torch.arange(ctx.rank, n, ctx.world_size, dtype=torch.long)


def average_gradients_hooks(params: Iterable[nn.Parameter], ctx: DistContext) -> list:
    """All-reduce (mean) each gradient as soon as it is accumulated.

    For models whose training step does not go through ``module.forward`` (BEGAN runs encoder,
    decoder and generator separately), this gives DDP's gradient averaging without the wrapper.
    Returns the hook handles (call ``.remove()`` on each to detach).
    """
    if not ctx.enabled:
        return []

    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(ctx.world_size)

    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]


def broadcast_parameters(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (same start without DDP)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
