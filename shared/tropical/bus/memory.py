"""An in-process broker with RabbitMQ's delivery semantics, for the embedded default and tests.

`MemoryBroker` plays the server and `MemoryBus` one connection to it, so several
services in one process keep separate connections exactly as they would against
RabbitMQ: exclusive queues die with their connection, and whatever a closed
connection had not settled is redelivered to the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tropical.bus.base import (
    Bus,
    BusClosed,
    Delivery,
    Handler,
    QueueLocked,
    QueueMismatch,
    QueueNotFound,
    QueueSpec,
    Subscription,
    Unroutable,
    run_handler,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Message:
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    redelivered: bool = False


class MemoryBroker:
    """The queues, shared by every MemoryBus connected to this broker."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}

    def connect(self) -> MemoryBus:
        return MemoryBus(self)


class _Queue:
    def __init__(self, broker: MemoryBroker, spec: QueueSpec, owner: MemoryBus | None) -> None:
        self.broker = broker
        self.spec = spec
        self.owner = owner
        self.ready: deque[_Message] = deque()
        self.consumers: list[_Consumer] = []
        self._turn = 0

    def put(self, message: _Message, *, front: bool = False) -> None:
        (self.ready.appendleft if front else self.ready.append)(message)
        self.pump()

    def dead_letter(self, message: _Message) -> None:
        target = self.broker._queues.get(self.spec.dead_letter_queue or "")
        if target is None:
            log.warning("dropped a refused message from %s: it has no dead-letter queue", self.spec.name)
            return
        target.put(replace(message, redelivered=False))

    def pump(self) -> None:
        """Hand ready messages to consumers with room in their prefetch window, round robin."""
        while self.ready and self.consumers:
            for offset in range(len(self.consumers)):
                consumer = self.consumers[(self._turn + offset) % len(self.consumers)]
                if consumer.has_room():
                    self._turn = (self._turn + offset + 1) % len(self.consumers)
                    consumer.deliver(self.ready.popleft())
                    break
            else:
                return


class MemoryDelivery(Delivery):
    def __init__(self, consumer: _Consumer, message: _Message) -> None:
        super().__init__()
        self.message = message
        self.body = message.body
        self.queue = consumer.queue.spec.name
        self.reply_to = message.reply_to
        self.correlation_id = message.correlation_id
        self.redelivered = message.redelivered
        self._consumer = consumer

    async def _ack(self) -> None:
        self._consumer.settle(self)

    async def _nack(self, requeue: bool) -> None:
        if not self._consumer.settle(self):
            return
        queue = self._consumer.queue
        if requeue:
            queue.put(replace(self.message, redelivered=True), front=True)
        else:
            queue.dead_letter(self.message)


class _Consumer(Subscription):
    def __init__(self, bus: MemoryBus, queue: _Queue, handler: Handler, prefetch: int, auto_ack: bool = False) -> None:
        self.bus = bus
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.auto_ack = auto_ack  # settled as it is handed over: no prefetch limit, nothing given back on cancel
        self.unsettled: dict[MemoryDelivery, asyncio.Task[None]] = {}
        self._handing: set[asyncio.Task[None]] = set()

    def has_room(self) -> bool:
        return self.auto_ack or len(self.unsettled) < self.prefetch

    def deliver(self, message: _Message) -> None:
        delivery = MemoryDelivery(self, message)
        task = asyncio.get_running_loop().create_task(run_handler(self.handler, delivery))
        if self.auto_ack:
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)
        else:
            self.unsettled[delivery] = task

    def settle(self, delivery: MemoryDelivery) -> bool:
        """Forget a settled delivery; False if its subscription had already given it back."""
        if self.unsettled.pop(delivery, None) is None:
            log.debug("settled a delivery from %s after its subscription ended; ignored", self.queue.spec.name)
            return False
        self.queue.pump()
        return True

    async def cancel(self) -> None:
        if self not in self.queue.consumers:
            return
        self.queue.consumers.remove(self)
        self.bus._consumers.discard(self)
        pending, self.unsettled = self.unsettled, {}
        current = asyncio.current_task()
        for task in pending.values():
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in pending.values() if t is not current), return_exceptions=True)
        for delivery in reversed(list(pending)):
            self.queue.put(replace(delivery.message, redelivered=True), front=True)


class MemoryBus(Bus):
    """One connection to a MemoryBroker."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker()
        self._consumers: set[_Consumer] = set()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the bus is closed")

    def _queue(self, name: str) -> _Queue:
        queue = self.broker._queues.get(name)
        if queue is None:
            raise QueueNotFound(f"no queue named {name!r}")
        return queue

    async def declare_queue(self, spec: QueueSpec) -> None:
        self._check_open()
        if spec.dead_letter_queue:
            await self.declare_queue(spec.dead_letter_spec())
        existing = self.broker._queues.get(spec.name)
        if existing is None:
            self.broker._queues[spec.name] = _Queue(self.broker, spec, self if spec.exclusive else None)
        elif existing.owner not in (None, self):
            raise QueueLocked(f"queue {spec.name!r} is exclusive to another connection")
        elif existing.spec != spec:
            raise QueueMismatch(f"queue {spec.name!r} exists as {existing.spec}, not {spec}")

    async def delete_queue(self, name: str) -> None:
        self._check_open()
        queue = self.broker._queues.get(name)
        if queue is not None:
            if queue.owner not in (None, self):
                raise QueueLocked(f"queue {name!r} is exclusive to another connection")
            for consumer in list(queue.consumers):
                await consumer.cancel()
            self.broker._queues.pop(name, None)
            if queue.spec.dead_letter_queue:
                await self.delete_queue(queue.spec.dead_letter_queue)

    async def publish(self, queue: str, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None) -> None:
        self._check_open()
        target = self.broker._queues.get(queue)
        if target is None:
            raise Unroutable(f"no queue named {queue!r}: the message was not taken")
        target.put(_Message(bytes(body), reply_to, correlation_id))

    async def publish_many(self, queue: str, bodies: Sequence[bytes], *, reply_to: str | None = None) -> None:
        for body in bodies:
            await self.publish(queue, body, reply_to=reply_to)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16, auto_ack: bool = False) -> Subscription:
        self._check_open()
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        target = self._queue(queue)
        if target.owner not in (None, self):
            raise QueueLocked(f"queue {queue!r} is exclusive to another connection")
        consumer = _Consumer(self, target, handler, prefetch, auto_ack)
        target.consumers.append(consumer)
        self._consumers.add(consumer)
        target.pump()
        return consumer

    async def queue_depth(self, name: str) -> int:
        self._check_open()
        return len(self._queue(name).ready)

    async def close(self) -> None:
        if self._closed:
            return
        for consumer in list(self._consumers):
            await consumer.cancel()
        for name, queue in list(self.broker._queues.items()):
            if queue.owner is self:
                del self.broker._queues[name]
        self._closed = True
