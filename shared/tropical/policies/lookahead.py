"""What a decoding worker will do with the prompts queued on it, step by step, if nothing else arrives.

A prompt riding on decode steps comes out when the step that runs its last
chunk ends, and that step's length depends on everything else the batcher
puts in it: waiting decodes it admits, other prompts' chunks, a step cut short
so a finishing prompt stays on time, KV that is not free yet. A closed-form
guess at that is optimistic exactly when it matters, under load. So the
router asks the worker's own batcher for its next plans, on a view of the
worker advanced one predicted step at a time.

Output lengths are unknown, so no decode finishes in the look-ahead: the batch
and its KV only grow, which errs late. A worker whose batcher would wait (its
KV full until some decode ends) gives no first token in the look-ahead.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from tropical.latency.model import Chunk, LatencyModel
from tropical.policies.batching import on_time as on_time_decode
from tropical.policies.records import BatchSummary, RequestId, RequestView, WorkerView

if TYPE_CHECKING:
    from tropical.policies.batching import DecodeBatcher

MAX_STEPS = 256  # a bound on one look-ahead; past it the rest come out "not in time"


def first_tokens(
    batcher: DecodeBatcher, model: LatencyModel, worker: WorkerView, start: float, watch: Collection[RequestView],
    arriving: tuple[RequestId, float] | None = None,
    stop_at_late: bool = False,
    queued: Sequence[RequestView] | None = None,
) -> dict[RequestId, float]:
    """When prompts queued on `worker` get their first token: each of `watch` that gets it, inf for each that is late.

    `start` is when the worker is next free to plan (the end of the step in
    progress, whose chunks and decode step count as done). A watched prompt
    is late once its deadline passes before it is out, or once the batcher
    gives it up. The look-ahead stops once every watched prompt is out or
    late, or, with `stop_at_late`, at the first late one: watched prompts it
    has not settled by then are missing from the answer. `arriving` (a
    prompt, a time) reaches the worker only then: no step planned before it
    holds that prompt. `queued` stands for the worker's own queued prompts:
    what a router asks with a prompt added.
    """
    late_id, arrives_at = arriving if arriving is not None else (None, -math.inf)
    deadlines = {r.id: r.ttft_deadline for r in watch}
    pending = set(deadlines)
    firsts: dict[RequestId, float] = {}
    prefills: list[RequestView] = []
    waiting = list(worker.waiting)
    for r in worker.prefills if queued is None else queued:
        prefilled = r.prefill_tokens - worker.unstarted_prefill(r)  # the step in progress's chunks done
        if prefilled >= r.prefill_tokens:
            firsts[r.id] = start if start <= deadlines.get(r.id, math.inf) else math.inf
            pending.discard(r.id)
            waiting.append(_decoding(r, start))
        else:
            prefills.append(_prefilled(r, prefilled) if prefilled != r.prefilled else r)
    batch, kv_used, t = worker.batch, worker.kv_used, start
    if worker.busy and batch.size:  # the step in progress decodes the batch too
        batch, kv_used = _stepped(batch), kv_used + batch.size
    plan_step, step_time = batcher.plan, model.step_time
    for _ in range(MAX_STEPS):
        overdue = [request for request in pending if deadlines[request] < t]
        for request in overdue:
            firsts[request] = math.inf
            pending.discard(request)
        if not pending or (overdue and stop_at_late):
            break
        early = t < arrives_at
        planned = tuple(r for r in prefills if r.id != late_id) if early else tuple(prefills)
        view = WorkerView(
            worker.id, worker.role, worker.kv_capacity, kv_used, False, t, t, 0,
            planned, sum(r.remaining_prefill for r in planned), batch, tuple(waiting), worker.incoming, worker.decode_load,
        )
        plan = plan_step(view, t)
        if plan.abandon:
            dropped = set(plan.abandon)
            given_up = pending & dropped
            for request in given_up:
                firsts[request] = math.inf
            pending -= given_up
            if given_up and stop_at_late:
                break
            prefills = [r for r in prefills if r.id not in dropped]
            waiting = [r for r in waiting if r.id not in dropped]
        if not plan.chunks and not (plan.decode or plan.admit):
            if early:
                t = arrives_at
                continue  # idle until the prompt arrives
            break  # the worker would wait for something the look-ahead cannot see (a decode ending, a review)
        if plan.admit:
            joining = set(plan.admit)
            batch = _joined(batch, [r for r in waiting if r.id in joining], model)
            waiting = [r for r in waiting if r.id not in joining]
        by_id = {r.id: r for r in prefills}
        chunks: list[Chunk] = []
        for request, tokens in plan.chunks:
            r = by_id[request]
            if r.prefilled == 0:
                kv_used += r.prefill_tokens
            chunks.append((r.prefilled, r.prefilled + tokens))
        decoding = plan.decode or bool(plan.admit)
        t += step_time(batch.size if decoding else 0, batch.context_tokens, chunks)
        for request, tokens in plan.chunks:
            r = by_id[request]
            if r.prefilled + tokens >= r.prefill_tokens:
                if r.id in pending:
                    firsts[r.id] = t if t <= deadlines[r.id] else math.inf
                    pending.discard(r.id)
                else:
                    firsts.setdefault(r.id, t)
                waiting.append(_decoding(r, t))
                del by_id[request]
            else:
                by_id[request] = _prefilled(r, r.prefilled + tokens)
        prefills = list(by_id.values())
        if decoding and batch.size:
            kv_used += batch.size
            batch = _stepped(batch)
    return firsts


def _prefilled(r: RequestView, prefilled: int) -> RequestView:
    return RequestView(r.id, r.arrival, r.prompt_tokens, r.ttft_slo, r.tpot_slo, prefilled, r.generated, r.first_token)


def _decoding(r: RequestView, first_token: float) -> RequestView:
    """r once its prompt is done: a waiting decode with its first token out."""
    return RequestView(r.id, r.arrival, r.prompt_tokens, r.ttft_slo, r.tpot_slo, r.prefill_tokens, max(1, r.generated), first_token)


def _joined(batch: BatchSummary, joining: list[RequestView], model: LatencyModel) -> BatchSummary:
    """The batch with `joining` admitted (its on-time deadline over the decodes `on_time` counts, as the worker's)."""
    if not joining:
        return batch
    earliest, reserve, tpot, on_time = batch.next_token_deadline, batch.reserve_deadline, batch.tpot_slo, batch.on_time_deadline
    for r in joining:
        deadline = r.token_deadline
        earliest, reserve, tpot = min(earliest, deadline), min(reserve, deadline - r.tpot_slo), min(tpot, r.tpot_slo)
        if on_time_decode(r, model):
            on_time = min(on_time, deadline)
    return BatchSummary(
        batch.size + len(joining),
        batch.context_tokens + sum(r.context_tokens for r in joining),
        batch.prompt_tokens + sum(r.prompt_tokens for r in joining),
        earliest, reserve, tpot, on_time,
    )


def _stepped(batch: BatchSummary) -> BatchSummary:
    """The batch after one decode step: a token more each, every deadline one TPOT on (the tightest: errs early)."""
    tpot = batch.tpot_slo if math.isfinite(batch.tpot_slo) else 0.0
    return BatchSummary(
        batch.size, batch.context_tokens + batch.size, batch.prompt_tokens,
        batch.next_token_deadline + tpot, batch.reserve_deadline + tpot, batch.tpot_slo, batch.on_time_deadline + tpot,
    )
