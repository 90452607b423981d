"""Device selection and CPU tuning shared by training, inference and the benchmark."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys

import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """An unknown or unavailable device was requested (one-line message)."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cpu``; ``cuda`` / ``cuda:N`` (must exist)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    match = _DEVICE_RE.match(text)
    if not match:
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if index is not None:
            raise DeviceError(f"unknown device {spec!r}: 'auto' takes no index")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        if index not in (None, "0"):
            raise DeviceError(f"unknown device {spec!r}: use cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} requested but CUDA is not available (torch {torch.__version__})")
    count = torch.cuda.device_count()
    number = int(index) if index is not None else 0
    if number >= count:
        raise DeviceError(f"device {spec!r} requested but only {count} CUDA device(s) exist")
    return torch.device("cuda", number)


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS (Linux/glibc only).

    Large activation tensors (64 MB per layer for the ``paper`` config at batch 16) are otherwise
    allocated with ``mmap`` and page-faulted afresh on every forward pass, which can halve CPU
    throughput.  This is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` does from the
    environment; jemalloc/tcmalloc are alternatives.  Returns True when the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return False
    return ok
