"""The scale check: policies on a cluster grown at constant load per worker, and the drops it reports."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tropical.cli import app
from tropical.simulator.bench_scale import ScalePoint, attainment_drops, scale_point


def point(policy: str, workers: int, attainment: float) -> ScalePoint:
    return ScalePoint(policy, workers, None, 100 * workers, attainment, attainment, 1.0, 0.01 * workers)


def test_drops_are_reported_where_a_larger_cluster_attains_less() -> None:
    points = [point("a", 32, 0.95), point("a", 8, 0.99), point("a", 128, 0.951), point("b", 8, 0.97), point("b", 32, 0.968)]
    drops = attainment_drops(points)
    assert [(name, small, large) for name, small, large, _ in drops] == [("a", 8, 32)]  # b's 0.002 is within tolerance
    assert drops[0][3] == 0.99 - 0.95
    assert point("a", 8, 1.0).us_per_request == 100.0


def test_a_point_replays_the_load_per_worker_on_the_scaled_cluster() -> None:
    small = scale_point("distserve", 4, per_worker_rps=1.0, requests_per_worker=20)
    assert (small.workers, small.prefill_workers, small.requests) == (4, 2, 80)  # 3/8 of 4 workers, rounded
    assert 0.0 <= small.attainment <= min(small.ttft_attainment, small.tpot_attainment) <= 1.0 and small.wall_s > 0.0


def test_bench_scale_command_prints_each_point_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    args = ["bench-scale", "--policies", "vllm,unified", "--workers", "2,4", "--requests-per-worker", "10", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count(" requests: attainment ") == 4
    record = json.loads(out.read_text())
    assert [(p["policy"], p["workers"], p["requests"]) for p in record["points"]] == [("vllm", 2, 20), ("vllm", 4, 40), ("unified", 2, 20), ("unified", 4, 40)]
    assert isinstance(record["attainment_drops"], list) and record["per_worker_rps"] == 1.75


def test_bench_scale_refuses_sizes_a_policy_cannot_split() -> None:
    result = CliRunner().invoke(app, ["bench-scale", "--policies", "kairos", "--workers", "8,1"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "needs at least 1 prefill and one decoding worker" in result.output
    result = CliRunner().invoke(app, ["bench-scale", "--workers", "8,x"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "not a list of whole numbers" in result.output
    result = CliRunner().invoke(app, ["bench-scale", "--arrival", "gamma"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "one of poisson, trace, not 'gamma'" in result.output


def test_the_trace_replay_keeps_the_trace_times_rescaled() -> None:
    replayed = scale_point("vllm", 2, per_worker_rps=1.0, requests_per_worker=10, arrival="trace")
    assert replayed.requests == 20 and 0.0 <= replayed.attainment <= 1.0
