"""The faults, each injected once mid-load into a spawned deployment: what it runs against, and what it does.

| scenario | deployment | the fault |
|---|---|---|
| `kill-worker` | as spawned | SIGKILL of the decoding worker holding the most requests |
| `restart-broker` | on a private RabbitMQ | the broker stopped, then started again on its port |
| `restart-redis` | on a private Redis (no persistence) | Redis stopped, then started again, empty, on its port |
| `kill-router` | two routers | SIGKILL of the one holding the routers' lease (the first, where routers hold none) |
| `kv-fault` | `distserve`, KV over a private Redis | for a while, every KV the workers hand over is deleted from Redis before its receiver pulls it |
| `overload` | `unified` on two workers, strict admission | none: three times the cluster's goodput is offered |

The policy is `tropical` (a prefill and two multiplexing workers) unless said
otherwise: `kv-fault` runs `distserve`, whose every request's KV crosses
between workers (`tropical` multiplexes most prompts on its decoding workers
at half its goodput, and hands few over).

Each scenario returns the `Fault`: when it began on the run's clock and the
facts that show it happened (the process killed and what it held, the
server's pids before and after, the KV keys deleted, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from tropical.chaos.servers import PrivateRabbitMQ, PrivateRedis, PrivateServer
from tropical.core.status import held_requests
from tropical.live.spawn import Spawned, router_name
from tropical.protocol import KvTransport, WorkerRole
from tropical.store import Store

STORE_TIMEOUT_S = 5.0
VICTIM_WAIT_S = 10.0  # how long a kill waits for a decoding worker to hold a request
KV_FAULT_WINDOW_S = 3.0
OVERLOAD_HEADROOM_MS = 20.0  # what a first token may lose live on two shared cores: step jitter and the hops back
OVERLOAD_DISPATCH_LEAD_MS = 10.0  # a placement's trip to its worker, with room
TAKEOVER_WAIT_S = 30.0  # how long a killed router's lease is watched for another holder
ROUTER_LEASE = "router"  # the routers' lease in the store, where routers hold one
DECODING = (WorkerRole.DECODE, WorkerRole.MULTIPLEX, WorkerRole.COLOCATED)


@dataclass(frozen=True)
class Fault:
    """When the fault began (seconds on the run's clock; None: the scenario has none) and what shows it happened."""

    at: float | None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaultContext:
    """What a scenario acts on: the spawned deployment, its store, its private servers, and the run's clock."""

    deployment: Spawned
    store: Store
    clock: Callable[[], float]
    broker: PrivateRabbitMQ | None = None
    redis: PrivateRedis | None = None

    async def until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.clock()))

    async def kill(self, name: str) -> int:
        """SIGKILL one of the deployment's processes; its exit status."""
        process = self.deployment.processes[name]
        process.kill()
        return await asyncio.wait_for(process.wait(), timeout=30.0)


@dataclass(frozen=True)
class Scenario:
    """One fault and the deployment it is injected into.

    `rate_factor`: the offered load when no rate is given, as a multiple of
    the spawned cluster's goodput (half of it: the deployment has room to
    absorb the fault; overload: three times it).
    """

    name: str
    inject: Callable[[FaultContext, float], Awaitable[Fault]]  # the fault, injected at that time on the run's clock
    policy: str = "tropical"
    workers: int = 3
    routers: int = 1
    kv_transport: KvTransport | None = None
    private_broker: bool = False
    private_redis: bool = False
    rate_factor: float = 0.5
    compare_sim: bool = False  # also simulate the same requests: the policy's own attainment, where no fault is injected
    admission_headroom_ms: float = 0.0  # strict admission (Settings.admission_headroom_ms), where the settings give none
    dispatch_lead_ms: float = 0.0  # likewise Settings.dispatch_lead_ms


async def kill_worker(ctx: FaultContext, at: float) -> Fault:
    await ctx.until(at)
    deadline = ctx.clock() + VICTIM_WAIT_S
    while True:
        statuses = await asyncio.wait_for(ctx.store.list_worker_statuses(), timeout=STORE_TIMEOUT_S)
        decoding = [s for s in statuses if s.role in DECODING and s.worker_id in ctx.deployment.processes]
        victim = max(decoding, key=lambda s: len(held_requests(s)), default=None)
        if victim is not None and (held_requests(victim) or ctx.clock() > deadline):
            break
        await asyncio.sleep(0.05)  # polling heartbeats until a decoding worker holds something
    began = ctx.clock()
    status = await ctx.kill(victim.worker_id)
    return Fault(began, {"killed": victim.worker_id, "role": victim.role.value, "held_requests": len(held_requests(victim)), "exit_status": status})


async def restart_broker(ctx: FaultContext, at: float) -> Fault:
    assert ctx.broker is not None
    return await _restart(ctx, ctx.broker, at)


async def restart_redis(ctx: FaultContext, at: float) -> Fault:
    assert ctx.redis is not None
    return await _restart(ctx, ctx.redis, at)


async def _restart(ctx: FaultContext, server: PrivateServer, at: float) -> Fault:
    await ctx.until(at)
    began = ctx.clock()
    await server.stop()
    stopped = ctx.clock()
    await server.start()
    back = ctx.clock()
    return Fault(began, {
        "server": server.kind, "port": server.port, "pids": list(server.pids), "refused_while_down": server.refused_while_down,
        "stopped_s": stopped - began, "down_s": back - began,
    })


async def kill_router(ctx: FaultContext, at: float) -> Fault:
    """SIGKILL the active router; where routers hold a lease, also time until another holds it (`takeover_s`)."""
    await ctx.until(at)
    holder = await _lease_holder(ctx.store)
    victim = _router_holding(ctx.deployment, holder) if holder is not None else router_name(0)
    began = ctx.clock()
    status = await ctx.kill(victim)
    facts: dict[str, Any] = {"killed": victim, "lease_holder": holder, "exit_status": status}
    if holder is not None:
        deadline = began + TAKEOVER_WAIT_S
        while (successor := await _lease_holder(ctx.store)) in (None, holder) and ctx.clock() < deadline:
            await asyncio.sleep(0.05)  # polling the lease: its lapse is silent
        facts |= {"successor": successor, "takeover_s": ctx.clock() - began if successor not in (None, holder) else None}
    return Fault(began, facts)


async def _lease_holder(store: Store) -> str | None:
    """Who holds the routers' lease; None where the store keeps no leases (every router consumes)."""
    holder = getattr(store, "lease_holder", None)
    if holder is None:
        return None
    found: str | None = await asyncio.wait_for(holder(ROUTER_LEASE), timeout=STORE_TIMEOUT_S)
    return found


def _router_holding(deployment: Spawned, holder: str) -> str:
    """The router process that is the lease's holder: each router logs its lease transitions as `router <its holder id> ...`."""
    routers = [name for name in deployment.processes if name.startswith("router")]
    for name in routers:
        if f"router {holder} " in (deployment.logs / f"{name}.log").read_text(errors="replace"):
            return name
    raise RuntimeError(f"no router's log names itself {holder!r}, the lease's holder")


async def kv_fault(ctx: FaultContext, at: float) -> Fault:
    """Delete every KV key of the deployment as it is set, for `KV_FAULT_WINDOW_S`: pulls of handoffs pending then fail.

    Redis tells of each SET through keyspace notifications, switched on in the
    private Redis only (never the machine's shared one); keys there already
    when the window opens go too.
    """
    assert ctx.redis is not None
    prefix = f"{ctx.deployment.settings.namespace}:kv:"
    client = Redis.from_url(ctx.redis.url)
    deleted = 0
    try:
        await asyncio.wait_for(client.config_set("notify-keyspace-events", "E$"), timeout=STORE_TIMEOUT_S)
        pubsub = client.pubsub()
        await asyncio.wait_for(pubsub.subscribe("__keyevent@0__:set"), timeout=STORE_TIMEOUT_S)
        try:
            await ctx.until(at)
            began = ctx.clock()
            async for key in client.scan_iter(match=f"{prefix}*"):
                deleted += await asyncio.wait_for(client.delete(key), timeout=STORE_TIMEOUT_S)
            while (left := began + KV_FAULT_WINDOW_S - ctx.clock()) > 0:
                message = await asyncio.wait_for(pubsub.get_message(ignore_subscribe_messages=True, timeout=left), timeout=left + STORE_TIMEOUT_S)
                key = None if message is None else message["data"]
                if isinstance(key, bytes) and key.startswith(prefix.encode()):
                    deleted += await asyncio.wait_for(client.delete(key), timeout=STORE_TIMEOUT_S)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), timeout=STORE_TIMEOUT_S)
    finally:
        await client.aclose()
    return Fault(began, {"kv_keys_deleted": deleted, "window_s": KV_FAULT_WINDOW_S})


async def no_fault(ctx: FaultContext, at: float) -> Fault:
    return Fault(None)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("kill-worker", kill_worker),
        Scenario("restart-broker", restart_broker, private_broker=True),
        Scenario("restart-redis", restart_redis, private_redis=True),
        Scenario("kill-router", kill_router, routers=2),
        Scenario("kv-fault", kv_fault, policy="distserve", workers=2, kv_transport=KvTransport.REDIS, private_redis=True),
        Scenario("overload", no_fault, policy="unified", workers=2, rate_factor=3.0, compare_sim=True,
                 admission_headroom_ms=OVERLOAD_HEADROOM_MS, dispatch_lead_ms=OVERLOAD_DISPATCH_LEAD_MS),
    )
}
