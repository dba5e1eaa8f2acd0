"""A latency-model subscription fed through a local queue.

The queue decouples whoever sets models from a slow reader: a set never waits
on a subscriber, and a subscriber sees updates in the order they arrived.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from tropical.protocol import LatencyModelSpec
from tropical.store.base import LatencyModelUpdates
from tropical.store.errors import CorruptValue, StoreError
from tropical.store.values import decode_value

log = logging.getLogger(__name__)


class QueuedUpdates(LatencyModelUpdates):
    """Encoded models pushed in, checked models iterated out, until closed.

    ``source`` names where updates come from, for errors and logs. A message
    that does not decode is logged and skipped: one bad publisher must not cut
    every router off from the models that follow it.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()  # None: closed
        self._closed = False

    def push(self, data: bytes) -> None:
        if not self._closed:
            self._queue.put_nowait(data)

    def fail(self, exc: BaseException) -> None:
        """End the feed with an error its reader will see, e.g. a lost connection."""
        if not self._closed:
            self._queue.put_nowait(exc)

    async def __aiter__(self) -> AsyncIterator[LatencyModelSpec]:
        while not self._closed:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)  # for any other reader of this feed
                return
            if isinstance(item, BaseException):
                self._queue.put_nowait(item)
                raise StoreError(f"latency model updates from {self.source} failed: {item}") from item
            try:
                model = decode_value(item, LatencyModelSpec, key=self.source)
            except CorruptValue as exc:
                log.warning("skipping a latency model update: %s", exc)
                continue
            yield model

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop()
        self._queue.put_nowait(None)

    async def _stop(self) -> None:
        """Release whatever delivers updates; the base feed holds nothing."""

