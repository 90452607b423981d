"""The model speed benchmark's report: consistent figures, never a speed threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import one_thread  # noqa: F401 - one_thread is an autouse fixture

from facial_perception.core.benchmark import main


def test_model_benchmark_writes_json_and_markdown_with_fused_columns(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    args = ["--out-json", str(out_json), "--out-md", str(out_md), "--configs", "lite", "--batches", "1", "3"]
    assert main([*args, "--repeats", "2", "--device", "cpu", "--matmul-sizes", "128"]) == 0
    r = json.loads(out_json.read_text())
    (lite,) = r["configs"]
    assert [row["batch"] for row in lite["rows"]] == [1, 3]
    for row in lite["rows"]:
        assert row["faces_per_s"] == pytest.approx(1e3 * row["batch"] / row["ms_per_batch"])
    fused = lite["fused_vs_columns"]
    assert [c["batch"] for c in fused] == [1, 3]
    assert all(c["speedup"] > 0 and c["fused_ms_per_batch"] > 0 for c in fused)
    text = out_md.read_text()
    for c in fused:
        row = f"| lite | {c['batch']} | {c['columns_ms_per_batch']:.2f} | {c['fused_ms_per_batch']:.2f} |"
        assert row in text
    assert main(["--configs", "nope", "--out-json", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
