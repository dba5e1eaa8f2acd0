"""Shared cluster state: worker heartbeats, latency models, request records, leases.

Values are protocol messages, stored as their msgpack encoding, so whatever a
service reads is validated exactly like what it receives from the bus. A lease
holds only its holder's name: who may act alone (the active router), until
the name lapses unless renewed.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

from tropical.protocol import LatencyModelSpec, RequestRecord, WorkerStatus


class LatencyModelUpdates(abc.ABC):
    """A live feed of latency models as they are set; subscribed before it is returned."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[LatencyModelSpec]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


class Store(abc.ABC):
    # --- worker status: a heartbeat that vanishes when the worker stops sending it
    @abc.abstractmethod
    async def put_worker_status(self, status: WorkerStatus, *, ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def get_worker_status(self, worker_id: str) -> WorkerStatus | None: ...

    @abc.abstractmethod
    async def list_worker_statuses(self) -> list[WorkerStatus]:
        """Every worker whose last heartbeat has not expired, ordered by worker id."""

    @abc.abstractmethod
    async def remove_worker_status(self, worker_id: str) -> None:
        """A worker leaving cleanly says so at once instead of waiting out its TTL."""

    # --- latency models, keyed by LatencyModelSpec.key
    @abc.abstractmethod
    async def set_latency_model(self, model: LatencyModelSpec) -> None:
        """Store the model and notify every open subscription."""

    @abc.abstractmethod
    async def get_latency_model(self, key: str) -> LatencyModelSpec | None: ...

    @abc.abstractmethod
    async def list_latency_models(self) -> list[LatencyModelSpec]: ...

    @abc.abstractmethod
    async def subscribe_latency_models(self) -> LatencyModelUpdates:
        """Models set after this call returns are delivered in the order they were set."""

    # --- request records: what happened to a request, kept for a while after it ends
    @abc.abstractmethod
    async def put_request_record(self, record: RequestRecord, *, ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def get_request_record(self, request_id: str) -> RequestRecord | None: ...

    @abc.abstractmethod
    async def delete_request_record(self, request_id: str) -> None: ...

    # --- leases: one holder at a time (the active router), kept by renewing it within its TTL
    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease if nobody holds it (the caller included); it lapses after `ttl_s` unless renewed."""

    @abc.abstractmethod
    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease to `ttl_s` from now; False, changing nothing, unless `holder` holds it."""

    @abc.abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once, so another holder need not wait out its TTL; only its holder can."""

    @abc.abstractmethod
    async def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now (None: nobody)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
