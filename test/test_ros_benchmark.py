"""The ROS benchmark end to end on a short run: camera, node and benchmark in three processes over
real DDS; the report's figures are measured, so only their consistency is checked, never a speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from facial_perception.ros.ros_benchmark import BenchmarkResult, parse_param_override

REPO = Path(__file__).resolve().parents[1]


def test_short_benchmark_writes_json_and_markdown_with_its_comparisons(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    cmd = [sys.executable, "-m", "facial_perception.ros.ros_benchmark", "--duration", "3", "--warmup", "2"]
    cmd += ["--rate", "10", "--compare-transports", "--json", str(out_json), "--markdown", str(out_md)]
    cmd += ["--compare-param", "cpu_threads=2", "--param", "detection_threshold=0.5"]
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
    (threads,) = [c for c in result["comparisons"] if c["kind"] == "param"]
    assert threads["name"] == "cpu_threads" and threads["settings"]["overrides"] == {"cpu_threads": 2}
    assert threads["summary"]["results_received"] > 0 and result["settings"]["overrides"] == {}
    base = {"detection_threshold": 0.5}
    assert result["settings"]["base_params"] == threads["settings"]["base_params"] == base
    assert "Node parameters set in every run (`--param`): `detection_threshold=0.5`." in text
    assert "## Node parameter `cpu_threads`" in text and "| 1 (default) |" in text and "| 2 |" in text
    assert "Fast DDS transports" not in text  # --compare-transports with no names: no such run
    rows = result["by_faces"]  # every result belongs to a scene the camera showed (1-5 faces)
    assert sum(row["results"] for row in rows) == summary["results_received"]
    assert {row["faces"] for row in rows} <= {1, 2, 3, 4, 5}
    assert all(0 <= row["detected"] <= row["faces"] for row in rows)
    assert "## Latency by faces in the frame" in text


def test_latency_by_faces_splits_each_scene_into_its_start_and_the_rest() -> None:
    result = BenchmarkResult(settings={"warmup_s": 0.0})
    # a scene of 1 face (frames 0-11 of it), then one of 2 faces (frames 0-2): latency = 10 x frame + faces
    scenes = [(1, i) for i in range(12)] + [(2, i) for i in range(3)]
    result.scene_per_result = scenes
    result.faces_per_result = [faces for faces, _ in scenes]
    result.latencies_ms = [10.0 * since + faces for faces, since in scenes]
    one, two = result.by_faces(scene_start=10)
    assert (one["faces"], one["results"], one["detected"]) == (1, 12, 1.0)
    assert one["scene_start_p99_ms"] < 92.0 < one["steady_p50_ms"] == 106.0
    assert (two["results"], two["scene_start_p50_ms"]) == (3, 12.0)
    assert math.isnan(two["steady_p50_ms"])  # no frame of that scene after its start


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu_threads=2", ("cpu_threads", 2)),
        ("detection_threshold=0.6", ("detection_threshold", 0.6)),
        ("fuse_columns=FALSE", ("fuse_columns", False)),
        ("detector=haar", ("detector", "haar")),
    ],
)
def test_parameter_overrides_take_the_type_of_the_default(text: str, expected: tuple) -> None:
    assert parse_param_override(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu_threads", "wants NAME=VALUE"),
        ("no_such=1", "the node has no parameter 'no_such'"),
        ("cpu_threads=two", "cpu_threads takes a int value, got 'two'"),
        ("fuse_columns=maybe", "fuse_columns takes a bool value"),
    ],
)
def test_bad_parameter_overrides_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^--compare-param.*{message}"):
        parse_param_override(text)
    with pytest.raises(ValueError, match=f"^--param.*{message}"):
        parse_param_override(text, "--param")


def test_benchmark_refuses_a_bad_override_before_starting_anything(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "facial_perception.ros.ros_benchmark", "--compare-param", "no_such=1"]
    cmd += ["--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "B.md")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ros_benchmark: error: --compare-param: the node has no parameter 'no_such'"
    ]
    assert not (tmp_path / "b.json").exists()
