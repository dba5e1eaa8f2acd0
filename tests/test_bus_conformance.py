"""One suite, two buses: the in-memory bus must behave as RabbitMQ does, with classic work queues and quorum ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from tropical.bus import (
    Bus,
    BusClosed,
    Delivery,
    QueueLocked,
    QueueMismatch,
    QueueNotFound,
    QueueSpec,
    Unroutable,
    dead_letter_queue,
)
from tropical.queues import declare_requests_queue
from tropical.settings import Settings
from tests.bus_harness import WAIT, Broker, Inbox


class QuorumBroker(Broker):
    """RabbitMQ with quorum work queues: every rule of the suite holds for them as well."""

    async def work_queue(self, bus: Bus) -> str:
        name = self.name()
        await bus.declare_queue(QueueSpec(name, quorum=True))
        return name


@pytest.fixture(
    params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration), pytest.param("rabbitmq-quorum", marks=pytest.mark.integration)]
)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    harness = QuorumBroker(request.param) if request.param == "rabbitmq-quorum" else Broker(request.param)
    yield harness
    await harness.cleanup()


async def test_round_trip_keeps_body_and_properties(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    inbox = Inbox()
    await bus.consume(queue, inbox)
    await bus.publish(queue, b"\x00hello\xff", reply_to="somewhere", correlation_id="c-1")
    got = await inbox.next()
    assert (got.body, got.reply_to, got.correlation_id, got.redelivered, got.queue) == (
        b"\x00hello\xff",
        "somewhere",
        "c-1",
        False,
        queue,
    )


async def test_large_message_round_trip(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    inbox = Inbox()
    await bus.consume(queue, inbox)
    body = bytes(range(256)) * 4096  # 1 MiB
    await bus.publish(queue, body)
    assert (await inbox.next()).body == body


async def test_publish_to_missing_queue_is_unroutable(broker: Broker) -> None:
    bus = await broker.connect()
    with pytest.raises(Unroutable):
        await bus.publish(f"test.missing.{uuid.uuid4().hex}", b"x")
    queue = await broker.work_queue(bus)  # the bus is still usable afterwards
    await bus.publish(queue, b"y")
    assert await bus.queue_depth(queue) == 1


async def test_missing_queue_cannot_be_consumed_or_measured(broker: Broker) -> None:
    bus = await broker.connect()
    missing = f"test.missing.{uuid.uuid4().hex}"
    with pytest.raises(QueueNotFound):
        await bus.consume(missing, Inbox())
    with pytest.raises(QueueNotFound):
        await bus.queue_depth(missing)


async def test_declare_is_idempotent_and_refuses_other_properties(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    await bus.publish(queue, b"kept")
    spec = QueueSpec(queue, quorum=isinstance(broker, QuorumBroker))
    await bus.declare_queue(spec)
    assert await bus.queue_depth(queue) == 1
    with pytest.raises(QueueMismatch):
        await bus.declare_queue(replace(spec, dead_letter=False))
    await bus.publish(queue, b"still works")
    assert await bus.queue_depth(queue) == 2


async def test_single_consumer_sees_fifo_order(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    for i in range(20):
        await bus.publish(queue, str(i).encode())
    inbox = Inbox()
    await bus.consume(queue, inbox, prefetch=1)
    assert [d.body for d in await inbox.take(20)] == [str(i).encode() for i in range(20)]


async def test_publish_many_delivers_all_in_order(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    bodies = [f"m{i}".encode() for i in range(50)]
    await bus.publish_many(queue, bodies, reply_to="r")
    assert await bus.queue_depth(queue) == 50
    inbox = Inbox()
    await bus.consume(queue, inbox, prefetch=50)
    got = await inbox.take(50)
    assert [d.body for d in got] == bodies
    assert {d.reply_to for d in got} == {"r"}


async def test_prefetch_bounds_unsettled_deliveries(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    await bus.publish_many(queue, [b"%d" % i for i in range(5)])
    inbox = Inbox(settle="hold")
    await bus.consume(queue, inbox, prefetch=2)
    first = await inbox.take(2)
    assert inbox.items.empty()
    assert await bus.queue_depth(queue) == 3
    await first[0].ack()
    third = await inbox.next()
    assert third.body == b"2"
    assert await bus.queue_depth(queue) == 2


async def test_handler_that_returns_acks(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    seen = asyncio.Event()

    async def returns(delivery: Delivery) -> None:
        seen.set()

    sub = await bus.consume(queue, returns)
    await bus.publish(queue, b"x")
    await asyncio.wait_for(seen.wait(), WAIT)
    await sub.cancel()
    assert await bus.queue_depth(queue) == 0  # not given back: it was acked


async def test_nack_with_requeue_redelivers(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    inbox = Inbox(settle="hold")
    await bus.consume(queue, inbox)
    await bus.publish(queue, b"again")
    first = await inbox.next()
    assert not first.redelivered
    await first.nack(requeue=True)
    second = await inbox.next()
    assert (second.body, second.redelivered) == (b"again", True)
    await second.ack()


async def test_nack_without_requeue_dead_letters(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    inbox = Inbox(settle="hold")
    await bus.consume(queue, inbox)
    await bus.publish(queue, b"poison", reply_to="r")
    await (await inbox.next()).nack(requeue=False)
    dead = Inbox()
    await bus.consume(dead_letter_queue(queue), dead)
    got = await dead.next()
    assert (got.body, got.reply_to) == (b"poison", "r")


async def test_failing_handler_gets_one_retry_then_dead_letters(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    attempts: asyncio.Queue[bool] = asyncio.Queue()

    async def fails(delivery: Delivery) -> None:
        attempts.put_nowait(delivery.redelivered)
        raise RuntimeError("boom (expected by the test)")

    await bus.consume(queue, fails)
    await bus.publish(queue, b"bad")
    assert await asyncio.wait_for(attempts.get(), WAIT) is False
    assert await asyncio.wait_for(attempts.get(), WAIT) is True
    dead = Inbox()
    await bus.consume(dead_letter_queue(queue), dead)
    assert (await dead.next()).body == b"bad"
    assert attempts.empty()


async def test_cancel_returns_unsettled_messages(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    holder = Inbox(settle="hold")
    sub = await bus.consume(queue, holder, prefetch=4)
    await bus.publish_many(queue, [b"a", b"b"])
    held = await holder.take(2)
    await sub.cancel()
    await held[0].ack()  # too late: harmless, and the message is not lost
    taker = Inbox()
    await bus.consume(queue, taker)
    got = await taker.take(2)
    assert sorted(d.body for d in got) == [b"a", b"b"]
    assert all(d.redelivered for d in got)


async def test_auto_ack_delivers_in_order_and_leaves_nothing_to_settle(broker: Broker) -> None:
    """A reply stream: every message arrives, in order, and none waits in the queue for an ack."""
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    inbox = Inbox(settle="hold")  # the handler never settles: with auto_ack nothing needs it
    await bus.consume(queue, inbox, prefetch=1, auto_ack=True)
    bodies = [f"token {i}".encode() for i in range(50)]
    await bus.publish_many(queue, bodies)
    got = await inbox.take(50)
    assert [d.body for d in got] == bodies
    await got[0].ack()  # settling anyway is harmless
    assert await bus.queue_depth(queue) == 0


async def test_closed_connection_gives_unsettled_messages_to_others(broker: Broker) -> None:
    worker, survivor = await broker.connect(), await broker.connect()
    queue = await broker.work_queue(worker)
    holder = Inbox(settle="hold")
    await worker.consume(queue, holder)
    await survivor.publish(queue, b"in flight")
    await holder.next()
    await worker.close()
    taker = Inbox()
    await survivor.consume(queue, taker)
    got = await taker.next()
    assert (got.body, got.redelivered) == (b"in flight", True)


async def test_competing_consumers_each_message_once(broker: Broker) -> None:
    a, b = await broker.connect(), await broker.connect()
    queue = await broker.work_queue(a)
    inbox = Inbox()
    await a.consume(queue, inbox, prefetch=1)
    await b.consume(queue, inbox, prefetch=1)
    bodies = [b"%d" % i for i in range(40)]
    await a.publish_many(queue, bodies)
    got = await inbox.take(40)
    assert sorted(d.body for d in got) == sorted(bodies)
    assert inbox.items.empty()


async def test_reply_queue_is_private_and_dies_with_its_connection(broker: Broker) -> None:
    client, worker = await broker.connect(), await broker.connect()
    replies = broker.name("reply")
    await client.declare_queue(QueueSpec.reply(replies))
    with pytest.raises(QueueLocked):
        await worker.consume(replies, Inbox())
    with pytest.raises(QueueLocked):
        await worker.delete_queue(replies)
    await worker.publish(replies, b"token")  # anyone may answer
    inbox = Inbox()
    await client.consume(replies, inbox)
    assert (await inbox.next()).body == b"token"
    await client.close()
    with pytest.raises(Unroutable):  # the client is gone, and its worker learns so
        await worker.publish(replies, b"late token")


async def test_delete_queue_removes_it_and_its_dead_letters(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    await bus.delete_queue(queue)
    for name in (queue, dead_letter_queue(queue)):
        with pytest.raises(Unroutable):
            await bus.publish(name, b"x")
    await bus.delete_queue(queue)  # deleting twice is fine


async def test_closed_bus_refuses_work(broker: Broker) -> None:
    bus = await broker.connect()
    queue = await broker.work_queue(bus)
    await bus.close()
    with pytest.raises(BusClosed):
        await bus.publish(queue, b"x")
    await bus.close()  # closing twice is fine



async def test_requests_queue_is_durable_with_dead_letters(broker: Broker) -> None:
    settings = Settings(namespace=f"test-{uuid.uuid4().hex[:8]}")
    bus = await broker.connect()
    name = await declare_requests_queue(bus, settings)
    broker.created.append(name)
    assert name == f"{settings.namespace}.requests"
    await declare_requests_queue(bus, settings)  # idempotent
    with pytest.raises(QueueMismatch):
        await bus.declare_queue(QueueSpec(name, durable=False))
    await bus.publish(name, b"refused")
    inbox = Inbox(settle="hold")
    await bus.consume(name, inbox)
    await (await inbox.next()).nack(requeue=False)
    assert (await _next_from(bus, dead_letter_queue(name))).body == b"refused"


async def _next_from(bus: Bus, queue: str) -> Delivery:
    inbox = Inbox()
    await bus.consume(queue, inbox)
    return await inbox.next()


async def test_quorum_work_queue_is_its_own_kind_and_keeps_the_delivery_rules(broker: Broker) -> None:
    """A quorum namespace's queue (and its `.dead`) refuses a classic redeclaration; a failing handler still gets one retry."""
    settings = Settings(namespace=f"test-{uuid.uuid4().hex[:8]}", queue_type="quorum")
    bus = await broker.connect()
    name = await declare_requests_queue(bus, settings)
    broker.created.append(name)
    await declare_requests_queue(bus, settings)  # idempotent
    for classic in (QueueSpec(name), QueueSpec(dead_letter_queue(name), dead_letter=False)):
        with pytest.raises(QueueMismatch):
            await bus.declare_queue(classic)
    attempts: asyncio.Queue[bool] = asyncio.Queue()

    async def fails(delivery: Delivery) -> None:
        attempts.put_nowait(delivery.redelivered)
        raise RuntimeError("boom (expected by the test)")

    await bus.consume(name, fails)
    await bus.publish(name, b"bad", reply_to="r")
    assert [await asyncio.wait_for(attempts.get(), WAIT) for _ in range(2)] == [False, True]
    got = await _next_from(bus, dead_letter_queue(name))
    assert (got.body, got.reply_to) == (b"bad", "r")
    assert attempts.empty()


def test_a_quorum_queue_is_durable_and_shared() -> None:
    for spec in ({"durable": False}, {"exclusive": True}):
        with pytest.raises(ValueError, match="quorum"):
            QueueSpec("q", quorum=True, **spec)
