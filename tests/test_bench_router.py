"""The router benchmark: loaded states, every policy × size reported, and the command's input checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.core.bench_router import (
    SIMULATED_S,
    RouterCase,
    capture,
    cluster_roles,
    offered_requests,
    run_router_benchmark,
    scaled_setting,
)
from tropical.core.status import view_of
from tropical.policies import POLICY_NAMES, Role
from tropical.protocol import WorkerStatus, decode


@pytest.fixture(scope="module")
def tropical_on_eight() -> RouterCase:
    return capture("tropical", 8, queue_size=1000, snapshots=4)


def test_captured_states_are_loaded_and_hold_the_whole_queue(tropical_on_eight: RouterCase) -> None:
    snapshots = tropical_on_eight.snapshots
    assert len(snapshots) == 4
    for s in snapshots:
        assert len(s.queue) == 1000
        assert len({r.id for r in s.queue}) == 1000
        assert [r.arrival for r in s.queue] == sorted(r.arrival for r in s.queue)
        assert all(r.arrival <= s.now for r in s.queue)
        assert s.busy_workers > 0 and s.running_decodes > 0
        assert s.now >= SIMULATED_S / 2
    assert tropical_on_eight.roles == {"prefill": 1, "multiplex": 7}


def test_added_prompts_name_no_request_a_worker_holds(tropical_on_eight: RouterCase) -> None:
    for s in tropical_on_eight.snapshots:
        held = {r.id for w in s.views for group in (w.prefills, w.waiting, w.incoming) for r in group}
        held |= {request for w in s.views for request, _ in w.in_step}
        assert held and not held & {r.id for r in s.queue}


def test_heartbeats_read_back_as_the_captured_views(tropical_on_eight: RouterCase) -> None:
    names = tropical_on_eight.names
    for s in tropical_on_eight.snapshots:
        statuses = [decode(raw) for raw in s.statuses]
        assert all(isinstance(status, WorkerStatus) for status in statuses)
        assert [view_of(status, i, names) for i, status in enumerate(statuses)] == list(s.views)  # type: ignore[arg-type]


def test_a_large_cluster_replays_the_trace_past_its_end() -> None:
    setting = scaled_setting(256)
    requests = offered_requests(setting, 2.0 * 256, SIMULATED_S, seed=0)
    assert len(requests) == round(2.0 * 256 * SIMULATED_S)
    arrivals = [r.arrival for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[-1] == pytest.approx(SIMULATED_S, rel=0.05)


def test_role_splits_scale_the_best_eight_worker_split() -> None:
    assert cluster_roles("distserve", 64).count(Role.PREFILL) == 24
    assert cluster_roles("tropical", 256).count(Role.PREFILL) == 32
    assert cluster_roles("unified", 8) == (Role.MULTIPLEX,) * 8
    assert cluster_roles("vllm", 3) == (Role.COLOCATED,) * 3
    with pytest.raises(ValueError):
        cluster_roles("kairos", 1)


def test_report_has_every_policy_and_size_with_ordered_quantiles() -> None:
    sizes = (2, 4)
    seen = []
    report = run_router_benchmark(POLICY_NAMES, sizes, decisions=6, queue_size=100, progress=seen.append)
    results = report["results"]
    assert {(r["policy"], r["workers"]) for r in results} == {(p, n) for p in POLICY_NAMES for n in sizes}
    assert len(seen) == len(results)
    for r in results:
        assert r["queued"] == 100 and r["decisions"] == 6 and r["busy_workers"] > 0
        assert sum(r["roles"].values()) == r["workers"]
        for name in ("decode", "view_of", "place", "route_decode", "plan_step", "views", "decision", "total"):
            figures = r["times_ms"][name]
            assert 0.0 < figures["p50"] <= figures["p99"]
    profile = report["profile"]
    assert (profile["policy"], profile["workers"]) in {(p, n) for p in POLICY_NAMES for n in sizes}
    assert profile["hot"] and all(row["own_ms_per_decision"] >= 0.0 for row in profile["hot"])


def test_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "router.json"
    args = ["bench-router", "--policies", "vllm,kairos", "--workers", "2", "--queue", "50", "--decisions", "4", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert [(r["policy"], r["workers"]) for r in record["results"]] == [("vllm", 2), ("kairos", 2)]
    assert record["decisions"] == 4 and record["date"] and record["machine"] and "load_average_before" in record
    assert "slowest:" in result.output


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--policies", "vllm,orca"], "unknown policy 'orca'"),
        (["--policies", ","], "no policy given"),
        (["--workers", "8,0"], "at least 1"),
        (["--workers", "-8"], "at least 1"),
        (["--workers", "8,x"], "not a list of whole numbers"),
        (["--policies", "distserve", "--workers", "1"], "prefill"),
        (["--decisions", "0"], "--decisions"),
        (["--queue", "0"], "--queue"),
    ],
)
def test_command_rejects_bad_input(args: list[str], problem: str, tmp_path: Path) -> None:
    out = tmp_path / "router.json"
    result = CliRunner().invoke(app, ["bench-router", *args, "--json", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert problem in result.output
    assert not out.exists()
