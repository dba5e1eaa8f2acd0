"""Discrete-event simulation of a serving cluster: the clock-free core driven on a virtual clock.

What workers and the router hold and how decisions are applied is the core's
(`tropical.core`), the same code a live deployment runs. This driver only
keeps time: it jumps from event to event (arrival, end of a step, KV arrival,
a wake-up the policy asked for), hands each to the core, lets the cluster
settle at that instant, and turns the core's actions into later events. Step
times are the latency model's predictions (optionally perturbed by its
residual spread); a KV transfer takes the link's time for its bytes.

A decode batch whose membership does not change is advanced many steps at once
in closed form (see `WorkerState`): a span ends at the first of the next
sequence finishing, the KV cache filling up and the policy's review time, and
anything that concerns the worker mid-span cuts it at the next step boundary,
where the worker re-plans, exactly as a live worker only acts between steps.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from tropical.core import ClusterCore, RequestState, RouterWake, StepScheduled, TransferStarted, WorkerState, WorkerWake
from tropical.metrics import RequestOutcome
from tropical.policies.serving import ServingPolicy
from tropical.simulator.cluster import ClusterSpec, RequestTimeline, SimRequest

_STEP_END, _KV_ARRIVE, _WAKE_WORKER, _WAKE_ROUTER = range(4)


@dataclass(frozen=True)
class StepRecord:
    """One span of steps of one worker (kept only when asked for)."""

    worker: int
    start: float
    end: float
    steps: int
    decodes: int
    chunks: tuple[tuple[int, int], ...]  # (request, tokens)


@dataclass(frozen=True)
class SimulationResult:
    timelines: tuple[RequestTimeline, ...]
    events: int
    spans: int
    steps: int
    unfinished: int  # requests neither finished nor dropped when the events ran out: a bug if ever > 0
    step_log: tuple[StepRecord, ...] = ()

    def outcomes(self) -> list[RequestOutcome]:
        return [t.outcome() for t in self.timelines]

    @property
    def refused(self) -> int:
        """Requests the router turned away before placing them (infeasible ones apart)."""
        return sum(t.dropped and not t.infeasible and t.placed is None for t in self.timelines)

    @property
    def abandoned(self) -> int:
        """Requests a worker gave up on after they were placed: queued prompts, or decodes."""
        return sum(t.dropped and t.placed is not None for t in self.timelines)


def timeline(job: RequestState) -> RequestTimeline:
    return RequestTimeline(
        id=job.id,
        arrival=job.arrival,
        prompt_tokens=job.prompt,
        output_tokens=job.output,
        ttft_slo=job.ttft_slo,
        tpot_slo=job.tpot_slo,
        first_token=job.first_token,
        finish=job.finish,
        placed=job.placed,
        prefill_start=job.prefill_start,
        prefill_worker=job.prefill_worker,
        decode_worker=job.decode_worker,
        kv_ready=job.kv_ready,
        preemptions=job.preemptions,
        dropped=job.dropped,
        infeasible=job.infeasible,
        generated=job.generated,
        prefilled=job.prefilled,
    )


class Simulation:
    """One run of one policy on one cluster over one workload; deterministic for a seed."""

    def __init__(
        self,
        cluster: ClusterSpec,
        policy: ServingPolicy,
        *,
        seed: int = 0,
        noise: bool = False,
        record_steps: bool = False,
        observe: Callable[[float, ClusterCore], None] | None = None,
        spans: bool = True,
        refuse_infeasible: bool = True,
    ) -> None:
        """`observe(now, core)` sees the cluster each time it has settled (for tests and tracing);
        `spans=False` steps every decode on its own instead of in closed-form spans; `refuse_infeasible=False`
        serves every request, as a real engine does (`ClusterCore`)."""
        self.cluster = cluster
        self.observe = observe
        self.policy = policy
        self.model = cluster.model
        self.noise = noise
        self.random = random.Random(seed)
        self.record_steps = record_steps
        self.core = ClusterCore(
            policy, cluster.roles, cluster.kv_capacities, cluster.models, perturb=self._noise, spans=spans, refuse_infeasible=refuse_infeasible,
            instances=cluster.instances, swap_per_token=cluster.swap_per_token,
        )
        self.events: list[tuple[float, int, int, object, int]] = []
        self.sequence = 0
        self.event_count = self.span_count = self.step_count = 0
        self.step_log: list[StepRecord] = []

    def run(self, requests: Sequence[SimRequest]) -> SimulationResult:
        jobs = [RequestState(i, r.arrival, r.prompt_tokens, r.output_tokens, r.ttft_slo, r.tpot_slo) for i, r in enumerate(requests)]
        arrivals = sorted(jobs, key=lambda j: (j.arrival, j.id))
        events, core = self.events, self.core
        position, total = 0, len(arrivals)
        while True:
            next_arrival = arrivals[position].arrival if position < total else math.inf
            if events and events[0][0] <= next_arrival:
                now, _, kind, subject, tag = heapq.heappop(events)
                self._handle(now, kind, subject, tag)
            elif position < total:
                now = next_arrival
                core.arrive(arrivals[position])
                position += 1
            else:
                break
            if core.out:
                self._carry_out(now)
            self.event_count += 1
            upcoming = arrivals[position].arrival if position < total else math.inf
            if events and events[0][0] < upcoming:
                upcoming = events[0][0]
            if upcoming > now:  # everything that happens at `now` is in: let the cluster react
                core.settle(now)
                if core.out:
                    self._carry_out(now)
                if self.observe is not None:
                    self.observe(now, core)
        unfinished = 0
        for job in jobs:
            if job.finish is None and not job.dropped:
                unfinished += 1
                job.dropped = True
        return SimulationResult(
            timelines=tuple(timeline(job) for job in jobs),
            events=self.event_count,
            spans=self.span_count,
            steps=self.step_count,
            unfinished=unfinished,
            step_log=tuple(self.step_log),
        )

    def _push(self, time: float, kind: int, subject: object, tag: int = 0) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (time, self.sequence, kind, subject, tag))

    def _carry_out(self, now: float) -> None:
        """Turn the core's actions into events, in the order it made them."""
        for action in self.core.drain():
            if isinstance(action, StepScheduled):
                self._push(action.end, _STEP_END, action.worker, action.span_id)
            elif isinstance(action, TransferStarted):
                job = self.core.workers[action.target].incoming[action.request]
                self._push(now + self.cluster.transfer_time(action.kv_tokens, action.source, action.target), _KV_ARRIVE, (job, action.source, action.target))
            elif isinstance(action, WorkerWake):
                self._push(action.at, _WAKE_WORKER, action.worker, action.wake_id)
            elif isinstance(action, RouterWake):
                self._push(action.at, _WAKE_ROUTER, None)
            # Placed, Preempted and Abandoned: the request's own record already says so

    def _handle(self, now: float, kind: int, subject: object, tag: int) -> None:
        core = self.core
        if kind == _STEP_END:
            worker = core.workers[cast(int, subject)]
            if worker.busy and worker.span_id == tag:
                self._record(worker, now)
                core.step_ended(worker.id, tag, now)
        elif kind == _KV_ARRIVE:
            job, source, target = cast(tuple[RequestState, int, int], subject)
            core.kv_arrived(job, source, target, now)
        elif kind == _WAKE_WORKER:
            core.worker_woken(cast(int, subject), tag)
        elif kind == _WAKE_ROUTER:
            core.router_woken(now)

    def _record(self, worker: WorkerState, now: float) -> None:
        n = worker.span_n
        self.span_count += 1
        self.step_count += n
        if self.record_steps:
            self.step_log.append(
                StepRecord(worker.id, worker.span_start, now, n, worker.size if worker.span_decode else 0,
                           tuple((job.id, tokens) for job, tokens in worker.span_chunks))
            )

    def _noise(self, prefill: bool) -> float:
        return self.model.noise_factor(self.random, prefill=prefill) if self.noise else 1.0


def simulate(
    requests: Sequence[SimRequest],
    cluster: ClusterSpec,
    policy: ServingPolicy,
    *,
    seed: int = 0,
    noise: bool = False,
    record_steps: bool = False,
    refuse_infeasible: bool = True,
) -> SimulationResult:
    """Run `policy` on `cluster` over `requests`; the same inputs and seed give the same result."""
    return Simulation(cluster, policy, seed=seed, noise=noise, record_steps=record_steps, refuse_infeasible=refuse_infeasible).run(requests)
