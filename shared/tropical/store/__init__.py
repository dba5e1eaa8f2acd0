"""Shared cluster state, in process or in Redis; `open_store` picks by the settings."""

from __future__ import annotations

from tropical.settings import MEMORY_URL, Settings
from tropical.store.base import LatencyModelUpdates, Store
from tropical.store.errors import UNAVAILABLE, CorruptValue, StoreClosed, StoreError
from tropical.store.memory import MemoryStore
from tropical.store.redis import RedisStore

__all__ = [
    "UNAVAILABLE",
    "CorruptValue",
    "LatencyModelUpdates",
    "MemoryStore",
    "RedisStore",
    "Store",
    "StoreClosed",
    "StoreError",
    "open_store",
]


def open_store(settings: Settings, *, memory: MemoryStore | None = None) -> Store:
    """Connects lazily: a Redis store reaches the server on its first command.

    With `memory://`, pass the process's MemoryStore so every service in it sees
    the same state; without one, a new store is made. A memory store needs no
    prefix: it is private to its process already.
    """
    if settings.redis_url.startswith(MEMORY_URL):
        return memory if memory is not None else MemoryStore()
    return RedisStore.from_url(
        settings.redis_url, prefix=settings.namespace, resubscribe_timeout_s=settings.redis_resubscribe_timeout_s
    )
