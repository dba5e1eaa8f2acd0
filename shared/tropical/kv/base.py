"""How a finished prefill's KV cache moves to the worker that decodes it.

The sender offers the data and gets a handle; the handle (never the data)
travels in a `KvHandoff` message; the receiver pulls the data with it. The
sender leases what it offered: it keeps the data until the receiver acks
(`release`), the request is cancelled (`release` too), or the lease runs out
(`expire`, which the owning service calls from its timer). The lease clock is
injected, so tests drive expiry without waiting, and it is Unix time by
default because `lease_expires_at` crosses hosts on the wire.

Every implementation passes the same conformance suite
(tests/test_kv_conformance.py); the NCCL one, which needs two ranks, has its
own (tests/test_kv_nccl.py).
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Final, Generic, Literal, Self, TypeVar

import torch

from tropical.engine.kv_transfer import DTYPES, KvExport
from tropical.protocol import KvLayout, KvTransport

OFF_LOOP_BYTES: Final = 1 << 20  # copies at least this large run in a thread, off the event loop


class KvError(Exception):
    """Base of the KV transports' own errors."""


class KvGone(KvError):
    """The data behind a handle is gone: released, expired, or never offered under that name."""


class BadHandle(KvError, ValueError):
    """The bytes are not a handle this transport can have made."""


class LayoutMismatch(KvError):
    """The layout the receiver was told does not describe the data the sender holds."""


class FetchTimeout(KvError, TimeoutError):
    """The data did not arrive before the fetch's deadline."""


class TransportClosed(KvError):
    """The transport was closed; it neither offers nor fetches any more."""


@dataclass(frozen=True)
class KvOffer:
    """What a `KvHandoff` carries about the data: where it is, its shape and how long it stays."""

    handle: bytes
    layout: KvLayout
    nbytes: int
    lease_expires_at: float


@dataclass(frozen=True)
class TransferRecord:
    """One side of one transfer, for the services' KV transfer metrics."""

    transport: KvTransport
    direction: Literal["offer", "fetch"]
    handle: bytes
    nbytes: int
    duration_s: float

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.duration_s if self.duration_s > 0 else math.inf


Resource = TypeVar("Resource")


@dataclass(frozen=True)
class _Lease(Generic[Resource]):
    expires_at: float
    nbytes: int
    resource: Resource


def layout_shape(layout: KvLayout) -> tuple[int, int, int, int, int]:
    return (2, layout.num_layers, layout.num_tokens, layout.num_kv_heads, layout.head_dim)


def layout_nbytes(layout: KvLayout) -> int:
    return math.prod(layout_shape(layout)) * DTYPES[layout.dtype].itemsize


def as_bytes(data: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a flat uint8 tensor (no copy when it is contiguous already)."""
    return data.detach().contiguous().view(-1).view(torch.uint8)


def from_bytes(raw: torch.Tensor, layout: KvLayout) -> torch.Tensor:
    """The inverse of `as_bytes`, checked against the layout."""
    if raw.numel() != layout_nbytes(layout):
        raise LayoutMismatch(f"got {raw.numel()} bytes, the layout says {layout_nbytes(layout)}")
    return raw.view(DTYPES[layout.dtype]).view(layout_shape(layout))


Result = TypeVar("Result")


async def off_loop(nbytes: int, work: Callable[[], Result]) -> Result:
    """Run a copy inline when it is small, in a thread when it would stall the event loop."""
    return work() if nbytes < OFF_LOOP_BYTES else await asyncio.to_thread(work)


class Transport(abc.ABC, Generic[Resource]):
    """Both sides of the handoff: a worker offers what it prefilled and fetches what it decodes.

    `Resource` is what an implementation keeps per lease (a shared-memory
    segment, a tensor); the base class owns the lease book and the records.
    """

    kind: ClassVar[KvTransport]

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        on_transfer: Callable[[TransferRecord], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_transfer = on_transfer
        self._leases: dict[bytes, _Lease[Resource]] = {}
        self._closed = False

    # --- the sender's side
    async def offer(self, kv: KvExport, *, lease_s: float) -> KvOffer:
        """Make the KV fetchable and lease it for `lease_s` seconds of the transport's clock."""
        self._check_open()
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"a lease must last a positive, finite time, not {lease_s}")
        started = time.perf_counter()
        handle, resource = await self._put(kv.data, lease_s)
        expires_at = self._clock() + lease_s
        self._leases[handle] = _Lease(expires_at, kv.nbytes, resource)
        self._record("offer", handle, kv.nbytes, started)
        return KvOffer(handle=handle, layout=kv.layout, nbytes=kv.nbytes, lease_expires_at=expires_at)

    async def release(self, handle: bytes) -> bool:
        """Free the data now (the receiver acked, or the request was cancelled); False if it was not leased."""
        lease = self._leases.pop(handle, None)
        if lease is None:
            return False
        await self._free(handle, lease.resource)
        return True

    async def expire(self, now: float | None = None) -> list[bytes]:
        """Free every lease that ended at or before `now` (the clock's time by default); their handles."""
        now = self._clock() if now is None else now
        due = [handle for handle, lease in self._leases.items() if lease.expires_at <= now]
        for handle in due:
            await self.release(handle)
        return due

    @property
    def leases(self) -> dict[bytes, float]:
        """The handles leased now and when each lease ends."""
        return {handle: lease.expires_at for handle, lease in self._leases.items()}

    @property
    def leased_bytes(self) -> int:
        return sum(lease.nbytes for lease in self._leases.values())

    def _leased(self, handle: bytes) -> Resource | None:
        """The resource behind a live lease; safe to call from a transport's own threads (one dict read)."""
        lease = self._leases.get(handle)
        return None if lease is None else lease.resource

    # --- the receiver's side
    async def fetch(self, handle: bytes, layout: KvLayout, *, timeout_s: float) -> torch.Tensor:
        """A copy of the offered KV, `[2, layers, tokens, kv_heads, head_dim]`, before `timeout_s` runs out.

        The copy is the receiver's own: ack (and so free the sender's lease) once it returns.
        """
        self._check_open()
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"a fetch needs a positive, finite deadline, not {timeout_s}")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                data = await self._get(handle, layout, time.monotonic() + timeout_s)
        except FetchTimeout:
            raise
        except TimeoutError as exc:
            raise FetchTimeout(f"KV {handle!r} did not arrive within {timeout_s} s") from exc
        if data.shape != layout_shape(layout) or data.dtype != DTYPES[layout.dtype]:
            raise LayoutMismatch(f"got {tuple(data.shape)} {data.dtype}, the layout says {layout_shape(layout)} {layout.dtype}")
        self._record("fetch", handle, layout_nbytes(layout), started)
        return data

    # --- lifecycle
    async def close(self) -> None:
        """Free every lease and let go of connections; idempotent."""
        self._closed = True
        for handle in list(self._leases):
            await self.release(handle)
        await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # --- what each transport provides
    @abc.abstractmethod
    async def _put(self, data: torch.Tensor, lease_s: float) -> tuple[bytes, Resource]:
        """Place the data where receivers can reach it; its handle and what to keep until it is freed."""

    @abc.abstractmethod
    async def _free(self, handle: bytes, resource: Resource) -> None:
        """Make the data unreachable and give its memory back."""

    @abc.abstractmethod
    async def _get(self, handle: bytes, layout: KvLayout, deadline: float) -> torch.Tensor:
        """Pull a copy; `deadline` is on `time.monotonic()`, for waits that happen outside the event loop."""

    async def _close(self) -> None:
        """Let go of connections and threads; leases are released already."""

    # --- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"the {self.kind} KV transport is closed")

    def _record(self, direction: Literal["offer", "fetch"], handle: bytes, nbytes: int, started: float) -> None:
        if self._on_transfer is not None:
            duration = max(0.0, time.perf_counter() - started)
            self._on_transfer(TransferRecord(self.kind, direction, handle, nbytes, duration))
