"""KV handoff across hosts without GPUs, through Redis.

The KV's raw bytes live under `P:kv:<id>` (P is the deployment's prefix, as in
the store) and the key is the handle. The key's TTL is the lease, so data of a
sender that died still goes; the sender deletes it sooner on an ack, a cancel
or its own view of the lease's end. `from_url` takes any Redis URL the store
takes, a Sentinel one included.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tropical.engine.kv_transfer import kv_to_bytes
from tropical.kv.base import (
    BadHandle,
    KvError,
    KvGone,
    LayoutMismatch,
    TransferRecord,
    Transport,
    from_bytes,
    layout_nbytes,
    off_loop,
)
from tropical.protocol import KvLayout, KvTransport
from tropical.store.redis import connect_redis


class RedisTransport(Transport[None]):
    """Owns its client: closing the transport closes the client's connection pool."""

    kind = KvTransport.REDIS

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        device: str | torch.device = "cpu",
        clock: Callable[[], float] = time.time,
        on_transfer: Callable[[TransferRecord], None] | None = None,
    ) -> None:
        if not prefix:
            raise ValueError("the key prefix must not be empty")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("KV is raw bytes: make the client with decode_responses=False")
        super().__init__(clock=clock, on_transfer=on_transfer)
        self.prefix = prefix
        self.device = torch.device(device)
        self._client = client
        self._key = re.compile(rf"{re.escape(prefix)}:kv:[0-9a-f]{{32}}")

    @classmethod
    def from_url(cls, url: str, *, prefix: str, **options: Any) -> RedisTransport:
        """`options`: `device`, `clock`, `on_transfer`, as for the constructor."""
        return cls(connect_redis(url), prefix=prefix, **options)

    def new_key(self) -> str:
        return f"{self.prefix}:kv:{uuid.uuid4().hex}"

    async def _put(self, data: torch.Tensor, lease_s: float) -> tuple[bytes, None]:
        key = self.new_key()
        payload = await off_loop(data.numel() * data.element_size(), lambda: kv_to_bytes(data))
        try:
            await self._client.set(key, payload, px=max(1, math.ceil(lease_s * 1000)))
        except RedisError as exc:
            raise KvError(f"Redis refused the KV for {key}: {exc}") from exc
        return key.encode(), None

    async def _free(self, handle: bytes, resource: None) -> None:
        try:
            await self._client.delete(handle)
        except RedisError:  # the TTL frees it anyway
            pass

    async def _get(self, handle: bytes, layout: KvLayout, deadline: float) -> torch.Tensor:
        key = handle.decode("utf-8", errors="replace")
        if not self._key.fullmatch(key):
            raise BadHandle(f"{handle[:80]!r} is not a KV key of this deployment ({self.prefix}:kv:<32 hex digits>)")
        try:
            payload = await self._client.get(key)
        except RedisError as exc:
            raise KvError(f"Redis could not read {key}: {exc}") from exc
        if payload is None:
            raise KvGone(f"{key} is gone from Redis (released or expired)")
        if len(payload) != layout_nbytes(layout):
            raise LayoutMismatch(f"{key} holds {len(payload)} bytes, the layout says {layout_nbytes(layout)}")
        raw = await off_loop(len(payload), lambda: torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        data = from_bytes(raw, layout)
        if self.device.type == "cpu":
            return data
        return await asyncio.to_thread(data.to, self.device)

    async def _close(self) -> None:
        await self._client.aclose()
