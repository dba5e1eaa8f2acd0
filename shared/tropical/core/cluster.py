"""Workers and the router together, as one process sees a whole cluster: events and `now` in, actions out.

This is everything the simulator used to do besides keeping time: where a
placement lands, what happens when a step ends, where a prefilled request
decodes (a prefill worker's finished prompt is routed to a decoding worker,
which pulls its KV when it has room), and letting the router and every idle
worker act until nothing more happens at one instant. The driver feeds it
arrivals, step ends, KV arrivals and wake-ups on its own clock, and carries out
the actions it leaves in `out`, in order.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence

from tropical.core.actions import Action
from tropical.core.request import RequestState
from tropical.core.router import RouterState, feasible_on
from tropical.core.worker import Perturb, WorkerState, no_perturbation
from tropical.latency.model import LatencyModel
from tropical.policies.records import Role, WorkerView
from tropical.policies.serving import ServingPolicy

SETTLE_ROUNDS = 1000


class ClusterCore:
    """One policy over a set of workers, each with its latency model and KV capacity (one for all, or one per worker)."""

    def __init__(
        self,
        policy: ServingPolicy,
        roles: Sequence[Role],
        kv_capacity: int | Sequence[int],
        model: LatencyModel | Sequence[LatencyModel],
        *,
        perturb: Perturb = no_perturbation,
        spans: bool = True,
        refuse_infeasible: bool = True,
        instances: Sequence[int] | None = None,
        swap_per_token: Sequence[float] | None = None,
    ) -> None:
        """`spans=False` runs every decode step on its own, as live workers do (the simulator batches them).
        `refuse_infeasible=False` serves even requests no idle worker could serve in SLO, as a real engine does
        (they miss either way; a replay held against real runs must carry their load too). `instances` names
        each worker's instance: workers of one instance are the lanes of a pipeline, which share its stages.
        `swap_per_token` gives each worker's seconds to copy one token's KV to or from host memory: without it no
        worker can swap, and a policy that preempts by swapping is refused at its first preemption."""
        self.policy = policy
        capacities = [kv_capacity] * len(roles) if isinstance(kv_capacity, int) else list(kv_capacity)
        models = [model] * len(roles) if isinstance(model, LatencyModel) else list(model)
        if len(capacities) != len(roles) or len(models) != len(roles):
            raise ValueError(f"{len(roles)} workers need as many KV capacities and models, got {len(capacities)} and {len(models)}")
        self.kinds = list(dict.fromkeys(zip(roles, models, capacities, strict=True)))  # distinct workers, for feasibility
        self.refuse_infeasible = refuse_infeasible
        self.out: list[Action] = []
        self._changed: set[int] = set(range(len(roles)))  # workers whose cached view may be stale
        self._plans: set[int] = set()  # workers that need a plan once idle
        swaps = [None] * len(roles) if swap_per_token is None else list(swap_per_token)
        if len(swaps) != len(roles):
            raise ValueError(f"{len(roles)} workers need as many swap times, got {len(swaps)}")
        self.workers = [
            WorkerState(i, role, capacity, worker_model, self.out, perturb, spans=spans, changes=self._changed, plans=self._plans, swap_per_token=swap)
            for i, (role, worker_model, capacity, swap) in enumerate(zip(roles, models, capacities, swaps, strict=True))
        ]
        if instances is not None:
            if len(instances) != len(roles):
                raise ValueError(f"{len(roles)} workers need as many instance ids, got {len(instances)}")
            lanes: dict[int, list[WorkerState]] = {}
            for worker, instance in zip(self.workers, instances, strict=True):
                lanes.setdefault(instance, []).append(worker)
            for worker, instance in zip(self.workers, instances, strict=True):
                worker.peers = [peer for peer in lanes[instance] if peer is not worker]
        self._views: list[WorkerView] = [w.view(0.0) for w in self.workers]  # kept between calls; all stale until the first
        self._expiry: list[tuple[float, int]] = []  # (time a cached view stops holding, worker): a heap
        self._views_at = -math.inf
        self.router = RouterState(policy, self.out)
        self.stranded: list[tuple[RequestState, WorkerState]] = []  # prefilled, no decoding worker chosen yet
        self._tokens = itertools.count(1)
        self._next_token = self._tokens.__next__

    def drain(self) -> list[Action]:
        """The actions made since the last drain, oldest first."""
        actions, self.out[:] = list(self.out), []
        return actions

    # --- events --------------------------------------------------------------------------

    def arrive(self, job: RequestState) -> bool:
        """A request arrives; False when no idle cluster could serve it in SLO (it is refused)."""
        if self.refuse_infeasible and not feasible_on(job, self.kinds):
            job.infeasible = job.dropped = True
            return False
        self.router.enqueue(job)
        return True

    def step_ended(self, worker_id: int, span_id: int, now: float) -> bool:
        """A worker's step (span) ended; False for a span that was since replaced (cut short)."""
        worker = self.workers[worker_id]
        if not (worker.busy and worker.span_id == span_id):
            return False
        worker.end_step(now, self._hand_off)
        return True

    def kv_arrived(self, job: RequestState, source: int, target: int, now: float) -> None:
        self.workers[source].handed_over(job, now)
        self.workers[target].kv_arrived(job, now)

    def worker_woken(self, worker_id: int, wake_id: int) -> None:
        worker = self.workers[worker_id]
        if worker.wake_id == wake_id and not worker.busy:
            worker.needs_plan = True

    def router_woken(self, now: float) -> None:
        self.router.woken(now)

    # --- reacting ------------------------------------------------------------------------

    def views(self, now: float) -> list[WorkerView]:
        """Every worker's view at `now`. A router asks on every event, and at scale most workers have not
        moved since the last ask: only those that changed or crossed a step boundary are looked at again."""
        workers, changed, expiry, views = self.workers, self._changed, self._expiry, self._views
        if now < self._views_at:  # time went back: no cached view can be trusted
            expiry.clear()
            changed.update(range(len(workers)))
        while expiry and expiry[0][0] <= now:
            changed.add(heapq.heappop(expiry)[1])
        stale = list(changed)
        changed.clear()
        for i in stale:
            worker = workers[i]
            views[i] = worker.view(now)
            until = worker.view_until
            if until <= now:
                changed.add(i)  # holds only at this instant: look again next time
            elif until < math.inf:
                heapq.heappush(expiry, (until, i))
        self._views_at = now
        return list(views)

    def settle(self, now: float) -> None:
        """Let the router and every idle worker act until nothing more happens at `now`."""
        router, workers = self.router, self.workers
        for _ in range(SETTLE_ROUNDS):
            progressed = False
            if self.stranded:
                progressed |= self._retry_stranded(now)
            if router.queue:
                progressed |= router.route(self.views(now), now, self._place)
            for i in sorted(self._plans):  # in worker order; a plan only ever flags its own worker again
                worker = workers[i]
                if worker.needs_plan and not worker.busy:
                    worker.needs_plan = False
                    progressed |= worker.start_step(self.policy, self._next_token, now)
            if not progressed:
                return
        raise RuntimeError(f"the cluster did not settle at t={now}: a policy keeps changing its mind")

    def _place(self, job: RequestState, worker_id: int, now: float) -> None:
        self.workers[worker_id].place(job, now)

    def _retry_stranded(self, now: float) -> bool:
        stranded, self.stranded = self.stranded, []
        for job, source in stranded:
            self._hand_off(job, source, now)
        return len(self.stranded) < len(stranded)

    def _hand_off(self, job: RequestState, source: WorkerState, now: float) -> None:
        """Route a prompt prefilled on a prefill worker to a decoding worker (or keep it until one is chosen)."""
        target_id = self.policy.route_decode(job.view, self.views(now), now)
        if target_id is None:
            self.stranded.append((job, source))
            return
        target = self.workers[target_id]
        if not target.role.decodes:
            raise ValueError(f"{self.policy.name} handed request {job.id} to {target.role} worker {target.id}")
        target.receive(job, source.id, now)
