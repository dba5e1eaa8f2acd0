"""The router benchmark: loaded states, every policy × size reported, and the command's input checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.core.bench_router import (
    ARRIVALS,
    SIMULATED_S,
    RouterCase,
    capture,
    cluster_roles,
    offered_requests,
    per_prompt,
    run_router_benchmark,
    scaled_setting,
    settle,
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


def test_arrivals_are_new_prompts_arriving_at_the_snapshot(tropical_on_eight: RouterCase) -> None:
    for s in tropical_on_eight.snapshots:
        assert len(s.arrivals) == ARRIVALS and all(r.arrival == s.now for r in s.arrivals)
        held = {r.id for w in s.views for r in w.prefills}
        ids = [r.id for r in s.arrivals]
        assert len(set(ids)) == ARRIVALS and not set(ids) & ({r.id for r in s.queue} | held)


def test_settled_backlog_is_what_the_policy_left_and_where_it_placed_the_rest(tropical_on_eight: RouterCase) -> None:
    policy = tropical_on_eight.policy
    for s in tropical_on_eight.snapshots:
        decision = policy.place(s.queue, s.views, s.now)
        b = settle(policy, s)
        placed = {p.request_id for p in decision.placements}
        assert placed and {r.id for r in b.queue} <= {r.id for r in s.queue} - placed - set(decision.drops)
        on_workers = {r.id for w in b.views for r in w.prefills}
        assert placed <= on_workers and b.held >= s.queued_prefills + len(placed)
        for before, after in zip(s.views, b.views, strict=True):
            added = [r for r in after.prefills if r not in before.prefills]
            assert after.prefill_load == before.prefill_load + sum(r.remaining_prefill for r in added)
        again = policy.place(b.queue, b.views, b.now)
        assert not again.placements and not again.drops  # steady: the policy leaves the backlog waiting


def test_events_add_one_arrival_or_drain_one_worker(tropical_on_eight: RouterCase) -> None:
    b = settle(tropical_on_eight.policy, tropical_on_eight.snapshots[0])
    assert b.with_arrival(0) == (*b.queue, b.arrivals[0])
    takers = [w for w in b.views if w.role.takes_prompts]
    for k in range(len(takers)):
        views = b.with_drained(k)
        changed = [(old, new) for old, new in zip(b.views, views, strict=True) if old != new]
        assert len(changed) <= 1
        drained = views[takers[k].id]
        assert drained.prefills == () and drained.prefill_load == 0 and drained.placed_since_step == 0


def test_per_prompt_cost_leaves_out_calls_that_decided_nothing() -> None:
    assert per_prompt([1000, 900, 50], [10, 0, 5]) == [100, 10]


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
        assert 0 <= r["backlog"] <= 100 and r["held"] >= 0
        names = ["decode", "view_of", "place", "route_decode", "plan_step", "views", "decision", "total"]
        names += ["arrival", "status_change", "event", "heartbeat"]
        if r["placed"] + r["dropped"] > 0:
            names.append("place_per_prompt")
        for name in names:
            figures = r["times_ms"][name]
            assert 0.0 < figures["p50"] <= figures["p99"]
    for key in ("profile", "event_profile"):
        profile = report[key]
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
    assert "slowest burst decision:" in result.output and "slowest event:" in result.output


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
