"""A running consumer refuses bad input cleanly, answers the sender, and keeps serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tropical.bus import Bus, Delivery, QueueSpec, dead_letter_queue
from tropical.messaging import MessageConsumer, send
from tropical.protocol import (
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    KvAck,
    ProtocolError,
    decode,
    encode,
)
from tests.bus_harness import WAIT, Broker, Inbox
from tests.messages import generate_request
from tests.test_protocol import msgpack_values, mutated_messages


@dataclass
class Service:
    """A consumer of GenerateRequests on a work queue, and a client with a reply queue."""

    bus: Bus
    client: Bus
    queue: str
    replies: str
    consumer: MessageConsumer
    handled: asyncio.Queue[GenerateRequest]
    reply_inbox: Inbox
    dead_inbox: Inbox

    async def next_reply(self) -> ErrorReply:
        reply = decode((await self.reply_inbox.next()).body)
        assert isinstance(reply, ErrorReply)
        return reply

    async def next_handled(self) -> GenerateRequest:
        return await asyncio.wait_for(self.handled.get(), WAIT)

    async def still_serves(self, request_id: str = "after") -> None:
        await send(self.client, self.queue, generate_request(request_id=request_id, reply_to=self.replies))
        assert (await self.next_handled()).request_id == request_id


async def start_service(broker: Broker, *, max_message_bytes: int = 64 * 1024) -> Service:
    bus, client = await broker.connect(), await broker.connect()
    queue, replies = await broker.work_queue(bus), broker.name("reply")
    await client.declare_queue(QueueSpec.reply(replies))
    handled: asyncio.Queue[GenerateRequest] = asyncio.Queue()

    async def on_generate(message: GenerateRequest, delivery: Delivery) -> None:
        if message.prompt == "crash":
            raise RuntimeError("handler bug (expected by the test)")
        handled.put_nowait(message)

    consumer = MessageConsumer(bus, queue, {GenerateRequest: on_generate}, max_message_bytes=max_message_bytes)
    await consumer.start()
    reply_inbox, dead_inbox = Inbox(), Inbox()
    await client.consume(replies, reply_inbox)
    await client.consume(dead_letter_queue(queue), dead_inbox)
    return Service(bus, client, queue, replies, consumer, handled, reply_inbox, dead_inbox)


@pytest.fixture
async def service(broker: Broker) -> AsyncIterator[Service]:
    yield await start_service(broker)


async def test_valid_message_reaches_its_typed_handler(service: Service) -> None:
    request = generate_request(reply_to=service.replies)
    await send(service.client, service.queue, request)
    assert await service.next_handled() == request


BAD_PAYLOADS = {
    "garbage": (b"\xc1\x00garbage", ErrorCode.MALFORMED),
    "wrong-shape": (msgpack.packb([1, 2, 3]), ErrorCode.MALFORMED),
    "invalid-fields": (msgpack.packb({"v": 1, "type": "generate", "request_id": "r"}), ErrorCode.INVALID),
    "unknown-type": (msgpack.packb({"v": 1, "type": "teleport"}), ErrorCode.UNKNOWN_TYPE),
    "future-version": (msgpack.packb({"v": 99, "type": "generate"}), ErrorCode.UNSUPPORTED_VERSION),
    "oversized": (encode(generate_request(prompt="x" * 70_000)), ErrorCode.TOO_LARGE),
}


@pytest.mark.parametrize("case", list(BAD_PAYLOADS))
async def test_bad_message_is_dead_lettered_answered_and_logged_once(
    service: Service, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload, code = BAD_PAYLOADS[case]
    with caplog.at_level(logging.WARNING, logger="tropical.messaging"):
        await service.client.publish(service.queue, payload, reply_to=service.replies)
        assert (await service.dead_inbox.next()).body == payload
        reply = await service.next_reply()
    assert reply.code == code
    assert reply.request_id is None
    assert len([r for r in caplog.records if r.name == "tropical.messaging"]) == 1
    assert service.consumer.rejected == 1
    await service.still_serves()


async def test_bad_message_without_reply_address_is_only_dead_lettered(service: Service) -> None:
    await service.client.publish(service.queue, b"\xc1")
    assert (await service.dead_inbox.next()).body == b"\xc1"
    await service.still_serves()
    assert service.reply_inbox.items.empty()


async def test_message_of_a_type_the_queue_does_not_take(service: Service) -> None:
    await send(service.client, service.queue, KvAck(handoff_id="h", request_id="r-9", receiver="w"), reply_to=service.replies)
    reply = await service.next_reply()
    assert (reply.code, reply.request_id) == (ErrorCode.UNEXPECTED, "r-9")
    await service.dead_inbox.next()
    await service.still_serves()


async def test_handler_failing_twice_dead_letters_with_an_internal_error(service: Service) -> None:
    await send(service.client, service.queue, generate_request(request_id="r-crash", prompt="crash", reply_to=service.replies))
    reply = await service.next_reply()
    assert (reply.code, reply.request_id) == (ErrorCode.INTERNAL, "r-crash")
    assert decode((await service.dead_inbox.next()).body).request_id == "r-crash"  # type: ignore[attr-defined]
    await service.still_serves()


async def test_vanished_sender_does_not_stop_the_consumer(broker: Broker) -> None:
    service = await start_service(broker)
    await service.client.publish(service.queue, b"\xc1", reply_to="test.reply.nobody-listens")
    await service.dead_inbox.next()
    await service.still_serves()


@pytest.mark.parametrize("kind", ["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=200) | msgpack_values.map(msgpack.packb) | mutated_messages())
async def test_running_consumer_survives_random_payloads(kind: str, payload: bytes) -> None:
    """Each random payload is either served or refused with an answer; nothing is lost either way."""
    harness = Broker(kind)
    try:
        service = await start_service(harness)
        await service.client.publish(service.queue, payload, reply_to=service.replies)
        try:
            message = decode(payload, max_bytes=service.consumer.max_message_bytes)
        except ProtocolError as exc:
            assert (await service.next_reply()).code == exc.code
            assert (await service.dead_inbox.next()).body == payload
        else:
            if isinstance(message, GenerateRequest) and message.prompt != "crash":
                assert await service.next_handled() == message
            else:
                await service.next_reply()
                await service.dead_inbox.next()
        await service.still_serves()
    finally:
        await harness.cleanup()

