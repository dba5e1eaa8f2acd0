"""Discrete-event simulation of a serving cluster, one worker step at a time.

Every worker runs steps the policy plans; time jumps from event to event
(arrival, end of a step, KV arrival, a wake-up the policy asked for). A decode
batch whose membership does not change is advanced many steps at once in
closed form: step i of a span costs a + b·i (the batch's context grows by one
token per sequence per step), so the end of step m is t0 + m·a + b·m(m−1)/2.
A span ends at the first of: the next sequence finishing, the KV cache filling
up, the policy's review time; anything that concerns the worker mid-span (a
placement, a handoff, a KV arrival) cuts the span at the next step boundary,
where the worker re-plans, exactly as a live worker only acts between steps.

Mechanisms, not policy, live here: KV accounting (a prompt's KV is allocated
when its prefill starts; a decode grows by one token per step; when a step
would overflow the cache, the most recently admitted decode is preempted and
later recomputed, as vLLM does), KV handoff (the receiving worker pulls a
prefilled request's KV, first come first served, once it has room; the sender
keeps it until the transfer ends), and refusal of requests no idle cluster
could serve within their SLO.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from tropical.metrics import RequestOutcome
from tropical.policies.records import (
    EMPTY_BATCH,
    BatchSummary,
    RequestView,
    Role,
    StepPlan,
    WorkerView,
)
from tropical.policies.serving import ServingPolicy
from tropical.simulator.cluster import ClusterSpec, RequestTimeline, SimRequest

_STEP_END, _KV_ARRIVE, _WAKE_WORKER, _WAKE_ROUTER = range(4)
_PULL_HEADROOM = 0.01  # fraction of a worker's KV left free when pulling a handoff in
_SETTLE_ROUNDS = 1000


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


class _Job:
    __slots__ = (
        "_view",
        "arrival",
        "decode_worker",
        "dropped",
        "finish",
        "first_token",
        "generated",
        "id",
        "in_transfer",
        "infeasible",
        "join_gen",
        "join_step",
        "kv",
        "kv_ready",
        "met_ttft",
        "output",
        "placed",
        "preemptions",
        "prefill_start",
        "prefill_worker",
        "prefilled",
        "prompt",
        "token",
        "tpot_slo",
        "ttft_slo",
    )

    def __init__(self, index: int, request: SimRequest) -> None:
        self.id = index
        self.arrival = request.arrival
        self.prompt = request.prompt_tokens
        self.output = request.output_tokens
        self.ttft_slo = request.ttft_slo
        self.tpot_slo = request.tpot_slo
        self.prefilled = 0
        self.generated = 0
        self.first_token: float | None = None
        self.finish: float | None = None
        self.kv = 0  # KV tokens allocated to it outside a running batch
        self.placed: float | None = None
        self.prefill_start: float | None = None
        self.prefill_worker: int | None = None
        self.decode_worker: int | None = None
        self.kv_ready: float | None = None
        self.preemptions = 0
        self.dropped = False
        self.infeasible = False
        self.in_transfer = False
        self.met_ttft = False
        self.join_step = 0
        self.join_gen = 0
        self.token = 0  # identifies its current membership of a running batch (0: none)
        self._view: RequestView | None = None

    @property
    def view(self) -> RequestView:
        view = self._view
        if view is None:
            view = self._view = RequestView(
                self.id, self.arrival, self.prompt, self.ttft_slo, self.tpot_slo, self.prefilled, self.generated, self.first_token
            )
        return view

    def timeline(self) -> RequestTimeline:
        return RequestTimeline(
            id=self.id,
            arrival=self.arrival,
            prompt_tokens=self.prompt,
            output_tokens=self.output,
            ttft_slo=self.ttft_slo,
            tpot_slo=self.tpot_slo,
            first_token=self.first_token,
            finish=self.finish,
            placed=self.placed,
            prefill_start=self.prefill_start,
            prefill_worker=self.prefill_worker,
            decode_worker=self.decode_worker,
            kv_ready=self.kv_ready,
            preemptions=self.preemptions,
            dropped=self.dropped,
            infeasible=self.infeasible,
            generated=self.generated,
            prefilled=self.prefilled,
        )


class _Worker:
    """One simulated worker: its queues, its running batch (kept in closed form) and its current span."""

    def __init__(self, index: int, role: Role, capacity: int) -> None:
        self.id = index
        self.role = role
        self.capacity = capacity
        self.kv_static = 0  # KV of requests outside the running batch
        # running batch: generated(job) = join_gen + steps − join_step
        self.running: dict[int, _Job] = {}
        self.ctx_offset = 0  # Σ (prompt + join_gen − join_step): batch KV = ctx_offset + size·steps
        self.prompt_sum = 0
        self.steps = 0  # decode steps this worker has run
        self.finishes: list[tuple[int, int, _Job]] = []  # (step it finishes at, token, job)
        # (tpot, met its TTFT) → heap of (next token deadline − tpot·steps, token, job), and its live members
        self.deadlines: dict[tuple[float, bool], list[tuple[float, int, _Job]]] = {}
        self.members: dict[tuple[float, bool], int] = {}
        self.prefills: dict[int, _Job] = {}
        self.prefill_load = 0
        self.waiting: dict[int, _Job] = {}
        self.incoming: dict[int, _Job] = {}
        self.side_prompt = 0  # Σ prompt of waiting and incoming
        # the span in progress
        self.busy = False
        self.span_id = 0
        self.span_start = 0.0
        self.span_a = 0.0
        self.span_b = 0.0
        self.span_n = 0
        self.span_end = 0.0
        self.span_decode = False
        self.span_chunks: tuple[tuple[_Job, int], ...] = ()
        self.placed_since_step = 0
        self.needs_plan = False
        self.wake_id = 0
        self.version = 0
        self._view: WorkerView | None = None
        self._view_steps = -1

    # --- running batch in closed form ----------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.running)

    def join(self, job: _Job, token: int) -> None:
        steps = self.steps
        job.join_step, job.join_gen, job.token = steps, job.generated, token
        self.running[job.id] = job
        self.ctx_offset += job.prompt + job.generated - steps
        self.prompt_sum += job.prompt
        heapq.heappush(self.finishes, (steps + job.output - job.generated, token, job))
        tpot, first = job.tpot_slo, job.first_token
        assert first is not None, "only prefilled requests decode"
        group = (tpot, job.met_ttft)
        heap = self.deadlines.get(group)
        if heap is None:
            heap = self.deadlines[group] = []
        heapq.heappush(heap, (first + tpot * (job.generated - steps), token, job))
        self.members[group] = self.members.get(group, 0) + 1

    def leave(self, job: _Job) -> None:
        del self.running[job.id]
        job.generated = job.join_gen + self.steps - job.join_step
        job.token = 0
        job._view = None
        self.ctx_offset -= job.prompt + job.join_gen - job.join_step
        self.prompt_sum -= job.prompt
        self.members[(job.tpot_slo, job.met_ttft)] -= 1

    def batch_kv(self, steps: int) -> int:
        return self.ctx_offset + len(self.running) * steps

    def summary(self, steps: int) -> BatchSummary:
        if not self.running:
            return EMPTY_BATCH
        earliest = reserve = tightest = on_time = math.inf
        for (tpot, met_ttft), heap in self.deadlines.items():
            if not self.members[(tpot, met_ttft)]:
                continue
            while heap[0][2].token != heap[0][1]:
                heapq.heappop(heap)
            deadline = heap[0][0] + tpot * steps
            earliest = min(earliest, deadline)
            reserve = min(reserve, deadline - tpot)
            tightest = min(tightest, tpot)
            if met_ttft:
                on_time = min(on_time, deadline)
        return BatchSummary(len(self.running), self.batch_kv(steps), self.prompt_sum, earliest, reserve, tightest, on_time)

    # --- span arithmetic ------------------------------------------------------------------

    def span_time(self, m: int) -> float:
        """End of the m-th step of the current span."""
        return self.span_start + m * self.span_a + self.span_b * m * (m - 1) / 2.0

    def steps_done(self, now: float) -> int:
        """Steps of the current span completed by `now`."""
        if not self.busy or now >= self.span_end:
            return self.span_n if self.busy else 0
        m = self._steps_for(now - self.span_start)
        while m > 0 and self.span_time(m) > now:
            m -= 1
        while m + 1 < self.span_n and self.span_time(m + 1) <= now:
            m += 1
        return m

    def boundary_after(self, now: float) -> int:
        """The first step boundary of the current span at or after `now` (as a step count ≥ 1)."""
        m = max(1, self.steps_done(now))
        if self.span_time(m) < now:
            m += 1
        return min(m, self.span_n)

    def _steps_for(self, elapsed: float) -> int:
        a, b = self.span_a, self.span_b
        if b <= 0.0:
            return int(elapsed / a) if a > 0.0 else self.span_n
        half = a - b / 2.0
        return int((-half + math.sqrt(half * half + 2.0 * b * elapsed)) / b)

    def current_steps(self, now: float) -> int:
        """Decode steps run by `now`, counting the completed part of a decode span."""
        if self.busy and self.span_decode and self.span_n > 1:
            return self.steps + self.steps_done(now)
        return self.steps

    # --- the view a policy sees -----------------------------------------------------------

    def changed(self) -> None:
        self.version += 1
        self._view = None

    def view(self, now: float) -> WorkerView:
        steps = self.current_steps(now)
        view = self._view
        if view is not None and self._view_steps == steps:
            return view
        if self.busy and self.span_n > 1:
            done = steps - self.steps if self.span_decode else 0
            begin, end = self.span_time(done), self.span_time(min(done + 1, self.span_n))
        elif self.busy:
            begin, end = self.span_start, self.span_end
        else:
            begin = end = self.span_end
        prefills = self.prefills.values()
        ordered = (
            [j.view for j in prefills if j.prefilled > 0]
            + [j.view for j in prefills if j.prefilled == 0 and j.generated > 0]
            + [j.view for j in prefills if j.prefilled == 0 and j.generated == 0]
        )
        view = WorkerView(
            id=self.id,
            role=self.role,
            kv_capacity=self.capacity,
            kv_used=self.kv_static + self.batch_kv(steps),
            busy=self.busy,
            step_begin=begin,
            step_end=end,
            placed_since_step=self.placed_since_step,
            prefills=tuple(ordered),
            prefill_load=self.prefill_load,
            batch=self.summary(steps),
            waiting=tuple(j.view for j in self.waiting.values()),
            incoming=tuple(j.view for j in self.incoming.values()),
            decode_load=self.prompt_sum + self.side_prompt,
            in_step=tuple((job.id, tokens) for job, tokens in self.span_chunks) if self.busy else (),
        )
        self._view, self._view_steps = view, steps
        return view


class Simulation:
    """One run of one policy on one cluster over one workload; deterministic for a seed."""

    def __init__(self, cluster: ClusterSpec, policy: ServingPolicy, *, seed: int = 0, noise: bool = False, record_steps: bool = False) -> None:
        self.cluster = cluster
        self.policy = policy
        self.model = cluster.model
        self.noise = noise
        self.random = random.Random(seed)
        self.record_steps = record_steps
        self.workers = [_Worker(i, role, cluster.kv_capacity) for i, role in enumerate(cluster.roles)]
        self.events: list[tuple[float, int, int, object, int]] = []
        self.sequence = 0
        self.tokens = 0
        self.queue: dict[int, _Job] = {}
        self._queue_views: tuple[RequestView, ...] | None = None
        self.stranded: list[tuple[_Job, _Worker]] = []  # prefilled, no decoding worker chosen yet
        self.sources: dict[int, _Worker] = {}  # request → prefill worker holding its KV until pulled
        self.router_wake = math.inf
        self.event_count = self.span_count = self.step_count = 0
        self.step_log: list[StepRecord] = []

    # --- driving ------------------------------------------------------------------------

    def run(self, requests: Sequence[SimRequest]) -> SimulationResult:
        jobs = [_Job(i, r) for i, r in enumerate(requests)]
        arrivals = sorted(jobs, key=lambda j: (j.arrival, j.id))
        events = self.events
        position, total = 0, len(arrivals)
        while True:
            next_arrival = arrivals[position].arrival if position < total else math.inf
            if events and events[0][0] <= next_arrival:
                now, _, kind, subject, tag = heapq.heappop(events)
                self._handle(now, kind, subject, tag)
            elif position < total:
                now = next_arrival
                self._arrive(arrivals[position])
                position += 1
            else:
                break
            self.event_count += 1
            upcoming = arrivals[position].arrival if position < total else math.inf
            if events and events[0][0] < upcoming:
                upcoming = events[0][0]
            if upcoming > now:  # everything that happens at `now` is in: let the cluster react
                self._settle(now)
        unfinished = 0
        for job in jobs:
            if job.finish is None and not job.dropped:
                unfinished += 1
                job.dropped = True
        return SimulationResult(
            timelines=tuple(job.timeline() for job in jobs),
            events=self.event_count,
            spans=self.span_count,
            steps=self.step_count,
            unfinished=unfinished,
            step_log=tuple(self.step_log),
        )

    def _push(self, time: float, kind: int, subject: object, tag: int = 0) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (time, self.sequence, kind, subject, tag))

    def _handle(self, now: float, kind: int, subject: object, tag: int) -> None:
        if kind == _STEP_END:
            worker = cast(_Worker, subject)
            if worker.busy and worker.span_id == tag:
                self._end_span(worker, now)
        elif kind == _KV_ARRIVE:
            job, source, target = cast(tuple[_Job, _Worker, _Worker], subject)
            self._kv_arrived(job, source, target, now)
        elif kind == _WAKE_WORKER:
            worker = cast(_Worker, subject)
            if worker.wake_id == tag and not worker.busy:
                worker.needs_plan = True
        elif kind == _WAKE_ROUTER and now >= self.router_wake:
            self.router_wake = math.inf

    def _arrive(self, job: _Job) -> None:
        if not self._feasible(job):
            job.infeasible = job.dropped = True
            return
        self.queue[job.id] = job
        self._queue_views = None

    def _feasible(self, job: _Job) -> bool:
        """Whether an idle cluster could serve it within both SLOs (else it is refused and counted as a miss)."""
        model = self.model
        if job.prompt + job.output > self.cluster.kv_capacity:
            return False
        if model.prefill_time(job.prompt) > job.ttft_slo:
            return False
        return job.output <= 1 or model.decode_time(1, job.prompt + job.output // 2) <= job.tpot_slo

    def _settle(self, now: float) -> None:
        """Let the router and every idle worker act until nothing more happens at `now`."""
        workers = self.workers
        for _ in range(_SETTLE_ROUNDS):
            progressed = False
            if self.stranded:
                progressed |= self._retry_stranded(now)
            if self.queue:
                progressed |= self._route(now)
            for worker in workers:
                if worker.needs_plan and not worker.busy:
                    worker.needs_plan = False
                    progressed |= self._start_span(worker, now)
            if not progressed:
                return
        raise RuntimeError(f"the cluster did not settle at t={now}: a policy keeps changing its mind")

    # --- the router -----------------------------------------------------------------------

    def _views(self, now: float) -> list[WorkerView]:
        return [w.view(now) for w in self.workers]

    def _route(self, now: float) -> bool:
        views = self._queue_views
        if views is None:
            views = self._queue_views = tuple(j.view for j in self.queue.values())
        decision = self.policy.place(views, self._views(now), now)
        for placement in decision.placements:
            job = self.queue.pop(placement.request_id)
            worker = self.workers[placement.worker_id]
            if not worker.role.takes_prompts:
                raise ValueError(f"{self.policy.name} placed a prompt on {worker.role} worker {worker.id}")
            job.placed = now
            worker.prefills[job.id] = job
            worker.prefill_load += job.prompt + job.generated
            worker.placed_since_step += 1
            self._poke(worker, now)
        for request_id in decision.drops:
            job = self.queue.pop(request_id)
            job.dropped = True
        if decision.placements or decision.drops:
            self._queue_views = None
        review = decision.review_at
        if review is not None and now < review < self.router_wake:
            self.router_wake = review
            self._push(review, _WAKE_ROUTER, None)
        return bool(decision.placements or decision.drops)

    def _retry_stranded(self, now: float) -> bool:
        stranded, self.stranded = self.stranded, []
        for job, source in stranded:
            self._hand_off(job, source, now)
        return len(self.stranded) < len(stranded)

    # --- steps ----------------------------------------------------------------------------

    def _poke(self, worker: _Worker, now: float) -> None:
        """Something concerns this worker: re-plan it now if idle, else at its next step boundary."""
        worker.changed()
        if not worker.busy:
            worker.needs_plan = True
            return
        if worker.span_n > 1 and worker.span_end > now:
            m = worker.boundary_after(now)
            if m < worker.span_n:
                worker.span_n = m
                worker.span_end = worker.span_time(m)
                worker.span_id += 1
                self._push(worker.span_end, _STEP_END, worker, worker.span_id)

    def _start_span(self, worker: _Worker, now: float) -> bool:
        plan: StepPlan = self.policy.plan_step(worker.view(now), now)
        for request_id in plan.abandon:
            job = worker.waiting.pop(request_id, None)
            if job is not None:
                worker.side_prompt -= job.prompt
            else:
                job = worker.prefills.pop(request_id)
                worker.prefill_load -= job.prompt + job.generated - job.prefilled
            worker.kv_static -= job.kv
            job.kv = 0
            job.dropped = True
        for request_id in plan.admit:
            job = worker.waiting.pop(request_id)
            worker.side_prompt -= job.prompt
            worker.kv_static -= job.kv
            job.kv = 0
            self.tokens += 1
            worker.join(job, self.tokens)
        chunks = []
        for request_id, tokens in plan.chunks:
            job = worker.prefills[request_id]
            if tokens <= 0 or tokens > job.prompt + job.generated - job.prefilled:
                raise ValueError(f"{self.policy.name} planned {tokens} prompt tokens for request {request_id}")
            if job.prefilled == 0:
                job.kv = job.prompt + job.generated
                worker.kv_static += job.kv
                if job.prefill_start is None:
                    job.prefill_start, job.prefill_worker = now, worker.id
            chunks.append((job, tokens))
        decode = (plan.decode or bool(plan.admit)) and bool(worker.running)
        if decode:
            self._make_room(worker)
            decode = bool(worker.running)
        if worker.kv_static + worker.batch_kv(worker.steps) > worker.capacity:
            raise ValueError(f"{self.policy.name} overfilled the KV cache of worker {worker.id}")
        worker.changed()
        if not decode and not chunks:
            if plan.abandon:  # the freed KV may let a handoff in, or the next plan start something
                worker.placed_since_step = 0  # it has dealt with what was placed: given up on it
                if worker.incoming:
                    self._pull(worker, now)
                worker.needs_plan = True
                return True
            if plan.review_at is not None and plan.review_at > now:
                worker.wake_id += 1
                self._push(plan.review_at, _WAKE_WORKER, worker, worker.wake_id)
            return False

        model = self.model
        size = worker.size if decode else 0
        context = worker.batch_kv(worker.steps) if decode else 0
        factor = self._noise(bool(chunks))
        if chunks:
            a = factor * model.step_time(size, context, [(job.prefilled, job.prefilled + tokens) for job, tokens in chunks])
            b, n = 0.0, 1
        else:
            a = factor * model.decode_time(size, context)
            b = factor * model.d2 * size
            finishes = worker.finishes
            while finishes[0][2].token != finishes[0][1]:
                heapq.heappop(finishes)
            n = finishes[0][0] - worker.steps
            room = worker.capacity - worker.kv_static - context
            n = max(1, min(n, room // size))
        worker.busy = True
        worker.span_id += 1
        worker.span_start, worker.span_a, worker.span_b, worker.span_n = now, a, b, n
        worker.span_decode, worker.span_chunks = decode, tuple(chunks)
        if plan.review_at is not None and n > 1 and worker.span_time(n) > plan.review_at:
            worker.span_n = n = worker.boundary_after(plan.review_at)
        worker.span_end = worker.span_time(n)
        worker.placed_since_step = 0
        worker.changed()
        self._push(worker.span_end, _STEP_END, worker, worker.span_id)
        return True

    def _make_room(self, worker: _Worker) -> None:
        """Preempt the most recently admitted decodes until one more step's KV fits (vLLM's recompute)."""
        while worker.running and worker.kv_static + worker.batch_kv(worker.steps) + worker.size > worker.capacity:
            victim = next(reversed(worker.running.values()))
            worker.leave(victim)
            victim.prefilled = 0
            victim.preemptions += 1
            worker.prefills[victim.id] = victim
            worker.prefill_load += victim.prompt + victim.generated

    def _noise(self, prefill: bool) -> float:
        if not self.noise:
            return 1.0
        spread = self.model.prefill_std if prefill else self.model.decode_std
        return max(0.05, 1.0 + self.random.gauss(0.0, spread)) if spread > 0 else 1.0

    def _end_span(self, worker: _Worker, now: float) -> None:
        n = worker.span_n
        self.span_count += 1
        self.step_count += n
        if self.record_steps:
            self.step_log.append(
                StepRecord(worker.id, worker.span_start, now, n, worker.size if worker.span_decode else 0,
                           tuple((job.id, tokens) for job, tokens in worker.span_chunks))
            )
        worker.busy = False
        if worker.span_decode:
            worker.steps += n
            finishes = worker.finishes
            while finishes and finishes[0][0] <= worker.steps:
                _, token, job = heapq.heappop(finishes)
                if job.token != token:
                    continue
                worker.leave(job)
                job.finish = now
        for job, tokens in worker.span_chunks:
            job.prefilled += tokens
            job._view = None
            worker.prefill_load -= tokens
            if job.prefilled == job.prompt + job.generated:
                del worker.prefills[job.id]
                self._prefilled(job, worker, now)
        worker.span_chunks = ()
        worker.needs_plan = True
        worker.changed()
        if worker.incoming:
            self._pull(worker, now)

    def _prefilled(self, job: _Job, worker: _Worker, now: float) -> None:
        """A prompt (or a preempted request's recompute) is done: its step produced a token."""
        if job.generated == 0:
            job.first_token = now
            job.met_ttft = now - job.arrival <= job.ttft_slo
        job.generated += 1
        job._view = None
        if job.generated >= job.output:
            job.finish = now
            worker.kv_static -= job.kv
            job.kv = 0
            if job.decode_worker is None:
                job.decode_worker = worker.id
                job.kv_ready = now
            return
        if worker.role is Role.PREFILL:
            self._hand_off(job, worker, now)
            return
        if job.decode_worker is None:
            job.decode_worker, job.kv_ready = worker.id, now
        worker.waiting[job.id] = job
        worker.side_prompt += job.prompt

    # --- KV handoff -------------------------------------------------------------------------

    def _hand_off(self, job: _Job, source: _Worker, now: float) -> None:
        target_id = self.policy.route_decode(job.view, self._views(now), now)
        if target_id is None:
            self.stranded.append((job, source))
            return
        target = self.workers[target_id]
        if not target.role.decodes:
            raise ValueError(f"{self.policy.name} handed request {job.id} to {target.role} worker {target.id}")
        job.decode_worker = target.id
        job.in_transfer = False
        target.incoming[job.id] = job
        target.side_prompt += job.prompt
        self.sources[job.id] = source
        self._poke(target, now)
        if not target.busy:
            self._pull(target, now)

    def _pull(self, worker: _Worker, now: float) -> None:
        """Start transfers into `worker`, oldest first, while its KV has room."""
        used = worker.kv_static + worker.batch_kv(worker.current_steps(now))
        free = worker.capacity - used - _PULL_HEADROOM * worker.capacity
        for job in worker.incoming.values():
            if job.in_transfer:
                continue
            if job.kv > free and not (used == 0 and job.kv <= worker.capacity):  # an empty worker takes any request that fits
                break
            used += job.kv
            free -= job.kv
            job.in_transfer = True
            worker.kv_static += job.kv
            worker.changed()
            source = self.sources.pop(job.id)
            self._push(now + self.cluster.transfer_time(job.kv), _KV_ARRIVE, (job, source, worker))

    def _kv_arrived(self, job: _Job, source: _Worker, target: _Worker, now: float) -> None:
        source.kv_static -= job.kv
        self._poke(source, now)
        del target.incoming[job.id]
        job.in_transfer = False
        job.kv_ready = now
        target.waiting[job.id] = job
        self._poke(target, now)


def simulate(
    requests: Sequence[SimRequest],
    cluster: ClusterSpec,
    policy: ServingPolicy,
    *,
    seed: int = 0,
    noise: bool = False,
    record_steps: bool = False,
) -> SimulationResult:
    """Run `policy` on `cluster` over `requests`; the same inputs and seed give the same result."""
    return Simulation(cluster, policy, seed=seed, noise=noise, record_steps=record_steps).run(requests)
