"""One engine step, named exactly: which sequences decode and which prompt pieces are computed.

The worker's step planner (a serving policy, through the core) decides; the
engine runs the plan and reports what happened. A sequence with KV that the
plan does not name simply waits, holding its KV: a decode kept out of the
batch, or an imported KV not yet admitted. The engine's own FCFS scheduler is
just the default maker of these plans for a plain engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tropical.protocol import FinishReason

if TYPE_CHECKING:
    import torch


class PlanRefused(ValueError):
    """A plan the engine cannot run (unknown request, wrong token count, no KV room); nothing was changed."""


@dataclass(frozen=True)
class EnginePlan:
    """What one step computes.

    `decode`: sequences whose KV holds all but their last sampled token; each
    computes that token and samples the next. `chunks`: (request, tokens)
    pieces of prompts (or of a preempted sequence's recompute), in order from
    where the sequence's KV ends; the piece that reaches the end samples a
    token. The first piece of a prompt reserves KV for the whole of it.
    `preempt`: sequences whose KV is dropped before the step (they are
    recomputed later from their prompt and outputs). A request appears at most
    once in a plan.
    """

    decode: tuple[str, ...] = ()
    chunks: tuple[tuple[str, int], ...] = ()
    preempt: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.decode or self.chunks or self.preempt)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(tokens for _, tokens in self.chunks)


@dataclass(frozen=True)
class SequenceOutput:
    """What one sequence got from one step: at most one new token, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logits: torch.Tensor | None = None  # only with step(with_logits=True) on a model engine

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepResult:
    """What a step did: the plan it ran, the tokens it sampled, and how long it took."""

    outputs: list[SequenceOutput] = field(default_factory=list)
    step_time_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_seqs: int = 0  # sequences with a decode or a chunk in this step
    preempted: list[str] = field(default_factory=list)
    plan: EnginePlan = EnginePlan()

    @property
    def finished(self) -> list[SequenceOutput]:
        return [out for out in self.outputs if out.finished]
