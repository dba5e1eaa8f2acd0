"""What a scheduling policy sees and what it decides: small frozen records.

The router, the workers, the simulator and the tests all hand a policy the same
records, so a policy cannot tell (and need not care) whether it runs live or
simulated. Times are seconds on one clock; `now` always comes from the caller.

A worker's running decode batch reaches the policy as a `BatchSummary`, a few
numbers rather than one record per sequence: that is what a worker's heartbeat
can afford to carry every step, and every decision below needs only the size of
the batch, its KV tokens and its tightest banked TPOT deadline.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

RequestId = int


class Role(enum.StrEnum):
    """What a worker may be asked to run."""

    PREFILL = "prefill"  # prompts only; finished prompts hand their KV to a decoding worker
    DECODE = "decode"  # decodes handed over by prefill workers
    MULTIPLEX = "multiplex"  # decodes, plus prompts the router places here (Tropical's multiplexing worker)
    COLOCATED = "colocated"  # every request's prompt and decode (vLLM, Sarathi)

    @property
    def decodes(self) -> bool:
        return self is not Role.PREFILL

    @property
    def takes_prompts(self) -> bool:
        return self is not Role.DECODE


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request as a scheduler may know it: never its true output length."""

    id: RequestId
    arrival: float
    prompt_tokens: int
    ttft_slo: float
    tpot_slo: float
    prefilled: int = 0  # tokens of `prefill_tokens` whose KV exists
    generated: int = 0  # output tokens produced, the first token included
    first_token: float | None = None

    @property
    def prefill_tokens(self) -> int:
        """Tokens to prefill: the prompt, or prompt plus output when a preemption dropped the KV."""
        return self.prompt_tokens + self.generated

    @property
    def remaining_prefill(self) -> int:
        return self.prefill_tokens - self.prefilled

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def ttft_deadline(self) -> float:
        return self.arrival + self.ttft_slo

    @property
    def met_ttft(self) -> bool:
        return self.first_token is not None and self.first_token - self.arrival <= self.ttft_slo

    @property
    def token_deadline(self) -> float:
        """Latest time the next token may appear with the request's TPOT, an average, still in SLO.

        After n tokens the running mean gap is (t − first)/n for a token at t, so
        the budget banked by fast steps is first + n·TPOT − now (Tropical's decode slack).
        """
        if self.first_token is None:
            return math.inf
        return self.first_token + self.tpot_slo * max(1, self.generated)


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """A worker's running decode batch in the numbers that placement and admission use."""

    size: int = 0
    context_tokens: int = 0  # KV tokens of the batch: Σ (prompt + generated)
    prompt_tokens: int = 0  # Σ prompt: Tropical's "unfinished decode tokens"
    next_token_deadline: float = math.inf  # min over the batch of RequestView.token_deadline
    reserve_deadline: float = math.inf  # min of token_deadline − tpot_slo: a stall ending later leaves someone < one TPOT banked
    tpot_slo: float = math.inf  # the tightest TPOT SLO in the batch
    on_time_deadline: float = math.inf  # next_token_deadline over decodes that met their TTFT (the others are misses anyway)


EMPTY_BATCH = BatchSummary()


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker's state as the router and the worker's own step planner see it."""

    id: int
    role: Role
    kv_capacity: int  # KV tokens this worker can hold
    kv_used: int
    busy: bool  # a step is in progress
    step_begin: float  # start of the step in progress (or of the last one)
    step_end: float  # predicted end of the step in progress
    placed_since_step: int  # requests placed here since the step in progress began: dispatches not yet picked up
    prefills: tuple[RequestView, ...]  # prompts placed here, not fully prefilled; started ones first
    prefill_load: int  # Σ remaining prefill tokens of `prefills`
    batch: BatchSummary
    waiting: tuple[RequestView, ...]  # decodes resident here, not yet in the batch
    incoming: tuple[RequestView, ...]  # decodes handed here whose KV has not arrived yet
    decode_load: int  # Σ prompt tokens of the batch, `waiting` and `incoming`
    in_step: tuple[tuple[RequestId, int], ...] = ()  # prompt chunks (request, tokens) the step in progress computes

    @property
    def kv_free(self) -> int:
        return self.kv_capacity - self.kv_used

    def unstarted_prefill(self, r: RequestView) -> int:
        """Prompt tokens of r that no step has begun: `prefilled` counts a chunk only once its step ends."""
        return r.remaining_prefill - sum(tokens for request, tokens in self.in_step if request == r.id)


@dataclass(frozen=True, slots=True)
class Placement:
    """Run this request's prefill on this worker (a prefill worker, or inline on a decoding one)."""

    request_id: RequestId
    worker_id: int


@dataclass(frozen=True, slots=True)
class RouterDecision:
    placements: tuple[Placement, ...] = ()
    drops: tuple[RequestId, ...] = ()  # refused outright: counted as misses
    review_at: float | None = None  # ask again at this time even if nothing happens before


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step of one worker.

    `admit` moves resident waiting decodes into the running batch before the
    step; `decode` runs the whole batch for one token each; `chunks` prefill
    (request, tokens) pieces in the same step. A plan with nothing to run leaves
    the worker idle until something happens or `review_at`. `abandon` names
    requests the worker gives up on, queued prompts or waiting decodes that can
    only miss their SLOs: they end with an error and free their KV.
    """

    decode: bool = False
    admit: tuple[RequestId, ...] = ()
    abandon: tuple[RequestId, ...] = ()
    chunks: tuple[tuple[RequestId, int], ...] = ()
    review_at: float | None = None

    @property
    def idle(self) -> bool:
        return not (self.decode or self.chunks)


IDLE = StepPlan()
