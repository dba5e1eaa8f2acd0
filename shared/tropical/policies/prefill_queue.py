"""Prefill ordering: FCFS, shortest first, and deadline-count maximisation (Moore–Hodgson).

Kairos's prefill side asks which prompts to run, and in which order, so that as
many as possible meet their TTFT deadline. On one machine with known processing
times that is the scheduling problem 1||ΣU_j, solved exactly by Moore and
Hodgson's algorithm: walk the jobs in deadline order and, whenever the
schedule runs late, drop the longest job kept so far. The dropped jobs are not
abandoned, only moved behind every job that can still make it.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from tropical.latency.model import LatencyModel
from tropical.policies.records import IDLE, RequestId, RequestView, StepPlan, WorkerView


@dataclass(frozen=True, slots=True)
class Job:
    id: RequestId
    duration: float
    deadline: float


def moore_hodgson(jobs: Sequence[Job], start: float) -> tuple[list[Job], list[Job]]:
    """Split `jobs` into a largest on-time set (in EDF order) and the rest (in EDF order).

    Running the first list back to back from `start` meets every deadline in it,
    and no other order or selection meets more deadlines.
    """
    on_time, late = _moore_hodgson([(j.deadline, j.duration, i) for i, j in enumerate(jobs)], start)
    return [jobs[i] for i in on_time], [jobs[i] for i in late]


def _moore_hodgson(jobs: list[tuple[float, float, int]], start: float) -> tuple[list[int], list[int]]:
    """`moore_hodgson` over (deadline, duration, position) tuples: the positions on time and late, each in EDF order.

    Sorting the tuples is the stable sort by (deadline, duration); plain tuples
    keep the router's per-arrival ordering of a long queue cheap. The k-th job
    in EDF order is known by k alone, so the heap holds (−duration, k).
    """
    jobs = sorted(jobs)
    longest: list[tuple[float, int]] = []  # max-heap of (−duration, k)
    dropped: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    finish = start
    for k, (deadline, duration, _) in enumerate(jobs):
        push(longest, (-duration, k))
        finish += duration
        if finish > deadline:
            negative, index = pop(longest)
            dropped.append(index)
            finish += negative
    if not dropped:
        return [position for _, _, position in jobs], []
    late = set(dropped)
    on_time = [job[2] for k, job in enumerate(jobs) if k not in late]
    return on_time, [jobs[k][2] for k in sorted(late)]


def urgency_order(requests: Sequence[RequestView], model: LatencyModel, now: float, *, start: float | None = None, servers: int = 1) -> list[RequestView]:
    """Kairos's prefill order: the Moore–Hodgson on-time set by deadline, then the rest.

    Requests whose laxity is already negative (deadline − now − own prefill time)
    cannot be saved by any order; they go last, shortest first, as best effort.
    With several prefill servers, the queue is treated as one server `servers`
    times as fast (an approximation; exact for one server).
    """
    if len(requests) < 2:  # one prompt is in order whatever its laxity: a router asks this on every arrival
        return list(requests)
    return list(iter_urgency(requests, model, now, start=start, servers=servers))


def iter_urgency(requests: Sequence[RequestView], model: LatencyModel, now: float, *, start: float | None = None, servers: int = 1) -> Iterator[RequestView]:
    """`urgency_order` one at a time: the hopeless tail is sorted only if a caller gets that far."""
    head, hopeless = _urgency_split(requests, model, now, now if start is None else start, servers)
    for i in head:
        yield requests[i]
    tail = [(requests[i].remaining_prefill, requests[i].arrival, i) for i in hopeless]  # shortest first, then queue order
    tail.sort()
    for _, _, i in tail:
        yield requests[i]


def _urgency_split(requests: Sequence[RequestView], model: LatencyModel, now: float, start: float, servers: int) -> tuple[list[int], list[int]]:
    """Positions of the savable requests in order (on time, then late), and of the hopeless in queue order.

    The router runs this over its whole queue on every decision, so the loop
    reads each field once and keeps only a position for a hopeless request.
    """
    c0, c1, c2 = model.c0, model.c1, model.c2
    past_is_hopeless = min(c0, c1, c2) >= 0.0  # prefill times are then never negative: a deadline already past is hopeless
    hopeless: list[int] = []
    jobs: list[tuple[float, float, int]] = []
    for i, r in enumerate(requests):
        deadline = r.arrival + r.ttft_slo  # r.ttft_deadline
        if past_is_hopeless and deadline < now:
            hopeless.append(i)
            continue
        tokens = r.prompt_tokens + r.generated - r.prefilled  # r.remaining_prefill
        duration = c2 + (c0 * (tokens * tokens) + c1 * tokens) if tokens > 0 else model.prefill_time(tokens)  # model.prefill_time, inlined
        if deadline - now - duration < 0.0:
            hopeless.append(i)
        else:
            jobs.append((deadline, duration / servers, i))
    on_time, late = _moore_hodgson(jobs, start)
    return on_time + late, hopeless


def urgent_first(requests: Sequence[RequestView], model: LatencyModel, now: float) -> list[RequestView]:
    """A worker's own queue, preemptively: recomputes of preempted decodes, then Kairos's urgency order.

    Started prompts get no precedence: a more urgent arrival overtakes them at
    the next chunk boundary, while a prompt that can no longer meet its TTFT
    falls behind every one that can. A decoding worker's batcher asks this
    every step, and a router looks many steps ahead, so one prompt needs no ordering.
    """
    recomputes = [r for r in requests if r.generated > 0]
    prompts = [r for r in requests if r.generated == 0]
    return recomputes + (prompts if len(prompts) < 2 else urgency_order(prompts, model, now))


def unattainable(queue: Sequence[RequestView], model: LatencyModel, now: float) -> list[RequestId]:
    """Prompts waiting at a router that no schedule could save: now + their isolated prefill > their TTFT deadline."""
    prefill_time = model.prefill_time
    return [r.id for r in queue if now + prefill_time(r.remaining_prefill) > r.ttft_deadline]


def without_hopeless(model: LatencyModel, worker: WorkerView, now: float) -> tuple[WorkerView, tuple[RequestId, ...]]:
    """The worker without its hopeless prompts, and their ids.

    A prompt (not a recompute) is hopeless when even running the rest of it
    alone from now would miss its TTFT. It is a miss whatever happens; given up
    now, it ends with an error instead of taking steps from prompts that can
    still make it.
    """
    hopeless = tuple(
        r.id for r in worker.prefills if r.generated == 0 and now + model.chunk_time((r.prefilled, r.prefill_tokens)) > r.ttft_deadline
    )
    if not hopeless:
        return worker, ()
    return replace(worker, prefills=tuple(r for r in worker.prefills if r.id not in hopeless)), hopeless


class PrefillOrder(enum.StrEnum):
    FCFS = "fcfs"  # placement order
    SJF = "sjf"  # fewest prompt tokens first (Tropical's prefill engines)
    URGENCY = "urgency"  # Moore–Hodgson over TTFT deadlines (Kairos)


def order_prefills(order: PrefillOrder, requests: Sequence[RequestView], model: LatencyModel, now: float) -> list[RequestView]:
    if order is PrefillOrder.FCFS:
        return list(requests)
    if order is PrefillOrder.SJF:
        return sorted(requests, key=_shortest_first)
    return urgency_order(requests, model, now)


def iter_prefills(order: PrefillOrder, requests: Sequence[RequestView], model: LatencyModel, now: float) -> Iterator[RequestView]:
    """`order_prefills` one at a time, for a caller that often stops after the first few.

    Shortest first is a heap, so a router that takes only the head of a long
    queue pays a linear heapify and not a sort.
    """
    if order is not PrefillOrder.SJF:
        yield from order_prefills(order, requests, model, now)
        return
    heap = [(r.prompt_tokens + r.generated - r.prefilled, r.arrival, i) for i, r in enumerate(requests)]  # ties: queue order, as a stable sort
    heapq.heapify(heap)
    while heap:
        yield requests[heapq.heappop(heap)[2]]


def _shortest_first(r: RequestView) -> tuple[int, float]:
    return r.prompt_tokens + r.generated - r.prefilled, r.arrival  # (remaining_prefill, arrival) without the properties


@dataclass(frozen=True)
class PrefillPlanner:
    """A prefill worker's step: prompts in `order`, batched whole while they fit `batch_tokens`.

    A prompt already started (a chunked one) keeps its place at the front. The
    first prompt always runs if its KV fits, however long; `max_batch` = 1 runs
    one prompt per step, as Tropical's prefill engines do to keep step times
    predictable. `chunk_tokens` caps the tokens of one step for long prompts.
    """

    model: LatencyModel
    order: PrefillOrder = PrefillOrder.FCFS
    batch_tokens: int = 4096
    max_batch: int = 1
    chunk_tokens: int | None = None
    abandon_hopeless: bool = False  # give up on queued prompts that could not meet their TTFT even if run alone now

    def plan(self, worker: WorkerView, now: float) -> StepPlan:
        if not worker.prefills:
            return IDLE
        abandon: tuple[RequestId, ...] = ()
        if self.abandon_hopeless:
            worker, abandon = without_hopeless(self.model, worker, now)
        started = [r for r in worker.prefills if r.prefilled > 0]
        fresh = [r for r in worker.prefills if r.prefilled == 0]
        queue = started + order_prefills(self.order, fresh, self.model, now)
        free = worker.kv_free
        budget = self.batch_tokens
        chunks: list[tuple[RequestId, int]] = []
        for r in queue:
            if len(chunks) >= self.max_batch:
                break
            tokens = r.remaining_prefill
            if self.chunk_tokens is not None:
                tokens = min(tokens, self.chunk_tokens)
            if chunks and tokens > budget:
                break
            kv = r.prefill_tokens if r.prefilled == 0 else 0
            if kv > free:
                break
            free -= kv
            budget -= tokens
            chunks.append((r.id, tokens))
        if not chunks:
            return StepPlan(abandon=abandon) if abandon else IDLE
        return StepPlan(chunks=tuple(chunks), abandon=abandon)
