"""How busy each simulated worker was, and with what: where a policy's goodput runs out.

Goodput stops rising where some worker runs out of time. Which one, and on
what (prompt-only steps, decode steps, mixed ones), says whether a better
placement could still help or only less work per request would: a decoding
worker busy all the time at the batch its TPOT allows has nothing left to give.

Shares are taken over a window (by default while requests still arrive), not
the whole run: a run's tail, draining the last long outputs at a small batch,
would otherwise dilute every figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tropical.policies.records import Role
from tropical.simulator.simulation import StepRecord


@dataclass(frozen=True)
class WorkerUsage:
    """One worker over a window of `seconds`: shares of it spent in steps, and the decode tokens it made."""

    worker: int
    role: Role
    seconds: float
    busy: float  # share of the window in any step
    prompt_only: float  # ... in steps that ran prompt chunks and no decode
    mixed: float  # ... in decode steps that also carried prompt chunks
    decode_tokens: int  # decode tokens made in the window (one per member per decode step)
    decode_steps: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "role": self.role.value,
            "busy_share": round(self.busy, 4),
            "prompt_only_share": round(self.prompt_only, 4),
            "mixed_share": round(self.mixed, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "mean_decode_batch": round(self.mean_decode_batch, 2),
        }


def worker_usage(steps: Sequence[StepRecord], roles: Sequence[Role], start: float, end: float) -> tuple[WorkerUsage, ...]:
    """Each worker's usage over [start, end], from a run's step log (`simulate(..., record_steps=True)`).

    A span of steps crossing an edge of the window counts in proportion: its
    steps are of one kind and close to one length.
    """
    if end <= start:
        raise ValueError(f"an empty window: [{start}, {end}]")
    busy = [0.0] * len(roles)
    prompt_only = [0.0] * len(roles)
    mixed = [0.0] * len(roles)
    tokens = [0.0] * len(roles)
    decode_steps = [0.0] * len(roles)
    for span in steps:
        length = span.end - span.start
        inside = min(span.end, end) - max(span.start, start)
        if inside <= 0.0 or length <= 0.0:
            continue
        share = inside / length
        busy[span.worker] += inside
        if span.decodes:
            decode_steps[span.worker] += span.steps * share
            tokens[span.worker] += span.steps * span.decodes * share
            if span.chunks:
                mixed[span.worker] += inside
        elif span.chunks:
            prompt_only[span.worker] += inside
    seconds = end - start
    return tuple(
        WorkerUsage(i, role, seconds, busy[i] / seconds, prompt_only[i] / seconds, mixed[i] / seconds, round(tokens[i]), round(decode_steps[i]))
        for i, role in enumerate(roles)
    )


def usage_by_role(usage: Sequence[WorkerUsage]) -> dict[Role, WorkerUsage]:
    """The workers of each role pooled: busy shares averaged, decode tokens and steps summed (for a one-line summary)."""
    pooled: dict[Role, WorkerUsage] = {}
    for role in dict.fromkeys(u.role for u in usage):
        group = [u for u in usage if u.role is role]
        n = len(group)
        pooled[role] = WorkerUsage(
            worker=-1,
            role=role,
            seconds=group[0].seconds,
            busy=sum(u.busy for u in group) / n,
            prompt_only=sum(u.prompt_only for u in group) / n,
            mixed=sum(u.mixed for u in group) / n,
            decode_tokens=sum(u.decode_tokens for u in group),
            decode_steps=sum(u.decode_steps for u in group),
        )
    return pooled
