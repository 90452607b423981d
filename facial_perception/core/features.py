"""Frozen-encoder feature cache: run the encoder over a dataset once, train columns on the maps.

With the encoder frozen, its output for a given image never changes, so recomputing it every
epoch wastes most of the CPU time of column training. :func:`compute_features` runs the encoder
once over an in-memory ``uint8`` image array (optionally also over the mirrored images, and over
``views`` randomly shifted, scaled, rotated and brightened copies of every image), stores the maps
as float16 and :func:`cached_features` keeps them on disk keyed by a hash of the encoder weights
and of the image bytes, so a second run (an ablation, a resumed job, another column on the same
data) skips the encoder entirely.

Why the augmented views: a column trained on the maps of aligned crops only learns to read the map
of an aligned face; shifted by 4 pixels of 64, 16 % of the shipped v5 gender labels change
(``evaluate --shift-test 4``, docs/MODEL_CARD.md). Columns that also see the maps of a few cached
augmented copies change half as many, for a few extra encoder passes once instead of one per step.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facial_perception.core.fileio import atomic_path
from facial_perception.core.preprocess import Augment, normalise_tensor

FORMAT_VERSION = 1
# Never let the cache take more than this share of the memory that is available right now.
MEMORY_FRACTION = 0.6


class FeatureCacheError(RuntimeError):
    """The cache cannot be built (too big for memory, bad image array, unreadable cache file)."""


@dataclass
class FeatureSet:
    """Encoder feature maps of a dataset (float16, CPU), optionally of its mirror images and of
    ``V`` augmented copies of every image (``views``: ``(V, N, C, H, W)``)."""

    features: torch.Tensor
    flipped: torch.Tensor | None = None
    views: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    @property
    def num_views(self) -> int:
        """How many augmented copies of each image are cached (0 = none)."""
        return 0 if self.views is None else int(self.views.shape[0])

    def nbytes(self) -> int:
        parts = (self.features, self.flipped, self.views)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def batch(
        self, indices: torch.Tensor, flip: torch.Tensor | None = None, view: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 maps for ``indices``; where ``flip`` is true, the mirrored image's maps; where
        ``view`` (one int per index) is ``k >= 0``, the maps of augmented copy ``k`` (over ``flip``)."""
        out = self.features[indices]
        if flip is not None and self.flipped is not None and bool(flip.any()):
            out = torch.where(flip.view(-1, *([1] * (out.ndim - 1))), self.flipped[indices], out)
        if view is not None and self.views is not None:
            chosen = torch.nonzero(view >= 0).flatten()
            if chosen.numel():
                out = out.clone()
                out[chosen] = self.views[view[chosen], indices[chosen]]
        return out.float()


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate a uint8 image array (N, S, S) or (N, 1, S, S) and return it as (N, 1, S, S) uint8."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise FeatureCacheError(f"expected uint8 images, got {tensor.dtype}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4 or tensor.shape[1] != 1 or tensor.shape[2] != tensor.shape[3]:
        raise FeatureCacheError(
            f"expected grey square images (N, S, S) or (N, 1, S, S), got {tuple(tensor.shape)}"
        )
    return tensor


def encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 over the encoder's parameter/buffer names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def data_fingerprint(images: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of an image array's shape and bytes (the cache key's data half)."""
    tensor = images_to_tensor(images).contiguous()
    digest = hashlib.sha256(f"{tuple(tensor.shape)};".encode())
    digest.update(memoryview(tensor.numpy()).cast("B"))
    return digest.hexdigest()


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, limit: int | None = None) -> None:
    """Raise :class:`FeatureCacheError` if a cache of ``nbytes`` would not fit comfortably."""
    budget = limit
    if budget is None:
        available = available_memory()
        budget = None if available is None else int(available * MEMORY_FRACTION)
    if budget is not None and nbytes > budget:
        raise FeatureCacheError(
            f"feature cache needs {nbytes / 2**30:.2f} GiB but only {budget / 2**30:.2f} GiB may be used; "
            "train without the cache (--no-feature-cache), without flipped features, or on fewer images"
        )


def feature_bytes(encoder: nn.Module, count: int, flip: bool, views: int = 0) -> int:
    """Size in bytes of the float16 cache of ``count`` images."""
    shape = getattr(encoder, "feature_shape", None)
    if shape is None:
        raise FeatureCacheError("the encoder does not report its feature_shape")
    per_image = int(np.prod(shape)) * 2
    return per_image * count * ((2 if flip else 1) + views)


@torch.inference_mode()
def compute_features(
    encoder: nn.Module,
    images: np.ndarray | torch.Tensor,
    flip: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    memory_limit: int | None = None,
    desc: str = "encoder features",
    views: int = 0,
    view_seed: int = 0,
) -> FeatureSet:
    """Run ``encoder.forward_features`` over all images once (in eval mode, restored afterwards).

    ``views``: also over that many augmented copies of every image (:class:`preprocess.Augment`
    with its defaults; copy ``k`` draws from a CPU generator seeded with ``view_seed + k``, so the
    same images give the same copies on any device).
    """
    if views < 0:
        raise FeatureCacheError(f"views must be >= 0, got {views}")
    tensor = images_to_tensor(images)
    count = tensor.shape[0]
    check_memory(feature_bytes(encoder, count, flip, views), memory_limit)
    c, h, w = encoder.feature_shape
    features = torch.empty((count, c, h, w), dtype=torch.float16)
    flipped = torch.empty_like(features) if flip else None
    copies = torch.empty((views, count, c, h, w), dtype=torch.float16) if views else None
    augment = Augment().train()
    was_training = encoder.training
    encoder.eval()
    bar = _progress(total=count * ((2 if flip else 1) + views), desc=desc, enabled=progress)
    try:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            x = normalise_tensor(tensor[start:stop].to(device))
            features[start:stop] = encoder.forward_features(x).to("cpu", torch.float16)
            bar.update(stop - start)
            if flipped is not None:
                flipped[start:stop] = encoder.forward_features(torch.flip(x, dims=[3])).to(
                    "cpu", torch.float16
                )
                bar.update(stop - start)
        for k in range(views):
            generator = torch.Generator().manual_seed(view_seed + k)
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                x = augment(normalise_tensor(tensor[start:stop]), generator=generator).to(device)
                copies[k, start:stop] = encoder.forward_features(x).to("cpu", torch.float16)
                bar.update(stop - start)
    finally:
        bar.close()
        encoder.train(was_training)
    return FeatureSet(features, flipped, copies)


def cache_key(encoder: nn.Module, images: np.ndarray | torch.Tensor, flip: bool, views: int = 0) -> str:
    """File stem that changes whenever the encoder weights, the images or the cached copies change."""
    return (
        f"features-v{FORMAT_VERSION}-{encoder_fingerprint(encoder)[:20]}-{data_fingerprint(images)[:20]}"
        + ("-flip" if flip else "")
        + (f"-views{views}" if views else "")
    )


def cached_features(
    encoder: nn.Module,
    images: np.ndarray | torch.Tensor,
    cache_dir: str | os.PathLike[str] | None,
    flip: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    memory_limit: int | None = None,
    write: bool = True,
    views: int = 0,
) -> FeatureSet:
    """:func:`compute_features` with an on-disk cache (``safetensors``) in ``cache_dir``.

    ``write=False`` only reads an existing entry (used by non-zero ranks under torchrun, which
    wait for rank 0 to write it). A corrupt entry is recomputed and replaced.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    def compute() -> FeatureSet:
        return compute_features(
            encoder, images, flip, batch_size, device, progress, memory_limit, views=views
        )

    if cache_dir is None:
        return compute()
    folder = Path(cache_dir)
    path = folder / (cache_key(encoder, images, flip, views) + ".safetensors")
    if path.is_file():
        check_memory(path.stat().st_size, memory_limit)
        try:
            tensors = load_file(str(path))
            loaded = FeatureSet(tensors["features"], tensors.get("flipped"), tensors.get("views"))
            if loaded.num_views != views or (loaded.flipped is None) == flip:
                raise KeyError("the entry does not hold what its name says")  # recomputed below
            return loaded
        except (SafetensorError, OSError, KeyError, RuntimeError):
            if not write:
                raise FeatureCacheError(f"feature cache file {path} is unreadable") from None
    result = compute()
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"features": result.features.contiguous()}
        if result.flipped is not None:
            tensors["flipped"] = result.flipped.contiguous()
        if result.views is not None:
            tensors["views"] = result.views.contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"format_version": str(FORMAT_VERSION)})
    return result


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)
