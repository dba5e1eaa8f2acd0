"""Running services until told to stop: one router, one worker, or a whole deployment in one process.

SIGTERM and SIGINT drain: a service takes no new work, finishes what it holds,
says it is leaving, and returns. With `settings.metrics_port` a service also
serves its Prometheus `/metrics` there, on 127.0.0.1 unless `TROPICAL_METRICS_HOST`
names another address (such as 0.0.0.0 in a container).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from tropical.bus import Bus, connect_bus
from tropical.kv import make_transport
from tropical.kv.base import Transport
from tropical.kv.nccl import GroupAddress, join_group
from tropical.latency.model import LatencyModel
from tropical.live.deployment import Deployment
from tropical.live.engines import EngineChoice
from tropical.live.model_feed import CorrectionPublishing, LatencyModelFeed
from tropical.live.policy import live_policy
from tropical.live.router_service import RouterService
from tropical.live.worker_service import WorkerService
from tropical.policies.records import Role
from tropical.policies.serving import ServingPolicy, make_policy
from tropical.protocol import KvTransport
from tropical.settings import Settings
from tropical.store import Store, open_store
from tropical.telemetry import Telemetry, serve_metrics

log = logging.getLogger(__name__)


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


def metrics_host() -> str:
    """Where a service serves `/metrics`: loopback unless `TROPICAL_METRICS_HOST` says otherwise."""
    return os.environ.get("TROPICAL_METRICS_HOST", "127.0.0.1")


@asynccontextmanager
async def metrics_served(settings: Settings, telemetry: Telemetry, host: str | None = None) -> AsyncIterator[str | None]:
    """`/metrics` on `settings.metrics_port` while inside, when it is set (`host` None: `metrics_host()`); yields the
    base URL, or None when not served."""
    if settings.metrics_port is None:
        yield None
        return
    async with serve_metrics(telemetry, host or metrics_host(), settings.metrics_port) as url:
        log.info("metrics at %s/metrics", url)
        yield url


@dataclass
class _Connections:
    """What one service process holds open: the bus, the store and the engine's latency-model feed."""

    bus: Bus
    store: Store
    feed: LatencyModelFeed

    def model(self) -> LatencyModel:
        return self.feed.model


@asynccontextmanager
async def _connected(settings: Settings, engine: EngineChoice) -> AsyncIterator[_Connections]:
    """Open the bus, the store and the feed (the profiler's model of this engine, the shipped default until then; an
    emulated engine's own model, stored by the first service to start)."""
    bus = await connect_bus(settings)
    store = open_store(settings)
    feed = None
    try:
        key = engine.model_key()
        known = engine.known_profile(time.time())
        if known is not None and await store.get_latency_model(key) is None:
            await store.set_latency_model(known)  # an emulated engine's: the services calibrate from it like from a profile
        feed = await LatencyModelFeed.open(store, key, default=engine.latency_model(), publishing=CorrectionPublishing())
        yield _Connections(bus, store, feed)
    finally:
        if feed is not None:
            await feed.close()
        await bus.close()
        await store.close()


async def serve_router(settings: Settings, policy_name: str, engine: EngineChoice, *, metrics_host: str | None = None) -> None:
    telemetry = Telemetry()
    async with _connected(settings, engine) as held, metrics_served(settings, telemetry, metrics_host):
        policy = live_policy(policy_name, held.model(), settings)
        service = RouterService(
            policy, held.bus, held.store, settings, tokenizer=engine.tokenizer(), max_model_len=engine.max_model_len, feed=held.feed,
            telemetry=telemetry,
        )
        await until_signalled(service.stop)
        await service.run()


async def serve_worker(
    settings: Settings,
    role: Role,
    policy_name: str,
    engine: EngineChoice,
    name: str | None = None,
    kv_transport: KvTransport = KvTransport.HOST,
    group: GroupAddress | None = None,
    *,
    metrics_host: str | None = None,
) -> None:
    """One worker; `kv_transport` moves KV to and from other workers (host: shared memory on one host; NCCL: within
    the process group at `group`)."""
    name = name or settings.worker_id or f"{role.value}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    telemetry = Telemetry()
    async with (
        _connected(settings, engine) as held,
        _kv_transport(kv_transport, settings, group) as transport,
        metrics_served(settings, telemetry, metrics_host),
    ):
        model = held.model()
        service = WorkerService(
            name, role, engine.engine(), live_policy(policy_name, model, settings), model, held.bus, held.store, settings,
            transport=transport, feed=held.feed, telemetry=telemetry,
        )
        await until_signalled(service.stop)
        await service.run()


@asynccontextmanager
async def _kv_transport(kind: KvTransport, settings: Settings, group: GroupAddress | None) -> AsyncIterator[Transport[Any]]:
    """The worker's KV transport, logged as chosen; for NCCL, after joining the workers' process group (left at the end)."""
    if kind is not KvTransport.NCCL:
        log.info("KV transport: %s", kind.value)
        async with make_transport(kind, redis_url=settings.redis_url, prefix=settings.namespace) as transport:
            yield transport
        return
    if group is None:
        raise ValueError("the NCCL KV transport needs the process group's address")
    store, device = await asyncio.to_thread(join_group, group)
    log.info("KV transport: nccl (%s backend, rank %d of %d)", dist.get_backend(), group.rank, group.world_size)
    try:
        async with make_transport(kind, prefix=settings.namespace, store=store, device=device) as transport:
            yield transport
    finally:
        dist.destroy_process_group()


def deployment(settings: Settings, policy_name: str, workers: int, engine: EngineChoice) -> Deployment:
    """A whole deployment in one process, `workers` workers of the roles the policy needs."""
    model = engine.latency_model()
    roles = policy_roles(make_policy(policy_name, model), workers)
    return Deployment(policy_name, roles, engine.engine, model, settings, tokenizer=engine.tokenizer())
