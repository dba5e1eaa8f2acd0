"""The RabbitMQ bus heals a dropped connection: publishes ride it out, consumers come back, nothing taken is lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
from yarl import URL

from tropical.bus.base import Delivery, QueueSpec
from tropical.bus.rabbitmq import RabbitBus
from tests.servers import RABBITMQ_URL, connect_rabbit

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds any single expected event may take before the test fails


class CuttableProxy:
    """A TCP forwarder to the broker; `cut` drops every connection open now, and new ones still get through."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.accepted = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            broker_reader, broker_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.transport.abort()
            return
        self._open |= {client_writer, broker_writer}
        await asyncio.gather(_pump(client_reader, broker_writer), _pump(broker_reader, client_writer))
        self._open -= {client_writer, broker_writer}

    def cut(self) -> None:
        """Drop both ends of every proxied connection at once, as a network failure would."""
        for writer in self._open:
            writer.transport.abort()
        self._open.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()  # one side gone: the whole connection is


@pytest.fixture
async def proxy() -> AsyncIterator[CuttableProxy]:
    target = URL(RABBITMQ_URL)
    forwarder = CuttableProxy(target.host or "127.0.0.1", target.port or 5672)
    await forwarder.start()
    yield forwarder
    await forwarder.close()


async def connect_through(proxy: CuttableProxy) -> RabbitBus:
    url = URL(RABBITMQ_URL).with_host("127.0.0.1").with_port(proxy.port)
    return await RabbitBus.connect(str(url), connect_timeout=WAIT, reconnect_interval=0.2)


class Received:
    """Bodies a consumer got (duplicates allowed: delivery is at least once), awaitable by content."""

    def __init__(self) -> None:
        self.bodies: set[bytes] = set()
        self._changed = asyncio.Condition()

    async def __call__(self, delivery: Delivery) -> None:
        async with self._changed:
            self.bodies.add(delivery.body)
            self._changed.notify_all()

    async def all_of(self, wanted: set[bytes]) -> None:
        async def arrived() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: wanted <= self.bodies)

        try:
            await asyncio.wait_for(arrived(), WAIT)
        except TimeoutError:
            missing = sorted(wanted - self.bodies)
            pytest.fail(f"{len(missing)} of {len(wanted)} published messages never arrived, e.g. {missing[:5]}")


async def test_publish_and_consume_survive_a_dropped_connection(proxy: CuttableProxy) -> None:
    queue = f"test.reconnect.{uuid.uuid4().hex[:12]}"
    async with AsyncExitStack() as cleanup:
        direct = await connect_rabbit()  # beside the proxy: sets up, publishes during the outage, cleans up
        cleanup.push_async_callback(direct.close)
        await direct.declare_queue(QueueSpec(queue))
        cleanup.push_async_callback(direct.delete_queue, queue)
        bus = await connect_through(proxy)
        cleanup.push_async_callback(bus.close)
        received = Received()
        await bus.consume(queue, received, prefetch=8)
        await bus.publish_many(queue, [b"before-%d" % i for i in range(5)])
        await received.all_of({b"before-%d" % i for i in range(5)})

        # A steady publisher keeps going while the connection is cut under it.
        published: list[bytes] = []
        progress = asyncio.Condition()
        stop = asyncio.Event()

        async def keep_publishing() -> None:
            while not stop.is_set():
                body = b"steady-%d" % len(published)
                await bus.publish(queue, body)
                async with progress:
                    published.append(body)
                    progress.notify_all()

        async def published_at_least(count: int) -> None:
            async with progress:
                await progress.wait_for(lambda: len(published) >= count)

        publisher = asyncio.create_task(keep_publishing())
        await asyncio.wait_for(published_at_least(50), WAIT)
        cut_at = len(published)
        proxy.cut()
        await direct.publish(queue, b"during the outage")  # the consumer gets it once it is back
        # Sent before the bus has even noticed the cut: they ride out the reconnect.
        await bus.publish(queue, b"after the cut")
        batch = [b"after the cut, batch %d" % i for i in range(20)]
        await bus.publish_many(queue, batch)
        await asyncio.wait_for(published_at_least(cut_at + 50), WAIT)
        stop.set()
        await asyncio.wait_for(publisher, WAIT)

        assert proxy.accepted >= 2, "the bus never reconnected through the proxy"
        await received.all_of({*published, b"during the outage", b"after the cut", *batch})


async def test_reply_queue_is_declared_again_after_a_dropped_connection(proxy: CuttableProxy) -> None:
    replies = f"test.reconnect-reply.{uuid.uuid4().hex[:12]}"
    async with AsyncExitStack() as cleanup:
        direct = await connect_rabbit()  # plays the worker that answers
        cleanup.push_async_callback(direct.close)
        bus = await connect_through(proxy)  # owns the reply queue, which goes with it
        cleanup.push_async_callback(bus.close)
        await bus.declare_queue(QueueSpec.reply(replies))
        received = Received()
        await bus.consume(replies, received)
        await direct.publish(replies, b"before")
        await received.all_of({b"before"})

        proxy.cut()  # RabbitMQ deletes an exclusive queue with its connection
        await bus.publish(replies, b"after, from its owner")  # waits until the bus has the queue back
        await direct.publish(replies, b"after, from a worker")
        await received.all_of({b"after, from its owner", b"after, from a worker"})
        assert proxy.accepted >= 2, "the bus never reconnected through the proxy"
