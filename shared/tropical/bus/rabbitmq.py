"""The bus on RabbitMQ, through aio-pika's self-healing connection.

One connection per bus. Publishes go through one channel with publisher
confirms and ``mandatory`` set, so a message is either taken by a queue or
refused as Unroutable. Declarations, deletions and depth queries each open a
short-lived channel: RabbitMQ closes the channel of a refused declaration, and
this way nothing else goes down with it. Every subscription has a channel of
its own, so closing it hands exactly its unsettled messages back. A QueueSpec
with `quorum` set is declared a quorum queue, replicated across the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)

from tropical.bus.base import (
    BrokerUnavailable,
    Bus,
    BusClosed,
    BusError,
    Delivery,
    Handler,
    QueueLocked,
    QueueMismatch,
    QueueNotFound,
    QueueSpec,
    Subscription,
    Unroutable,
    dead_letter_queue,
    run_handler,
)
from tropical.settings import mask_password

log = logging.getLogger(__name__)

T = TypeVar("T")

# How a dropped connection, or a channel that went down with it, shows itself.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
)
# The broker saying no: the channel closes too, but trying again cannot help.
_REFUSED: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelLockedResource,
    aiormq.exceptions.ChannelPreconditionFailed,
)


def _connection_lost(exc: BaseException) -> bool:
    """Worth waiting for the reconnect and trying again."""
    return isinstance(exc, _CONNECTION_LOST) and not isinstance(exc, _REFUSED)


@asynccontextmanager
async def _broker_refusals(queue: str) -> AsyncIterator[None]:
    """Turn the broker's refusals about a queue into the bus's own errors."""
    try:
        yield
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise QueueMismatch(f"queue {queue!r} exists with other properties: {exc}") from None
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise QueueNotFound(f"queue {queue!r} does not exist") from None
    except aiormq.exceptions.ChannelLockedResource:
        raise QueueLocked(f"queue {queue!r} is exclusive to another connection") from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise BusError(f"the broker refused access to queue {queue!r}: {exc}") from None


class _RabbitDelivery(Delivery):
    def __init__(self, message: AbstractIncomingMessage, queue: str, subscription: _RabbitSubscription) -> None:
        super().__init__()
        self.body = message.body
        self.queue = queue
        self.reply_to = message.reply_to
        self.correlation_id = message.correlation_id
        self.redelivered = bool(message.redelivered)
        self._message = message
        self._subscription = subscription

    async def _ack(self) -> None:
        await self._settle("ack", self._message.ack)

    async def _nack(self, requeue: bool) -> None:
        # Without requeue the queue's dead-letter arguments route it to `<name>.dead`.
        await self._settle("nack", lambda: self._message.reject(requeue=requeue))

    async def _settle(self, what: str, action: Callable[[], Awaitable[None]]) -> None:
        # The delivery tag is only valid on the channel the message came on; once
        # that channel is gone the broker has requeued the message by itself.
        if self._subscription.auto_ack:
            return  # nothing to settle: the broker forgot it when it sent it
        if self._subscription.cancelled:
            log.debug("%s on %s after its subscription was cancelled: the message was requeued", what, self.queue)
            return
        try:
            await action()
        except _CONNECTION_LOST as exc:
            log.debug("%s on %s lost with its channel (%r): the broker requeues the message", what, self.queue, exc)


class _RabbitSubscription(Subscription):
    def __init__(self, bus: RabbitBus, channel: AbstractRobustChannel, queue: str, handler: Handler, *, auto_ack: bool = False) -> None:
        self.auto_ack = auto_ack  # the broker settled each message as it sent it
        self._bus = bus
        self._channel = channel
        self.queue = queue
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self.cancelled = False

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if self.cancelled:
            return  # left unsettled: requeued when the channel closes
        delivery = _RabbitDelivery(message, self.queue, self)
        task = asyncio.create_task(run_handler(self._handler, delivery), name=f"bus handler for {self.queue}")
        self._tasks.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("handler task for %s failed outside its handler", self.queue, exc_info=exc)

    async def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self._bus._subscriptions.discard(self)
        # A handler may cancel its own subscription; that one finishes by itself.
        current = asyncio.current_task()
        running = [task for task in self._tasks if task is not current]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        # Closing the channel is what makes RabbitMQ requeue the unsettled
        # messages (marked redelivered); a closed robust channel stays closed.
        with suppress(*_CONNECTION_LOST, TimeoutError):
            async with asyncio.timeout(self._bus.retry_for):
                await self._channel.close()


class RabbitBus(Bus):
    """A bus on one robust RabbitMQ connection; it reconnects by itself after the broker drops it."""

    def __init__(self, connection: AbstractRobustConnection, publisher: AbstractRobustChannel, retry_for: float) -> None:
        self._connection = connection
        self._publisher = publisher
        self._subscriptions: set[_RabbitSubscription] = set()
        self._exclusive: dict[str, QueueSpec] = {}
        self._closed = False
        self.retry_for = retry_for
        # Set while the connection and all its channels are up. The channels come
        # back one after another; a publish waits for all of them, so it finds
        # this connection's exclusive queues declared again.
        self._restored = asyncio.Event()
        self._restored.set()
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)

    @classmethod
    async def connect(cls, url: str, *, connect_timeout: float = 10.0, reconnect_interval: float = 1.0) -> RabbitBus:
        """Connect, failing if the broker cannot be reached within `connect_timeout`.

        Later disconnects are healed in the background, trying every
        `reconnect_interval` seconds; operations wait up to `connect_timeout` for that.
        """
        try:
            connection = await aio_pika.connect_robust(url, timeout=connect_timeout, reconnect_interval=reconnect_interval)
        except aiormq.exceptions.ProbableAuthenticationError:
            raise BrokerUnavailable(f"the broker at {mask_password(url)} refused the login: check the user and password") from None
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            reason = next((a for a in reversed(exc.args) if isinstance(a, str)), None) or str(exc) or type(exc).__name__
            raise BrokerUnavailable(f"cannot reach the broker at {mask_password(url)}: {reason}") from None
        try:
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        return cls(connection, publisher, connect_timeout)

    def _on_connection_lost(self, *_: Any) -> None:
        self._restored.clear()

    def _on_reconnected(self, *_: Any) -> None:
        log.info("reconnected to the broker")
        self.reconnected_at = time.monotonic()
        self._restored.set()

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the bus is closed")

    def _unreachable(self, what: str) -> BusError:
        if self._closed:
            return BusClosed("the bus is closed")
        return BrokerUnavailable(f"could not {what} within {self.retry_for:g} s: the broker connection is down or stalled")

    @asynccontextmanager
    async def _robustly(self, what: str) -> AsyncIterator[None]:
        """Bound the wait of a robust channel for the connection to come back."""
        self._check_open()
        try:
            async with asyncio.timeout(self.retry_for):
                yield
        except TimeoutError:
            raise self._unreachable(what) from None

    async def _on_own_channel(self, queue: str, operation: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        """Run one declaration or query on a plain channel of its own.

        RabbitMQ answers a refused declaration by closing the channel; this way
        nothing else goes down with it. Each of these is idempotent, so it is
        simply run again if the connection drops meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        while True:
            self._check_open()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._connection.ready()
                    channel = aio_pika.Channel(self._connection, publisher_confirms=False)
                    await channel.initialize()
                    try:
                        async with _broker_refusals(queue):
                            return await operation(channel)
                    finally:
                        if not channel.is_closed:
                            with suppress(*_CONNECTION_LOST):
                                await channel.close()
            except TimeoutError:
                raise self._unreachable(f"reach queue {queue!r}") from None
            except _CONNECTION_LOST as exc:
                if not _connection_lost(exc):
                    raise
                log.debug("operation on %s lost with the connection (%r); trying again", queue, exc)
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    async def declare_queue(self, spec: QueueSpec) -> None:
        known = self._exclusive.get(spec.name)
        if known is not None and known != spec:
            # RabbitMQ lets the owner redeclare an exclusive queue with another durable flag.
            raise QueueMismatch(f"queue {spec.name!r} exists with other properties: {known}")
        try:
            await self._on_own_channel(spec.name, lambda channel: channel.declare_queue(spec.name, **_queue_properties(spec)))
        except QueueLocked:
            # RabbitMQ says "locked" also when only the exclusive flag differs;
            # a passive declare is refused only if another connection owns the queue.
            await self.queue_depth(spec.name)
            raise QueueMismatch(f"queue {spec.name!r} exists with another exclusive flag") from None
        if spec.exclusive and known is None:
            # It dies with the connection, so keep it on a robust channel as well,
            # which declares it again after a reconnect. Ours already: cannot fail.
            async with self._robustly(f"declare {spec.name!r}"):
                await self._publisher.declare_queue(spec.name, **_queue_properties(spec), robust=True)
            self._exclusive[spec.name] = spec
        if spec.dead_letter_queue is not None:
            await self.declare_queue(spec.dead_letter_spec())

    async def delete_queue(self, name: str) -> None:
        # RabbitMQ cancels the consumers of a deleted queue; ours stop for good.
        for subscription in [s for s in self._subscriptions if s.queue in (name, dead_letter_queue(name))]:
            await subscription.cancel()
        for queue in (name, dead_letter_queue(name)):
            await self._delete(queue)

    async def _delete(self, queue: str) -> None:
        if self._exclusive.pop(queue, None) is None:
            await self._on_own_channel(queue, lambda channel: channel.queue_delete(queue))
            return
        async with self._robustly(f"delete {queue!r}"):
            await self._publisher.queue_delete(queue)  # forgets it for reconnects, too

    async def queue_depth(self, name: str) -> int:
        async def depth(channel: AbstractChannel) -> int:
            queue = await channel.declare_queue(name, passive=True)
            return queue.declaration_result.message_count or 0

        return await self._on_own_channel(name, depth)

    async def publish(self, queue: str, body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None) -> None:
        await self._publish(queue, [_message(body, reply_to, correlation_id)])

    async def publish_many(self, queue: str, bodies: Sequence[bytes], *, reply_to: str | None = None) -> None:
        await self._publish(queue, [_message(body, reply_to, None) for body in bodies])

    async def _publish(self, queue: str, messages: list[aio_pika.Message]) -> None:
        """Send all, then await all confirms; resend what a dropped connection lost.

        A message whose confirm was lost with the connection may have been taken
        all the same, so a resend can duplicate it: delivery is at least once.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        pending = messages
        pause = 0.05
        while pending:
            self._check_open()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._restored.wait()
                    self._check_open()
                    await self._publisher.ready()
                    exchange = self._publisher.default_exchange
                    results = await asyncio.gather(
                        *(exchange.publish(message, routing_key=queue, mandatory=True) for message in pending),
                        return_exceptions=True,
                    )
            except TimeoutError:
                raise self._unreachable(f"publish to {queue!r}") from None
            lost = []
            for message, result in zip(pending, results):
                if isinstance(result, aiormq.exceptions.PublishError):  # returned: no queue by that name
                    raise Unroutable(f"no queue {queue!r} took the message") from None
                if isinstance(result, aiormq.exceptions.DeliveryError):  # nacked by the broker
                    raise BusError(f"the broker refused a message for {queue!r}: {result}") from None
                # A confirm pending when the channel died can also come back cancelled.
                if isinstance(result, asyncio.CancelledError) or (isinstance(result, Exception) and _connection_lost(result)):
                    lost.append(message)
                elif isinstance(result, BaseException):
                    raise result
            if lost:
                self._check_open()
                log.debug("%d of %d publishes to %s lost with the connection; sending them again", len(lost), len(pending), queue)
                # The channel may not have noticed yet that it is gone: don't spin on it.
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(pause * 2, 1.0)
            pending = lost

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16, auto_ack: bool = False) -> Subscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        # Ask on a channel of its own first, so a refusal never lands on the consuming one.
        await self.queue_depth(queue)
        channel = await self._connection.channel(publisher_confirms=False)
        subscription = _RabbitSubscription(self, channel, queue, handler, auto_ack=auto_ack)
        try:
            async with self._robustly(f"consume {queue!r}"), _broker_refusals(queue):
                await channel.set_qos(prefetch_count=prefetch)
                # Looked up, not declared: after a reconnect the channel consumes
                # again once the queue is back, and never creates one by itself.
                source = await channel.get_queue(queue)
                await source.consume(subscription.on_message, no_ack=auto_ack)
        except BaseException:
            subscription.cancelled = True
            with suppress(*_CONNECTION_LOST):
                await channel.close()
            raise
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._restored.set()  # wakes publishes waiting for a reconnect; they find the bus closed
        await asyncio.gather(*(subscription.cancel() for subscription in list(self._subscriptions)), return_exceptions=True)
        await self._connection.close()


def _queue_properties(spec: QueueSpec) -> dict[str, Any]:
    """The declaration's flags and arguments.

    A classic queue names no type, so queues declared before types existed
    keep matching. A quorum queue takes the same dead-letter arguments
    (at-most-once dead-lettering, its default); it refuses exclusive,
    non-durable and priority queues, which QueueSpec and this bus never ask
    for, and no message TTL is set on any queue.
    """
    arguments: dict[str, Any] = {}
    if spec.dead_letter_queue is not None:
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": spec.dead_letter_queue}
    if spec.quorum:
        arguments["x-queue-type"] = "quorum"
    return {"durable": spec.durable, "exclusive": spec.exclusive, "arguments": arguments}


def _message(body: bytes, reply_to: str | None, correlation_id: str | None) -> aio_pika.Message:
    # Persistent, so a durable queue keeps it across a broker restart.
    return aio_pika.Message(body, delivery_mode=DeliveryMode.PERSISTENT, reply_to=reply_to, correlation_id=correlation_id)
