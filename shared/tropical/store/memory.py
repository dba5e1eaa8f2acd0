"""The in-process store: Redis's semantics without a server, for the embedded default."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Literal

from tropical.protocol import LatencyModelSpec, RequestRecord, WorkerStatus, encode
from tropical.store.base import LatencyModelUpdates, Store
from tropical.store.errors import StoreClosed
from tropical.store.feed import QueuedUpdates
from tropical.store.values import DecodedListing, StoredT, check_holder, check_ttl, decode_listing, decode_value

Table = Literal["worker_status", "latency_model", "request_record"]


class _ExpiringTable:
    """Values with deadlines, dropped oldest-first as they pass.

    The heap makes expiry cost O(log n) per write instead of a sweep, so a
    table of finished requests stays bounded by the ones still alive. It keeps
    one entry per write; an overwritten or removed value's entry is ignored
    when it comes up.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._values: dict[str, tuple[bytes, float]] = {}
        self._deadlines: list[tuple[float, str]] = []

    def put(self, name: str, data: bytes, ttl_s: float) -> None:
        deadline = self._clock() + ttl_s
        self._values[name] = (data, deadline)
        heapq.heappush(self._deadlines, (deadline, name))
        self._expire()

    def get(self, name: str) -> bytes | None:
        self._expire()
        entry = self._values.get(name)
        return entry[0] if entry else None

    def items(self) -> list[tuple[str, bytes]]:
        self._expire()
        return sorted((name, data) for name, (data, _) in self._values.items())

    def remove(self, name: str) -> None:
        self._values.pop(name, None)

    def _expire(self) -> None:
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, name = heapq.heappop(self._deadlines)
            entry = self._values.get(name)
            if entry is not None and entry[1] == deadline:
                del self._values[name]


class MemoryStore(Store):
    """Keeps encoded bytes, not objects, so every read is validated as from Redis.

    ``clock`` is monotonic seconds; tests may pass their own to move time on.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._statuses = _ExpiringTable(clock)
        self._status_listing = DecodedListing(WorkerStatus)
        self._records = _ExpiringTable(clock)
        self._models: dict[str, bytes] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # each lease's holder and when it lapses
        self._clock = clock
        self._subscriptions: set[QueuedUpdates] = set()
        self._closed = False

    # --- worker status
    async def put_worker_status(self, status: WorkerStatus, *, ttl_s: float) -> None:
        self._check_open()
        self._statuses.put(status.worker_id, encode(status), check_ttl(ttl_s))

    async def get_worker_status(self, worker_id: str) -> WorkerStatus | None:
        self._check_open()
        data = self._statuses.get(worker_id)
        return _decode_one(data, WorkerStatus, "worker_status", worker_id)

    async def list_worker_statuses(self) -> list[WorkerStatus]:
        self._check_open()
        entries = [(_key("worker_status", name), name, data) for name, data in self._statuses.items()]
        return self._status_listing.decode(entries)

    async def remove_worker_status(self, worker_id: str) -> None:
        self._check_open()
        self._statuses.remove(worker_id)

    # --- latency models
    async def set_latency_model(self, model: LatencyModelSpec) -> None:
        self._check_open()
        data = encode(model)
        self._models[model.key] = data
        self._publish(data)

    async def get_latency_model(self, key: str) -> LatencyModelSpec | None:
        self._check_open()
        data = self._models.get(key)
        return _decode_one(data, LatencyModelSpec, "latency_model", key)

    async def list_latency_models(self) -> list[LatencyModelSpec]:
        self._check_open()
        entries = [(_key("latency_model", name), name, data) for name, data in sorted(self._models.items())]
        return decode_listing(entries, LatencyModelSpec)

    async def subscribe_latency_models(self) -> LatencyModelUpdates:
        self._check_open()
        subscription = _MemoryUpdates(self._subscriptions)
        self._subscriptions.add(subscription)
        return subscription

    # --- request records
    async def put_request_record(self, record: RequestRecord, *, ttl_s: float) -> None:
        self._check_open()
        self._records.put(record.request_id, encode(record), check_ttl(ttl_s))

    async def get_request_record(self, request_id: str) -> RequestRecord | None:
        self._check_open()
        data = self._records.get(request_id)
        return _decode_one(data, RequestRecord, "request_record", request_id)

    async def delete_request_record(self, request_id: str) -> None:
        self._check_open()
        self._records.remove(request_id)

    # --- leases
    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        self._check_open()
        holder, ttl_s = check_holder(holder), check_ttl(ttl_s)
        if await self.lease_holder(name) is not None:
            return False
        self._leases[name] = (holder, self._clock() + ttl_s)
        return True

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        self._check_open()
        holder, ttl_s = check_holder(holder), check_ttl(ttl_s)
        if await self.lease_holder(name) != holder:
            return False
        self._leases[name] = (holder, self._clock() + ttl_s)
        return True

    async def release_lease(self, name: str, holder: str) -> None:
        self._check_open()
        if await self.lease_holder(name) == check_holder(holder):
            del self._leases[name]

    async def lease_holder(self, name: str) -> str | None:
        self._check_open()
        lease = self._leases.get(name)
        if lease is None:
            return None
        if lease[1] <= self._clock():
            del self._leases[name]
            return None
        return lease[0]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the memory store is closed")

    def _put_raw(self, table: Table, name: str, data: bytes, *, ttl_s: float = 60.0) -> None:
        """Store bytes unchecked: the only way to test that reads refuse garbage."""
        if table == "worker_status":
            self._statuses.put(name, data, ttl_s)
        elif table == "request_record":
            self._records.put(name, data, ttl_s)
        else:
            self._models[name] = data

    def _publish(self, data: bytes) -> None:
        """Hand bytes to every subscription unchecked, as a Redis PUBLISH does; tests send garbage here."""
        for subscription in self._subscriptions:
            subscription.push(data)


class _MemoryUpdates(QueuedUpdates):
    def __init__(self, registry: set[QueuedUpdates]) -> None:
        super().__init__("latency_model updates")
        self._registry = registry

    async def _stop(self) -> None:
        self._registry.discard(self)


def _key(table: Table, name: str) -> str:
    """How errors name a memory value: like a Redis key, without the deployment's prefix."""
    return f"{table}:{name}"


def _decode_one(data: bytes | None, expected: type[StoredT], table: Table, name: str) -> StoredT | None:
    return None if data is None else decode_value(data, expected, key=_key(table, name), name=name)
