"""Running services until told to stop: one router, one worker, or a whole deployment in one process.

SIGTERM and SIGINT drain: a service takes no new work, finishes what it holds,
says it is leaving, and returns.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable

from tropical.bus import connect_bus
from tropical.kv import make_transport
from tropical.live.deployment import Deployment
from tropical.live.engines import EngineChoice
from tropical.live.model_feed import CorrectionPublishing, LatencyModelFeed
from tropical.live.router_service import RouterService
from tropical.live.worker_service import WorkerService
from tropical.policies.records import Role
from tropical.policies.serving import ServingPolicy, make_policy
from tropical.protocol import KvTransport
from tropical.settings import Settings
from tropical.store import Store, open_store


def policy_roles(policy: ServingPolicy, workers: int) -> tuple[Role, ...]:
    """One process's workers for `policy`: colocated ones, or multiplexing ones where it needs no prefill worker."""
    return policy.roles(workers, 0 if policy.min_prefill_workers == 0 else None)


async def until_signalled(stop: Callable[[], Awaitable[None]]) -> asyncio.Event:
    """Call `stop` on the first SIGTERM or SIGINT; the event is set once it has been called."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_signal() -> None:
        if not stopped.is_set():
            stopped.set()
            loop.create_task(stop())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    return stopped


async def serve_router(settings: Settings, policy_name: str, engine: EngineChoice) -> None:
    bus = await connect_bus(settings)
    store = open_store(settings)
    feed = await _feed(store, engine)
    policy = make_policy(policy_name, feed.model if feed else engine.latency_model())
    service = RouterService(policy, bus, store, settings, tokenizer=engine.tokenizer(), max_model_len=engine.max_model_len, feed=feed)
    await until_signalled(service.stop)
    try:
        await service.run()
    finally:
        if feed is not None:
            await feed.close()
        await bus.close()
        await store.close()


async def _feed(store: Store, engine: EngineChoice) -> LatencyModelFeed | None:
    """The engine's latency model as the profiler publishes it (the shipped default until then); None when emulated."""
    key = engine.model_key()
    if key is None:
        return None
    return await LatencyModelFeed.open(store, key, default=engine.latency_model(), publishing=CorrectionPublishing())


async def serve_worker(
    settings: Settings,
    role: Role,
    policy_name: str,
    engine: EngineChoice,
    name: str | None = None,
    kv_transport: KvTransport = KvTransport.HOST,
) -> None:
    """One worker; `kv_transport` moves KV to and from other workers (host: shared memory on one host)."""
    name = name or settings.worker_id or f"{role.value}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    bus = await connect_bus(settings)
    store = open_store(settings)
    feed = await _feed(store, engine)
    model = feed.model if feed else engine.latency_model()
    transport = make_transport(kv_transport, redis_url=settings.redis_url, prefix=settings.namespace)
    service = WorkerService(
        name, role, engine.engine(), make_policy(policy_name, model), model, bus, store, settings, transport=transport, feed=feed
    )
    await until_signalled(service.stop)
    try:
        await service.run()
    finally:
        if feed is not None:
            await feed.close()
        await transport.close()
        await bus.close()
        await store.close()


def deployment(settings: Settings, policy_name: str, workers: int, engine: EngineChoice) -> Deployment:
    """A whole deployment in one process, `workers` workers of the roles the policy needs."""
    model = engine.latency_model()
    roles = policy_roles(make_policy(policy_name, model), workers)
    return Deployment(policy_name, roles, engine.engine, model, settings, tokenizer=engine.tokenizer())
