"""Waiting helpers: tests wait for conditions with deadlines, never for fixed times."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

DEFAULT_TIMEOUT_S = 5.0


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    interval: float = 0.005,
    what: str = "the condition",
) -> None:
    """Poll ``predicate`` (sync or async) until it holds; fail the test at the deadline.

    The deadline bounds a hung test, not the behaviour under test: a slow
    machine only makes the wait longer, never the assertion wrong.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(interval)
