"""A replay: every request sent at its arrival onto one target, at most so many at a time, and all measured.

Sends are timed on the client from the replay's start, so a late send counts
against the system that kept the loop busy; a sweep is one replay per rate on
the same target.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from tropical.live.bench.load import BenchRequest
from tropical.live.bench.measure import Measured
from tropical.live.bench.targets import BusTarget, Target, embedded_target
from tropical.live.client import Client
from tropical.metrics import RequestOutcome

if TYPE_CHECKING:
    from tropical.live.deployment import Deployment


@dataclass(frozen=True)
class BenchResult:
    """Every request of one replay, in the order given."""

    requests: int
    measured: tuple[Measured, ...]

    @property
    def outcomes(self) -> list[RequestOutcome]:
        return [m.outcome for m in self.measured]


async def replay(
    target: Target | Client,
    requests: Sequence[BenchRequest],
    *,
    start: float,
    timeout_s: float = 300.0,
    max_concurrency: int | None = None,
    on_done: Callable[[Measured], None] | None = None,
) -> BenchResult:
    """Send each request at `start` + its arrival (on the loop's clock), at most `max_concurrency` at a time, and measure every stream.

    A request that gets an error reply or is not done `timeout_s` after its
    arrival fails; the whole replay is bounded by the last arrival plus that
    (once per wave of requests the cap lets through).
    """
    sender: Target = BusTarget(target) if isinstance(target, Client) else target
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    origin = time.perf_counter() - (loop.time() - start)  # `start` on a finer clock: some loops' time() ticks in whole milliseconds

    def now() -> float:
        return time.perf_counter() - origin

    async def one(index: int, request: BenchRequest) -> Measured:
        await asyncio.sleep(max(0.0, request.arrival - now()))
        held = slots is not None and slots.locked()
        async with slots or contextlib.nullcontext():
            result = await sender.measure(index, request, now() if held else request.arrival, now, timeout_s)
        if on_done is not None:
            on_done(result)
        return result

    tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]
    last = max((r.arrival for r in requests), default=0.0)
    waves = math.ceil(len(requests) / max_concurrency) if max_concurrency else 1
    try:
        async with asyncio.timeout_at(start + last + waves * timeout_s + 5.0):
            measured_all = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)  # let cancelled streams close their reply routes
    return BenchResult(len(requests), tuple(measured_all))


async def replay_all(
    target: Target,
    runs: Sequence[Sequence[BenchRequest]],
    *,
    timeout_s: float = 300.0,
    max_concurrency: int | None = None,
    progress: bool = False,
) -> list[BenchResult]:
    """One replay after another on the same target (a sweep), each with its progress bar on stderr when asked."""
    results = []
    for requests in runs:
        with tqdm(total=len(requests), unit="req", disable=not progress) as bar:
            start = asyncio.get_running_loop().time()
            results.append(
                await replay(target, requests, start=start, timeout_s=timeout_s, max_concurrency=max_concurrency, on_done=lambda _: bar.update())
            )
    return results


async def bench_embedded(deployment: Deployment, requests: Sequence[BenchRequest], *, timeout_s: float = 300.0) -> BenchResult:
    """Start the deployment, replay onto it from a client in the same process, drain it."""
    async with embedded_target(deployment, timeout_s=timeout_s) as target:
        return (await replay_all(target, [requests], timeout_s=timeout_s))[0]
