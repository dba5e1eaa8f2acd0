"""Policy decisions on small hand-computed cases."""

from __future__ import annotations

import itertools
import random

import pytest

from tropical.latency.model import LatencyModel
from tropical.policies import (
    Admission,
    AllowedStep,
    BatchSummary,
    DecodeBatcher,
    Job,
    LeastLoadedRouter,
    MultiplexingToggle,
    PrefillMode,
    PrefillOrder,
    PrefillPlanner,
    RequestView,
    Role,
    UrgencyRouter,
    WorkerView,
    make_policy,
    max_chunk,
    moore_hodgson,
    urgency_order,
)
from tropical.policies.records import EMPTY_BATCH

# prefill: 10 ms + 1 ms per token; decode: 10 ms + 1 ms per sequence + 20 µs per KV token
MODEL = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.00002)


def request(id: int, prompt: int, *, arrival: float = 0.0, ttft: float = 10.0, tpot: float = 0.1, prefilled: int = 0,
            generated: int = 0, first_token: float | None = None) -> RequestView:
    return RequestView(id, arrival, prompt, ttft, tpot, prefilled, generated, first_token)


def worker(id: int = 0, role: Role = Role.MULTIPLEX, *, prefills: tuple[RequestView, ...] = (), batch: BatchSummary = EMPTY_BATCH,
           waiting: tuple[RequestView, ...] = (), incoming: tuple[RequestView, ...] = (), busy: bool = False,
           step_begin: float = 0.0, step_end: float = 0.0, placed: int = 0, kv_capacity: int = 100_000, kv_used: int = 0,
           decode_load: int | None = None) -> WorkerView:
    load = sum(r.prompt_tokens for r in waiting + incoming) + batch.prompt_tokens
    return WorkerView(
        id=id, role=role, kv_capacity=kv_capacity, kv_used=kv_used, busy=busy, step_begin=step_begin, step_end=step_end,
        placed_since_step=placed, prefills=prefills, prefill_load=sum(r.remaining_prefill for r in prefills), batch=batch,
        waiting=waiting, incoming=incoming, decode_load=load if decode_load is None else decode_load,
    )


# --- Moore–Hodgson -----------------------------------------------------------------------


def test_moore_hodgson_textbook_instance() -> None:
    # Pinedo, Scheduling (1||ΣU_j example): p = 7, 8, 4, 6, 6; d = 9, 17, 18, 19, 21.
    # EDF adds 1 (C=7), 2 (C=15), 3 (C=19 > 18: drop 2, C=11), 4 (C=17), 5 (C=23 > 21: drop 1, C=16).
    jobs = [Job(1, 7, 9), Job(2, 8, 17), Job(3, 4, 18), Job(4, 6, 19), Job(5, 6, 21)]
    on_time, late = moore_hodgson(jobs, start=0.0)
    assert [j.id for j in on_time] == [3, 4, 5]
    assert [j.id for j in late] == [1, 2]


def test_moore_hodgson_is_optimal_against_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(200):
        jobs = [Job(i, rng.randint(1, 9), rng.randint(1, 30)) for i in range(rng.randint(1, 7))]
        on_time, late = moore_hodgson(jobs, start=0.0)
        finish = 0.0
        for job in on_time:  # the kept set really is on time in the returned order
            finish += job.duration
            assert finish <= job.deadline
        best = 0
        for size in range(len(jobs), 0, -1):
            for subset in itertools.combinations(jobs, size):
                t, ok = 0.0, True
                for job in sorted(subset, key=lambda j: j.deadline):
                    t += job.duration
                    ok &= t <= job.deadline
                if ok:
                    best = size
                    break
            if best:
                break
        assert len(on_time) == best
        assert sorted(j.id for j in on_time + late) == sorted(j.id for j in jobs)


def test_urgency_order_puts_hopeless_requests_last() -> None:
    # prefill of 990 tokens takes 1.0 s; a deadline 0.5 s away cannot be met by any order
    hopeless = request(1, 990, ttft=0.5)
    late_deadline = request(2, 90, ttft=5.0)  # 0.1 s of work
    urgent = request(3, 190, ttft=1.0)  # 0.2 s of work
    order = urgency_order([hopeless, late_deadline, urgent], MODEL, now=0.0)
    assert [r.id for r in order] == [3, 2, 1]


def test_prefill_planner_orders_and_batches() -> None:
    queue = (request(1, 300, arrival=0.0), request(2, 100, arrival=1.0), request(3, 200, arrival=2.0))
    sjf = PrefillPlanner(MODEL, order=PrefillOrder.SJF, max_batch=1).plan(worker(role=Role.PREFILL, prefills=queue), 3.0)
    assert sjf.chunks == ((2, 100),)
    fcfs = PrefillPlanner(MODEL, order=PrefillOrder.FCFS, batch_tokens=450, max_batch=8).plan(worker(role=Role.PREFILL, prefills=queue), 3.0)
    assert fcfs.chunks == ((1, 300), (2, 100))  # 300 + 100 fit 450, the next 200 does not
    started = queue + (request(4, 900, prefilled=400),)
    assert PrefillPlanner(MODEL, order=PrefillOrder.SJF, chunk_tokens=256).plan(worker(role=Role.PREFILL, prefills=started), 3.0).chunks == ((4, 256),)


def test_prefill_planner_respects_kv() -> None:
    queue = (request(1, 600),)
    assert PrefillPlanner(MODEL).plan(worker(role=Role.PREFILL, prefills=queue, kv_capacity=1000, kv_used=500), 0.0).idle


# --- Tropical's dispatcher -----------------------------------------------------------------

TOGGLE = MultiplexingToggle(MODEL)


def decoding_worker(reserve: float, *, prefills: tuple[RequestView, ...] = (), size: int = 4, context: int = 4000) -> WorkerView:
    batch = BatchSummary(size=size, context_tokens=context, prompt_tokens=context, next_token_deadline=reserve + 0.1,
                         reserve_deadline=reserve, tpot_slo=0.1)
    return worker(prefills=prefills, batch=batch)


def test_short_prompts_always_inline() -> None:
    busy = decoding_worker(reserve=0.0, prefills=(request(9, 3000),))  # no slack at all, a prefill pending
    assert TOGGLE.inlinable(request(1, 511), busy, now=5.0)
    assert not TOGGLE.inlinable(request(1, 512), busy, now=5.0)


def test_inline_slack_boundary() -> None:
    # prefill of 600 tokens: 10 ms + 600 ms = 0.61 s; every decode must keep one TPOT banked after it:
    # inlinable iff now + 0.61 <= reserve deadline (0.9 s), i.e. now <= 0.29 s
    w = decoding_worker(reserve=0.9)
    assert TOGGLE.inlinable(request(1, 600), w, now=0.29)
    assert not TOGGLE.inlinable(request(1, 600), w, now=0.2901)


def test_inline_counts_waiting_and_incoming_decodes() -> None:
    # a handed-over decode with first token at 0.0 and one token: deadline 0.1, reserve 0.0
    arriving = request(7, 100, generated=1, first_token=0.0)
    w = worker(batch=BatchSummary(), incoming=(arriving,))
    assert not TOGGLE.inlinable(request(1, 600), w, now=0.0)
    assert TOGGLE.inlinable(request(1, 600), worker(batch=BatchSummary()), now=0.0)


def test_inline_watermarks() -> None:
    heavy = decoding_worker(reserve=100.0, size=4, context=45_000)  # step 10 + 4 + 900 ms = 0.914 s > 0.85 s
    assert not TOGGLE.inlinable(request(1, 600), heavy, now=0.0)
    assert TOGGLE.inlinable(request(1, 600), decoding_worker(reserve=100.0, size=4, context=40_000), now=0.0)  # 0.814 s
    crowded = worker(batch=BatchSummary(size=1, context_tokens=10, reserve_deadline=100.0), decode_load=400_001)
    assert not TOGGLE.inlinable(request(1, 600), crowded, now=0.0)


def test_clockwork_check_boundary() -> None:
    # Busy prefill worker: step began at 0, ends at 0.5; it holds q (490 tokens → 0.5 s, deadline 3.0).
    # Reported slacks: q: 3.0 − 0 − 0.5 = 2.5; new r (990 tokens → 1.0 s): d_r − 0.5 − 1.0.
    # SJF: q at offset 0, r at 1.02·0.5 = 0.51; at now = 0.1: r fits iff d_r − 1.5 − 0.51 − 0.1 > 0, d_r > 2.11.
    held = (request(5, 490, ttft=3.0),)
    w = worker(role=Role.PREFILL, prefills=held, busy=True, step_begin=0.0, step_end=0.5)
    assert TOGGLE.clockwork_feasible(request(1, 990, ttft=2.12), w, now=0.1)
    assert not TOGGLE.clockwork_feasible(request(1, 990, ttft=2.10), w, now=0.1)
    assert TOGGLE.clockwork_feasible(request(1, 990, ttft=0.01), worker(role=Role.PREFILL), now=0.1)  # idle: always


def test_toggle_tries_multiplexing_first_then_prefill_then_waits() -> None:
    prefill = worker(0, Role.PREFILL)
    busy_prefill = worker(0, Role.PREFILL, prefills=(request(5, 4990, ttft=5.1),), busy=True, step_end=5.0)
    roomy = worker(1, Role.MULTIPLEX)
    tight = decoding_worker(reserve=0.0)
    tight = WorkerView(**{**{f: getattr(tight, f) for f in tight.__slots__}, "id": 1})
    r = request(1, 1000, ttft=3.0)
    assert TOGGLE.place([r], [prefill, roomy], 0.0).placements[0].worker_id == 1
    assert TOGGLE.place([r], [prefill, tight], 0.0).placements[0].worker_id == 0
    assert TOGGLE.place([r], [busy_prefill, tight], 0.0).placements == ()


def test_toggle_serves_the_shortest_first_and_never_overtakes_a_blocked_head() -> None:
    prefill = worker(0, Role.PREFILL)
    tight = WorkerView(**{**{f: getattr(decoding_worker(reserve=0.0), f) for f in WorkerView.__slots__}, "id": 1})
    long_, short = request(1, 3000, ttft=100.0), request(2, 1000, ttft=100.0)
    decision = TOGGLE.place([long_, short], [prefill, tight], 0.0)
    assert [p.request_id for p in decision.placements] == [2]  # the idle prefill worker takes one dispatch per step


def test_toggle_spreads_short_prompts_and_keeps_them_off_workers_with_a_prompt_pending() -> None:
    # Short prompts skip every check, so where they land is all that protects their TTFT: a worker already
    # holding a prompt would make them wait for its stall, and one call's shorts must not all pile on one worker.
    pending = worker(0, prefills=(request(9, 4000),), decode_load=0)
    light, heavier = worker(1, decode_load=1000), worker(2, decode_load=1200)
    shorts = [request(i, 300) for i in range(1, 4)]
    decision = TOGGLE.place(shorts, [pending, light, heavier], 0.0)
    assert [p.worker_id for p in decision.placements] == [1, 2, 1]  # worker 1 holds 300 prompt tokens after the first


def test_toggle_without_multiplexing_never_inlines() -> None:
    off = MultiplexingToggle(MODEL, multiplexing=False)
    assert off.place([request(1, 100)], [worker(1, Role.MULTIPLEX)], 0.0).placements == ()


# --- decode batching -----------------------------------------------------------------------


def running(size: int = 2, context: int = 2000, *, deadline: float = 10.0) -> BatchSummary:
    return BatchSummary(size=size, context_tokens=context, prompt_tokens=context, next_token_deadline=deadline,
                        reserve_deadline=deadline - 0.1, tpot_slo=0.1)


def test_slack_admission_boundary_and_shortest_first() -> None:
    # with 2 running (2000 KV tokens): adding 1000 → 10 + 3 + 60 ms = 0.073 s <= 0.1; adding 2400 → 0.101 s > 0.1
    kairos = DecodeBatcher(MODEL, admission=Admission.SLACK, allowed_step=AllowedStep.TPOT)
    short = request(1, 999, generated=1, first_token=0.0)
    long_ = request(2, 2399, generated=1, first_token=0.0)
    plan = kairos.plan(worker(batch=running(), waiting=(long_, short)), now=1.0)
    assert plan.admit == (1,) and plan.decode
    assert kairos.plan(worker(batch=running(), waiting=(long_,)), now=1.0).admit == ()
    # an empty batch always admits its shortest waiting decode, whatever the step
    assert kairos.plan(worker(waiting=(request(3, 90_000, generated=1, first_token=0.0),)), now=1.0).admit == (3,)


def test_banked_admission_uses_the_tightest_banked_deadline() -> None:
    banked = DecodeBatcher(MODEL, admission=Admission.SLACK, allowed_step=AllowedStep.BANKED)
    long_ = request(2, 2399, generated=1, first_token=1.0)  # its own deadline: 1.1
    assert banked.plan(worker(batch=running(deadline=1.15), waiting=(long_,)), now=0.9).admit == (2,)  # 0.101 <= 0.2
    assert banked.plan(worker(batch=running(deadline=1.0), waiting=(long_,)), now=0.9).admit == ()  # 0.101 > 0.1


def test_prefill_first_stalls_the_batch() -> None:
    vllm = DecodeBatcher(MODEL, prefill_mode=PrefillMode.FIRST, token_budget=1000)
    prompts = (request(1, 600), request(2, 300), request(3, 200))
    plan = vllm.plan(worker(role=Role.COLOCATED, batch=running(), prefills=prompts), 0.0)
    assert plan.chunks == ((1, 600), (2, 300)) and not plan.decode
    assert vllm.plan(worker(role=Role.COLOCATED, batch=running()), 0.0).decode


def test_stall_free_chunks_fill_the_token_budget() -> None:
    sarathi = DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, token_budget=512)
    prompts = (request(1, 400, prefilled=100), request(2, 1000))
    plan = sarathi.plan(worker(role=Role.COLOCATED, batch=running(size=10, context=5000), prefills=prompts), 0.0)
    assert plan.decode and plan.chunks == ((1, 300), (2, 202))  # 512 − 10 decodes = 502 prompt tokens


def test_slo_sized_chunks_fit_the_allowed_step() -> None:
    # decode of 2 × 2000 tokens: 10 + 2 + 40 ms = 0.052 s; banked deadline 0.1 s away leaves 0.048 s = 48 tokens
    ours = DecodeBatcher(MODEL, prefill_mode=PrefillMode.CHUNKED, allowed_step=AllowedStep.BANKED, slo_chunks=True)
    plan = ours.plan(worker(batch=running(deadline=1.1), prefills=(request(1, 1000),)), now=1.0)
    assert plan.chunks == ((1, 48),)


def test_max_chunk_solves_the_quadratic() -> None:
    assert max_chunk(MODEL, 0, 0.05) == 50
    quadratic = LatencyModel(c0=1e-6, c1=0.0, c2=0.0, d0=0.0, d1=0.0, d2=0.0)
    # tokens [100, 100 + c) cost 1e-6·((100 + c)² − 100²); room 0.03 → (100 + c)² <= 40000 → c = 100
    assert max_chunk(quadratic, 100, 0.03) == 100
    assert max_chunk(MODEL, 0, -1.0) == 0


# --- routers and composition ---------------------------------------------------------------


def test_least_loaded_router_balances_within_one_call() -> None:
    workers = [worker(0, Role.PREFILL, prefills=(request(9, 500),)), worker(1, Role.PREFILL)]
    decision = LeastLoadedRouter(Role.PREFILL).place([request(1, 300), request(2, 300), request(3, 100)], workers, 0.0)
    # loads 500 | 0 → r1 to 1 (500 | 300) → r2 to 1 (500 | 600) → r3 to 0
    assert [(p.request_id, p.worker_id) for p in decision.placements] == [(1, 1), (2, 1), (3, 0)]


def test_urgency_router_hands_work_only_to_free_prefill_workers() -> None:
    router = UrgencyRouter(MODEL, batch_tokens=500)
    busy = worker(0, Role.PREFILL, prefills=(request(9, 500),), busy=True, step_end=0.5)
    free = worker(1, Role.PREFILL)
    queue = [request(1, 300, ttft=9.0), request(2, 300, ttft=1.0), request(3, 100, ttft=5.0)]
    decision = router.place(queue, [busy, free], 0.0)
    # earliest deadline first: r2 (300 of 500 tokens), then r3 (100) fits, r1 (300) does not
    assert [(p.request_id, p.worker_id) for p in decision.placements] == [(2, 1), (3, 1)]
    assert router.place(queue, [busy], 0.0).placements == ()


def test_make_policy_layouts_and_options() -> None:
    assert make_policy("vllm", MODEL).roles(3) == (Role.COLOCATED,) * 3
    assert make_policy("tropical", MODEL).roles(4, 1) == (Role.PREFILL, Role.MULTIPLEX, Role.MULTIPLEX, Role.MULTIPLEX)
    assert make_policy("kairos", MODEL).roles(2) == (Role.PREFILL, Role.DECODE)
    assert make_policy("unified", MODEL).roles(2, 0) == (Role.MULTIPLEX, Role.MULTIPLEX)
    with pytest.raises(ValueError):
        make_policy("tropical", MODEL).roles(2, 0)
    assert make_policy("sarathi", MODEL, token_budget=2048).batcher.token_budget == 2048
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("orca", MODEL)
    with pytest.raises(ValueError, match="no option"):
        make_policy("vllm", MODEL, warp_speed=9)
    with pytest.raises(ValueError, match="no option 'router.token_budget'"):
        make_policy("vllm", MODEL, **{"router.token_budget": 9})


def test_an_option_reaches_only_the_part_it_names() -> None:
    """The router's queue order and the prefill workers' are two options: naming one leaves the other."""
    base = make_policy("unified", MODEL)
    fcfs_router = make_policy("unified", MODEL, **{"router.order": PrefillOrder.FCFS})
    assert fcfs_router.router.order is PrefillOrder.FCFS and fcfs_router.prefill == base.prefill
    fcfs_workers = make_policy("unified", MODEL, **{"prefill.order": PrefillOrder.FCFS})
    assert fcfs_workers.prefill.order is PrefillOrder.FCFS and fcfs_workers.router == base.router
    with pytest.raises(ValueError, match="give router.order or prefill.order"):
        make_policy("unified", MODEL, order=PrefillOrder.FCFS)  # two parts have it: which one is meant is not guessed
    assert make_policy("unified", MODEL, drop_hopeless=False).router.drop_hopeless is False  # one part has it: no name needed
    kept = make_policy("unified", MODEL, **{"batcher.min_chunk": 96, "router.min_chunk": 32})  # a copy named itself stays its own
    assert (kept.batcher.min_chunk, kept.router.min_chunk) == (96, 32)
