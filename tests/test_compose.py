"""compose.yaml as shipped: what it promises on paper, and its services run as local processes.

No container engine is needed: the integration test reads each Tropical service's command and environment from
compose.yaml (variables interpolated as compose does), points them at this machine's RabbitMQ and Redis in a
namespace of their own, starts them from the repository root, serves requests through the gateway, runs every
service's own healthcheck, and drains them all with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import eventually
from tests.servers import RABBITMQ_URL, REDIS_URL, connect_rabbit
from tropical.bus import QueueNotFound, dead_letter_queue
from tropical.engine import Engine, EngineConfig
from tropical.live.engines import EngineChoice
from tropical.protocol import SamplingParams
from tropical.settings import Settings
from tropical.store import open_store

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
GPU_OVERLAY = ROOT / "compose.gpu.yaml"
DOCKERFILE = ROOT / "Dockerfile"

SERVERS = {"rabbitmq", "redis"}
TROPICAL = ["router", "prefill", "multiplex", "profiler", "gateway"]
ENGINES = {"prefill", "multiplex", "profiler"}
WORKERS = {"prefill", "multiplex"}

# What the user's .env holds; these stand-ins are replaced by the machine's broker URL before anything connects.
REQUIRED = {"TROPICAL_BROKER_USER": "user-from-env", "TROPICAL_BROKER_PASSWORD": "password-from-env", "TROPICAL_API_KEYS": "key-from-env"}

START_S = 240.0  # six processes import torch and load engines on a few shared cores
SERVE_S = 120.0
DRAIN_S = 90.0  # the profiler finishes the profile it is running before it leaves
PROBE_S = 30.0


# --- compose's variable interpolation -----------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset: compose refuses to start with the message."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}` and `$$`, as compose reads them."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"], match["op"] or "", match["arg"] or ""
        value = env.get(name)
        if value is not None and not (value == "" and op.startswith(":")):
            return value
        if op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg if op.endswith("-") else ""

    return _VARIABLE.sub(one, text)


def resolved(tree: Any, env: Mapping[str, str]) -> Any:
    """Every string of a loaded compose file interpolated."""
    if isinstance(tree, str):
        return interpolate(tree, env)
    if isinstance(tree, dict):
        return {key: resolved(value, env) for key, value in tree.items()}
    if isinstance(tree, list):
        return [resolved(value, env) for value in tree]
    return tree


def load(path: Path, env: Mapping[str, str] = REQUIRED) -> dict[str, Any]:
    services = resolved(yaml.safe_load(path.read_text()), env)["services"]
    assert isinstance(services, dict)
    return services


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in (service.get("environment") or {}).items()}


def test_interpolation_reads_variables_as_compose_does() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET} $$ ${SET:?m}", env) == "x d d  d  $ x"
    with pytest.raises(MissingVariable, match="EMPTY: say why"):
        interpolate("${EMPTY:?say why}", env)


# --- what compose.yaml promises on paper ---------------------------------------------------------------------


def test_the_deployment_has_every_service_and_each_a_healthcheck() -> None:
    services = load(COMPOSE)
    assert set(services) == SERVERS | set(TROPICAL)
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert services["rabbitmq"]["healthcheck"]["test"][1:] == ["rabbitmq-diagnostics", "-q", "ping"]
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    assert "/health" in services["gateway"]["healthcheck"]["test"][-1]
    for name in set(TROPICAL) - {"gateway"}:  # the others probe their own /metrics on the port they are given
        assert "/metrics" in services[name]["healthcheck"]["test"][-1] and "TROPICAL_METRICS_PORT" in environment(services[name])
        assert environment(services[name])["TROPICAL_METRICS_HOST"] == "0.0.0.0", f"{name}'s /metrics is out of other containers' reach"


def test_commands_name_only_the_service_and_every_choice_is_a_variable() -> None:
    services = load(COMPOSE)
    for name in TROPICAL:
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]
    chosen = {"TROPICAL_POLICY": "kairos", "TROPICAL_ENGINE": "smollm2", "TROPICAL_SETTING": "longbench-70b", "TROPICAL_KV_TRANSPORT": "host",
              "TROPICAL_METRICS_PORT": "9200", "TROPICAL_NAMESPACE": "elsewhere", "TROPICAL_ADMISSION_HEADROOM_MS": "20",
              "TROPICAL_DISPATCH_LEAD_MS": "10"}
    for name, service in load(COMPOSE, {**REQUIRED, **chosen}).items():
        env = environment(service)
        if name in SERVERS:
            continue
        expected = {key: value for key, value in chosen.items() if key in env}
        assert {"TROPICAL_POLICY", "TROPICAL_ENGINE", "TROPICAL_SETTING", "TROPICAL_NAMESPACE"} <= set(expected), name
        assert ("TROPICAL_KV_TRANSPORT" in expected) == (name in WORKERS), name
        # the router admits with the margins and the workers keep them: they build one policy
        assert ("TROPICAL_ADMISSION_HEADROOM_MS" in expected and "TROPICAL_DISPATCH_LEAD_MS" in expected) == (name == "router" or name in WORKERS), name
        assert {key: env[key] for key in expected} == expected, f"{name} does not take every choice from the environment"


def _strings(tree: Any) -> Iterator[tuple[str, str]]:
    """Each (key, string value) of a loaded YAML tree; list items under their parent's key."""
    items = tree.items() if isinstance(tree, dict) else [("", value) for value in tree] if isinstance(tree, list) else []
    for key, value in items:
        if isinstance(value, str):
            yield str(key), value
        else:
            yield from _strings(value)


INTERPOLATED = r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}"


def test_no_credential_is_written_into_the_files() -> None:
    """Credentials are compose variables only: every password, key and URL user comes from the environment."""
    for path in (COMPOSE, GPU_OVERLAY):
        for key, value in _strings(yaml.safe_load(path.read_text())):
            if re.search(r"(?i)pass|secret|key|token", key):
                assert re.fullmatch(INTERPOLATED, value), f"{path.name}: {key} is written in"
            for credentials in re.findall(r"://(.*?)@", value):
                assert re.fullmatch(f"{INTERPOLATED}(:{INTERPOLATED})?", credentials), f"{path.name}: a URL with a written-in user"
    for path in (COMPOSE, GPU_OVERLAY, DOCKERFILE):
        assert "guest" not in path.read_text(), path.name
    dockerfile = DOCKERFILE.read_text()
    assert not re.search(r"://[^\s/]*@", dockerfile), "the Dockerfile names a URL with credentials"
    assert not re.search(r"(?im)^(ENV|ARG)\b.*(pass|secret|key|token)", dockerfile), "the Dockerfile sets a credential"
    assert re.search(r"(?m)^USER\s+(?!root\b)\S+", dockerfile), "the image runs as root"
    services = load(COMPOSE)
    rabbit = environment(services["rabbitmq"])
    assert (rabbit["RABBITMQ_DEFAULT_USER"], rabbit["RABBITMQ_DEFAULT_PASS"]) == (REQUIRED["TROPICAL_BROKER_USER"], REQUIRED["TROPICAL_BROKER_PASSWORD"])
    for name in TROPICAL:
        assert environment(services[name])["TROPICAL_BROKER_URL"].startswith("amqp://user-from-env:password-from-env@rabbitmq:5672/")
    assert environment(services["gateway"])["TROPICAL_API_KEYS"] == REQUIRED["TROPICAL_API_KEYS"]


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_to_start_without_the_credentials(missing: str) -> None:
    with pytest.raises(MissingVariable, match=missing):
        load(COMPOSE, {key: value for key, value in REQUIRED.items() if key != missing})


def test_scaled_services_have_no_fixed_names_nor_host_ports_and_the_gateway_publishes_8000() -> None:
    services = load(COMPOSE)
    for name in TROPICAL:
        assert "container_name" not in services[name], name
        assert name == "gateway" or not services[name].get("ports"), f"{name} publishes a host port: it could not scale"
    assert [port.rsplit(":", 1)[1] for port in services["gateway"]["ports"]] == ["8000"]
    gateway = environment(services["gateway"])
    assert (gateway["TROPICAL_GATEWAY_HOST"], gateway["TROPICAL_GATEWAY_PORT"]) == ("0.0.0.0", "8000")
    assert "${TROPICAL_API_KEYS:?" in COMPOSE.read_text()


def test_the_gpu_overlay_reserves_gpus_for_the_engines_and_shares_the_namespaces_cuda_ipc_needs() -> None:
    base, overlay = load(COMPOSE), load(GPU_OVERLAY)
    assert set(overlay) <= set(base), "the overlay only adds to compose.yaml's services"
    for name in ENGINES | {"router"}:  # the router reads the latency model the profiler fits for this GPU
        devices = overlay[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count") == "all" for d in devices), name
    for name in ENGINES:
        assert (overlay[name]["ipc"], overlay[name]["pid"]) == ("host", "host"), name
    for name in WORKERS:
        assert environment(overlay[name])["TROPICAL_KV_TRANSPORT"] == "cuda_ipc"
    assert not any("gpu" in json.dumps(service) or "ipc" in service for service in base.values()), "compose.yaml alone must run on a CPU host"


# --- compose.yaml's services as local processes --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Service:
    """One compose service run as a local process: its command, environment, healthcheck and log."""

    name: str
    command: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.env["TROPICAL_GATEWAY_PORT" if self.name == "gateway" else "TROPICAL_METRICS_PORT"])

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-3000:]


def _local(command: list[str]) -> list[str]:
    """A compose command or healthcheck as run here: this interpreter for `python`."""
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]


@dataclass
class LocalCompose:
    """compose.yaml's Tropical services in namespace `settings.namespace`, two multiplex replicas among them."""

    settings: Settings
    api_key: str
    services: list[Service] = field(default_factory=list)

    def start(self) -> None:
        for service in self.services:
            with service.log.open("wb") as out:
                service.process = subprocess.Popen(service.command, cwd=ROOT, env=service.env, stdout=out, stderr=subprocess.STDOUT)

    def named(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.named('gateway').port}"

    @property
    def worker_ids(self) -> list[str]:
        return [s.env["TROPICAL_WORKER_ID"] for s in self.services if "TROPICAL_WORKER_ID" in s.env]

    def tails(self) -> str:
        return "\n".join(s.tail() for s in self.services)

    def check_running(self) -> None:
        for service in self.services:
            assert service.process is not None and service.process.poll() is None, f"{service.name} exited\n{self.tails()}"

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to all, then each one's exit status (None: still running at the deadline, then killed)."""
        for service in self.services:
            if service.process is not None and service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for service in self.services:
            if service.process is None:
                continue
            try:
                codes[service.name] = service.process.wait(timeout=DRAIN_S)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=DRAIN_S)
                codes[service.name] = None
        return codes


def _from_compose(logs: Path) -> LocalCompose:
    api_key = secrets.token_hex(16)
    settings = Settings(broker_url=RABBITMQ_URL, redis_url=REDIS_URL, namespace=f"test-compose-{uuid.uuid4().hex[:8]}")
    services = load(COMPOSE, {**REQUIRED, "TROPICAL_API_KEYS": api_key})
    host = {key: value for key, value in os.environ.items() if not key.startswith("TROPICAL_")}
    machine = {  # this machine's servers, in a namespace of its own; one thread per engine on the shared cores
        "TROPICAL_BROKER_URL": RABBITMQ_URL, "TROPICAL_REDIS_URL": REDIS_URL, "TROPICAL_NAMESPACE": settings.namespace, "OMP_NUM_THREADS": "1",
    }
    deployment = LocalCompose(settings, api_key)
    for name, replicas in [("router", 1), ("prefill", 1), ("multiplex", 2), ("profiler", 1), ("gateway", 1)]:
        spec = services[name]
        for replica in range(replicas):
            label = f"{name}-{replica}" if name in WORKERS else name
            env = {**host, **environment(spec), **machine}
            if name == "gateway":
                env["TROPICAL_GATEWAY_PORT"] = str(_free_port())
            else:
                env["TROPICAL_METRICS_PORT"] = str(_free_port())  # each container has its own; here each process needs one
            if name in WORKERS:
                env["TROPICAL_WORKER_ID"] = label
            if name == "profiler":
                env["TROPICAL_PROFILER_QUICK"] = "1"  # a small grid: seconds, not minutes, on a CPU
            command = _local(spec["command"])
            healthcheck = _local(spec["healthcheck"]["test"][1:])
            deployment.services.append(Service(label, command, env, healthcheck, logs / f"{label}.log"))
    return deployment


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[LocalCompose]:
    started = _from_compose(tmp_path)
    await (await connect_rabbit()).close()  # fails the test at once when RabbitMQ cannot be reached
    started.start()
    try:
        yield started
    finally:
        started.stop()
        await _remove_namespace(started.settings, started.worker_ids)


async def _remove_namespace(settings: Settings, workers: list[str]) -> None:
    """The namespace's queues (and dead letters) and Redis keys go with the deployment."""
    bus = await connect_rabbit()
    try:
        for name in ["requests", *(f"worker.{w}" for w in workers)]:
            await asyncio.wait_for(bus.delete_queue(settings.queue(name)), timeout=10)
    finally:
        await bus.close()
    client = aioredis.from_url(REDIS_URL)
    try:
        async with asyncio.timeout(10):
            keys = [key async for key in client.scan_iter(match=f"{settings.namespace}:*")]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()


async def _queues_left(settings: Settings, workers: list[str]) -> list[str]:
    bus = await connect_rabbit()
    left = []
    try:
        for name in ["requests", *(f"worker.{w}" for w in workers)]:
            for queue in (settings.queue(name), dead_letter_queue(settings.queue(name))):
                try:
                    await asyncio.wait_for(bus.queue_depth(queue), timeout=10)
                    left.append(queue)
                except QueueNotFound:
                    pass
    finally:
        await bus.close()
    return left


async def _healthy(deployment: LocalCompose, service: Service) -> bool:
    """The service's compose healthcheck, run here, passes (a process that died fails the test at once)."""
    deployment.check_running()
    probe = await asyncio.create_subprocess_exec(*service.healthcheck, env=service.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(probe.wait(), timeout=PROBE_S) == 0
    except TimeoutError:
        probe.kill()
        await probe.wait()
        return False


async def _health(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/health") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


@dataclass(frozen=True)
class Ask:
    prompt: list[int]
    max_tokens: int
    stream: bool


async def _complete(session: aiohttp.ClientSession, deployment: LocalCompose, ask: Ask) -> tuple[list[int], dict[str, Any]]:
    """One /v1/completions request; its output tokens, and its usage and timings."""
    body = {"model": "tiny", "prompt": ask.prompt, "max_tokens": ask.max_tokens, "temperature": 0, "ignore_eos": True, "stream": ask.stream}
    if ask.stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {deployment.api_key}", "x-slo-ttft-ms": "600000", "x-slo-tpot-ms": "60000"}
    async with session.post(f"{deployment.gateway}/v1/completions", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        if not ask.stream:
            whole = await response.json()
            return whole["choices"][0]["token_ids"], {"usage": whole["usage"], "timings": whole["timings"]}
        events = [line.removeprefix(b"data: ").strip() async for line in response.content if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    tokens = [t for chunk in chunks for choice in chunk["choices"] for t in choice["token_ids"]]
    finished = [chunk for chunk in chunks if any(choice["finish_reason"] for choice in chunk["choices"])]
    assert len(finished) == 1 and chunks[-1]["choices"] == []
    return tokens, {"usage": chunks[-1]["usage"], "timings": finished[0]["timings"]}


def _metrics(text: str) -> dict[str, float]:
    """Each sample of a Prometheus text page, keyed by name and labels."""
    return {
        f"{s.name}{json.dumps(s.labels, sort_keys=True)}": s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


@pytest.mark.integration
@pytest.mark.timeout(900)
async def test_compose_services_run_as_local_processes_serve_through_the_gateway_and_drain(deployment: LocalCompose) -> None:
    workers = deployment.worker_ids
    for service in deployment.services:  # as compose waits for `healthy`
        await eventually(lambda s=service: _healthy(deployment, s), START_S, interval=1.0, what=f"{service.name}'s healthcheck")
    timeout = aiohttp.ClientTimeout(total=SERVE_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def every_worker() -> bool:
            return (await _health(session, deployment.gateway))["workers"] == len(workers)

        await eventually(every_worker, START_S, interval=0.5, what="every worker in the gateway's /health")
        for service in deployment.services:
            if service.name in workers:  # each logs the transport it took from TROPICAL_KV_TRANSPORT (compose's: redis)
                assert f"KV transport: {service.env['TROPICAL_KV_TRANSPORT']}" in service.log.read_text(errors="replace"), service.tail()

        asks = [Ask([7 * i + j for j in range(3 + 5 * i)], 2 + 3 * i, stream=i % 2 == 0) for i in range(6)]
        engine = Engine.load("tiny", EngineConfig(device="cpu"))
        greedy = SamplingParams(temperature=0.0, ignore_eos=True)
        expected = [engine.generate([a.prompt], greedy, max_tokens=a.max_tokens)[0].token_ids for a in asks]
        answers = await asyncio.wait_for(asyncio.gather(*(_complete(session, deployment, a) for a in asks)), timeout=SERVE_S)
        for ask, want, (tokens, extra) in zip(asks, expected, answers, strict=True):
            assert tokens == want, deployment.tails()
            assert extra["usage"]["completion_tokens"] == ask.max_tokens and extra["usage"]["prompt_tokens"] == len(ask.prompt)
            assert extra["timings"]["first_token"] is not None and extra["timings"]["finished"] >= extra["timings"]["first_token"]
        # the policy's prefill worker handed KV to a multiplex worker over the transport compose chose
        assert any(extra["timings"]["kv_transferred"] is not None for _, extra in answers), deployment.tails()

        client = openai.AsyncOpenAI(base_url=f"{deployment.gateway}/v1", api_key=deployment.api_key, timeout=SERVE_S, max_retries=0)
        reply = await client.completions.create(model="tiny", prompt=asks[1].prompt, max_tokens=asks[1].max_tokens, temperature=0,
                                                extra_body={"ignore_eos": True})
        assert reply.usage is not None and reply.usage.completion_tokens == asks[1].max_tokens
        await client.close()
        async with session.post(f"{deployment.gateway}/v1/completions", json={"model": "tiny", "prompt": [1, 2]}) as refused:
            assert refused.status == 401  # the gateway took TROPICAL_API_KEYS from compose

        pages: dict[str, dict[str, float]] = {}
        for service in deployment.services:
            async with session.get(f"http://127.0.0.1:{service.port}/metrics") as response:
                assert response.status == 200, service.name
                pages[service.name] = _metrics(await response.text())
                assert any(key.startswith("tropical:") for key in pages[service.name]), service.name
        served = sum(v for k, v in pages["gateway"].items() if k.startswith("tropical:request_success_total") and '"outcome": "finished' in k)
        assert served == len(asks) + 1
        assert (await _health(session, deployment.gateway))["status"] == "ok"

    key = EngineChoice("tiny").model_key()
    async with open_store(deployment.settings) as store:
        await eventually(lambda: asyncio.wait_for(store.get_latency_model(key), 5), START_S, interval=0.5, what=f"the profiler publishing {key}")
        codes = await asyncio.to_thread(deployment.stop)
        assert codes == {s.name: 0 for s in deployment.services}, deployment.tails()
        assert await asyncio.wait_for(store.list_worker_statuses(), timeout=5) == []  # each worker left the store as it drained
    await _remove_namespace(deployment.settings, workers)
    assert await _queues_left(deployment.settings, workers) == []
