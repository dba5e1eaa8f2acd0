"""Worker usage from a step log: shares of a window, spans cut at its edges, roles pooled."""

from __future__ import annotations

import pytest

from tropical.policies.records import Role
from tropical.simulator import StepRecord
from tropical.simulator.usage import usage_by_role, worker_usage

ROLES = (Role.PREFILL, Role.DECODE, Role.DECODE)
STEPS = (
    StepRecord(worker=0, start=0.0, end=2.0, steps=1, decodes=0, chunks=((1, 500),)),  # a prompt-only step
    StepRecord(worker=1, start=0.0, end=1.0, steps=10, decodes=4, chunks=()),  # 10 decode steps of 4
    StepRecord(worker=1, start=1.0, end=1.5, steps=1, decodes=2, chunks=((2, 64),)),  # a mixed step
    StepRecord(worker=2, start=3.0, end=5.0, steps=20, decodes=1, chunks=()),  # half of it after the window
)


def test_shares_tokens_and_batches_over_the_window() -> None:
    first, second, third = worker_usage(STEPS, ROLES, 0.0, 4.0)
    assert (first.busy, first.prompt_only, first.mixed, first.decode_tokens) == (0.5, 0.5, 0.0, 0)
    assert (second.busy, second.prompt_only, second.mixed) == (0.375, 0.0, 0.125)
    assert second.decode_tokens == 42 and second.decode_steps == 11 and second.decode_tokens_per_s == 10.5
    assert third.busy == 0.25 and third.decode_tokens == 10 and third.mean_decode_batch == 1.0  # only the half inside counts


def test_roles_pool_their_workers() -> None:
    pooled = usage_by_role(worker_usage(STEPS, ROLES, 0.0, 4.0))
    assert list(pooled) == [Role.PREFILL, Role.DECODE]
    decoding = pooled[Role.DECODE]
    assert decoding.busy == pytest.approx((0.375 + 0.25) / 2) and decoding.decode_tokens == 52 and decoding.decode_steps == 21


def test_an_empty_window_is_refused() -> None:
    with pytest.raises(ValueError, match="an empty window"):
        worker_usage(STEPS, ROLES, 2.0, 2.0)
