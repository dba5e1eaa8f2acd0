"""The message bus interface every service talks to.

Semantics are RabbitMQ's, kept small: named queues, at-least-once delivery with
manual acks, a per-consumer prefetch window, redelivery of whatever a consumer
had not settled when it went away, and a dead-letter queue per work queue for
messages that are refused. The in-memory bus gives the same semantics inside one
process, so the embedded default behaves like a real deployment.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)


class BusError(Exception):
    """Base of the bus's own errors."""


class Unroutable(BusError):
    """Published to a queue that does not exist: the message was not taken."""


class QueueNotFound(BusError):
    """Consumed from, or asked about, a queue that does not exist."""


class QueueMismatch(BusError):
    """Declared a queue again with other properties than it has."""


class QueueLocked(BusError):
    """Another connection owns this exclusive queue."""


class BrokerUnavailable(BusError):
    """The broker stayed unreachable longer than the bus waits for it to come back."""


class BusClosed(BusError):
    """The bus was closed; nothing more can be sent or received on it."""


@dataclass(frozen=True)
class QueueSpec:
    """How a queue behaves.

    A work queue is durable and dead-letters what its consumers refuse into
    ``<name>.dead``. A reply queue is exclusive: private to the connection that
    declared it and deleted when that connection closes, so a vanished client
    leaves nothing behind and its workers learn it is gone (Unroutable).

    A ``quorum`` queue is replicated across the nodes of a RabbitMQ cluster
    (Raft), so it outlives the loss of a minority of them; its dead-letter
    queue is one too. Only a durable, shared queue can be one. It is part of
    the queue's identity: declaring it again as the other kind is refused
    (QueueMismatch). The in-memory bus has one node and nothing to replicate.
    """

    name: str
    durable: bool = True
    exclusive: bool = False
    dead_letter: bool = True
    quorum: bool = False

    def __post_init__(self) -> None:
        if self.quorum and (self.exclusive or not self.durable):
            raise ValueError(f"queue {self.name!r}: a quorum queue must be durable and not exclusive")

    @classmethod
    def reply(cls, name: str) -> QueueSpec:
        return cls(name, durable=False, exclusive=True, dead_letter=False)

    @property
    def dead_letter_queue(self) -> str | None:
        return dead_letter_queue(self.name) if self.dead_letter else None

    def dead_letter_spec(self) -> QueueSpec:
        """The queue refused messages go to: of the same kind, and with no dead-letter queue of its own."""
        return QueueSpec(dead_letter_queue(self.name), durable=self.durable, exclusive=self.exclusive, dead_letter=False, quorum=self.quorum)


def dead_letter_queue(name: str) -> str:
    return f"{name}.dead"


class Delivery(abc.ABC):
    """One received message, to be settled exactly once with ack or nack."""

    body: bytes
    queue: str
    reply_to: str | None
    correlation_id: str | None
    redelivered: bool

    def __init__(self) -> None:
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    async def ack(self) -> None:
        """Done with it: the broker forgets the message."""
        if not self._settled:
            self._settled = True
            await self._ack()

    async def nack(self, *, requeue: bool) -> None:
        """Give it back: to the queue's head again, or (requeue=False) to the dead-letter queue."""
        if not self._settled:
            self._settled = True
            await self._nack(requeue)

    @abc.abstractmethod
    async def _ack(self) -> None: ...

    @abc.abstractmethod
    async def _nack(self, requeue: bool) -> None: ...


Handler = Callable[[Delivery], Awaitable[None]]


class Subscription(abc.ABC):
    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop receiving; deliveries not yet settled go back to the queue, marked redelivered."""


class Bus(abc.ABC):
    """A connection to the broker."""

    # When (time.monotonic()) this connection last came back after the broker dropped it; None if it never did. Right
    # after one, a client's reply queue may be missing only because its own connection has not come back yet.
    reconnected_at: float | None = None

    @abc.abstractmethod
    async def declare_queue(self, spec: QueueSpec) -> None:
        """Create the queue (and its dead-letter queue) unless it exists with the same properties."""

    @abc.abstractmethod
    async def delete_queue(self, name: str) -> None:
        """Delete the queue and its dead-letter queue; a missing queue is not an error."""

    @abc.abstractmethod
    async def publish(self, queue: str, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None) -> None:
        """Return once the broker has taken the message; raise Unroutable if the queue does not exist."""

    @abc.abstractmethod
    async def publish_many(self, queue: str, bodies: Sequence[bytes], *, reply_to: str | None = None) -> None:
        """Publish several messages and wait for all of them to be taken at once (fewer round trips)."""

    @abc.abstractmethod
    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16, auto_ack: bool = False) -> Subscription:
        """Call `handler` for each message, at most `prefetch` unsettled at a time.

        A handler that returns without settling acks its message. One that raises has
        its message requeued the first time and dead-lettered if it fails again, so a
        poison message cannot loop forever. With `auto_ack` the broker forgets each
        message as it sends it (no settling, no redelivery): for a client's private
        reply stream, where an ack per token message would cost more than the message.
        """

    @abc.abstractmethod
    async def queue_depth(self, name: str) -> int:
        """Messages waiting in the queue, not counting those delivered and not yet settled."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel every subscription (their unsettled messages are requeued) and disconnect."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


async def run_handler(handler: Handler, delivery: Delivery) -> None:
    """Run one handler with the settle rules of Bus.consume; shared by every bus."""
    try:
        await handler(delivery)
    except Exception:
        requeue = not delivery.redelivered
        log.exception(
            "handler failed on a message from %s; %s",
            delivery.queue,
            "requeued once" if requeue else "dead-lettered after its second failure",
        )
        await delivery.nack(requeue=requeue)
    else:
        await delivery.ack()
