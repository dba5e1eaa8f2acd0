"""One engine step, named exactly: which sequences decode and which prompt pieces are computed.

The worker's step planner (a serving policy, through the core) decides; the
engine runs the plan and reports what happened. A sequence with KV that the
plan does not name simply waits, holding its KV: a decode kept out of the
batch, or an imported KV not yet admitted. The engine's own FCFS scheduler is
just the default maker of these plans for a plain engine.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    recomputed later from their prompt and outputs).
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
