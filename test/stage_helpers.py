"""Module-level first stages for ProcessStage tests (a spawned child imports them by name)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator


def squares(count: int | None, fail_at: int | None = None, exit_at: int | None = None) -> Iterator[int]:
    """Set-up returns the iterator; ``fail_at`` raises there, ``exit_at`` kills the process there."""

    def items() -> Iterator[int]:
        for i in itertools.count() if count is None else range(count):
            if i == fail_at:
                raise ValueError(f"bad frame {i}")
            if i == exit_at:
                os._exit(3)
            yield i * i

    return items()


def missing_file(path: str) -> Iterator[int]:
    """A set-up that fails before the first item."""
    with open(path, "rb"):
        pass
    return iter(())
