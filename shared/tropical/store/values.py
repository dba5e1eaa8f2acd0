"""Reading stored bytes back into checked messages, shared by every store."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Generic, TypeVar

from tropical.protocol import (
    LatencyModelSpec,
    Message,
    ProtocolError,
    RequestRecord,
    WorkerStatus,
    decode,
)
from tropical.store.errors import CorruptValue

log = logging.getLogger(__name__)

StoredT = TypeVar("StoredT", bound=WorkerStatus | LatencyModelSpec | RequestRecord)


def name_of(value: WorkerStatus | LatencyModelSpec | RequestRecord) -> str:
    """The name a value is stored under, so a read can tell it sits in the right place."""
    if isinstance(value, WorkerStatus):
        return value.worker_id
    if isinstance(value, LatencyModelSpec):
        return value.key
    return value.request_id


def decode_value(data: bytes, expected: type[StoredT], *, key: str, name: str | None = None) -> StoredT:
    """Validate bytes like the bus does, then check they are the value named ``name``.

    A valid message of another type, or one about another worker, is as wrong
    as garbage: trusting it would put one worker's load under another's name.
    ``name`` is None where only the value itself says what it is (an update).
    """
    try:
        message: Message = decode(data)
    except ProtocolError as exc:
        raise CorruptValue(key, str(exc)) from exc
    if not isinstance(message, expected):
        raise CorruptValue(key, f"holds a {type(message).__name__}, not a {expected.__name__}")
    if name is not None and name_of(message) != name:
        raise CorruptValue(key, f"holds the value of {name_of(message)!r}, not of {name!r}")
    return message


def decode_listing(entries: Iterable[tuple[str, str, bytes]], expected: type[StoredT]) -> list[StoredT]:
    """Decode ``(key, name, data)`` entries, logging and skipping the corrupt ones."""
    return DecodedListing(expected).decode(entries)


class DecodedListing(Generic[StoredT]):
    """A listing read again and again (the router reads every worker's status every few milliseconds): only the
    entries whose bytes changed since the last read are decoded; an unchanged one is the same object as before."""

    def __init__(self, expected: type[StoredT]) -> None:
        self.expected = expected
        self._last: dict[str, tuple[bytes, StoredT]] = {}

    def decode(self, entries: Iterable[tuple[str, str, bytes]]) -> list[StoredT]:
        """Decode ``(key, name, data)`` entries, logging and skipping the corrupt ones; bytes seen at the last call are not
        decoded again."""
        values: list[StoredT] = []
        last: dict[str, tuple[bytes, StoredT]] = {}
        for key, name, data in entries:
            seen = self._last.get(key)
            if seen is not None and seen[0] == data:
                value = seen[1]
            else:
                try:
                    value = decode_value(data, self.expected, key=key, name=name)
                except CorruptValue as exc:
                    log.warning("skipping a stored %s: %s", self.expected.__name__, exc)
                    continue
            last[key] = (data, value)
            values.append(value)
        self._last = last
        return values


def check_holder(holder: str) -> str:
    """A lease held by nobody in particular could be renewed by anybody."""
    if not holder:
        raise ValueError("a lease's holder must be named")
    return holder


def check_ttl(ttl_s: float) -> float:
    """Both stores refuse the same TTLs, so a bug shows up with either of them."""
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"ttl_s must be a positive number of seconds, not {ttl_s!r}")
    return ttl_s
