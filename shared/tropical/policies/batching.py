"""One step of a decoding worker: which waiting decodes join, whether the batch runs, which prompt chunks ride along.

One parameterised batcher covers every policy's decoding side:

- vLLM (v0, no chunking): prefill-first. A step is either prompts only (the
  running decodes stall) or the decode batch.
- Sarathi / vLLM with chunked prefill: stall-free. Every step runs the whole
  batch plus prompt chunks up to a fixed token budget.
- Kairos: admission control. Waiting decodes join shortest first, only while
  the predicted step stays within the tightest allowed step of the batch.
- Tropical's multiplexing worker: chunked steps with a large budget (8192), so
  a placed prompt runs in one mixed step.
- Our own: the allowed step from banked TPOT slack, and the chunk size derived
  from it instead of fixed; and it gives up on work that can only miss: queued
  prompts that can no longer meet their TTFT, and waiting decodes so far behind
  that no running batch can take them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from tropical.latency.model import LatencyModel
from tropical.policies.prefill_queue import urgent_first, without_hopeless
from tropical.policies.records import (
    IDLE,
    BatchSummary,
    RequestId,
    RequestView,
    StepPlan,
    WorkerView,
)


class PrefillMode(enum.StrEnum):
    FIRST = "first"  # prompt-only steps take priority; decodes wait (vLLM v0)
    CHUNKED = "chunked"  # decodes every step, prompt chunks fill the rest of the budget


class Admission(enum.StrEnum):
    ALL = "all"  # every resident waiting decode joins (continuous batching)
    SLACK = "slack"  # shortest first while the predicted step fits the allowed step (Kairos)


class AllowedStep(enum.StrEnum):
    TPOT = "tpot"  # a step may take at most the tightest TPOT SLO
    BANKED = "banked"  # a step may take what the tightest banked budget allows (next token deadline − now)


class Preemption(enum.StrEnum):
    """How a decode preempted for KV room comes back (vLLM's preemption mode)."""

    RECOMPUTE = "recompute"  # its KV is dropped; its prompt and tokens so far are prefilled again
    SWAP = "swap"  # its KV is copied to host memory and back when there is room, each copy charged to a step


def tpot_attainable(r: RequestView, model: LatencyModel) -> bool:
    """Whether r's TPOT is no shorter than a lone decode step of its prompt: one shorter misses whatever is done."""
    return model.decode_time(1, r.prompt_tokens) <= r.tpot_slo


def on_time(r: RequestView, model: LatencyModel) -> bool:
    """A decode that can still meet both SLOs: the only kind a batch that lets late ones go (`protect_late` off) keeps
    on pace, so one that misses anyway never holds back the steps of the others."""
    return r.met_ttft and tpot_attainable(r, model)


def max_chunk(model: LatencyModel, start: int, room: float) -> int:
    """Most prompt tokens from position `start` whose chunk cost fits in `room` seconds of a mixed step."""
    if room <= 0.0:
        return 0
    a, b = model.c0, 2.0 * model.c0 * start + model.c1
    if a <= 0.0:
        return int(room / b + 1e-9) if b > 0.0 else 1 << 30
    return max(0, int((-b + math.sqrt(b * b + 4.0 * a * room)) / (2.0 * a) + 1e-9))


class _NextBatch(NamedTuple):
    admit: tuple[RequestId, ...]
    size: int
    context: int  # KV tokens
    limit: float  # latest end of the step that keeps every protected decode within budget
    tpot: float  # tightest TPOT SLO
    review_at: float | None
    abandon: tuple[RequestId, ...] = ()


@dataclass(frozen=True)
class DecodeBatcher:
    model: LatencyModel
    prefill_mode: PrefillMode = PrefillMode.FIRST
    token_budget: int = 8192  # tokens per step: prompt tokens (FIRST), decodes + chunks (CHUNKED)
    max_seqs: int = 256
    admission: Admission = Admission.ALL
    allowed_step: AllowedStep = AllowedStep.TPOT
    slo_chunks: bool = False  # size prompt chunks to fit the allowed step instead of the token budget
    shortest_prompt_first: bool = False  # order of fresh prompts (Tropical's decode engines: SJF)
    urgent_prompt_first: bool = False  # order every prompt by TTFT deadline, started ones included (preemptive)
    protect_late: bool = True  # False: decodes that already missed their TTFT do not limit the step (they miss anyway)
    reserve_tpots: float = 0.0  # banked TPOTs every decode keeps (BANKED)
    bank_steps: float = 1.0  # a step may spend 1/bank_steps of a decode's banked surplus (BANKED)
    repay_steps: float = 64.0  # a decode behind its budget repays 1/repay_steps of the deficit per step (BANKED)
    chunk_fill: float = 1.0  # prompt chunks fill a step up to this fraction of TPOT plus the spendable surplus (slo_chunks)
    min_chunk: int = 0  # prompt tokens a step carries even when the allowed step leaves no room (progress)
    abandon_after: float | None = None  # seconds behind its budget after which a waiting decode is given up (BANKED)
    abandon_hopeless: bool = False  # give up on queued prompts that could not meet their TTFT even if run alone now
    kv_watermark: float = 0.01  # fraction of KV kept free when starting a prompt (vLLM's default)
    finish_on_time: bool = False  # no chunk lengthens a step past the TTFT deadline of a prompt the step completes
    finish_margin: float = 0.0  # ... less this many seconds: what a live step's overrun and the reply's way back take
    max_paddings: int | None = None  # vLLM before chunked prefill pads a prompt batch to its longest: at most this many pad tokens (FIRST)
    preemption: Preemption = Preemption.RECOMPUTE  # what the worker does with a decode it must preempt for KV room

    def plan(self, worker: WorkerView, now: float) -> StepPlan:
        batch = self._admit(worker, now)
        if self.abandon_hopeless and worker.prefills:
            worker, hopeless = without_hopeless(self.model, worker, now)
            if hopeless:
                batch = batch._replace(abandon=batch.abandon + hopeless)
        chunks: tuple[tuple[RequestId, int], ...] = ()
        if worker.prefills and self.prefill_mode is PrefillMode.FIRST:
            chunks = self._prompt_step(worker, now)
            if chunks:
                return StepPlan(chunks=chunks, abandon=batch.abandon)
        if worker.prefills and self.prefill_mode is PrefillMode.CHUNKED:
            chunks = self._chunks(worker, batch, now)
        if batch.size == 0 and not chunks:
            if batch.review_at is None and not batch.abandon:
                return IDLE
            return StepPlan(abandon=batch.abandon, review_at=batch.review_at)
        return StepPlan(decode=batch.size > 0, admit=batch.admit, abandon=batch.abandon, chunks=chunks, review_at=batch.review_at)

    # --- decodes -----------------------------------------------------------------------

    def _admit(self, worker: WorkerView, now: float) -> _NextBatch:
        """Which waiting decodes join, and what the batch looks like once they have."""
        running = worker.batch
        abandon: tuple[RequestId, ...] = ()
        if self.abandon_after is not None and running.size > 0 and worker.waiting:  # an empty batch takes whatever waits
            abandon = tuple(r.id for r in worker.waiting if self._starved(r, now, self.abandon_after))
        batch = _NextBatch((), running.size, running.context_tokens, self._batch_limit(running, now), running.tpot_slo, None, abandon)
        room = self.max_seqs - running.size
        if not worker.waiting or room <= 0:
            return batch
        admit: list[RequestId] = []
        candidates: Sequence[RequestView]
        if self.admission is Admission.ALL:
            candidates = worker.waiting[:room]
        else:
            waiting = [r for r in worker.waiting if r.id not in abandon] if abandon else worker.waiting
            candidates = sorted(waiting, key=lambda r: (not (self.protect_late or on_time(r, self.model)), r.context_tokens, r.arrival))
        size, context, limit, tpot = batch.size, batch.context, batch.limit, batch.tpot
        for r in candidates:
            if len(admit) >= room:
                break
            joined = min(limit, self._own_limit(r, now))
            slack_bound = self.admission is Admission.SLACK and size > 0  # an empty batch always takes its first candidate
            if slack_bound and now + self.model.decode_time(size + 1, context + r.context_tokens) > joined:
                continue
            admit.append(r.id)
            size, context, limit, tpot = size + 1, context + r.context_tokens, joined, min(tpot, r.tpot_slo)
        review_at = None
        if len(admit) < len(candidates) and self.allowed_step is AllowedStep.BANKED and math.isfinite(tpot):
            review_at = now + tpot  # banked budgets grow while steps beat TPOT: look again
        return _NextBatch(tuple(admit), size, context, limit, tpot, review_at, abandon)

    def _starved(self, r: RequestView, now: float, abandon_after: float) -> bool:
        """A waiting decode whose paced step ends before now, `abandon_after` seconds behind its budget.

        No running batch can take it: it would join only once the batch has
        drained, holding its KV all the while. Under sustained load that never
        happens and such decodes pile up; given up, they end with an error (a
        miss, as they would be anyway) and free their KV.
        """
        if not (self.protect_late or on_time(r, self.model)):
            return False
        return self._own_limit(r, now) <= now and now - r.token_deadline >= abandon_after

    def _batch_limit(self, running: BatchSummary, now: float) -> float:
        """Latest end of the next step that keeps the running batch within its TPOT budget."""
        if self.allowed_step is AllowedStep.TPOT:
            return now + running.tpot_slo
        banked = running.next_token_deadline if self.protect_late else running.on_time_deadline
        return self._paced(banked, running.tpot_slo, now)

    def _own_limit(self, r: RequestView, now: float) -> float:
        if self.allowed_step is AllowedStep.TPOT:
            return now + r.tpot_slo
        if not (self.protect_late or on_time(r, self.model)):
            return math.inf
        return self._paced(r.token_deadline, r.tpot_slo, now)

    def _paced(self, deadline: float, tpot: float, now: float) -> float:
        """One TPOT, lengthened by a share of the banked surplus past `deadline`, or shortened to repay a deficit.

        TPOT is a mean over the whole output: a decode whose next token is due
        later than one TPOT from now may take a longer step; one already behind
        must take shorter ones, but only a little shorter each, since it has (on
        average) many tokens left to repay over and a batch cannot shrink to nothing.
        """
        if math.isinf(deadline) or math.isinf(tpot):
            return math.inf
        surplus = deadline - self.reserve_tpots * tpot - now - tpot
        return now + tpot + surplus / (self.bank_steps if surplus > 0 else self.repay_steps)

    # --- prompts -----------------------------------------------------------------------

    def _ordered_prompts(self, worker: WorkerView, now: float) -> list[RequestView]:
        if self.urgent_prompt_first:
            return urgent_first(worker.prefills, self.model, now)
        started = [r for r in worker.prefills if r.prefilled > 0]
        fresh = [r for r in worker.prefills if r.prefilled == 0]
        if self.shortest_prompt_first:
            fresh.sort(key=lambda r: (r.remaining_prefill, r.arrival))
        return started + fresh

    def _free_for_prompts(self, worker: WorkerView) -> float:
        """KV a new prompt may take: all of it on an empty worker, else what the watermark leaves."""
        if worker.kv_used == 0:
            return worker.kv_capacity
        return worker.kv_free - self.kv_watermark * worker.kv_capacity

    def _prompt_step(self, worker: WorkerView, now: float) -> tuple[tuple[RequestId, int], ...]:
        """vLLM v0: as many whole prompts, in order, as fit the token budget, the sequence cap and KV.

        With `max_paddings`, as vLLM's scheduler of early 2024: the batch is padded to its longest prompt, the budget
        counts the padded tokens, and a prompt that would add more than `max_paddings` pad tokens in all waits.
        """
        free = self._free_for_prompts(worker)
        seqs = worker.batch.size + len(worker.waiting)
        budget = self.token_budget
        chunks: list[tuple[RequestId, int]] = []
        longest = total = 0
        for r in self._ordered_prompts(worker, now):
            tokens = r.remaining_prefill
            kv = r.prefill_tokens if r.prefilled == 0 else 0
            if (chunks and tokens > budget) or (kv and kv > free) or seqs + len(chunks) >= self.max_seqs:
                break
            if self.max_paddings is not None and chunks:
                padded = (len(chunks) + 1) * max(longest, tokens)
                if padded > self.token_budget or padded - (total + tokens) > self.max_paddings:
                    break
            longest, total = max(longest, tokens), total + tokens
            chunks.append((r.id, tokens))
            budget -= tokens
            free -= kv
        return tuple(chunks)

    def _chunks(self, worker: WorkerView, batch: _NextBatch, now: float) -> tuple[tuple[RequestId, int], ...]:
        """Stall-free: prompt chunks after the decodes, within the token budget (or the allowed step).

        A router's look-ahead calls this for every step it predicts, so the
        loop reads the batcher's fields and the model's coefficients once.
        """
        model = self.model
        c0, c1 = model.c0, model.c1
        free = self._free_for_prompts(worker)
        budget = self.token_budget - batch.size
        room = math.inf
        decode = model.decode_time(batch.size, batch.context) if batch.size > 0 else model.c2  # the step before its chunks
        if self.slo_chunks and batch.size > 0:
            limit = batch.limit - (1.0 - self.chunk_fill) * batch.tpot if math.isfinite(batch.tpot) else batch.limit
            room = limit - now - decode
        seqs = batch.size + len(worker.waiting) - len(batch.admit)
        max_seqs, min_chunk, finish_on_time, skip_blocked = self.max_seqs, self.min_chunk, self.finish_on_time, self.urgent_prompt_first
        finish_margin = self.finish_margin
        end = now + decode  # the step's end so far
        chunks: list[tuple[RequestId, int]] = []
        for r in self._ordered_prompts(worker, now):
            if budget <= 0 or room <= 0.0:
                break
            prefilled = r.prefilled
            kv = r.prefill_tokens if prefilled == 0 else 0
            if (kv and kv > free) or (prefilled == 0 and seqs + len(chunks) >= max_seqs):
                if skip_blocked:
                    continue  # a started prompt further down holds KV already: let it finish
                break
            remaining = r.remaining_prefill
            tokens = min(remaining, budget)
            if math.isfinite(room):
                fits = max_chunk(model, prefilled, room)
                if fits <= 0 and chunks:
                    break
                tokens = min(tokens, max(fits, min_chunk) if not (finish_on_time and chunks) else fits)
                if tokens <= 0:
                    break
            cost = c0 * ((prefilled + tokens) ** 2 - prefilled**2) + c1 * tokens
            room -= cost
            end += cost
            if finish_on_time and tokens == remaining:
                deadline = r.ttft_deadline - finish_margin
                if end <= deadline:
                    room = min(room, deadline - end)  # its first token comes out when the step ends: keep that on time
            chunks.append((r.id, tokens))
            budget -= tokens
            free -= kv
        return tuple(chunks)
