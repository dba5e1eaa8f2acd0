"""The decoding workers in order of the earliest first token an inline prompt could get there, kept between calls.

`tropical.policies.unified`'s router weighs every worker for every prompt, and
it is asked on every arrival: over a cluster of hundreds of workers, reading
every view on every call was most of its cost. Yet from one call to the next
only the workers that moved on have new views (the simulator's core hands
back the same view object for a worker that has not). So the numbers a call
needs of each worker are kept with the view they came from, and only workers
whose view is not the same object are read again: views are immutable, so this
is a cache and not state, and every call decides what a fresh reading would.

A worker's bound (`_Entry`) is when a prompt placed on it could give its first
token at the soonest: the end of the step in progress (or now), plus one
decode step of its batch, plus the queued prompt work that runs before every
prompt of the call (recomputes, and prompts due no later than the earliest).
Two parts of it depend on the call (`now`, and that earliest deadline), so the
kept order is by a lower bound without them, and `visit` refines each worker's
bound as it comes up: workers come out in the order of their exact bounds.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from itertools import compress
from operator import is_not
from typing import NamedTuple

from tropical.latency.model import LatencyModel
from tropical.policies.batching import tpot_attainable
from tropical.policies.records import RequestId, RequestView, Role, WorkerView


class _Entry(NamedTuple):
    """One decoding worker's part of the bound, from its view (kept at the same position in `InlineIndex.views`)."""

    start: float | None  # the end of the step in progress; None when idle (the bound starts at `now`)
    step: float  # one decode step of its batch, 0 without one
    recomputes: float  # prompt work of its queued recomputes: ahead of every prompt
    fresh: tuple[tuple[float, float], ...]  # (TTFT deadline, work) of its other queued prompts, in queue order
    behind_from: float  # the earliest next-token deadline of a waiting decode that can still meet its TPOT

    def lends(self, now: float, protect_waiting: bool) -> bool:
        """Whether it may lend steps to prompt chunks: not while a waiting decode is already behind its budget (with
        `protect_waiting`), as chunks would delay that decode more."""
        return not (protect_waiting and self.behind_from < now)

    def floor(self, due: float) -> float:
        """Queued prompt work that runs before a prompt due no earlier than `due`."""
        work = self.recomputes
        for deadline, fresh in self.fresh:
            if deadline <= due:
                work += fresh
        return work


class InlineIndex:
    """A router's kept reading of the workers: who takes prompts, and the decoding workers by their bound."""

    def __init__(self) -> None:
        self.views: tuple[WorkerView, ...] = ()  # the views read at the last call, by position
        self.reading: tuple[LatencyModel, bool] | None = None  # the router's model and multiplexing they were read with
        self.entries: list[_Entry | None] = []  # by position; None for a worker that lends no decode steps
        self.prefill: list[int] = []  # positions of the prefill workers
        self.takers = 0  # workers that may take a prompt
        self.busy: dict[int, tuple[float, int]] = {}  # position → (lower bound, position) of a busy decoding worker
        self.idle: dict[int, tuple[float, int]] = {}  # position → (lower bound − now, position) of an idle one

    def read(self, workers: Sequence[WorkerView], model: LatencyModel, multiplexing: bool) -> None:
        """Bring the index up to `workers`, reading again only the views that are not the ones read last time."""
        views = tuple(workers)
        old = self.views
        afresh = (model, multiplexing) != self.reading or len(views) != len(old)  # another router, or cluster
        if afresh:
            self.reading = (model, multiplexing)
            self.entries, self.busy, self.idle = [None] * len(views), {}, {}
            changed: Sequence[int] = range(len(views))
        else:
            changed = list(compress(range(len(views)), map(is_not, views, old)))  # by identity, at C speed
        self.views = views
        recount = afresh
        for i in changed:
            w, seen = views[i], None if afresh else old[i]
            if seen is not None and seen.role is not w.role:
                recount = True
            self._enter(i, w, seen, model, multiplexing)
        if recount:
            self.prefill = [i for i, w in enumerate(views) if w.role is Role.PREFILL]
            self.takers = sum(1 for w in views if takes_prompts(w.role, multiplexing))

    def _enter(self, i: int, w: WorkerView, seen: WorkerView | None, model: LatencyModel, multiplexing: bool) -> None:
        """Read worker i's new view `w`; `seen` is the one read before, whose numbers still hold where its queues do."""
        self.busy.pop(i, None)
        self.idle.pop(i, None)
        kept = self.entries[i]
        if w.role is Role.PREFILL or not takes_prompts(w.role, multiplexing):  # lends no decode steps to prompts
            self.entries[i] = None
            return
        batch = w.batch
        step = model.d0 + model.d1 * batch.size + model.d2 * batch.context_tokens if batch.size else 0.0
        if kept is not None and seen is not None and seen.prefills is w.prefills and seen.in_step is w.in_step:
            recomputes, fresh = kept.recomputes, kept.fresh  # a worker only further into its decode steps
        else:
            recomputes, fresh = _queued_work(w, model)
        if kept is not None and seen is not None and seen.waiting is w.waiting:
            behind = kept.behind_from
        elif w.waiting:
            behind = min((q.token_deadline for q in w.waiting if tpot_attainable(q, model)), default=math.inf)
        else:
            behind = math.inf
        entry = self.entries[i] = _Entry(w.step_end if w.busy else None, step, recomputes, fresh, behind)
        if entry.start is None:
            self.idle[i] = (step + recomputes, i)
        else:
            self.busy[i] = (entry.start + step + recomputes, i)

    def lenders(self, now: float, protect_waiting: bool) -> Iterator[tuple[int, WorkerView]]:
        """The decoding workers that may lend steps to prompt chunks, by position."""
        for i, entry in enumerate(self.entries):
            if entry is not None and entry.lends(now, protect_waiting):
                yield i, self.views[i]

    def visit(self, now: float, due: float, protect_waiting: bool) -> Iterator[tuple[float, int, WorkerView, float]]:
        """(bound, position, view, queued work ahead of every prompt due no earlier than `due`) of each decoding
        worker that may lend steps (`_Entry.lends`), by bound, then position."""
        busy = list(self.busy.values())
        idle = list(self.idle.values())
        heapq.heapify(busy)
        heapq.heapify(idle)
        exact: list[tuple[float, int, float]] = []  # (bound, position, floor) of the workers refined so far
        entries, views, inf = self.entries, self.views, math.inf
        while True:
            b = busy[0][0] if busy else inf
            d = idle[0][0] + now if idle else inf
            if exact and exact[0][0] <= b and exact[0][0] <= d:
                bound, i, floor = heapq.heappop(exact)
                yield bound, i, views[i], floor
                continue
            if b == inf and d == inf:
                return
            _, i = heapq.heappop(busy) if b <= d else heapq.heappop(idle)
            entry = entries[i]
            assert entry is not None
            if not entry.lends(now, protect_waiting):
                continue
            start = entry.start if entry.start is not None and entry.start > now else now  # max(now, step end)
            floor = entry.floor(due)
            heapq.heappush(exact, (start + entry.step + floor, i, floor))


def takes_prompts(role: Role, multiplexing: bool) -> bool:
    """Whether a router places prompts on a worker of this role: prefill workers always, decoding ones only when it
    multiplexes (a decode-only worker never)."""
    return role is Role.PREFILL or (multiplexing and role.takes_prompts)


def _queued_work(w: WorkerView, model: LatencyModel) -> tuple[float, tuple[tuple[float, float], ...]]:
    """The work of w's queued recomputes, and (deadline, work) of its other queued prompts."""
    recomputes, fresh = 0.0, []
    if w.prefills:
        begun = begun_tokens(w) if w.in_step else {}
        for q in w.prefills:
            work = unstarted_work(model.c0, model.c1, q, begun)
            if q.generated > 0:
                recomputes += work
            else:
                fresh.append((q.arrival + q.ttft_slo, work))
    return recomputes, tuple(fresh)


def begun_tokens(w: WorkerView) -> dict[RequestId, int]:
    """Prompt tokens per request that w's step in progress computes."""
    begun: dict[RequestId, int] = {}
    for request, tokens in w.in_step:
        begun[request] = begun.get(request, 0) + tokens
    return begun


def unstarted_work(c0: float, c1: float, q: RequestView, begun: dict[RequestId, int]) -> float:
    """`prompt_work` of q's `unstarted_prefill`, written out: a router asks it of most prompts queued in the cluster."""
    end = q.prompt_tokens + q.generated  # q.prefill_tokens
    start = q.prefilled + begun.get(q.id, 0) if begun else q.prefilled
    return c0 * (end * end - start * start) + c1 * (end - start)
