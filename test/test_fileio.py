"""Atomic writes: the old file survives a failed write, no temporary file is left behind."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from facial_perception.core.fileio import atomic_path, atomic_write_bytes, atomic_write_text, jsonable


def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_private_mode(tmp_path):
    target = atomic_write_text(tmp_path / "secret", "x", mode=0o600)
    assert os.stat(target).st_mode & 0o777 == 0o600


def test_jsonable_makes_strict_json():
    value = {"a": (np.float32(0.5), float("nan")), 1: np.arange(3), "b": [math.inf, np.int64(2)]}
    assert json.loads(json.dumps(jsonable(value), allow_nan=False)) == {
        "a": [0.5, None],
        "1": [0, 1, 2],
        "b": [None, 2],
    }
