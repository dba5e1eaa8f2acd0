"""What the router holds: the waiting queue, and the dispatches workers have not confirmed yet.

Placement order stays global and late-bound: a request waits here until the
policy places it, so the router hands a worker only what it can start soon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace

from tropical.core.actions import Action, RouterWake
from tropical.core.request import RequestState
from tropical.latency.model import LatencyModel
from tropical.policies.records import RequestId, RequestView, Role, RouterDecision, WorkerView
from tropical.policies.serving import ServingPolicy

PlacePrompt = Callable[[RequestState, int, float], None]  # (request, worker, now): apply one placement


def feasible(job: RequestState, model: LatencyModel, kv_capacity: int) -> bool:
    """Whether an idle worker could serve it within both SLOs (else it is refused at arrival, a miss).

    The same admission rule for every policy: a request no schedule could serve
    is refused by all of them alike.
    """
    return job.prompt + job.output <= kv_capacity and _prefills_in_time(job, model) and _decodes_in_time(job, model)


def _prefills_in_time(job: RequestState, model: LatencyModel) -> bool:
    return model.prefill_time(job.prompt) <= job.ttft_slo


def _decodes_in_time(job: RequestState, model: LatencyModel) -> bool:
    return job.output <= 1 or model.decode_time(1, job.prompt + job.output // 2) <= job.tpot_slo


WorkerKind = tuple[Role, LatencyModel, int]  # what feasibility depends on: role, step times, KV capacity


def feasible_on(job: RequestState, kinds: Sequence[WorkerKind]) -> bool:
    """`feasible` on a cluster of different workers: some worker taking prompts could prefill it in time, and some
    decoding worker could hold it and decode it within its TPOT (the same worker on a colocated or multiplexing one)."""
    whole = job.prompt + job.output
    return any(
        role.takes_prompts and (job.prompt if role is Role.PREFILL else whole) <= capacity and _prefills_in_time(job, model)
        for role, model, capacity in kinds
    ) and any(role.decodes and whole <= capacity and _decodes_in_time(job, model) for role, model, capacity in kinds)


class RouterState:
    """The global queue of prompts not placed yet, and when the policy wants to be asked again."""

    def __init__(self, policy: ServingPolicy, out: list[Action]) -> None:
        self.policy = policy
        self.out = out
        self.queue: dict[RequestId, RequestState] = {}
        self.wake = math.inf
        self._queue_views: tuple[RequestView, ...] | None = None
        self._unjudged: list[RequestId] = []  # queued since `drop_infeasible` last looked on `_judged_on`
        self._judged_on: tuple[WorkerKind, ...] = ()

    def enqueue(self, job: RequestState) -> None:
        self.queue[job.id] = job
        if self._judged_on:  # only a live router judges (the simulator refuses at arrival): nothing piles up unread
            self._unjudged.append(job.id)
        self._queue_views = None

    def remove(self, request_id: RequestId) -> RequestState | None:
        """Take a request out of the queue (a cancel); None when it is not waiting here."""
        job = self.queue.pop(request_id, None)
        if job is not None:
            self._queue_views = None
        return job

    def drop_infeasible(self, kinds: Sequence[WorkerKind]) -> list[RequestId]:
        """Refuse the queued requests no idle worker of these kinds could serve within their SLOs (`feasible_on`): a
        live router's side of the rule the simulator applies at arrival. Their ids, in queue order.

        Nothing is refused while no worker taking prompts or none decoding has reported yet: what has not reported
        cannot be judged. A request is judged once for a given set of kinds: the router asks this on every decision.
        """
        if not (any(role.takes_prompts for role, _, _ in kinds) and any(role.decodes for role, _, _ in kinds)):
            return []
        if tuple(kinds) != self._judged_on:
            self._judged_on, self._unjudged = tuple(kinds), list(self.queue)
        fresh, self._unjudged = self._unjudged, []
        gone = [job for job in (self.queue.get(i) for i in fresh) if job is not None and not feasible_on(job, kinds)]
        for job in gone:
            del self.queue[job.id]
            job.infeasible = job.dropped = True
        if gone:
            self._queue_views = None
        return [job.id for job in gone]

    def route(self, views: Sequence[WorkerView], now: float, place: PlacePrompt) -> bool:
        """Ask the policy where queued prompts go and apply its answer; whether anything changed."""
        queue_views = self._queue_views
        if queue_views is None:
            queue_views = self._queue_views = tuple(j.view for j in self.queue.values())
        decision: RouterDecision = self.policy.place(queue_views, views, now)
        for placement in decision.placements:
            worker = views[placement.worker_id]
            if not worker.role.takes_prompts:
                raise ValueError(f"{self.policy.name} placed a prompt on {worker.role} worker {worker.id}")
            place(self.queue.pop(placement.request_id), placement.worker_id, now)
        for request_id in decision.drops:
            self.queue.pop(request_id).dropped = True
        if decision.placements or decision.drops:
            self._queue_views = None
        review = decision.review_at
        if review is not None and now < review < self.wake:
            self.wake = review
            self.out.append(RouterWake(review))
        return bool(decision.placements or decision.drops)

    def woken(self, now: float) -> None:
        if now >= self.wake:
            self.wake = math.inf


@dataclass(frozen=True, slots=True)
class Dispatched:
    request: RequestView
    at: float


class DispatchLedger:
    """Placements a worker's status does not show yet, so the router never counts a worker as emptier than it is.

    A live router sees each worker through its last heartbeat. A prompt it
    dispatched after that heartbeat is added to the worker's view until a
    heartbeat shows it (held there, or taken since the previous heartbeat), or
    until `confirm_after` seconds pass without that: the dispatch is then
    reported as lost, for the router to place again.
    """

    def __init__(self, confirm_after: float = 5.0) -> None:
        self.confirm_after = confirm_after
        self._pending: dict[Hashable, dict[RequestId, Dispatched]] = {}  # by worker (its name, live)

    def dispatched(self, worker: Hashable, request: RequestView, now: float) -> None:
        self._pending.setdefault(worker, {})[request.id] = Dispatched(request, now)

    def pending(self, worker: Hashable) -> tuple[RequestView, ...]:
        return tuple(d.request for d in self._pending.get(worker, {}).values())

    def confirm(self, worker: Hashable, seen: Iterable[RequestId]) -> None:
        """A status of `worker` shows `seen` (what it holds, and what it took since its last status)."""
        pending = self._pending.get(worker)
        if not pending:
            return
        for request_id in seen:
            pending.pop(request_id, None)

    def lost(self, now: float) -> list[tuple[Hashable, RequestView]]:
        """Dispatches no status has confirmed within `confirm_after`: forgotten here, returned to place again."""
        gone = []
        for worker, pending in self._pending.items():
            for request_id in [r for r, d in pending.items() if now - d.at > self.confirm_after]:
                gone.append((worker, pending.pop(request_id).request))
        return gone

    def forget_worker(self, worker: Hashable) -> tuple[RequestView, ...]:
        """A worker went away: what it had been dispatched and never confirmed."""
        return tuple(d.request for d in self._pending.pop(worker, {}).values())

    def view(self, worker: Hashable, view: WorkerView) -> WorkerView:
        """`worker`'s view with its unconfirmed dispatches added as queued prompts, as it will soon hold them."""
        pending = self._pending.get(worker)
        if not pending:
            return view
        extra = tuple(d.request for d in pending.values())
        return replace(
            view,
            prefills=view.prefills + extra,
            prefill_load=view.prefill_load + sum(r.remaining_prefill for r in extra),
            placed_since_step=view.placed_since_step + len(extra),
        )
