"""Where each request the router placed is now, so that what a silent worker held is not lost with it.

A request no step has begun has sent its client nothing yet: it can move to
another worker unnoticed. So the router keeps a dispatched request's
`GenerateRequest` until a heartbeat shows it started (its prefill begun, its
first token out, handed to a decoding worker, or taken and gone between two
heartbeats); a started one keeps only its reply queue, for the error its client
gets if its worker is lost (the client then resumes it), and is forgotten once
no heartbeat has shown it for `forget_after` seconds (finished). The workers
a failed one was lost with are remembered a while: what such a worker still
shows of it, should it come back, is not taken for the resumed request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tropical.core.status import resident_requests
from tropical.protocol import GenerateRequest, WorkerStatus

FAILED_REMEMBERED = 10_000  # failed requests whose lost workers are remembered, for when they are resumed


@dataclass
class Placed:
    request_id: str
    reply_to: str
    worker: str | None  # where it is: dispatched there, or shown there by the latest heartbeat; None back in the queue
    request: GenerateRequest | None  # until it starts: what is placed again if its worker goes silent
    seen_at: float | None = None  # when a heartbeat of `worker` last showed it (None: the dispatch is not confirmed)
    shown: bool = False  # the latest heartbeat of `worker` shows it (it is in flight there)
    left: frozenset[str] = frozenset()  # workers it was taken back from, or failed on: what they still show of it is stale

    @property
    def started(self) -> bool:
        return self.request is None


class Placements:
    """The router's placed requests by name, from dispatch until done (or failed with their worker)."""

    def __init__(self, forget_after: float) -> None:
        self.forget_after = forget_after
        self._placed: dict[str, Placed] = {}
        self._draining: set[str] = set()  # workers whose latest heartbeat said they are draining
        self._failed: dict[str, frozenset[str]] = {}  # failed requests → the workers they were lost with, until resumed

    def __len__(self) -> int:
        return len(self._placed)

    def dispatched(self, request: GenerateRequest, worker: str) -> None:
        placed = self._placed.get(request.request_id)
        left = placed.left if placed is not None else self._failed.pop(request.request_id, frozenset())
        self._placed[request.request_id] = Placed(request.request_id, request.reply_to, worker, request, left=left)

    def worker_of(self, request_id: str) -> str | None:
        """Where a cancel for the request goes (None: not placed, or back in the router's queue)."""
        placed = self._placed.get(request_id)
        return None if placed is None else placed.worker

    def forget(self, request_id: str) -> None:
        self._placed.pop(request_id, None)
        self._failed.pop(request_id, None)

    def workers(self) -> set[str]:
        """Every worker holding a request placed here."""
        return {p.worker for p in self._placed.values() if p.worker is not None}

    def unstarted(self, worker: str) -> list[str]:
        return [p.request_id for p in self._placed.values() if p.worker == worker and not p.started]

    def observe(self, statuses: Iterable[WorkerStatus], now: float) -> list[str]:
        """Follow the requests through fresh heartbeats; the names forgotten as finished."""
        statuses = list(statuses)
        if not statuses:  # the router asks every few milliseconds; most times no worker has reported since
            return []
        here: dict[str, list[Placed]] = {}
        for placed in self._placed.values():
            if placed.worker is not None:
                here.setdefault(placed.worker, []).append(placed)
        fresh = set()
        for status in statuses:
            worker = status.worker_id
            fresh.add(worker)
            if status.draining:
                self._draining.add(worker)
            else:
                self._draining.discard(worker)
            waiting = {p.request_id for p in status.prefills if p.prefilled == 0 and p.generated == 0}
            waiting.difference_update(c.request_id for c in status.in_step)
            held = set(resident_requests(status))
            shown = held.union(status.accepted)  # held, or taken since the previous heartbeat (and maybe gone already)
            for placed in here.get(worker, ()):
                if placed.worker == worker and placed.seen_at is not None and placed.request_id not in shown:
                    placed.shown, placed.request = False, None  # it was here and is gone: started (finished, or handed on)
            for name in shown:
                placed = self._placed.get(name)
                if placed is None or placed.worker is None or worker in placed.left:
                    continue
                placed.worker, placed.seen_at, placed.shown = worker, now, name in held
                if name not in waiting:
                    placed.request = None
        done = [
            p.request_id
            for p in self._placed.values()
            if p.started and not p.shown and p.worker in fresh and p.seen_at is not None and now - p.seen_at > self.forget_after
        ]
        for name in done:
            del self._placed[name]
        return done

    def take_back(self, request_id: str, worker: str) -> GenerateRequest | None:
        """The request, if it is on `worker` and has not started: it goes back to the router's queue."""
        placed = self._placed.get(request_id)
        if placed is None or placed.worker != worker or placed.request is None:
            return None
        request = placed.request
        placed.worker, placed.seen_at, placed.shown, placed.left = None, None, False, placed.left | {worker}
        return request

    def lost(self, worker: str) -> list[GenerateRequest]:
        """`worker` went silent: what it had not started, taken back to be placed again."""
        taken = (self.take_back(name, worker) for name in self.unstarted(worker))
        return [request for request in taken if request is not None]

    def failed(self, worker: str, *, left: bool = True) -> list[Placed]:
        """`worker` is lost: the started requests it was serving, forgotten here for their clients to resume (none when it
        `left` the store after draining; `left=False`: it is merely silent, its status still there)."""
        here = [p for p in self._placed.values() if p.worker == worker]
        drained = left and worker in self._draining  # a drained worker finished what it held before it left
        self._draining.discard(worker)
        failed = [] if drained else [p for p in here if p.shown]
        for placed in here:
            del self._placed[placed.request_id]
        for placed in failed:
            self._failed[placed.request_id] = placed.left | {worker}
            if len(self._failed) > FAILED_REMEMBERED:
                del self._failed[next(iter(self._failed))]
        return failed
