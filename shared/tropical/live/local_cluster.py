"""A whole cluster in one process on engines, on a virtual clock: the core driven by what engines report.

Where the simulator asks the latency model how long a step takes, this driver
runs each step the core begins on the worker's engine (an `EmulatedEngine`,
or a model engine) and lets virtual time advance by the engine's step time.
Workers step one at a time, as live ones do; KV moves between engines through
their export and import. With emulated engines it reproduces the simulator;
with model engines it serves real tokens through the same policy decisions.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tropical.core.actions import Abandoned, Action, Placed, Preempted, RouterWake, StepScheduled, TransferStarted, WorkerWake
from tropical.core.cluster import ClusterCore
from tropical.core.request import RequestState
from tropical.core.status import RequestIds
from tropical.engine.clock import FakeClock
from tropical.engine.kv_transfer import KvExport
from tropical.engine.plan import StepResult
from tropical.engine.serving import ServingEngine
from tropical.latency.model import LatencyModel
from tropical.live.engine_worker import EngineWorker
from tropical.policies.records import Role
from tropical.policies.serving import ServingPolicy
from tropical.protocol import SamplingParams

_STEP_END, _KV_ARRIVE, _WAKE_WORKER, _WAKE_ROUTER = range(4)


@dataclass(frozen=True)
class LocalRequest:
    """A request offered to the local cluster: real token ids and its own SLOs."""

    arrival: float
    prompt: tuple[int, ...]
    max_tokens: int
    ttft_slo: float
    tpot_slo: float
    sampling: SamplingParams = SamplingParams()


@dataclass
class LocalRun:
    """What happened to each request (the core's record) and the tokens it got, in order."""

    requests: list[RequestState]
    tokens: list[list[int]]
    steps: int = 0
    step_times: list[float] = field(default_factory=list)


class LocalCluster:
    """One policy over engines, one per worker; each engine with a `FakeClock` is moved to the step's start."""

    def __init__(
        self,
        policy: ServingPolicy,
        roles: Sequence[Role],
        engines: Sequence[ServingEngine],
        model: LatencyModel,
        *,
        kv_capacity: int | None = None,
        transfer_time: Callable[[int], float] = lambda tokens: 0.0,
        engine_time: bool = True,
    ) -> None:
        """`model` is what the policies predict with; `kv_capacity` (tokens per worker) defaults to the engines' smallest.

        `engine_time`: virtual time advances by the step time each engine reports
        (an emulated engine's model time, a model engine's wall time); False
        advances it by the model's prediction, so a run on model engines is
        repeatable whatever the machine's speed.
        """
        if len(engines) != len(roles):
            raise ValueError(f"{len(roles)} workers need {len(roles)} engines, not {len(engines)}")
        capacity = kv_capacity or min(e.kv_capacity_tokens for e in engines)
        self.core = ClusterCore(policy, roles, capacity, model, spans=False)
        self.names = RequestIds()
        self.workers = [EngineWorker(state, engine, self.names) for state, engine in zip(self.core.workers, engines)]
        self.transfer_time = transfer_time
        self.engine_time = engine_time
        self._events: list[tuple[float, int, int, object]] = []
        self._sequence = 0
        self._offered: dict[int, LocalRequest] = {}
        self._pending: dict[int, list[Action]] = {}  # each worker's preemptions and abandonments not yet told to its engine
        self._run = LocalRun([], [])
        self._index: dict[int, int] = {}

    def run(self, requests: Sequence[LocalRequest]) -> LocalRun:
        jobs = []
        for i, request in enumerate(requests):
            job = RequestState(
                self.names.id_of(f"request-{i}"),
                request.arrival, len(request.prompt), request.max_tokens, request.ttft_slo, request.tpot_slo,
            )
            jobs.append(job)
            self._offered[job.id] = request
        self._run = run = LocalRun(jobs, [[] for _ in jobs])
        self._index = {job.id: i for i, job in enumerate(jobs)}
        arrivals = sorted(jobs, key=lambda j: (j.arrival, j.id))
        position, events, core = 0, self._events, self.core
        while True:
            next_arrival = arrivals[position].arrival if position < len(arrivals) else math.inf
            if events and events[0][0] <= next_arrival:
                now, _, kind, subject = heapq.heappop(events)
                self._handle(now, kind, subject)
            elif position < len(arrivals):
                now = next_arrival
                core.arrive(arrivals[position])
                position += 1
            else:
                break
            self._carry_out(now)
            upcoming = arrivals[position].arrival if position < len(arrivals) else math.inf
            if events and events[0][0] < upcoming:
                upcoming = events[0][0]
            if upcoming > now:
                core.settle(now)
                self._carry_out(now)
        return run

    def _push(self, time: float, kind: int, subject: object) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (time, self._sequence, kind, subject))

    def _carry_out(self, now: float) -> None:
        for action in self.core.drain():
            if isinstance(action, Placed):
                worker, request = self.workers[action.worker], self._offered[action.request]
                job = worker.state.prefills[action.request]
                worker.add(job, request.prompt, request.sampling, request.max_tokens)
            elif isinstance(action, (Preempted, Abandoned)):
                self._pending.setdefault(action.worker, []).append(action)
            elif isinstance(action, StepScheduled):
                self._step(self.workers[action.worker], action, now)
            elif isinstance(action, TransferStarted):
                source = self.workers[action.source]
                job = self.core.workers[action.target].incoming[action.request]
                kv = source.export(job)
                self._push(now + self.transfer_time(action.kv_tokens), _KV_ARRIVE, (job, action.source, action.target, kv))
            elif isinstance(action, WorkerWake):
                self._push(action.at, _WAKE_WORKER, (action.worker, action.wake_id))
            elif isinstance(action, RouterWake):
                self._push(action.at, _WAKE_ROUTER, None)
        for worker_id, actions in list(self._pending.items()):  # given up on while idle: the engine lets them go
            if not self.core.workers[worker_id].busy:
                self.workers[worker_id].plan(self._pending.pop(worker_id))

    def _step(self, worker: EngineWorker, scheduled: StepScheduled, now: float) -> None:
        plan = worker.plan(self._pending.pop(worker.state.id, []))
        clock = getattr(worker.engine, "clock", None)
        if isinstance(clock, FakeClock):
            clock.time = max(clock.time, now)
        result = worker.run(plan)
        self._run.steps += 1
        self._run.step_times.append(result.step_time_s)
        end = now + result.step_time_s if self.engine_time else scheduled.end
        self._push(end, _STEP_END, (worker.state.id, scheduled.span_id, result))

    def _handle(self, now: float, kind: int, subject: object) -> None:
        core = self.core
        if kind == _STEP_END:
            worker_id, span_id, result = subject  # type: ignore[misc]
            assert isinstance(result, StepResult)
            if core.step_ended(worker_id, span_id, now):
                self.workers[worker_id].reconcile(result, now)
                for output in result.outputs:
                    self._run.tokens[self._index[self.names.id_of(output.request_id)]].extend(output.new_token_ids)
        elif kind == _KV_ARRIVE:
            job, source, target, kv = subject  # type: ignore[misc]
            assert isinstance(kv, KvExport)
            self.workers[target].receive(job, kv)
            core.kv_arrived(job, source, target, now)
            self.workers[source].handed_over(job)
        elif kind == _WAKE_WORKER:
            worker_id, wake_id = subject  # type: ignore[misc]
            core.worker_woken(worker_id, wake_id)
        elif kind == _WAKE_ROUTER:
            core.router_woken(now)
