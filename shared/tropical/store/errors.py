"""Errors the stores raise beyond the protocol's own."""

from __future__ import annotations

from redis.exceptions import RedisError


class StoreError(Exception):
    """Base of the store's own errors."""


class StoreClosed(StoreError):
    """The store was closed; a closed Redis pool would otherwise quietly reconnect."""


class CorruptValue(StoreError):
    """What is stored under ``key`` is not the value that belongs there.

    Raised by reads of a single value; listings skip such entries and log them,
    so one bad writer cannot hide every healthy worker or model from the router.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt value at {key}: {reason}")
        self.key = key
        self.reason = reason


# What a store call may raise while the store restarts or is out of reach: its own errors, the Redis client's, the
# socket's, and a deadline. A service that rides out an outage catches these and tries again later.
UNAVAILABLE: tuple[type[BaseException], ...] = (StoreError, RedisError, OSError, TimeoutError)
