"""The router's decisions: where each waiting prompt is prefilled, and where a prefilled request decodes.

- `LeastLoadedRouter`: every request goes at once to the worker holding the
  fewest unfinished tokens (INFaaS-style, as both Tropical's baselines and
  DistServe's prefill dispatcher do); the worker queues it.
- `MultiplexingToggle`: Tropical's dispatcher as its released code runs it
  (papers.md §1.4 d): the head of a shortest-first global queue goes inline to
  a multiplexing worker if that worker's running decodes can absorb the stall,
  else to an idle or "clockwork"-feasible prefill worker, else it waits.
- `UrgencyRouter`: Kairos's prefill side with late binding: the global queue
  in Moore–Hodgson order, handed out only to prefill workers that are free.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from tropical.latency.model import LatencyModel
from tropical.policies.prefill_queue import PrefillOrder, order_prefills, urgency_order
from tropical.policies.records import (
    Placement,
    RequestView,
    Role,
    RouterDecision,
    WorkerView,
)


def least_decode_load(request: RequestView, workers: Sequence[WorkerView], now: float) -> int | None:
    """The decoding worker with the fewest unfinished decode tokens (Tropical's migration target)."""
    best = None
    for w in workers:
        if w.role.decodes and (best is None or w.decode_load < best.decode_load):
            best = w
    return None if best is None else best.id


@dataclass(frozen=True)
class LeastLoadedRouter:
    """Place every waiting request at once on the `role` worker with the fewest unfinished tokens."""

    role: Role = Role.PREFILL

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        targets = [w for w in workers if w.role is self.role]
        if not targets or not queue:
            return RouterDecision()
        load = {w.id: w.prefill_load + (w.decode_load if self.role.decodes else 0) for w in targets}
        placements = []
        for r in queue:
            worker_id = min(load, key=load.__getitem__)
            load[worker_id] += r.prompt_tokens
            placements.append(Placement(r.id, worker_id))
        return RouterDecision(tuple(placements))


@dataclass(frozen=True)
class MultiplexingToggle:
    """Tropical's `slack_generator`: inline on a multiplexing worker, else a prefill worker, else wait.

    Constants are the released code's: prompts under 512 tokens always inline;
    prompts of 8192 or more never do; a multiplexing worker whose decode step
    is predicted over 0.85 s or whose decodes hold over 400k prompt tokens takes
    no inline prompt; a clockwork check inflates queued prefill times by 2 %.
    """

    model: LatencyModel
    multiplexing: bool = True
    short_prompt: int = 512
    max_inline_prompt: int = 8192
    latency_watermark: float = 0.85
    token_watermark: int = 400_000
    margin: float = 1.02
    order: PrefillOrder = PrefillOrder.SJF  # of the global queue; only its head is ever tried

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        placements: list[Placement] = []
        touched: set[int] = set()  # workers given a request in this call: their state is not yet reported
        for r in order_prefills(self.order, queue, self.model, now):
            worker_id = self.dispatch(r, workers, now, touched)
            if worker_id is None:
                break  # the head waits; nobody overtakes it
            touched.add(worker_id)
            placements.append(Placement(r.id, worker_id))
        return RouterDecision(tuple(placements))

    def dispatch(self, r: RequestView, workers: Sequence[WorkerView], now: float, touched: AbstractSet[int] = frozenset()) -> int | None:
        if self.multiplexing and r.prompt_tokens < self.max_inline_prompt:
            worker_id = self.inlinable_worker(r, workers, now, touched)
            if worker_id is not None:
                return worker_id
        return self.feasible_prefill_worker(r, workers, now, touched)

    def inlinable_worker(self, r: RequestView, workers: Sequence[WorkerView], now: float, touched: AbstractSet[int] = frozenset()) -> int | None:
        candidates = [w for w in workers if w.role is Role.MULTIPLEX and self.inlinable(r, w, now, w.id in touched)]
        if not candidates:
            return None
        return min(candidates, key=lambda w: w.decode_load).id

    def inlinable(self, r: RequestView, w: WorkerView, now: float, prefill_pending: bool = False) -> bool:
        if r.prompt_tokens < self.short_prompt:
            return True
        if w.prefills or prefill_pending:
            return False
        if self.model.decode_time(w.batch.size, w.batch.context_tokens) > self.latency_watermark:
            return False
        if w.decode_load > self.token_watermark:
            return False
        stall_end = now + self.model.prefill_time(r.prompt_tokens)
        reserve = w.batch.reserve_deadline
        for q in w.waiting + w.incoming:
            reserve = min(reserve, q.token_deadline - q.tpot_slo)
        return stall_end <= reserve

    def feasible_prefill_worker(self, r: RequestView, workers: Sequence[WorkerView], now: float, touched: AbstractSet[int] = frozenset()) -> int | None:
        candidates = [
            w
            for w in workers
            if w.role is Role.PREFILL and w.placed_since_step == 0 and w.id not in touched and self.clockwork_feasible(r, w, now)
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda w: w.prefill_load).id

    def clockwork_feasible(self, r: RequestView, w: WorkerView, now: float) -> bool:
        """Idle, or inserting `r` shortest-first into the worker's queue leaves every deadline positive."""
        if not w.busy and not w.prefills:
            return True
        held = []
        for q in w.prefills:
            duration = self.model.prefill_time(q.remaining_prefill)
            held.append((duration, q.ttft_deadline - w.step_begin - duration))
        duration = self.model.prefill_time(r.remaining_prefill)
        held.append((duration, r.ttft_deadline - w.step_end - duration))
        held.sort()
        elapsed = now - w.step_begin
        offset = 0.0
        for duration, slack in held:
            if slack - offset - elapsed <= 0.0:
                return False
            offset += self.margin * duration
        return True


@dataclass(frozen=True)
class UrgencyRouter:
    """Kairos's prefill queue, kept global: Moore–Hodgson order, handed only to free prefill workers.

    A free worker (nothing queued or running) gets the head of the order plus
    the following prompts while they fit `batch_tokens`; the rest stay global,
    so a later, more urgent arrival can still overtake them.
    """

    model: LatencyModel
    batch_tokens: int = 4096
    max_batch: int = 256

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        prefill = [w for w in workers if w.role is Role.PREFILL]
        free = [w for w in prefill if not w.prefills]
        if not free or not queue:
            return RouterDecision()
        busy_until = sum(max(w.step_end - now, 0.0) for w in prefill if w.prefills)
        order = urgency_order(queue, self.model, now, start=now + busy_until / len(prefill), servers=len(prefill))
        placements: list[Placement] = []
        position = 0
        for w in sorted(free, key=lambda w: w.id):
            budget = self.batch_tokens
            taken = 0
            while position < len(order) and taken < self.max_batch:
                r = order[position]
                if taken and r.remaining_prefill > budget:
                    break
                if r.prefill_tokens > w.kv_free:
                    break
                budget -= r.remaining_prefill
                taken += 1
                position += 1
                placements.append(Placement(r.id, w.id))
            if position >= len(order):
                break
        return RouterDecision(tuple(placements))
