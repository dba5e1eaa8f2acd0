"""What the core asks its driver to do: plain records, drained in the order they were made.

The core never waits and never reads a clock. When it starts a step, moves KV
or wants to be asked again later, it says so here; the simulator turns each
action into an event on its virtual clock, a live service into engine work,
a KV pull or a timer. Order matters: a driver that keeps it reproduces the
core's decisions exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from tropical.policies.records import RequestId


@dataclass(frozen=True, slots=True)
class StepScheduled:
    """Worker `worker` runs a step (or a span of identical decode steps) that ends at `end`.

    A later action with the same worker and a higher `span_id` replaces it (the
    span was cut short); the driver reports the end with `ClusterCore.step_ended`.
    """

    worker: int
    span_id: int
    end: float


@dataclass(frozen=True, slots=True)
class WorkerWake:
    """Ask worker `worker` to plan again at `at` if nothing else has (its policy's review time)."""

    worker: int
    wake_id: int
    at: float


@dataclass(frozen=True, slots=True)
class RouterWake:
    """Ask the router to place again at `at` (its policy's review time)."""

    at: float


@dataclass(frozen=True, slots=True)
class TransferStarted:
    """Move `kv_tokens` of request `request`'s KV from worker `source` to worker `target`."""

    request: RequestId
    source: int
    target: int
    kv_tokens: int


@dataclass(frozen=True, slots=True)
class Placed:
    """The router placed request `request`'s prompt on worker `worker` (a live router dispatches it there)."""

    worker: int
    request: RequestId


@dataclass(frozen=True, slots=True)
class Preempted:
    """Worker `worker` dropped request `request`'s KV to make room; it is recomputed from its prompt and outputs."""

    worker: int
    request: RequestId


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Worker `worker` gave up on request `request` (it could only miss its SLOs); its KV is freed."""

    worker: int
    request: RequestId


Action = StepScheduled | WorkerWake | RouterWake | TransferStarted | Placed | Preempted | Abandoned
