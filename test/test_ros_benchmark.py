"""The ROS benchmark end to end on a short run: camera, node and benchmark in three processes over
real DDS; the report's figures are measured, so only their consistency is checked, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_short_benchmark_writes_json_and_markdown_with_its_comparisons(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    cmd = [sys.executable, "-m", "facial_perception.ros.ros_benchmark", "--duration", "3", "--warmup", "2"]
    cmd += ["--rate", "10", "--compare-transports", "--json", str(out_json), "--markdown", str(out_md)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out_json.read_text())
    summary = result["summary"]
    assert result["settings"]["mirror_average"] is True
    assert 0 < summary["results_received"] <= summary["frames_published"]
    assert summary["latency_p50_ms"] <= summary["latency_p95_ms"] <= summary["latency_p99_ms"]
    (mirror,) = [c for c in result["comparisons"] if c["kind"] == "mirror_average"]
    assert mirror["settings"]["mirror_average"] is False and mirror["summary"]["results_received"] > 0
    text = out_md.read_text()
    assert "## Mirror averaging" in text and "| false |" in text and "| true |" in text
    (stages,) = [c for c in result["comparisons"] if c["kind"] == "encoder_stage"]
    assert result["settings"]["encoder_stage"] is True and stages["settings"]["encoder_stage"] is False
    assert stages["summary"]["results_received"] > 0 and "## Three worker threads or two" in text
    (fused,) = [c for c in result["comparisons"] if c["kind"] == "fuse_columns"]
    assert result["settings"]["fuse_columns"] is True and fused["settings"]["fuse_columns"] is False
    assert fused["summary"]["results_received"] > 0 and "## Fused columns or one by one" in text
    (alone,) = [c for c in result["comparisons"] if c["kind"] == "standalone_members"]
    assert result["settings"]["standalone_members"] and alone["settings"]["standalone_members"] is False
    assert alone["summary"]["results_received"] > 0 and "## Standalone members" in text
    (stock,) = [c for c in result["comparisons"] if c["kind"] == "executor"]
    assert result["settings"]["node_executor"].startswith("pooled")
    assert stock["settings"]["node_executor"] == "multi_threaded" and stock["summary"]["results_received"] > 0
    assert "## Executor of the node" in text and "| multi_threaded |" in text
    assert "Fast DDS transports" not in text  # --compare-transports with no names: no such run
