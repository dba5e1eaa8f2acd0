"""A deployment as users run it: the router and every worker a `tropical serve` process of its own.

The benchmark uses it to measure the distributed system itself (each service
on its own event loop, talking through RabbitMQ and Redis), not one process
hosting them all. Processes get their own namespace, so several deployments
share one broker without meeting.
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
from pathlib import Path

from tropical.bus import BusError, connect_bus
from tropical.live.engines import EngineChoice
from tropical.policies.records import Role
from tropical.queues import requests_queue, worker_queue
from tropical.settings import MEMORY_URL, Settings
from tropical.store import open_store

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # every process imports torch and connects
DRAIN_TIMEOUT_S = 60.0
QUEUE_DELETE_TIMEOUT_S = 10.0


def worker_name(index: int) -> str:
    return f"w{index}"


def serve_commands(policy: str, roles: Sequence[Role], engine: EngineChoice) -> list[list[str]]:
    """`tropical serve` for the router and each worker (named by `worker_name`), as a user would start them."""
    common = ["--policy", policy, "--engine", engine.source, "--setting", engine.setting]
    if engine.max_model_len is not None:
        common += ["--max-model-len", str(engine.max_model_len)]
    router = [sys.executable, "-m", "tropical.cli", "serve", "router", *common]
    workers = [[sys.executable, "-m", "tropical.cli", "serve", role.value, *common, "--name", worker_name(i)] for i, role in enumerate(roles)]
    return [router, *workers]


@contextlib.asynccontextmanager
async def spawned(settings: Settings, policy: str, roles: Sequence[Role], engine: EngineChoice) -> AsyncIterator[Settings]:
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
    }
    with tempfile.TemporaryDirectory(prefix="tropical-spawn-") as logs:
        processes: list[tuple[asyncio.subprocess.Process, Path]] = []
        try:
            for i, command in enumerate(serve_commands(policy, roles, engine)):
                log = Path(logs) / f"{i}.log"
                with log.open("wb") as out:
                    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=out, stderr=out)
                processes.append((process, log))
            await _ready(settings, processes, len(roles))
            yield settings
        finally:
            await _stop(processes)
            await _remove_queues(settings, len(roles))


async def _ready(settings: Settings, processes: list[tuple[asyncio.subprocess.Process, Path]], workers: int) -> None:
    async with open_store(settings) as store:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while len(await asyncio.wait_for(store.list_worker_statuses(), timeout=5.0)) < workers:
                for process, log in processes:
                    if process.returncode is not None:
                        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
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


async def _stop(processes: list[tuple[asyncio.subprocess.Process, Path]]) -> None:
    """SIGTERM drains each service; one still running after `DRAIN_TIMEOUT_S` is killed."""
    for process, _ in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    waits = [asyncio.create_task(process.wait()) for process, _ in processes]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT_S)
        for process, _ in processes:
            if process.returncode is None:
                process.kill()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
