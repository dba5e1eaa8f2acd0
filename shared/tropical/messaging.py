"""Typed messages over the bus: send them, and serve a queue with one handler per type.

Whatever arrives is decoded and validated before a handler sees it. A message
that cannot be accepted — garbage bytes, the wrong shape, an unknown type or
version, too large, or a type this queue does not take — is dead-lettered, its
sender gets an ErrorReply when it left a reply-to, one line is logged, and the
consumer carries on.

A handler's return acks its message, unless it returns a `Held`: it keeps the
delivery to settle later, once the work the message carries is done (the
router acks a request once it has placed it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tropical.bus import Bus, Delivery, Subscription, Unroutable
from tropical.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ErrorCode,
    ErrorReply,
    Message,
    ProtocolError,
    decode,
    encode,
    request_id_of,
)

log = logging.getLogger(__name__)


class Held:
    """A delivery its handler keeps after returning, settled by whoever holds it when the work is done.

    The consumer waits for that settle instead of acking on the handler's
    return, so the message counts against the prefetch window meanwhile. Should
    the subscription end first (the consumer stopped, the connection lost), the
    message goes back to the queue for another consumer, and a later settle
    here changes nothing.
    """

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self._settled = asyncio.Event()

    async def ack(self) -> None:
        try:
            await self.delivery.ack()
        finally:
            self._settled.set()

    async def nack(self, *, requeue: bool) -> None:
        try:
            await self.delivery.nack(requeue=requeue)
        finally:
            self._settled.set()

    async def settled(self) -> None:
        await self._settled.wait()


MessageHandler = Callable[[Any, Delivery], Awaitable[Held | None]]


async def send(bus: Bus, queue: str, message: Message, *, reply_to: str | None = None) -> None:
    """Publish one typed message.

    A message that names its own reply queue (a GenerateRequest) also carries it as
    the transport's reply address, so even a receiver that cannot read the body
    knows where to send the error.
    """
    reply_to = reply_to or getattr(message, "reply_to", None)
    await bus.publish(queue, encode(message), reply_to=reply_to, correlation_id=request_id_of(message))


async def reply_error(bus: Bus, reply_to: str | None, request_id: str | None, code: ErrorCode, text: str) -> None:
    """Tell a sender why its message was refused; a sender that is gone is not an error."""
    if not reply_to:
        return
    try:
        await send(bus, reply_to, ErrorReply(request_id=request_id, code=code, message=text))
    except Unroutable:
        log.info("could not send a %s error to %s: that queue is gone", code, reply_to)


class MessageConsumer:
    """Serves one queue: decodes each delivery and calls the handler registered for its type."""

    def __init__(
        self,
        bus: Bus,
        queue: str,
        handlers: Mapping[type[Message], MessageHandler],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.bus = bus
        self.queue = queue
        self.handlers = dict(handlers)
        self.max_message_bytes = max_message_bytes
        self.rejected = 0
        self._subscription: Subscription | None = None

    async def start(self, *, prefetch: int = 16) -> None:
        self._subscription = await self.bus.consume(self.queue, self._on_delivery, prefetch=prefetch)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.body, max_bytes=self.max_message_bytes)
        except ProtocolError as exc:
            # The body cannot say which request it was; the sender's correlation id can, so its client hears of it.
            await self._reject(delivery, delivery.correlation_id, exc.code, str(exc))
            return
        handler = self.handlers.get(type(message))
        if handler is None:
            text = f"queue {self.queue!r} does not take {message.__struct_config__.tag!r} messages"
            await self._reject(delivery, request_id_of(message), ErrorCode.UNEXPECTED, text)
            return
        try:
            held = await handler(message, delivery)
        except Exception:
            if not delivery.redelivered:
                raise  # the bus requeues it once
            log.exception("handler for %s failed twice on %s; dead-lettered", self.queue, request_id_of(message))
            await delivery.nack(requeue=False)
            await reply_error(self.bus, delivery.reply_to, request_id_of(message), ErrorCode.INTERNAL, "internal error")
            return
        if held is not None:
            # No deadline: the holder settles it when its work is done, or the subscription's end cancels this wait.
            await held.settled()

    async def _reject(self, delivery: Delivery, request_id: str | None, code: ErrorCode, text: str) -> None:
        self.rejected += 1
        log.warning("rejected a message on %s (%d bytes): %s: %s", self.queue, len(delivery.body), code, text[:200])
        await delivery.nack(requeue=False)
        await reply_error(self.bus, delivery.reply_to, request_id, code, text[:1000])
