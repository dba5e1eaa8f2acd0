"""The router's decisions: where each waiting prompt is prefilled, and where a prefilled request decodes.

- `LeastLoadedRouter`: every request goes at once to a worker, which queues
  it: by default the one with the fewest queued prefill tokens, then the
  earliest end of its step in progress (what a load-aware router such as
  llm-d's scorers does in front of vLLM); or, as `PlacementRule.INFAAS`, the
  one holding the fewest unfinished tokens (as Tropical's baselines and
  DistServe's prefill dispatcher do).
- `MultiplexingToggle`: Tropical's dispatcher as its released code runs it
  (papers.md §1.4 d): the head of a shortest-first global queue goes inline to
  a multiplexing worker if that worker's running decodes can absorb the stall,
  else to an idle or "clockwork"-feasible prefill worker, else it waits.
- `UrgencyRouter`: Kairos's prefill side with late binding: the global queue
  in Moore–Hodgson order, handed out only to prefill workers that are free.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cached_property

from tropical.latency.model import LatencyModel
from tropical.policies.prefill_queue import PrefillOrder, iter_prefills, iter_urgency
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
    prefill = Role.PREFILL
    for w in workers:  # a router asks this over the whole cluster at every handoff: `w.role.decodes` written out
        if w.role is not prefill and (best is None or w.decode_load < best.decode_load):
            best = w
    return None if best is None else best.id


class PlacementRule(enum.StrEnum):
    LOAD_AWARE = "load-aware"  # fewest queued prefill tokens, then the step in progress that ends first
    INFAAS = "infaas"  # fewest unfinished tokens, prompt and decode (blind to which worker is about to be free)


@dataclass(frozen=True)
class LeastLoadedRouter:
    """Place every waiting request at once on the least loaded `role` worker, by `rule`.

    INFaaS's rule counts a worker's unfinished decode tokens too, so a prompt
    can go to a worker with little decode work but a long step in progress
    while another is about to be free; the load-aware rule asks which worker
    starts the prompt first. Neither wins everywhere (docs/results.md).
    """

    role: Role = Role.PREFILL
    rule: PlacementRule = PlacementRule.LOAD_AWARE

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        role = self.role
        targets = [w for w in workers if w.role is role]
        if not targets or not queue:
            return RouterDecision()
        # a heap of (load, when it can start a prompt, position, worker): its top is the least loaded, the first in
        # worker order among equals; INFaaS's load counts decode tokens too, and is blind to when a worker is free
        if self.rule is PlacementRule.INFAAS:
            decodes = role.decodes
            heap = [(w.prefill_load + (w.decode_load if decodes else 0), 0.0, i, w.id) for i, w in enumerate(targets)]
        else:
            heap = [(w.prefill_load, w.step_end if w.busy else now, i, w.id) for i, w in enumerate(targets)]
        heapq.heapify(heap)
        placements = []
        for r in queue:
            load, free_at, i, worker_id = heap[0]
            heapq.heapreplace(heap, (load + r.prompt_tokens, free_at, i, worker_id))
            placements.append(Placement(r.id, worker_id))
        return RouterDecision(tuple(placements))


@dataclass(frozen=True)
class MultiplexingToggle:
    """Tropical's `slack_generator`: inline on a multiplexing worker, else a prefill worker, else wait.

    Constants are the released code's: prompts under 512 tokens always inline;
    prompts of 8192 or more never do; a multiplexing worker whose decode step
    is predicted over 0.85 s or whose decodes hold over 400k prompt tokens takes
    no inline prompt; a clockwork check inflates queued prefill times by 2 %.
    Short prompts skip every check, so the one choice that protects their TTFT
    is where they go: the multiplexing worker holding the fewest unprefilled
    prompt tokens, then the fewest decode tokens, counting what this call
    placed. The rule as first ported, fewest decode tokens alone, did not see a
    worker's prompts until they joined its batch, and so sent every short
    arrival between two of that worker's steps to it.
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
        targets = _ToggleTargets(self, workers, now)
        for r in iter_prefills(self.order, queue, self.model, now):
            worker_id = targets.dispatch(r, touched)
            if worker_id is None:
                break  # the head waits; nobody overtakes it
            touched.add(worker_id)
            placements.append(Placement(r.id, worker_id))
        return RouterDecision(tuple(placements))

    def dispatch(self, r: RequestView, workers: Sequence[WorkerView], now: float, touched: AbstractSet[int] = frozenset()) -> int | None:
        """Where r goes now: inline on a multiplexing worker, else on a prefill worker; None: it waits."""
        return _ToggleTargets(self, workers, now).dispatch(r, touched)

    def inlinable(self, r: RequestView, w: WorkerView, now: float, prefill_pending: bool = False) -> bool:
        if r.prompt_tokens < self.short_prompt:
            return True
        if w.prefills or prefill_pending or not self.steady(w):
            return False
        return now + self.model.prefill_time(r.prompt_tokens) <= self.reserve(w)

    def steady(self, w: WorkerView) -> bool:
        """A decode step and decode tokens that leave room for an inline prompt."""
        return self.model.decode_time(w.batch.size, w.batch.context_tokens) <= self.latency_watermark and w.decode_load <= self.token_watermark

    @staticmethod
    def reserve(w: WorkerView) -> float:
        """The latest end of a stall that leaves every decode of w at least one TPOT banked."""
        reserve = w.batch.reserve_deadline
        for q in w.waiting + w.incoming:
            reserve = min(reserve, q.token_deadline - q.tpot_slo)
        return reserve

    def clockwork_feasible(self, r: RequestView, w: WorkerView, now: float) -> bool:
        """Idle, or inserting `r` shortest-first into the worker's queue leaves every deadline positive."""
        if not w.busy and not w.prefills:
            return True
        return self.clockwork_fits(r, w, sorted(self.clockwork_queue(w)), now)

    def clockwork_queue(self, w: WorkerView) -> list[tuple[float, float]]:
        """(duration, slack) of each prompt queued on w, slack counted from the start of its step in progress."""
        held = []
        for q in w.prefills:
            duration = self.model.prefill_time(q.remaining_prefill)
            held.append((duration, q.ttft_deadline - w.step_begin - duration))
        return held

    def clockwork_fits(self, r: RequestView, w: WorkerView, held: list[tuple[float, float]], now: float) -> bool:
        """The clockwork check of `r` against w's queue, `held` as `clockwork_queue` gives it, sorted."""
        duration = self.model.prefill_time(r.remaining_prefill)
        own = (duration, r.ttft_deadline - w.step_end - duration)
        elapsed = now - w.step_begin
        offset = 0.0
        for duration, slack in heapq.merge(held, (own,)):
            if slack - offset - elapsed <= 0.0:
                return False
            offset += self.margin * duration
        return True


class _ToggleTargets:
    """`MultiplexingToggle.dispatch` for one `place` call, with what every prompt would recompute worked out once.

    Within a call the workers' views do not change; only the set of workers
    given a prompt in it grows. So the least-loaded multiplexing worker (where
    every short prompt goes), the multiplexing workers free of prompts in the
    order a longer prompt tries them, and each prefill worker's queue are
    worked out once, when first needed, each list in the order `min` would
    prefer (load, then position); the multiplexing workers' loads grow by each
    short prompt given to them.
    """

    def __init__(self, toggle: MultiplexingToggle, workers: Sequence[WorkerView], now: float) -> None:
        self.toggle = toggle
        self.now = now
        self.workers = workers
        self.mux = [w for w in workers if w.role is Role.MULTIPLEX] if toggle.multiplexing else []
        # Short prompts go to the multiplexing worker with the fewest unfinished decode tokens, counting the
        # prompts already placed there (they decode there next) and those given to it in this call.
        self.mux_load = [((w.prefill_load, w.decode_load), i, w.id) for i, w in enumerate(self.mux)]
        heapq.heapify(self.mux_load)
        self.queues: dict[int, list[tuple[float, float]] | None] = {}  # a prefill worker's sorted queue, or None if idle

    @cached_property
    def unqueued(self) -> list[tuple[int, int, WorkerView]]:
        """(decode load, position, worker) of the multiplexing workers with no prompt queued: those a longer prompt
        may go to, in the order it tries them (whether their decodes can absorb it is asked on the way)."""
        return sorted((w.decode_load, i, w) for i, w in enumerate(self.mux) if not w.prefills)

    @cached_property
    def prefill(self) -> list[tuple[int, int, WorkerView]]:
        """(load, position, worker) of the prefill workers given nothing since their step began."""
        prefill = [w for w in self.workers if w.role is Role.PREFILL and w.placed_since_step == 0]
        return sorted((w.prefill_load, i, w) for i, w in enumerate(prefill))

    def dispatch(self, r: RequestView, touched: AbstractSet[int]) -> int | None:
        toggle = self.toggle
        if toggle.multiplexing and r.prompt_tokens < toggle.max_inline_prompt:
            if r.prompt_tokens < toggle.short_prompt:
                if self.mux_load:
                    load, i, worker_id = self.mux_load[0]
                    heapq.heapreplace(self.mux_load, ((load[0] + r.prompt_tokens, load[1]), i, worker_id))
                    return worker_id
            else:
                stall_end = self.now + toggle.model.prefill_time(r.prompt_tokens)
                for _, _, w in self.unqueued:
                    if w.id not in touched and toggle.steady(w) and stall_end <= toggle.reserve(w):
                        return w.id
        for _, _, w in self.prefill:
            if w.id not in touched and self._clockwork_feasible(r, w):
                return w.id
        return None

    def _clockwork_feasible(self, r: RequestView, w: WorkerView) -> bool:
        if w.id not in self.queues:
            self.queues[w.id] = None if not w.busy and not w.prefills else sorted(self.toggle.clockwork_queue(w))
        held = self.queues[w.id]
        return held is None or self.toggle.clockwork_fits(r, w, held, self.now)


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
        order = iter_urgency(queue, self.model, now, start=now + busy_until / len(prefill), servers=len(prefill))
        placements: list[Placement] = []
        head = next(order, None)  # the most urgent prompt not handed out yet
        for w in sorted(free, key=lambda w: w.id):
            budget = self.batch_tokens
            taken = 0
            while head is not None and taken < self.max_batch:
                if taken and head.remaining_prefill > budget:
                    break
                if head.prefill_tokens > w.kv_free:
                    break
                budget -= head.remaining_prefill
                taken += 1
                placements.append(Placement(head.id, w.id))
                head = next(order, None)
            if head is None:
                break
        return RouterDecision(tuple(placements))
