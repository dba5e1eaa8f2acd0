"""Simulator: hand-computed timelines, closed-form spans against step-by-step arithmetic, invariants."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from tropical.latency.model import LatencyModel
from tropical.metrics import summarize
from tropical.policies import (
    POLICY_NAMES,
    DecodeBatcher,
    Preemption,
    RequestView,
    Role,
    RouterDecision,
    StepPlan,
    WorkerView,
    make_policy,
)
from tropical.core.worker import WorkerState
from tropical.simulator import ClusterSpec, Link, SimRequest, WorkerGroup, simulate

# prefill: 10 ms + 1 ms per token; decode: 10 ms + 1 ms per sequence + 20 µs per KV token
MODEL = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.00002)


def cluster(roles: Sequence[Role], *, kv: int = 100_000) -> ClusterSpec:
    # KV transfer: 1 ms + 1000 bytes per token at 1 MB/s = 1 ms per token
    return ClusterSpec(tuple(roles), MODEL, kv_capacity=kv, kv_bytes_per_token=1000, link_bandwidth=1e6, link_latency=0.001)


def req(arrival: float, prompt: int, output: int, *, ttft: float = 100.0, tpot: float = 1.0) -> SimRequest:
    return SimRequest(arrival, prompt, output, ttft, tpot)


def decode_step(batch: int, context: int) -> float:
    return 0.01 + 0.001 * batch + 0.00002 * context


def test_single_request_colocated() -> None:
    # prefill of 100 tokens: 0.01 + 0.1 = 0.11 s, first token; then two decode steps at 101 and 102 KV tokens
    [t] = simulate([req(0.0, 100, 3)], cluster([Role.COLOCATED]), make_policy("vllm", MODEL)).timelines
    assert t.first_token == pytest.approx(0.11)
    assert t.finish == pytest.approx(0.11 + decode_step(1, 101) + decode_step(1, 102))
    assert t.decode_worker == t.prefill_worker == 0


def test_single_request_disaggregated_pays_the_transfer() -> None:
    # transfer of 100 tokens: 0.001 + 100·1000/1e6 = 0.101 s after the first token
    [t] = simulate([req(0.0, 100, 3)], cluster([Role.PREFILL, Role.DECODE]), make_policy("distserve", MODEL)).timelines
    assert t.first_token == pytest.approx(0.11)
    assert t.kv_ready == pytest.approx(0.211)
    assert t.finish == pytest.approx(0.211 + decode_step(1, 101) + decode_step(1, 102))
    assert (t.prefill_worker, t.decode_worker) == (0, 1)


def test_one_token_output_finishes_at_its_first_token() -> None:
    [t] = simulate([req(0.0, 100, 1)], cluster([Role.PREFILL, Role.DECODE]), make_policy("distserve", MODEL)).timelines
    assert t.finish == t.first_token == pytest.approx(0.11)


def test_closed_form_spans_match_step_by_step_arithmetic() -> None:
    prompts, outputs = [100, 200, 300], [5, 10, 20]
    result = simulate([req(0.0, p, o) for p, o in zip(prompts, outputs)], cluster([Role.COLOCATED]), make_policy("vllm", MODEL))
    # reference: one prefill step of all three (0.01 + 0.6 s), then one decode step at a time
    now = 0.61
    generated = [1, 1, 1]
    finish = [None, None, None]
    while None in finish:
        live = [i for i in range(3) if finish[i] is None]
        now += decode_step(len(live), sum(prompts[i] + generated[i] for i in live))
        for i in live:
            generated[i] += 1
            if generated[i] == outputs[i]:
                finish[i] = now
    assert [t.first_token for t in result.timelines] == pytest.approx([0.61] * 3)
    assert [t.finish for t in result.timelines] == pytest.approx(finish, abs=1e-9)
    assert result.spans < result.steps  # the decode steps were advanced in spans, not one by one


def test_infeasible_requests_are_refused_and_counted_as_misses() -> None:
    requests = [req(0.0, 900, 200), req(0.0, 100, 5)]  # 1100 KV tokens do not fit a 1000-token worker
    result = simulate(requests, cluster([Role.COLOCATED], kv=1000), make_policy("vllm", MODEL))
    refused, served = result.timelines
    assert refused.infeasible and refused.dropped and refused.first_token is None
    assert served.finish is not None
    summary = summarize(result.outcomes())
    assert summary.infeasible == 1 and summary.attainment == 0.5


def test_worker_groups_prefill_and_decode_each_with_their_own_times_and_kv() -> None:
    """A DistServe-style deployment: a fast prefill group (twice MODEL's speed) hands over to a decode group at MODEL's."""
    fast = MODEL.scaled(0.5)
    groups = (WorkerGroup(Role.PREFILL, 1, fast, kv_capacity=1000, tensor_parallel=2), WorkerGroup(Role.DECODE, 1, MODEL, kv_capacity=200))
    spec = ClusterSpec.of_groups(groups, kv_bytes_per_token=1000, link=Link(1e6, 0.001))
    assert spec.roles == (Role.PREFILL, Role.DECODE) and spec.gpus == 3 and spec.model == fast
    fits, too_big = simulate([req(0.0, 100, 3), req(0.0, 150, 60)], spec, make_policy("distserve", fast)).timelines
    assert fits.first_token == pytest.approx(0.055)  # the prefill group's times
    assert fits.finish == pytest.approx(fits.kv_ready + decode_step(1, 101) + decode_step(1, 102))  # the decode group's
    assert too_big.infeasible  # 210 KV tokens fit the prefill worker, not the only decoding one
    with pytest.raises(ValueError, match="do not add up"):
        ClusterSpec((Role.COLOCATED,), MODEL, 100, 1, 1.0, groups=groups)


def test_kv_between_nodes_takes_the_internode_link_at_the_narrower_sides_tp() -> None:
    groups = (WorkerGroup(Role.PREFILL, 1, MODEL, kv_capacity=1000, tensor_parallel=2, node="a"),
              WorkerGroup(Role.DECODE, 1, MODEL, kv_capacity=1000, tensor_parallel=4, node="a"),
              WorkerGroup(Role.DECODE, 1, MODEL, kv_capacity=1000, tensor_parallel=4, node="b"))
    spec = ClusterSpec.of_groups(groups, kv_bytes_per_token=1000, link=Link(1e6, 0.001), internode=Link(1e5, 0.01))
    assert spec.transfer_time(100, 0, 1) == pytest.approx(0.001 + 100 * 1000 / (1e6 * 2))  # two GPU pairs
    assert spec.transfer_time(100, 0, 2) == pytest.approx(0.01 + 100 * 1000 / (1e5 * 2))
    (handed,) = simulate([req(0.0, 100, 3)], spec, make_policy("distserve", MODEL)).timelines
    assert handed.kv_ready - handed.first_token == pytest.approx(spec.transfer_time(100, 0, handed.decode_worker))


@dataclass
class RecordingRouter:
    """Wraps a router and keeps every worker view it was shown."""

    inner: object
    seen: list[tuple[float, tuple[WorkerView, ...]]] = field(default_factory=list)

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        self.seen.append((now, tuple(workers)))
        return self.inner.place(queue, workers, now)


def test_a_mid_span_view_reports_the_batch_at_that_instant() -> None:
    vllm = make_policy("vllm", MODEL)
    recorder = RecordingRouter(vllm.router)
    simulate([req(0.0, 100, 1000, tpot=0.1), req(1.0, 10, 2)], cluster([Role.COLOCATED]), replace(vllm, router=recorder))
    now, (view,) = recorder.seen[-1]
    assert now == 1.0
    # reference: first token at 0.11, then decode steps of one sequence whose context grows by one per step
    t, generated = 0.11, 1
    while t + decode_step(1, 100 + generated) <= 1.0:
        t += decode_step(1, 100 + generated)
        generated += 1
    assert view.busy and view.step_begin == pytest.approx(t)
    assert view.batch.size == 1 and view.batch.context_tokens == 100 + generated
    assert view.batch.next_token_deadline == pytest.approx(0.11 + 0.1 * generated)
    assert view.batch.reserve_deadline == pytest.approx(0.11 + 0.1 * (generated - 1))


def test_a_view_names_the_prompt_chunks_of_the_step_in_progress() -> None:
    distserve = make_policy("distserve", MODEL)
    recorder = RecordingRouter(distserve.router)
    # the first prompt's step runs from 0 to 1.01 s; the second arrives during it, the third after it
    simulate([req(0.0, 1000, 2), req(0.5, 10, 2), req(1.5, 10, 2)], cluster([Role.PREFILL, Role.DECODE]), replace(distserve, router=recorder))
    during = {now: views[0] for now, views in recorder.seen}
    assert during[0.5].busy and during[0.5].in_step == ((0, 1000),)
    assert during[0.5].unstarted_prefill(during[0.5].prefills[0]) == 0  # its prefilled count moves only when the step ends
    assert during[1.5].in_step == ()


def test_a_handoff_joins_the_batch_at_the_next_step_boundary() -> None:
    requests = [req(0.0, 100, 400), req(0.5, 50, 3)]
    result = simulate(requests, cluster([Role.PREFILL, Role.DECODE]), make_policy("distserve", MODEL), record_steps=True)
    second = result.timelines[1]
    spans = [s for s in result.step_log if s.worker == 1]
    joined = next(s for s in spans if s.decodes == 2)
    before = next(s for s in reversed(spans) if s.end <= joined.start)
    assert before.end == joined.start  # the decode worker never idled
    step = decode_step(1, 100 + 400)  # longest possible step of the lone decode
    assert second.kv_ready <= joined.start < second.kv_ready + step


@dataclass(frozen=True)
class AbandonEveryWaiting:
    """A decode side that gives up on every decode that has to wait for a running batch."""

    inner: DecodeBatcher

    def plan(self, worker: WorkerView, now: float) -> StepPlan:
        plan = self.inner.plan(worker, now)
        if worker.batch.size == 0:
            return plan
        return replace(plan, admit=(), abandon=tuple(r.id for r in worker.waiting))


def test_an_abandoned_decode_ends_as_a_dropped_miss_and_frees_its_kv() -> None:
    policy = make_policy("distserve", MODEL)
    policy = replace(policy, batcher=AbandonEveryWaiting(policy.batcher))  # type: ignore[arg-type]
    # the first request grows to 400 KV tokens of 450: it runs unpreempted only if the abandoned ones' KV was freed
    requests = [req(0.0, 100, 300), req(0.5, 100, 3), req(1.0, 100, 3)]
    result = simulate(requests, cluster([Role.PREFILL, Role.DECODE], kv=450), policy)
    first, second, third = result.timelines
    assert result.unfinished == 0
    assert first.finish is not None and not first.dropped and first.preemptions == 0
    for abandoned in (second, third):
        assert abandoned.dropped and abandoned.first_token is not None and abandoned.finish is None
    summary = summarize(result.outcomes())
    assert summary.dropped == 2 and summary.good == 1


@dataclass(frozen=True)
class AbandonStartedPrompts:
    """A decode side that gives up on every prompt once its first chunk has run."""

    inner: DecodeBatcher

    def plan(self, worker: WorkerView, now: float) -> StepPlan:
        started = tuple(r.id for r in worker.prefills if r.prefilled > 0)
        rest = replace(worker, prefills=tuple(r for r in worker.prefills if r.prefilled == 0))
        return replace(self.inner.plan(rest, now), abandon=started)


def test_an_abandoned_prompt_frees_its_kv_for_the_next() -> None:
    policy = make_policy("sarathi", MODEL)  # 512-token chunks: the first prompt's first chunk leaves 488 tokens to go
    policy = replace(policy, batcher=AbandonStartedPrompts(policy.batcher))  # type: ignore[arg-type]
    # 1000 + 400 KV tokens do not fit in 1300: the second prompt can start only once the first's KV is freed
    result = simulate([req(0.0, 1000, 5), req(0.001, 400, 5)], cluster([Role.COLOCATED], kv=1300), policy)
    first, second = result.timelines
    assert result.unfinished == 0
    assert first.dropped and first.first_token is None and first.prefill_start == 0.0 and first.prefilled == 512
    assert not second.dropped and second.finish is not None


def random_workload(count: int, seed: int) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(8.0)
        prompt = rng.choice([30, 200, 600, 1500, 3000])
        out.append(SimRequest(t, prompt, rng.randint(1, 120), ttft_slo=max(0.25, 3 * MODEL.prefill_time(prompt)), tpot_slo=0.1))
    return out


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_invariants_under_load(name: str) -> None:
    policy = make_policy(name, MODEL)
    roles = policy.roles(4, 1 if policy.disaggregated else None)
    requests = random_workload(200, seed=3)
    result = simulate(requests, cluster(roles, kv=12_000), policy, record_steps=True)

    assert result.unfinished == 0
    finished = [t for t in result.timelines if t.finish is not None]
    assert all(t.dropped for t in result.timelines if t.finish is None)
    assert len(finished) > 50  # unified refuses prompts it can no longer serve in time; the others serve all

    by_worker = defaultdict(list)
    for span in result.step_log:
        assert span.end > span.start and span.steps >= 1
        by_worker[span.worker].append(span)
    for spans in by_worker.values():  # no worker runs two steps at once
        spans.sort(key=lambda s: s.start)
        for earlier, later in itertools.pairwise(spans):
            assert later.start >= earlier.end - 1e-12

    # every output token comes from a decode step or from a prefill (the first, or a recompute's),
    # including those of requests given up after their first token
    assert all(t.generated == t.output_tokens and t.prefilled >= t.prompt_tokens for t in finished)
    decoded = sum(s.decodes * s.steps for s in result.step_log)
    from_prefills = sum(1 + t.preemptions for t in result.timelines if t.first_token is not None)
    assert decoded + from_prefills == sum(t.generated for t in result.timelines)
    prompt_tokens = sum(tokens for s in result.step_log for _, tokens in s.chunks)
    if not any(t.preemptions for t in result.timelines):
        assert prompt_tokens == sum(t.prefilled for t in result.timelines)

    for t in finished:  # nobody beats an idle cluster
        assert t.first_token - t.arrival >= MODEL.prefill_time(t.prompt_tokens) - 1e-9
        assert t.arrival <= t.first_token <= t.finish


def test_preemption_recomputes_and_everyone_finishes() -> None:
    requests = [req(0.01 * i, 400, 300) for i in range(12)]
    result = simulate(requests, cluster([Role.COLOCATED], kv=3000), make_policy("vllm", MODEL))
    assert result.unfinished == 0
    assert all(t.finish is not None for t in result.timelines)
    assert sum(t.preemptions for t in result.timelines) > 0


def test_swap_preemption_keeps_the_victims_kv_on_the_host_and_charges_the_copies() -> None:
    requests = [req(0.01 * i, 400, 300) for i in range(12)]
    spec = cluster([Role.COLOCATED], kv=3000)
    swapping = make_policy("vllm", MODEL, **{"batcher.preemption": Preemption.SWAP})
    result = simulate(requests, spec, swapping, record_steps=True)
    assert result.unfinished == 0 and all(t.finish is not None for t in result.timelines)
    assert sum(t.preemptions for t in result.timelines) > 0
    prefilled: dict[int, int] = {}
    for record in result.step_log:
        for request, tokens in record.chunks:
            prefilled[request] = prefilled.get(request, 0) + tokens
    assert all(prefilled[t.id] == t.prompt_tokens for t in result.timelines)  # nobody's prompt is computed twice
    recomputing = simulate(requests, spec, make_policy("vllm", MODEL), record_steps=True)
    assert sum(tokens for record in recomputing.step_log for _, tokens in record.chunks) > sum(prefilled.values())
    slow_host = simulate(requests, replace(spec, host_bandwidth=1e6), swapping).timelines  # 1 ms a token each way
    assert max(t.finish for t in slow_host) > max(t.finish for t in result.timelines) + 0.1


def test_a_padded_prompt_batch_computes_its_pad_tokens() -> None:
    # vLLM before chunked prefill ran a prompt batch as one tensor padded to its longest prompt
    requests = [req(0.0, 100, 2), req(0.0, 20, 2)]
    padded = make_policy("vllm", MODEL, **{"batcher.max_paddings": 256})
    first, second = simulate(requests, cluster([Role.COLOCATED]), padded).timelines
    assert first.first_token == second.first_token == pytest.approx(0.01 + 2 * 100 * 0.001)
    first, second = simulate(requests, cluster([Role.COLOCATED]), make_policy("vllm", MODEL)).timelines
    assert first.first_token == second.first_token == pytest.approx(0.01 + 120 * 0.001)


def test_a_worker_without_host_memory_cannot_swap() -> None:
    with pytest.raises(ValueError, match="no host memory to swap to"):
        WorkerState(0, Role.COLOCATED, 1000, MODEL, []).make_room(swap=True)


def test_runs_are_deterministic_per_seed() -> None:
    requests = random_workload(120, seed=5)
    policy = make_policy("tropical", MODEL)
    spec = cluster(policy.roles(3, 1))
    noisy = replace(spec, model=replace(MODEL, prefill_std=0.05, decode_std=0.05))
    first = simulate(requests, noisy, policy, seed=1, noise=True).timelines
    assert simulate(requests, noisy, policy, seed=1, noise=True).timelines == first
    assert simulate(requests, noisy, policy, seed=2, noise=True).timelines != first
    assert simulate(requests, spec, policy).timelines == simulate(requests, spec, policy).timelines


def test_cluster_spec_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError):
        cluster([Role.DECODE])
    with pytest.raises(ValueError):
        cluster([Role.PREFILL])
    with pytest.raises(ValueError):
        cluster([Role.COLOCATED, Role.PREFILL])
    assert cluster([Role.MULTIPLEX, Role.MULTIPLEX]).gpus == 2
