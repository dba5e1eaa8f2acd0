"""Worker status on the wire: built from a worker's state and read back, it is the view the simulator gives the policy."""

from __future__ import annotations

import pytest

from tropical.core import ClusterCore, DispatchLedger
from tropical.core.status import RequestIds, held_requests, status_of, view_of
from tropical.experiments import SETTINGS, Replay, workload
from tropical.policies import Role
from tropical.policies.records import RequestView
from tropical.policies.serving import make_policy
from tropical.protocol import WorkerRole, WorkerStatus, decode, encode
from tropical.simulator import Simulation


@pytest.mark.parametrize(("policy", "split"), [("vllm", None), ("distserve", 4), ("kairos", 3), ("tropical", 4), ("unified", 2)])
def test_status_round_trip_equals_the_simulators_view(policy: str, split: int | None) -> None:
    setting = SETTINGS["chat-13b"]
    load = workload(setting, setting.trace, 14.0, replay=Replay(requests=150), seed=3)
    names = RequestIds()
    for i in range(len(load.requests)):
        assert names.id_of(f"req-{i}") == i
    checked: dict[Role, int] = {}
    busy_seen = [0]

    def observe(now: float, core: ClusterCore) -> None:
        for worker in core.workers:
            status = status_of(worker, now, worker_id=f"w{worker.id}", queue=f"worker.w{worker.id}", names=names)
            wire = decode(encode(status))
            assert isinstance(wire, WorkerStatus)
            assert view_of(wire, worker.id, names) == worker.view(now)
            checked[worker.role] = checked.get(worker.role, 0) + 1
            busy_seen[0] += bool(worker.view(now).in_step) + worker.view(now).batch.size > 0

    policy_obj = make_policy(policy, setting.latency_model())
    Simulation(setting.cluster(policy_obj, split), policy_obj, seed=3, noise=True, observe=observe).run(load.requests)
    assert checked and min(checked.values()) > 50
    assert busy_seen[0] > 0  # states with a step in progress and a running batch were among those checked


def test_every_role_travels() -> None:
    assert {r.value for r in Role} == {r.value for r in WorkerRole}


def test_status_shows_running_decodes_with_their_slack() -> None:
    setting = SETTINGS["chat-13b"]
    load = workload(setting, setting.trace, 10.0, replay=Replay(requests=60), seed=0)
    names = RequestIds()
    for i in range(len(load.requests)):
        names.id_of(f"req-{i}")
    seen: list[WorkerStatus] = []

    def observe(now: float, core: ClusterCore) -> None:
        for worker in core.workers:
            if worker.size:
                status = status_of(worker, now, worker_id="w", queue="q", names=names)
                assert len(status.decodes) == worker.size
                tightest = min(d.slack_s for d in status.decodes)
                assert tightest == pytest.approx(status.batch.next_token_deadline - now)
                assert set(held_requests(status)) >= {d.request_id for d in status.decodes}
                seen.append(status)

    policy = make_policy("vllm", setting.latency_model())
    Simulation(setting.cluster(policy), policy, observe=observe).run(load.requests)
    assert seen


def test_request_ids_are_stable_and_distinct() -> None:
    ids = RequestIds()
    a, b = ids.id_of("a"), ids.id_of("b")
    assert (a, b, ids.id_of("a")) == (0, 1, 0)
    assert ids.name_of(b) == "b"
    ids.forget("a")
    assert ids.id_of("a") == 2  # a forgotten name comes back as a new request


def _request(i: int, prompt: int = 100) -> RequestView:
    return RequestView(i, 0.0, prompt, 1.0, 0.1)


def test_ledger_adds_unconfirmed_dispatches_to_the_view() -> None:
    setting = SETTINGS["chat-13b"]
    policy = make_policy("tropical", setting.latency_model())
    core = ClusterCore(policy, (Role.PREFILL, Role.MULTIPLEX), 10_000, setting.latency_model())
    view = core.views(0.0)[0]
    ledger = DispatchLedger(confirm_after=2.0)
    ledger.dispatched(0, _request(7, 300), now=1.0)
    ledger.dispatched(0, _request(8, 50), now=1.5)
    seen = ledger.view(0, view)
    assert [r.id for r in seen.prefills] == [7, 8]
    assert seen.prefill_load == view.prefill_load + 350
    assert seen.placed_since_step == view.placed_since_step + 2
    assert ledger.view(1, core.views(0.0)[1]) == core.views(0.0)[1]  # nothing pending there
    ledger.confirm(0, [7])
    assert [r.id for r in ledger.pending(0)] == [8]
    assert ledger.lost(3.4) == []
    assert [(w, r.id) for w, r in ledger.lost(3.6)] == [(0, 8)]
    assert ledger.view(0, view) == view


def test_ledger_forgets_a_worker() -> None:
    ledger = DispatchLedger()
    ledger.dispatched(3, _request(1), now=0.0)
    assert [r.id for r in ledger.forget_worker(3)] == [1]
    assert ledger.pending(3) == ()
