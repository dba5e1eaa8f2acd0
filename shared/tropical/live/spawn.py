"""A deployment as users run it: the router and every worker a `tropical serve` process of its own.

The benchmark uses it to measure the distributed system itself (each service
on its own event loop, talking through RabbitMQ and Redis), not one process
hosting them all. Processes get their own namespace, so several deployments
share one broker without meeting. `tropical chaos` uses it too: it may start
a standby router beside the first, choose the workers' KV transport, and kill
a process by its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tropical.bus import BusError, connect_bus
from tropical.live.engines import EngineChoice
from tropical.policies.records import Role
from tropical.protocol import KvTransport
from tropical.queues import requests_queue, worker_queue
from tropical.settings import MEMORY_URL, Settings
from tropical.store import open_store

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # every process imports torch and connects
DRAIN_TIMEOUT_S = 60.0
QUEUE_DELETE_TIMEOUT_S = 10.0


def worker_name(index: int) -> str:
    return f"w{index}"


def router_name(index: int) -> str:
    return f"router{index}"


def serve_commands(
    policy: str, roles: Sequence[Role], engine: EngineChoice, *, routers: int = 1, kv_transport: KvTransport | None = None
) -> dict[str, list[str]]:
    """`tropical serve` for each router (`router_name`) and each worker (`worker_name`), by name, as a user would start them.

    A second router is a standby (or, where routers hold no lease, a second
    consumer of the same queue); `kv_transport` None leaves the workers' default.
    """
    common = ["--policy", policy, "--engine", engine.source, "--setting", engine.setting]
    if engine.max_model_len is not None:
        common += ["--max-model-len", str(engine.max_model_len)]
    serve = [sys.executable, "-m", "tropical.cli", "serve"]
    transport = [] if kv_transport is None else ["--kv-transport", kv_transport.value]
    commands = {router_name(i): [*serve, "router", *common] for i in range(routers)}
    for i, role in enumerate(roles):
        commands[worker_name(i)] = [*serve, role.value, *common, "--name", worker_name(i), *transport]
    return commands


@dataclass(frozen=True)
class Spawned:
    """A running deployment: its settings, and each service's process by name; the logs live while it runs."""

    settings: Settings
    processes: dict[str, asyncio.subprocess.Process]
    logs: Path

    def log_tail(self, name: str, lines: int = 20) -> str:
        return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])


@contextlib.asynccontextmanager
async def spawned(
    settings: Settings,
    policy: str,
    roles: Sequence[Role],
    engine: EngineChoice,
    *,
    routers: int = 1,
    kv_transport: KvTransport | None = None,
) -> AsyncIterator[Spawned]:
    """Start the processes, wait until every worker has reported, yield; then SIGTERM them all and wait for the drain.

    RuntimeError (with the tail of its log) when a process exits before the
    deployment is ready or the workers do not report within `READY_TIMEOUT_S`.
    """
    if settings.broker_url.startswith(MEMORY_URL) or settings.redis_url.startswith(MEMORY_URL):
        raise ValueError("separate processes meet only through a real broker and Redis: give --broker-url and --redis-url")
    env = {
        **os.environ,
        "TROPICAL_BROKER_URL": settings.broker_url,
        "TROPICAL_REDIS_URL": settings.redis_url,
        "TROPICAL_NAMESPACE": settings.namespace,
        "TROPICAL_TOKEN_FLUSH_MS": str(settings.token_flush_ms),
        "TROPICAL_ADMISSION_HEADROOM_MS": str(settings.admission_headroom_ms),
        "TROPICAL_DISPATCH_LEAD_MS": str(settings.dispatch_lead_ms),
    }
    with tempfile.TemporaryDirectory(prefix="tropical-spawn-") as logs:
        processes: dict[str, asyncio.subprocess.Process] = {}
        try:
            for name, command in serve_commands(policy, roles, engine, routers=routers, kv_transport=kv_transport).items():
                with (Path(logs) / f"{name}.log").open("wb") as out:
                    processes[name] = await asyncio.create_subprocess_exec(*command, env=env, stdout=out, stderr=out)
            await _ready(settings, processes, Path(logs), len(roles))
            yield Spawned(settings, processes, Path(logs))
        finally:
            await _stop(list(processes.values()))
            await _remove_queues(settings, len(roles))


async def _ready(settings: Settings, processes: dict[str, asyncio.subprocess.Process], logs: Path, workers: int) -> None:
    async with open_store(settings) as store:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while len(await asyncio.wait_for(store.list_worker_statuses(), timeout=5.0)) < workers:
                for name, process in processes.items():
                    if process.returncode is not None:
                        tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                        raise RuntimeError(f"a served process exited ({process.returncode}) before the deployment was ready: " + " | ".join(tail))
                await asyncio.sleep(0.2)  # polling the store: nothing announces the last worker's first status


async def _remove_queues(settings: Settings, workers: int) -> None:
    """The deployment's queues (and their dead letters) go with its processes: a namespace of its own is left empty.

    A broker that cannot be reached by then leaves them, with a warning: what the run measured still stands.
    """
    try:
        bus = await connect_bus(settings)
        try:
            for name in [requests_queue(settings).name, *(worker_queue(settings, worker_name(i)) for i in range(workers))]:
                await asyncio.wait_for(bus.delete_queue(name), timeout=QUEUE_DELETE_TIMEOUT_S)
        finally:
            await bus.close()
    except (BusError, OSError, TimeoutError) as exc:
        log.warning("the queues of namespace %s are left on the broker: %s", settings.namespace, exc)


async def _stop(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM drains each service; one still running after `DRAIN_TIMEOUT_S` is killed (one killed already is left be)."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    waits = [asyncio.create_task(process.wait()) for process in processes]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT_S)
        for process in processes:
            if process.returncode is None:
                process.kill()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
