"""The core without any clock: events and `now` in, actions out, driven by hand."""

from __future__ import annotations

import pytest

from tropical.core import ClusterCore, Placed, RequestState, RouterWake, StepScheduled, TransferStarted, WorkerWake
from tropical.core.worker import WorkerState
from tropical.experiments import SETTINGS, Replay, workload
from tropical.latency.model import LatencyModel
from tropical.policies import Role, make_policy
from tropical.simulator import Simulation

# prefill: 10 ms + 1 ms per token; decode: 10 ms + 1 ms per sequence + 20 µs per KV token
MODEL = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.00002)


def request(i: int, arrival: float, prompt: int, output: int) -> RequestState:
    return RequestState(i, arrival, prompt, output, ttft_slo=100.0, tpot_slo=1.0)


def test_disaggregated_request_step_by_step() -> None:
    core = ClusterCore(make_policy("distserve", MODEL), (Role.PREFILL, Role.DECODE), 10_000, MODEL)
    job = request(0, 0.0, 100, 3)
    assert core.arrive(job)
    core.settle(0.0)
    placed, step = core.drain()
    assert placed == Placed(worker=0, request=0)  # a live router dispatches it there
    assert step == StepScheduled(worker=0, span_id=1, end=pytest.approx(0.11))
    assert core.views(0.05)[0].in_step == ((0, 100),)

    assert core.step_ended(0, 1, 0.11)
    assert job.first_token == 0.11 and job.generated == 1
    [transfer] = core.drain()
    assert transfer == TransferStarted(request=0, source=0, target=1, kv_tokens=100)
    assert core.views(0.11)[1].kv_used == 100  # the receiver reserved room before the KV moves

    core.kv_arrived(job, 0, 1, 0.2)
    core.settle(0.2)
    actions = core.drain()
    assert core.workers[0].kv_static == 0  # the sender's copy is freed
    assert [type(a) for a in actions] == [StepScheduled]
    decode = actions[0]
    assert isinstance(decode, StepScheduled) and decode.worker == 1
    # two decode steps of one sequence in one span: 101 then 102 KV tokens
    assert decode.end == pytest.approx(0.2 + (0.011 + 0.00002 * 101) + (0.011 + 0.00002 * 102))
    assert core.step_ended(1, decode.span_id, decode.end)
    assert job.finish == decode.end and job.generated == 3
    assert core.views(decode.end)[1].kv_used == 0


def test_a_placement_mid_span_cuts_it_at_the_next_step_boundary() -> None:
    core = ClusterCore(make_policy("vllm", MODEL), (Role.COLOCATED,), 10_000, MODEL)
    first = request(0, 0.0, 10, 50)
    core.arrive(first)
    core.settle(0.0)
    _, prefill = core.drain()
    assert isinstance(prefill, StepScheduled)
    core.step_ended(0, prefill.span_id, prefill.end)
    core.settle(prefill.end)
    [span] = core.drain()
    assert isinstance(span, StepScheduled) and span.end > prefill.end + 0.3  # a long span of decode steps
    second = request(1, prefill.end + 0.05, 10, 5)
    core.arrive(second)
    core.settle(second.arrival)
    placed, cut = core.drain()
    assert placed == Placed(worker=0, request=1)
    assert isinstance(cut, StepScheduled) and cut.span_id == span.span_id + 1
    assert second.arrival <= cut.end < second.arrival + 0.02  # the next boundary, one decode step away at most
    assert not core.step_ended(0, span.span_id, span.end)  # the replaced span's end is ignored


def test_refused_requests_never_reach_the_queue() -> None:
    core = ClusterCore(make_policy("vllm", MODEL), (Role.COLOCATED,), 1_000, MODEL)
    too_big = request(0, 0.0, 900, 200)
    assert not core.arrive(too_big)
    assert too_big.infeasible and too_big.dropped and not core.router.queue


def test_wakes_are_actions() -> None:
    core = ClusterCore(make_policy("unified", MODEL), (Role.MULTIPLEX, Role.MULTIPLEX), 10_000, MODEL)
    for i in range(4):
        core.arrive(request(i, 0.0, 2_000, 20))
    core.settle(0.0)
    kinds = {type(a) for a in core.drain()}
    assert StepScheduled in kinds
    assert kinds <= {Placed, StepScheduled, WorkerWake, RouterWake, TransferStarted}


@pytest.mark.parametrize("policy", ["vllm", "sarathi", "distserve", "tropical", "kairos", "unified"])
def test_closed_form_spans_equal_one_step_at_a_time(policy: str) -> None:
    """The simulator's spans are only a shortcut: live workers step one at a time and must see the same schedule."""
    setting = SETTINGS["chat-13b"]
    load = workload(setting, setting.trace, 12.0, replay=Replay(requests=200), seed=1)
    served = make_policy(policy, setting.latency_model())
    spec = setting.cluster(served, None if policy in ("vllm", "sarathi") else 4)
    spans = Simulation(spec, served).run(load.requests)
    steps = Simulation(spec, served, spans=False).run(load.requests)
    assert steps.spans == steps.steps == spans.steps > spans.spans
    for a, b in zip(spans.timelines, steps.timelines, strict=True):
        assert (a.prefill_worker, a.decode_worker, a.dropped, a.generated) == (b.prefill_worker, b.decode_worker, b.dropped, b.generated)
        assert a.finish == pytest.approx(b.finish, abs=1e-9)
        assert a.first_token == pytest.approx(b.first_token, abs=1e-9)


def test_a_live_router_refuses_what_no_reported_worker_could_serve_in_slo() -> None:
    """`RouterState.drop_infeasible`: the simulator's arrival rule, once workers of both sides have reported."""
    from tropical.core.router import RouterState

    model = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.0)
    router = RouterState(make_policy("distserve", model), [])
    hopeless = RequestState(0, 0.0, 100, 10, ttft_slo=100.0, tpot_slo=1e-9)  # no decode step is that fast
    fine = RequestState(1, 0.0, 100, 10, ttft_slo=100.0, tpot_slo=1.0)
    router.enqueue(hopeless)
    router.enqueue(fine)
    assert router.drop_infeasible([(Role.PREFILL, model, 1000)]) == []  # no decoding worker has reported: no judgement
    assert router.drop_infeasible([(Role.PREFILL, model, 1000), (Role.DECODE, model, 1000)]) == [0]
    assert list(router.queue) == [1] and hopeless.infeasible and hopeless.dropped
    late = RequestState(2, 0.0, 100, 10, ttft_slo=100.0, tpot_slo=1e-9)
    router.enqueue(late)  # judged as it comes, once: the decision after it looks only at what is new
    assert router.drop_infeasible([(Role.PREFILL, model, 1000), (Role.DECODE, model, 1000)]) == [2]
    assert router.drop_infeasible([(Role.PREFILL, model, 1000), (Role.DECODE, model, 1000)]) == []
    assert router.drop_infeasible([(Role.PREFILL, model, 1000), (Role.DECODE, model, 50)]) == [1]  # new kinds: all again


def test_a_handoff_from_a_sender_numbered_like_the_receiver_is_pulled_not_swapped_in() -> None:
    # A live worker numbers its own state 0 whatever its name, so a sender's id may equal the receiver's: only
    # a request this worker swapped out itself comes back from its host memory.
    out: list = []
    worker = WorkerState(0, Role.DECODE, 10_000, MODEL, out)
    job = RequestState(1, 0.0, 100, 5, 1.0, 0.1)
    job.kv = 101
    worker.receive(job, source=0, now=0.0)
    assert out == [TransferStarted(1, 0, 0, 101)] and worker.swap_tokens == 0 and 1 in worker.incoming


def test_a_view_moved_on_within_its_decode_span_is_the_one_made_afresh() -> None:
    """A router asks on every arrival, so a worker moves its last view on a step or two instead of making it again:
    at any time within a span, forward or back, that must be the view made from the worker's state."""
    setting = SETTINGS["chat-13b"]
    load = workload(setting, setting.trace, 14.0, replay=Replay(requests=150), seed=2)
    served = make_policy("unified", setting.latency_model())
    spec = setting.cluster(served, 0)
    compared = 0

    def check(now: float, core: ClusterCore) -> None:
        nonlocal compared
        for worker in core.workers:
            if not (worker.busy and worker.span_decode and worker.span_n > 2):
                continue
            first, last = worker.span_time(1), worker.span_end
            times = [now, first, (first + last) / 2, worker.span_time(2), last - 1e-9, last, last + 0.5, first - 1e-9]
            for t in times + times[::-1]:
                moved = worker.view(t)
                worker.changed()  # forget it: the next view is made afresh
                assert moved == worker.view(t), (worker.id, t)
                compared += 1

    plain = Simulation(spec, served).run(load.requests)
    checked = Simulation(spec, served, observe=check).run(load.requests)
    assert compared > 1000
    assert checked.timelines == plain.timelines  # asking about other times changes nothing the workers do
