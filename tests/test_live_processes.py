"""Separate processes on the real RabbitMQ and Redis, started as users start them: every policy, a profiler, a worker killed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from tests.helpers import eventually
from tests.servers import RABBITMQ_URL, REDIS_URL, START_HINT, connect_rabbit
from tropical.bus import Delivery
from tropical.engine import Engine, EngineConfig
from tropical.latency.profiling import default_latency_model
from tropical.live.client import Client
from tropical.live.engines import EngineChoice
from tropical.live.run import policy_roles
from tropical.policies import POLICY_NAMES, make_policy
from tropical.protocol import CancelRequest, Dispatch, Message, Slo, decode
from tropical.queues import worker_queue
from tropical.settings import Settings
from tropical.store import Store, StoreError, open_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]  # processes load torch on a few shared cores

MAX_MODEL_LEN = 256
SLO = Slo(ttft_ms=600_000, tpot_ms=60_000)
START_S = 60.0  # a process imports torch and loads its engine: on a loaded 2-core machine, tens of seconds
SERVE_S = 90.0  # fifty requests of the tiny engine on CPU, the profiler maybe profiling beside them
PROFILED = "unified"  # the deployment a profiler process runs beside


@dataclass(frozen=True)
class Workload:
    """Fifty prompts and their lengths, with a single engine's greedy tokens for them: the expected outputs."""

    prompts: list[list[int]]
    lengths: list[int]
    expected: list[list[int]]


@pytest.fixture(scope="module")
def workload() -> Workload:
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 40))] for _ in range(50)]
    lengths = [rng.randint(1, 8) for _ in prompts]
    generated = Engine.load("tiny", EngineConfig(device="cpu", max_model_len=MAX_MODEL_LEN)).generate(prompts, max_tokens=max(lengths))
    return Workload(prompts, lengths, [g.token_ids[:n] for g, n in zip(generated, lengths, strict=True)])


class Processes:
    """One deployment's service processes in their own namespace; each logs to a file, read when a check fails."""

    def __init__(self, policy: str, logs: Path) -> None:
        self.policy = policy
        self.logs = logs
        self.settings = Settings(broker_url=RABBITMQ_URL, redis_url=REDIS_URL, namespace=f"test-{uuid.uuid4().hex[:8]}")
        self.env = {
            **os.environ, "TROPICAL_BROKER_URL": RABBITMQ_URL, "TROPICAL_REDIS_URL": REDIS_URL, "TROPICAL_NAMESPACE": self.settings.namespace,
            "OMP_NUM_THREADS": "1",  # several engines share a few cores: one thread each, not a pool each
        }
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *command: str, served: bool = True, env: dict[str, str] | None = None) -> None:
        """`python -m <command>`; a `served` one (router, worker) is given the deployment's policy and engine."""
        options = ["--policy", self.policy, "--engine", "tiny", "--max-model-len", str(MAX_MODEL_LEN)] if served else []
        with open(self.logs / f"{name}.log", "wb") as log:
            self.running[name] = subprocess.Popen(
                [sys.executable, "-m", *command, *options], env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
            )

    def start_deployment(self, workers: int = 2) -> list[str]:
        """The router and the workers the policy needs (services.<role>, or `tropical serve colocated`); their names."""
        self.start("router", "services.router")
        names = []
        for index, role in enumerate(policy_roles(make_policy(self.policy, default_latency_model("tiny")), workers)):
            name = f"w{index}"
            command = ["tropical.cli", "serve", "colocated"] if role.value == "colocated" else [f"services.{role.value}"]
            self.start(name, *command, "--name", name)
            names.append(name)
        return names

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def tail(self, name: str) -> str:
        return f"--- {name} ---\n" + self.log(name)[-3000:]

    def stop(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM (a drain), then the exit status."""
        process = self.running[name]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=timeout)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name in self.running:
            self.stop(name)


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    started = Processes(getattr(request, "param", "vllm"), tmp_path)
    yield started
    started.stop_all()


async def statuses(store: Store) -> dict[str, float]:
    """Each reporting worker's last heartbeat time."""
    return {s.worker_id: s.sent_at for s in await asyncio.wait_for(store.list_worker_statuses(), timeout=5)}


@pytest.fixture
async def store(processes: Processes) -> AsyncIterator[Store]:
    """The deployment's store; a Redis that cannot be reached fails the test at once (never a skip)."""
    opened = open_store(processes.settings)
    try:
        await asyncio.wait_for(opened.list_worker_statuses(), timeout=5)
    except (OSError, ConnectionError, TimeoutError, StoreError, RedisError) as exc:
        await opened.close()
        pytest.fail(f"Redis at {REDIS_URL} cannot be reached ({exc!r}); {START_HINT}", pytrace=False)
    yield opened
    await opened.close()


async def complete_all(client: Client, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    requests = (client.complete(p, max_tokens=n, slo=SLO) for p, n in zip(prompts, lengths, strict=True))
    return await asyncio.wait_for(asyncio.gather(*requests), timeout=START_S + SERVE_S)


@pytest.fixture
async def client(processes: Processes) -> AsyncIterator[Client]:
    bus = await connect_rabbit()
    try:
        async with Client(bus, processes.settings, timeout_s=START_S + SERVE_S) as opened:
            yield opened
    finally:
        await bus.close()


@pytest.mark.parametrize("processes", POLICY_NAMES, indirect=True)
async def test_fifty_requests_through_separate_processes_get_a_single_engines_greedy_tokens(
    processes: Processes, client: Client, store: Store, workload: Workload
) -> None:
    workers = processes.start_deployment()
    profiled = processes.policy == PROFILED
    if profiled:  # profiles while the deployment serves; the router and workers switch to its model as it is published
        processes.start("profiler", "services.profiler", "--engine", "tiny", "--quick", "--device", "cpu", served=False)
    outputs = await complete_all(client, workload.prompts, workload.lengths)
    assert outputs == workload.expected, "\n".join(processes.tail(n) for n in processes.running)
    assert sorted(await statuses(store)) == workers
    if profiled:
        key = EngineChoice("tiny").model_key()
        assert key is not None
        await eventually(lambda: asyncio.wait_for(store.get_latency_model(key), 5), START_S + SERVE_S, interval=0.2, what=f"the profiler publishing {key}")
        again = await complete_all(client, workload.prompts[:8], workload.lengths[:8])  # serving on after the switch
        assert again == workload.expected[:8]
        assert processes.stop("profiler") == 0, processes.tail("profiler")
    for name in workers:  # SIGTERM drains, and the worker leaves the store at once
        assert processes.stop(name) == 0, processes.tail(name)
    assert await statuses(store) == {}
    if profiled:  # every service followed the published model
        assert all("adopted the model fitted at" in processes.log(n) for n in ["router", *workers]), "\n".join(processes.tail(n) for n in processes.running)


async def test_requests_queued_on_a_worker_killed_with_sigkill_complete_on_the_other(
    processes: Processes, client: Client, store: Store, workload: Workload
) -> None:
    processes.start_deployment()
    await eventually(lambda: _reporting(store, {"w0", "w1"}), START_S, interval=0.1, what="both workers reporting")
    since = time.time()
    await eventually(lambda: _reported_since(store, "w0", since), START_S, interval=0.02, what="a fresh heartbeat of w0")
    victim = processes.running["w0"]
    victim.send_signal(signal.SIGKILL)  # its status looks fresh for a second more: the router queues work on it meanwhile
    assert victim.wait(timeout=30) == -signal.SIGKILL
    count = 20
    outputs = await complete_all(client, workload.prompts[:count], workload.lengths[:count])
    assert outputs == workload.expected[:count], processes.tail("router") + processes.tail("w1")

    queued = await _drain_queue(processes.settings, "w0")  # what the router sent the dead worker: each dispatch, then its quiet cancel
    dispatched = [m.request.request_id for m in queued if isinstance(m, Dispatch)]
    cancelled = [m.request_id for m in queued if isinstance(m, CancelRequest) and m.quiet]
    assert dispatched and sorted(cancelled) == sorted(dispatched), processes.tail("router")


@pytest.mark.parametrize("processes", ["distserve"], indirect=True)
async def test_kv_handed_off_through_a_process_group_gives_a_single_engines_greedy_tokens(
    processes: Processes, client: Client, workload: Workload
) -> None:
    """`--kv-transport nccl` between a prefill and a decode worker process, on gloo here (NCCL's code path without a GPU)."""
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    processes.start("router", "services.router")
    for rank, role in enumerate(["prefill", "decode"]):
        processes.start(f"w{rank}", f"services.{role}", "--name", f"w{rank}", "--kv-transport", "nccl", env={**group, "RANK": str(rank)})
    count = 20
    outputs = await complete_all(client, workload.prompts[:count], workload.lengths[:count])
    assert outputs == workload.expected[:count], "\n".join(processes.tail(n) for n in processes.running)
    for rank, name in enumerate(["w0", "w1"]):
        assert f"KV transport: nccl (gloo backend, rank {rank} of 2)" in processes.log(name), processes.tail(name)
    for name in ["w0", "w1"]:  # both leave the group and drain
        assert processes.stop(name) == 0, processes.tail(name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _reporting(store: Store, names: set[str]) -> bool:
    return set(await statuses(store)) >= names


async def _reported_since(store: Store, name: str, since: float) -> bool:
    return (await statuses(store)).get(name, 0.0) > since


async def _drain_queue(settings: Settings, worker: str) -> list[Message]:
    """Every message waiting on a worker's queue, in order; the queue is deleted after."""
    queue = worker_queue(settings, worker)
    bus = await connect_rabbit()
    try:
        async with asyncio.timeout(30):
            depth = await bus.queue_depth(queue)
            taken: list[Message] = []
            all_taken = asyncio.Event()

            async def take(delivery: Delivery) -> None:
                taken.append(decode(delivery.body))
                await delivery.ack()
                if len(taken) >= depth:
                    all_taken.set()

            subscription = await bus.consume(queue, take, prefetch=1)
            await all_taken.wait()
            await subscription.cancel()
            await bus.delete_queue(queue)
            return taken
    finally:
        await bus.close()


async def test_an_emulated_engines_services_store_its_model_so_their_corrections_are_published() -> None:
    """An emulated engine needs no profiler: its steps' model is its profile. Stored by the first service to start, it
    is the base the workers' online correction (their time around each step) is published against; a service started
    later keeps the stored one, with the correction published meanwhile."""
    from dataclasses import replace

    import msgspec

    from tropical.latency.model import LatencyModel
    from tropical.live.run import _connected

    def unnamed(model: LatencyModel) -> LatencyModel:
        return replace(model, name="")

    engine = EngineChoice("emulated", setting="longbench-70b")
    assert EngineChoice("tiny").known_profile(0.0) is None  # a real engine's model comes from the profiler
    settings = Settings(broker_url=RABBITMQ_URL, redis_url=REDIS_URL, namespace=f"test-{uuid.uuid4().hex[:8]}")
    async with _connected(settings, engine) as first:
        stored = await first.store.get_latency_model(engine.model_key())
        assert stored is not None and stored.key == engine.model_key() == "longbench-70b@emulated/tp1"
        assert unnamed(LatencyModel.from_spec(stored)) == unnamed(engine.latency_model())
        assert first.feed.spec == stored
        await first.store.set_latency_model(msgspec.structs.replace(stored, correction=1.07))  # a worker's correction
        async with _connected(settings, engine) as later:
            assert later.feed.factor == 1.07
            assert unnamed(later.model()) == unnamed(engine.latency_model().scaled(1.07))
