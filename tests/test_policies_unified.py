"""Our combined policy's pieces on hand-computed cases: pacing, inline prediction, placement, routing."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import pytest

from tropical.experiments import SETTINGS, Replay, workload
from tropical.latency.model import LatencyModel
from tropical.policies import (
    Admission,
    PrefillPlanner,
    AllowedStep,
    BatchSummary,
    DecodeBatcher,
    PrefillMode,
    RequestView,
    Role,
    RouterDecision,
    WorkerView,
)
from tropical.policies.prefill_queue import urgency_order, urgent_first
from tropical.policies.records import EMPTY_BATCH
from tropical.policies.serving import ServingPolicy
from tropical.policies.inline_index import InlineIndex
from tropical.policies.unified import SlackAwareRouter, prompt_work
from tropical.simulator import Simulation

# prefill: 10 ms + 1 ms per token; decode: 10 ms + 1 ms per sequence + 20 µs per KV token
MODEL = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.00002)


def request(id: int, prompt: int, *, arrival: float = 0.0, ttft: float = 10.0, tpot: float = 0.1, generated: int = 0,
            first_token: float | None = None, prefilled: int = 0) -> RequestView:
    return RequestView(id, arrival, prompt, ttft, tpot, prefilled, generated, first_token)


def worker(id: int, role: Role, *, prefills: tuple[RequestView, ...] = (), batch: BatchSummary = EMPTY_BATCH, busy: bool = False,
           step_end: float = 0.0, waiting: tuple[RequestView, ...] = (), incoming: tuple[RequestView, ...] = (),
           kv_capacity: int = 100_000, kv_used: int = 0, in_step: tuple[tuple[int, int], ...] = ()) -> WorkerView:
    return WorkerView(
        id=id, role=role, kv_capacity=kv_capacity, kv_used=kv_used, busy=busy, step_begin=0.0, step_end=step_end,
        placed_since_step=0, prefills=prefills, prefill_load=sum(r.remaining_prefill for r in prefills), batch=batch,
        waiting=waiting, incoming=incoming, decode_load=batch.prompt_tokens, in_step=in_step,
    )


def batch(size: int, context: int, *, deadline: float, on_time: float | None = None) -> BatchSummary:
    return BatchSummary(size=size, context_tokens=context, prompt_tokens=context, next_token_deadline=deadline,
                        reserve_deadline=deadline - 0.1, tpot_slo=0.1, on_time_deadline=deadline if on_time is None else on_time)


# --- pacing of banked slack ------------------------------------------------------------------


def test_pacing_spends_surplus_and_repays_deficits_slowly() -> None:
    paced = DecodeBatcher(MODEL, allowed_step=AllowedStep.BANKED, bank_steps=1.0, repay_steps=64.0)
    assert paced._paced(1.3, 0.1, now=1.0) == pytest.approx(1.3)  # 0.2 s banked beyond one TPOT: all of it may go
    assert DecodeBatcher(MODEL, allowed_step=AllowedStep.BANKED, reserve_tpots=1.0)._paced(1.3, 0.1, now=1.0) == pytest.approx(1.2)
    assert DecodeBatcher(MODEL, allowed_step=AllowedStep.BANKED, bank_steps=4.0)._paced(1.3, 0.1, now=1.0) == pytest.approx(1.15)
    # 50 ms behind: the next step may take one TPOT less 1/64 of the deficit
    assert paced._paced(1.05, 0.1, now=1.0) == pytest.approx(1.1 - 0.05 / 64)


def test_decodes_that_missed_ttft_do_not_limit_the_step() -> None:
    # the batch's tightest deadline belongs to a request that missed TTFT; on-time ones have 1 s banked
    running = batch(2, 2000, deadline=1.0, on_time=2.0)
    late = DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED,
                         slo_chunks=True, protect_late=False)
    careful = DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED,
                            slo_chunks=True, protect_late=True)
    w = worker(0, Role.MULTIPLEX, prefills=(request(1, 2000),), batch=running)
    # decode step: 10 + 2 + 40 ms = 0.052 s. protect_late=False: limit 2.0 → room 0.948 s → 948 tokens;
    # protect_late=True: the late decode's deadline 1.0 is already past: one TPOT less 1/64 of 0.1 s of deficit
    assert late.plan(w, now=1.0).chunks == ((1, 948),)
    assert careful.plan(w, now=1.0).chunks == ((1, int((0.1 - 0.1 / 64 - 0.052) * 1000)),)


def test_starved_waiting_decodes_are_abandoned_once_far_behind() -> None:
    batcher = DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED,
                            slo_chunks=True, protect_late=False, abandon_after=60.0)
    running = batch(2, 2000, deadline=200.0)
    # each has one token out; the next is due one TPOT (0.1 s) after the first
    stuck = request(1, 100, generated=1, first_token=0.5)  # due at 0.6: 99.4 s behind at t=100
    recent = request(2, 100, arrival=98.0, generated=1, first_token=98.9)  # 1 s behind: its pacing still lets it join
    nearly = request(3, 100, arrival=35.0, generated=1, first_token=41.0)  # 58.9 s behind: stuck, not yet given up
    late = request(4, 100, generated=1, first_token=20.0)  # missed its TTFT: a miss whatever happens, never constrains
    plan = batcher.plan(worker(0, Role.MULTIPLEX, batch=running, waiting=(stuck, recent, nearly, late)), now=100.0)
    assert plan.abandon == (1,)
    assert 1 not in plan.admit and {2, 4} <= set(plan.admit) and 3 not in plan.admit
    # an empty batch takes whatever waits; with no abandon_after nothing is ever given up
    alone = batcher.plan(worker(0, Role.MULTIPLEX, waiting=(stuck,)), now=100.0)
    assert alone.abandon == () and alone.admit == (1,)
    keep = DecodeBatcher(MODEL, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED, protect_late=False)
    assert keep.plan(worker(0, Role.MULTIPLEX, batch=running, waiting=(stuck,)), now=100.0).abandon == ()


def test_prompts_that_can_no_longer_meet_their_ttft_are_abandoned() -> None:
    # prefill: 10 ms + 1 ms per token; deadlines at arrival + ttft
    fine = request(1, 500, ttft=1.0)  # 0.51 s alone: due at 1.0, fits from t=0.4
    hopeless = request(2, 500, ttft=0.8)  # needs until 0.91: misses from t=0.4
    started = request(3, 1000, ttft=1.2, prefilled=500)  # its remaining 500 tokens end at 0.91, due at 1.2
    behind = request(4, 1000, ttft=0.85, prefilled=600)  # remaining 400: ends at 0.81, due at 0.85: still in time
    lost = request(5, 1000, ttft=0.8, prefilled=500)  # remaining 500: ends at 0.91, due at 0.8
    recompute = request(6, 300, ttft=0.1, generated=4, first_token=0.05)  # a preempted decode: never abandoned
    w = worker(0, Role.MULTIPLEX, prefills=(fine, hopeless, started, behind, lost, recompute))
    batcher = DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED,
                            slo_chunks=True, abandon_hopeless=True)
    plan = batcher.plan(w, now=0.4)
    assert set(plan.abandon) == {2, 5}
    assert not {2, 5} & {request_id for request_id, _ in plan.chunks}
    planner = PrefillPlanner(MODEL, max_batch=8, batch_tokens=10_000, abandon_hopeless=True)
    planned = planner.plan(replace(w, role=Role.PREFILL), now=0.4)
    assert set(planned.abandon) == {2, 5} and {1, 3, 4, 6} <= {request_id for request_id, _ in planned.chunks}
    # off by default, and nothing to give up at t=0
    assert PrefillPlanner(MODEL, max_batch=8, batch_tokens=10_000).plan(replace(w, role=Role.PREFILL), now=0.4).abandon == ()
    assert batcher.plan(w, now=0.0).abandon == ()


# --- ordering ------------------------------------------------------------------------------------


def test_urgent_first_runs_recomputes_then_urgency_then_hopeless() -> None:
    recompute = request(1, 500, generated=30, first_token=0.0)
    hopeless = request(2, 990, ttft=0.5)  # 1 s of prefill for a 0.5 s deadline
    far = request(3, 100, ttft=9.0)
    near = request(4, 100, ttft=2.0, prefilled=50)
    assert [r.id for r in urgent_first([hopeless, far, near, recompute], MODEL, now=0.0)] == [1, 4, 3, 2]


# --- inline prediction -----------------------------------------------------------------------------


def test_prompt_work_leaves_out_the_step_cost() -> None:
    assert prompt_work(MODEL, request(1, 500, prefilled=100)) == pytest.approx(0.4)


def test_inline_time_spends_the_bank_then_rides_at_one_tpot() -> None:
    router = SlackAwareRouter(MODEL, min_chunk=16)  # 16 ms: below the 48 ms a step leaves
    assert router.inline_time(worker(0, Role.MULTIPLEX), 0.5, now=0.0) == pytest.approx(0.51)  # no decodes: a plain prefill
    # decode step 0.052 s; on-time deadline 0.4 s: surplus 0.4 − 0.1 = 0.3 → first step carries 0.1 + 0.3 − 0.052 = 0.348 s
    # of prompt work; the remaining 0.152 s goes 0.048 s per 0.1 s step
    # of prompt work; the remaining 0.152 s goes 0.048 s per 0.1 s step: three whole steps, then one of 0.052 + 0.008 s,
    # at whose end the first token comes out
    w = worker(0, Role.MULTIPLEX, batch=batch(2, 2000, deadline=0.4))
    assert router.inline_time(w, 0.5, now=0.0) == pytest.approx(0.348 + 0.052 + 3 * 0.1 + 0.052 + 0.008)
    assert router.inline_time(w, 0.3, now=0.0) == pytest.approx(0.3 + 0.052)  # within the first step


def test_no_chunk_lengthens_a_step_past_the_deadline_of_a_prompt_it_completes() -> None:
    # decode step 0.052 s, 0.348 s of room; the urgent prompt's 0.1 s ends at 0.152, due at 0.2
    urgent, patient = request(1, 100, ttft=0.2), request(2, 1000, ttft=5.0)
    w = worker(0, Role.MULTIPLEX, prefills=(urgent, patient), batch=batch(2, 2000, deadline=0.4))
    packing = DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED,
                            slo_chunks=True, urgent_prompt_first=True, protect_late=False)
    assert packing.plan(w, now=0.0).chunks == ((1, 100), (2, 248))  # the step ends at 0.4: the urgent prompt's token is late
    on_time = replace(packing, finish_on_time=True)
    assert on_time.plan(w, now=0.0).chunks == ((1, 100), (2, 48))  # cut to end at 0.2
    assert replace(on_time, finish_margin=0.02).plan(w, now=0.0).chunks == ((1, 100), (2, 28))  # live: to end 20 ms before it


# --- placement ---------------------------------------------------------------------------------------


def test_prefers_a_prefill_worker_that_meets_the_deadline() -> None:
    router = SlackAwareRouter(MODEL)
    prefill = worker(0, Role.PREFILL)
    roomy = worker(1, Role.MULTIPLEX)
    r = request(1, 490, ttft=2.0)  # 0.5 s alone
    assert [(p.request_id, p.worker_id) for p in router.place([r], [prefill, roomy], 0.0).placements] == [(1, 0)]
    eager = SlackAwareRouter(MODEL, prefer_prefill_workers=False)  # then the earliest finish wins: a tie, the first worker
    assert eager.place([r], [prefill, roomy], 0.0).placements[0].worker_id == 0
    running = request(9, 1990, ttft=3.0)
    busy = worker(0, Role.PREFILL, prefills=(running,), busy=True, step_end=2.0, in_step=((9, 1990),))  # 2 s step in progress
    assert router.place([r], [busy, roomy], 0.0).placements[0].worker_id == 1  # 0.5 s inline beats 2.5 s > 2.0 deadline


def test_no_prompt_inline_where_a_waiting_decode_is_behind() -> None:
    router = SlackAwareRouter(MODEL)
    r = request(1, 90, ttft=2.0)
    on_time = request(8, 100, arrival=0.0, generated=1, first_token=0.95)  # next token due at 1.05
    behind = request(9, 100, arrival=0.0, generated=1, first_token=0.5)  # next token was due at 0.6
    assert router.place([r], [worker(0, Role.MULTIPLEX, waiting=(on_time,))], 1.0).placements[0].worker_id == 0
    assert router.place([r], [worker(0, Role.MULTIPLEX, waiting=(behind,))], 1.0).drops == (1,)  # nowhere else to go
    both = [worker(0, Role.MULTIPLEX, waiting=(behind,)), worker(1, Role.MULTIPLEX, waiting=(on_time,))]
    assert router.place([r], both, 1.0).placements[0].worker_id == 1
    lenient = SlackAwareRouter(MODEL, protect_waiting=False)
    assert lenient.place([r], [worker(0, Role.MULTIPLEX, waiting=(behind,))], 1.0).placements[0].worker_id == 0


def test_counts_the_prompt_in_progress_once() -> None:
    router = SlackAwareRouter(MODEL)
    running = request(9, 990, ttft=5.0)  # its 1 s step began at 0 and ends at 1.0
    r = request(1, 490, ttft=2.0)
    begun = worker(0, Role.PREFILL, prefills=(running,), busy=True, step_end=1.0, in_step=((9, 990),))
    assert router.predict(r, begun, [running], now=0.5) == (pytest.approx(1.5), 0)  # after the step, not after it twice
    assert router.place([r], [begun], 0.5).placements[0].worker_id == 0
    chunked = worker(0, Role.PREFILL, prefills=(running,), busy=True, step_end=0.5, in_step=((9, 490),))  # 500 tokens left after it
    assert router.predict(r, chunked, [running], now=0.2) == (pytest.approx(0.5 + 0.51 + 0.5), 0)


def test_predicts_the_order_the_worker_will_run() -> None:
    router = SlackAwareRouter(MODEL)
    queued = request(9, 490, ttft=1.0)  # 0.5 s, due at 1.0
    w = worker(0, Role.PREFILL, prefills=(queued,))
    # 0.6 s due at 0.7: first by deadline, but then the queued one ends at 1.1 > 1.0, and Moore–Hodgson keeps
    # the shorter one: the worker would run the queued prompt first and this one late
    urgent = request(1, 590, ttft=0.7)
    assert router.predict(urgent, w, [queued], now=0.0)[0] > urgent.ttft_deadline
    assert router.place([urgent], [w], 0.0).drops == (1,)
    # 0.4 s due at 0.5: it goes first and pushes the longer queued one out of time (1 harmed)
    shorter = request(2, 390, ttft=0.5)
    long_queued = request(8, 690, ttft=1.0)  # 0.7 s
    assert router.predict(shorter, worker(0, Role.PREFILL, prefills=(long_queued,)), [long_queued], now=0.0) == (pytest.approx(0.4), 1)
    relaxed = request(3, 90, ttft=0.5)  # 0.1 s: the queued one still finishes at 0.6
    assert router.predict(relaxed, w, [queued], now=0.0) == (pytest.approx(0.1), 0)
    # a queued prompt that cannot make it whatever happens will be abandoned: it delays nobody
    hopeless = request(7, 990, ttft=0.8)  # 1 s of work due at 0.8
    assert router.predict(relaxed, worker(0, Role.PREFILL, prefills=(hopeless,)), [hopeless], now=0.0) == (pytest.approx(0.1), 0)
    patient = request(4, 490, ttft=3.0)  # due after the queued one: waits for it
    assert router.predict(patient, w, [queued], now=0.0) == (pytest.approx(1.0), 0)


def test_refuses_the_unattainable_and_holds_predicted_misses_for_spare_capacity() -> None:
    router = SlackAwareRouter(MODEL, drop_hopeless=False)
    busy = worker(0, Role.PREFILL, prefills=(request(9, 2990, ttft=9.0),), busy=True, step_end=3.0)
    unattainable = request(1, 990, ttft=0.5)
    predicted_miss = request(2, 490, ttft=2.0)  # alone 0.5 s, but only after 3 s of queued work
    decision = router.place([unattainable, predicted_miss], [busy], 0.0)
    assert decision.drops == (1,) and decision.placements == ()  # the predicted miss waits
    assert SlackAwareRouter(MODEL).place([predicted_miss], [busy], 0.0).drops == (2,)  # the default refuses it
    keep_all = SlackAwareRouter(MODEL, drop_hopeless=False, reject_unattainable=False)
    assert keep_all.place([unattainable], [busy], 0.0) == RouterDecision()  # nowhere spare: it waits
    spare = worker(1, Role.PREFILL)
    assert [(p.request_id, p.worker_id) for p in keep_all.place([unattainable], [busy, spare], 0.0).placements] == [(1, 1)]


# --- the bounded search against every worker -------------------------------------------------


def exhaustive_place(router: SlackAwareRouter, queue: list[RequestView], workers: list[WorkerView], now: float) -> list[tuple[int, int | None]]:
    """Each prompt's worker (None: refused) by predicting it on every worker, as the router's docstring defines the best."""
    held = {w.id: list(w.prefills) for w in workers}
    free = {w.id: w.kv_free - sum(r.prefill_tokens for r in w.prefills if r.prefilled == 0) for w in workers}
    chosen: list[tuple[int, int | None]] = []
    for r in urgency_order(queue, router.model, now, servers=len(workers)):
        best: tuple[tuple[int, bool, float], int] | None = None
        for i, w in enumerate(workers):
            if r.prefill_tokens > free[w.id] and (w.kv_used or held[w.id]):
                continue
            finish, harm = router.predict(r, w, held[w.id], now)
            key = (harm, w.role is not Role.PREFILL and router.prefer_prefill_workers, finish)
            if finish <= r.ttft_deadline and (best is None or (key, i) < best):
                best = (key, i)
        if best is None:
            chosen.append((r.id, None))
            continue
        target = workers[best[1]]
        held[target.id].append(r)
        free[target.id] -= r.prefill_tokens
        chosen.append((r.id, target.id))
    return chosen


BOUNDED = LatencyModel(c0=1e-7, c1=2e-4, c2=0.01, d0=0.015, d1=2e-4, d2=3e-7)


def random_prompt(rng: random.Random, id: int, arrival: float, ttft: tuple[float, ...] = (0.6, 1.5, 4.0)) -> RequestView:
    return request(id, rng.choice([30, 200, 900, 2500]), arrival=arrival, ttft=rng.choice(ttft), tpot=0.1)


def random_worker(rng: random.Random, i: int, now: float, role: Role, *, waiting: bool = False) -> WorkerView:
    """A worker some way into its work: prompts queued (the first perhaps begun), a batch, a step in progress, and
    with `waiting` perhaps a decode waiting to join, behind its budget or not."""
    queued = tuple(random_prompt(rng, 1000 * (i + 1) + k, now - rng.uniform(0.0, 0.5)) for k in range(rng.choice([0, 1, 2, 3, 4])))
    if queued and rng.random() < 0.5:  # the first is being prefilled in chunks
        queued = (replace(queued[0], prefilled=min(queued[0].prompt_tokens - 1, 16)), *queued[1:])
    in_step = ((queued[0].id, min(64, queued[0].remaining_prefill)),) if queued and rng.random() < 0.5 else ()
    busy = rng.random() < 0.8
    size = 0 if role is Role.PREFILL else rng.choice([0, 0, 4, 16, 40])
    deadline = now + rng.uniform(-0.05, 1.0)
    view = worker(i, role, prefills=queued, busy=busy, step_end=now + rng.uniform(0.0, 0.05) if busy else now, in_step=in_step,
                  batch=batch(size, size * rng.randint(200, 1500), deadline=deadline) if size else EMPTY_BATCH)
    if waiting and rng.random() < 0.2:
        decode = request(100_000 * (i + 1), 300, arrival=now - 1.0, generated=3, first_token=now - rng.uniform(0.0, 0.4))
        view = replace(view, waiting=(decode,))
    return view


def random_cluster(rng: random.Random, now: float, *, waiting: bool = False) -> list[WorkerView]:
    return [random_worker(rng, i, now, Role.PREFILL if rng.random() < 0.03 else Role.MULTIPLEX, waiting=waiting) for i in range(rng.randint(1, 32))]


def random_queue(rng: random.Random, now: float, model: LatencyModel) -> list[RequestView]:
    queue = [random_prompt(rng, k, now - rng.uniform(0.0, 0.1), (1.5, 4.0, 8.0)) for k in range(rng.randint(1, 6))]  # mostly due after the queued
    return [r for r in queue if now + model.prefill_time(r.remaining_prefill) <= r.ttft_deadline]  # the unattainable are refused first


@pytest.mark.parametrize("seed", range(200))
def test_the_bounded_search_finds_what_predicting_every_worker_finds(seed: int) -> None:
    rng = random.Random(seed)
    now = 10.0
    router = SlackAwareRouter(BOUNDED, window=1000)
    workers = random_cluster(rng, now)
    queue = random_queue(rng, now, BOUNDED)
    decision = router.place(queue, workers, now)
    placed = {p.request_id: p.worker_id for p in decision.placements}
    assert set(placed) | set(decision.drops) == {r.id for r in queue}
    expected = exhaustive_place(router, queue, workers, now)
    assert [(r, placed.get(r)) for r, _ in expected] == expected


@pytest.mark.parametrize("seed", range(50))
def test_a_router_that_keeps_its_reading_of_the_workers_decides_as_one_reading_them_afresh(seed: int) -> None:
    """Between calls a router keeps what it read of each view; a worker whose view is a new object (it moved on,
    changed its role or its queue) is read again. Every call must decide what a router new to the cluster would."""
    rng = random.Random(seed)
    now = 10.0
    kept = SlackAwareRouter(BOUNDED, window=1000)
    workers = random_cluster(rng, now, waiting=True)
    for _ in range(12):
        queue = random_queue(rng, now, BOUNDED)
        assert kept.place(queue, workers, now) == SlackAwareRouter(BOUNDED, window=1000).place(queue, workers, now)
        now += rng.uniform(0.0, 0.03)
        roles = [Role.PREFILL, Role.MULTIPLEX, Role.DECODE, Role.COLOCATED]

        def moved(w: WorkerView) -> WorkerView:  # a new view, perhaps of a new role
            return random_worker(rng, w.id, now, rng.choice(roles) if rng.random() < 0.2 else w.role, waiting=True)

        workers = [moved(w) if rng.random() < 0.3 else w for w in workers]
        if rng.random() < 0.1:  # the cluster grows or shrinks
            grown = [*workers, random_worker(rng, len(workers), now, Role.MULTIPLEX, waiting=True)]
            workers = workers[:-1] if len(workers) > 1 and rng.random() < 0.5 else grown
    assert kept.place(random_queue(rng, now, BOUNDED), [], now) == RouterDecision()  # every worker gone: nothing kept answers


def test_a_simulation_decides_the_same_with_every_worker_read_afresh_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept reading on the views a simulated cluster really hands its router (most unchanged between calls)."""
    setting = SETTINGS["chat-13b"]
    load = workload(setting, setting.trace, 15.0, replay=Replay(requests=250), seed=3)

    def run() -> tuple[object, ...]:
        from tropical.policies import make_policy

        served = make_policy("unified", setting.latency_model())
        return Simulation(setting.cluster(served, 2), served).run(load.requests).timelines

    kept = run()
    read = InlineIndex.read

    def afresh(index: InlineIndex, workers: Sequence[WorkerView], model: LatencyModel, multiplexing: bool) -> None:
        index.views = ()  # nothing read before: every worker is read again
        read(index, workers, model, multiplexing)

    monkeypatch.setattr(InlineIndex, "read", afresh)
    assert run() == kept


# --- the look-ahead: a decoding worker's own plans -------------------------------------------


def chunked_batcher(**options: object) -> DecodeBatcher:
    return DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED,
                         slo_chunks=True, urgent_prompt_first=True, protect_late=False, finish_on_time=True, **options)  # type: ignore[arg-type]


def test_a_placement_that_would_make_a_placed_prompt_late_is_refused() -> None:
    # no bank: a 0.1 s step carries what its 0.052 s of decodes leave, 48 tokens, then 47 as the decodes' KV grows
    placed = request(9, 96, ttft=0.26)  # alone: 48 + 47 + 1 tokens, out at the third step's end, 0.252
    w = worker(0, Role.MULTIPLEX, prefills=(placed,), batch=batch(2, 2000, deadline=0.1))
    urgent = request(1, 48, ttft=0.15)  # one step, and due first: it would run first and push the placed one past 0.3
    looking = SlackAwareRouter(MODEL, min_chunk=16, lookahead=chunked_batcher())
    assert looking.place([urgent], [w], 0.0).drops == (1,)
    assert replace(looking, keep_promises=False).place([urgent], [w], 0.0).placements[0].worker_id == 0
    patient = request(2, 48, ttft=0.4)  # due after the placed one: it waits for it and comes out at 0.355
    assert looking.place([patient], [w], 0.0).placements[0].worker_id == 0
    assert looking.place([replace(patient, ttft_slo=0.3)], [w], 0.0).drops == (2,)  # too late for it
    doomed = replace(w, prefills=(replace(placed, ttft_slo=0.24),))  # out at 0.252 even alone
    assert looking.place([urgent], [doomed], 0.0).drops == (1,)  # late with it: not asked whether it was late anyway
    assert replace(looking, keep_promises=False).place([urgent], [doomed], 0.0).placements[0].worker_id == 0


def test_the_look_ahead_predicts_what_the_simulated_worker_does() -> None:
    """With no decode ending and nothing arriving after, the look-ahead's first tokens are the simulator's."""
    from tropical.core import ClusterCore
    from tropical.policies.lookahead import first_tokens
    from tropical.simulator import ClusterSpec, SimRequest
    from tropical.simulator.simulation import Simulation

    model = LatencyModel(c0=1e-8, c1=1e-4, c2=0.01, d0=0.015, d1=1e-4, d2=5e-7)
    batcher = DecodeBatcher(model, prefill_mode=PrefillMode.CHUNKED, token_budget=16384, admission=Admission.SLACK,
                            allowed_step=AllowedStep.BANKED, slo_chunks=True, urgent_prompt_first=True, protect_late=False,
                            finish_on_time=True, abandon_hopeless=True, min_chunk=64)
    router = SlackAwareRouter(model, min_chunk=64, lookahead=batcher, reject_unattainable=False, drop_hopeless=False)
    policy = ServingPolicy("lookahead", router, PrefillPlanner(model), batcher, Role.MULTIPLEX, min_prefill_workers=0)
    decodes = [SimRequest(0.05 * i, 500 + 300 * i, 5000, 2.0, 0.05) for i in range(8)]  # long outputs: none ends in the window
    burst = [SimRequest(2.0, tokens, 20, ttft, 0.05) for tokens, ttft in ((900, 1.5), (300, 0.6), (2500, 3.0), (120, 0.4))]
    seen: list[tuple[float, WorkerView]] = []

    def observe(now: float, core: ClusterCore) -> None:
        if now == 2.0 and not seen:
            seen.append((now, core.workers[0].view(now)))

    spec = ClusterSpec((Role.MULTIPLEX,), model, kv_capacity=200_000, kv_bytes_per_token=1, link_bandwidth=1e9)
    result = Simulation(spec, policy, observe=observe).run([*decodes, *burst])
    now, view = seen[0]
    queued = {r.id for r in view.prefills}
    assert {t.id for t in result.timelines if t.arrival == 2.0} <= queued and view.batch.size > 0 and view.busy
    predicted = first_tokens(batcher, model, view, max(now, view.step_end), view.prefills)
    actual = {t.id: t.first_token for t in result.timelines if t.id in queued}
    assert set(predicted) == queued
    for request_id, first in actual.items():
        assert predicted[request_id] == pytest.approx(first, abs=1e-9)


def test_the_router_looks_ahead_with_the_batcher_the_workers_run() -> None:
    from tropical.policies import make_policy

    policy = make_policy("unified", MODEL)
    assert policy.router.lookahead is policy.batcher
    tuned = make_policy("unified", MODEL, **{"batcher.min_chunk": 128})  # the look-ahead, and the router's copy, follow it
    assert tuned.router.lookahead is tuned.batcher and tuned.batcher.min_chunk == tuned.router.min_chunk == 128
    assert make_policy("unified", MODEL, lookahead=None).router.lookahead is None  # the closed form alone


def test_the_live_router_and_its_workers_build_one_policy_with_the_settings_margins() -> None:
    from tropical.live.policy import live_policy
    from tropical.policies import make_policy
    from tropical.settings import Settings

    strict = live_policy("unified", MODEL, Settings(admission_headroom_ms=20.0, dispatch_lead_ms=10.0))
    assert (strict.router.headroom, strict.router.dispatch_lead, strict.batcher.finish_margin) == (0.02, 0.01, 0.02)
    assert strict.router.lookahead is strict.batcher  # the router looks ahead with the margin the workers keep
    assert live_policy("unified", MODEL, Settings()) == make_policy("unified", MODEL)
    assert live_policy("vllm", MODEL, Settings(admission_headroom_ms=20.0)) == make_policy("vllm", MODEL)  # no predicted first tokens


def test_a_decode_whose_tpot_no_step_can_meet_holds_back_no_prompt() -> None:
    """A TPOT below a lone decode step (here 1 ns against 12 ms) misses whatever is done: `unified` lets it go as it
    lets TTFT misses go, so the prompt behind it still gets chunks, and the router still places the next one there."""
    from tropical.policies import make_policy

    policy = make_policy("unified", MODEL)
    hopeless = request(0, 100, tpot=1e-9, generated=1, first_token=1.0, prefilled=100)  # TTFT met, far behind its TPOT
    paced = replace(hopeless, tpot_slo=0.1)  # the same decode with a TPOT it can meet, 0.9 s behind it: it limits the step
    prompt = request(1, 200, arrival=2.0, ttft=10.0)
    chunks = {decode.tpot_slo: policy.plan_step(worker(0, Role.MULTIPLEX, waiting=(decode,), prefills=(prompt,)), 2.0).chunks for decode in (hopeless, paced)}
    assert chunks[1e-9] == ((1, 200),)  # the whole prompt at once: nothing on time to keep on pace
    assert 0 < chunks[0.1][0][1] < 200
    placed = policy.place([request(2, 50, arrival=2.0)], [worker(0, Role.MULTIPLEX, waiting=(hopeless,))], 2.0)
    assert [p.worker_id for p in placed.placements] == [0] and not placed.drops


@pytest.mark.parametrize(
    ("budget", "max_paddings", "batched"),
    [(16384, None, [0, 1, 2]), (16384, 256, [0, 1]), (500, 256, [0])],
)
def test_vllm_of_early_2024_pads_a_prompt_batch_to_its_longest(budget: int, max_paddings: int | None, batched: list[int]) -> None:
    """[100, 300] pads to 2 × 300 (200 pad tokens); adding 120 would pad to 3 × 300 (380); 600 padded tokens pass no 500 budget."""
    batcher = DecodeBatcher(MODEL, prefill_mode=PrefillMode.FIRST, token_budget=budget, max_paddings=max_paddings)
    prompts = (request(0, 100), request(1, 300), request(2, 120))
    plan = batcher.plan(worker(0, Role.COLOCATED, prefills=prompts), 0.0)
    assert [r for r, _ in plan.chunks] == batched
