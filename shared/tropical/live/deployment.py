"""A whole deployment in one process: router and workers as tasks over one bus and one store.

With the in-memory bus and store (the embedded default) nothing else is
needed; given real URLs, the same services run against RabbitMQ and Redis, as
they do when each is its own process. All of them record their metrics in one
`Telemetry`, so one `/metrics` page (the gateway's) shows the whole process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tropical.bus import Bus, MemoryBroker, connect_bus
from tropical.engine.serving import ServingEngine
from tropical.engine.tokenizer import Tokenizer
from tropical.kv import make_transport
from tropical.latency.model import LatencyModel
from tropical.live.client import Client
from tropical.live.policy import live_policy
from tropical.live.router_service import RouterService
from tropical.live.worker_service import WorkerService
from tropical.policies.records import Role
from tropical.protocol import KvTransport
from tropical.settings import Settings
from tropical.store import MemoryStore, Store, open_store
from tropical.telemetry import Telemetry


@dataclass
class Deployment:
    """Started by `start`, stopped (drained) by `stop`; `client()` talks to it."""

    policy: str
    roles: Sequence[Role]
    engine: Callable[[], ServingEngine]  # one fresh engine per worker
    model: LatencyModel
    settings: Settings
    tokenizer: Tokenizer | None = None
    heartbeat_s: float = 0.1
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    memory_store: MemoryStore = field(default_factory=MemoryStore)
    telemetry: Telemetry = field(default_factory=Telemetry)

    async def start(self) -> None:
        policy = live_policy(self.policy, self.model, self.settings)
        self._buses: list[Bus] = []
        self._stores: list[Store] = []
        engines = [self.engine() for _ in self.roles]
        self._transports = [make_transport(KvTransport.HOST) for _ in self.roles]  # shared memory: one host
        self.workers = [
            WorkerService(
                f"worker-{i}", role, engine, policy, self.model, await self._bus(), self._store(), self.settings,
                transport=transport, heartbeat_s=self.heartbeat_s, telemetry=self.telemetry,
            )
            for i, (role, engine, transport) in enumerate(zip(self.roles, engines, self._transports))
        ]
        self.router = RouterService(
            live_policy(self.policy, self.model, self.settings), await self._bus(), self._store(), self.settings, tokenizer=self.tokenizer,
            max_model_len=min(e.max_model_len for e in engines), telemetry=self.telemetry,
        )
        self._tasks = [asyncio.create_task(w.run()) for w in self.workers]
        for worker in self.workers:  # every worker has reported before the router places anything
            await worker.publish_status()
        self._tasks.append(asyncio.create_task(self.router.run()))

    async def stop(self, timeout_s: float = 30.0) -> None:
        await self.router.stop()
        for worker in self.workers:
            await worker.stop()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout=timeout_s)
        for transport in self._transports:
            await transport.close()
        for bus in self._buses:
            await bus.close()
        for store in self._stores:
            await store.close()

    async def client(self) -> Client:
        return Client(await self._bus(), self.settings)

    async def connections(self) -> tuple[Bus, Store]:
        """A bus connection and a store of this deployment's own, for a front end such as the gateway (closed by `stop`)."""
        return await self._bus(), self._store()

    async def _bus(self) -> Bus:
        bus = await connect_bus(self.settings, broker=self.broker)
        self._buses.append(bus)
        return bus

    def _store(self) -> Store:
        store = open_store(self.settings, memory=self.memory_store)
        if store is not self.memory_store:
            self._stores.append(store)
        return store
