"""Helpers for tests that run against both buses: a broker under test and an inbox to await deliveries."""

from __future__ import annotations

import asyncio
import uuid
from typing import Literal

from tropical.bus import Bus, Delivery, MemoryBroker, QueueSpec
from tests.servers import connect_rabbit

WAIT = 10.0  # seconds any single expected event may take before the test fails


class Broker:
    """One broker under test: opens connections and names queues it cleans up afterwards."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.memory = MemoryBroker()
        self.opened: list[Bus] = []
        self.created: list[str] = []

    async def connect(self) -> Bus:
        bus = self.memory.connect() if self.kind == "memory" else await connect_rabbit()
        self.opened.append(bus)
        return bus

    def name(self, prefix: str = "q") -> str:
        name = f"test.{prefix}.{uuid.uuid4().hex[:12]}"
        self.created.append(name)
        return name

    async def work_queue(self, bus: Bus) -> str:
        name = self.name()
        await bus.declare_queue(QueueSpec(name))
        return name

    async def cleanup(self) -> None:
        """Close every connection first: exclusive queues go with them, and only their owner may delete them."""
        for bus in self.opened:
            await bus.close()
        cleaner = await self.connect()
        for name in self.created:
            await cleaner.delete_queue(name)
        await cleaner.close()


class Inbox:
    """Collects deliveries so a test can await the next one with a deadline."""

    def __init__(self, settle: Literal["ack", "hold"] = "ack") -> None:
        self.items: asyncio.Queue[Delivery] = asyncio.Queue()
        self.settle = settle

    async def __call__(self, delivery: Delivery) -> None:
        self.items.put_nowait(delivery)
        if self.settle == "ack":
            await delivery.ack()
        else:  # "hold": the test settles it; the handler stays busy until the subscription ends
            await asyncio.Event().wait()

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self.items.get(), WAIT)

    async def take(self, n: int) -> list[Delivery]:
        return [await self.next() for _ in range(n)]
