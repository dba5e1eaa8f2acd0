"""Separate processes on the real RabbitMQ and Redis: a router and two workers, started as users start them."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.servers import RABBITMQ_URL, REDIS_URL, connect_rabbit
from tropical.engine import Engine, EngineConfig
from tropical.live.client import Client
from tropical.protocol import Slo
from tropical.settings import Settings
from tropical.store import open_store

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 256


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


# (policy, how the two workers are started): colocated workers, and a prefill worker handing KV to a decode worker
LAYOUTS = {
    "vllm": (["-m", "tropical.cli", "serve", "colocated"], ["-m", "tropical.cli", "serve", "colocated"]),
    "distserve": (["-m", "services.prefill"], ["-m", "services.decode", "--kv-transport", "host"]),
}


@pytest.fixture(params=list(LAYOUTS))
def policy(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def deployment(namespace: str, policy: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "TROPICAL_BROKER_URL": RABBITMQ_URL, "TROPICAL_REDIS_URL": REDIS_URL, "TROPICAL_NAMESPACE": namespace}
    common = ["--policy", policy, "--engine", "tiny", "--max-model-len", str(MAX_MODEL_LEN)]
    first, second = LAYOUTS[policy]
    commands = [
        [sys.executable, "-m", "services.router", *common],
        [sys.executable, *first, *common, "--name", "w0"],
        [sys.executable, *second, *common, "--name", "w1"],
    ]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for command in commands]
    yield processes
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_fifty_requests_through_separate_processes(deployment: list[subprocess.Popen[bytes]], namespace: str, policy: str) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 60))] for _ in range(50)]
    lengths = [rng.randint(1, 12) for _ in prompts]
    settings = Settings(broker_url=RABBITMQ_URL, redis_url=REDIS_URL, namespace=namespace)
    bus = await connect_rabbit()
    try:
        async with Client(bus, settings, timeout_s=90) as client:
            slo = Slo(ttft_ms=600_000, tpot_ms=60_000)
            outputs = await asyncio.wait_for(
                asyncio.gather(*(client.complete(p, max_tokens=n, slo=slo) for p, n in zip(prompts, lengths))), timeout=240
            )
    finally:
        await bus.close()
    reference = Engine.load("tiny", EngineConfig(device="cpu", max_model_len=MAX_MODEL_LEN)).generate(prompts, max_tokens=12)
    for output, expected, n in zip(outputs, reference, lengths, strict=True):
        assert output == expected.token_ids[:n]
    store = open_store(settings)
    try:
        statuses = await store.list_worker_statuses()
        assert sorted(s.worker_id for s in statuses) == ["w0", "w1"]
    finally:
        await store.close()
    for process in deployment[1:]:  # SIGTERM drains and the worker leaves the store at once
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stderr.read().decode()[-2000:] if process.stderr else ""
    store = open_store(settings)
    try:
        assert await store.list_worker_statuses() == []
    finally:
        await store.close()
