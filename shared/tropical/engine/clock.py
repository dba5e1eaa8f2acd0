"""The time an emulated engine lives in: the real monotonic clock, or a fake one that moves only when slept on."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock."""

    def sleep_until(self, deadline: float) -> None:
        """Return once `now()` has reached `deadline` (at once if it has)."""


class MonotonicClock:
    """Real time, for a live worker."""

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class FakeClock:
    """Time that passes only when slept on: tests, and replays faster than real time."""

    def __init__(self, start: float = 0.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def sleep_until(self, deadline: float) -> None:
        self.time = max(self.time, deadline)
