"""Past one broker and one Redis: quorum queues on RabbitMQ, and a store that follows a Sentinel failover.

The quorum tests run on the local RabbitMQ (one node: a cluster of one, the
queues' kind is what is checked). The Sentinel test starts its own Redis
primary, replica and sentinel on free ports in a temporary directory, so the
machine's Redis on 6379 is never touched.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.helpers import eventually
from tests.servers import RABBITMQ_URL, REDIS_URL, connect_rabbit
from tests.test_live_embedded import MODEL, engine
from tropical.bus import Bus, QueueMismatch, QueueSpec, dead_letter_queue
from tropical.engine import KvExport
from tropical.kv import make_transport
from tropical.live.deployment import Deployment
from tropical.policies import Role
from tropical.protocol import KvTransport, RequestRecord, RequestState, SamplingParams, Slo, Timings
from tropical.queues import reply_queue, requests_queue, worker_queue
from tropical.redis_url import SentinelUrl
from tropical.settings import Settings
from tropical.store import open_store

WAIT_S = 30.0  # any one expected event
FAILOVER_S = 60.0  # the sentinel demotes the old primary on its own schedule: about ten seconds
SERVICE = "tropical-primary"


# --- settings and URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel://10.0.0.1/svc", SentinelUrl((("10.0.0.1", 26379),), "svc")),
        (
            "redis+sentinel://:p%40ss@s1:26380,s2,[::1]:26381/svc/3",
            SentinelUrl((("s1", 26380), ("s2", 26379), ("::1", 26381)), "svc", 3, None, "p@ss"),
        ),
        ("redis+sentinel://app:pw@s1:1/svc", SentinelUrl((("s1", 1),), "svc", 0, "app", "pw")),
    ],
)
def test_sentinel_urls_name_the_sentinels_the_service_and_the_database(url: str, expected: SentinelUrl) -> None:
    assert SentinelUrl.parse(url) == expected
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",  # no service
        "redis+sentinel://s1:26379/",
        "redis+sentinel://s1:port/svc",
        "redis+sentinel://s1:70000/svc",
        "redis+sentinel://s1,/svc",
        "redis+sentinel://s1/svc/zero",
        "redis+sentinel://pw@s1/svc",  # a password needs its colon
        "redis+sentinel://s1/svc?db=1",
        "redis+sentinel://[::1/svc",
    ],
)
def test_a_malformed_sentinel_url_is_refused_with_the_settings(url: str) -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel://"):
        Settings(redis_url=url)


def test_the_password_of_a_sentinel_url_is_masked() -> None:
    shown = Settings(redis_url="redis+sentinel://:secret@s1,s2/svc").redacted()["redis_url"]
    assert "secret" not in shown and shown.endswith("@s1,s2/svc")


def test_the_queue_type_comes_from_the_environment_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().queue_type == "classic"
    monkeypatch.setenv("TROPICAL_QUEUE_TYPE", "quorum")
    settings = Settings()
    assert settings.queue_type == "quorum"
    assert requests_queue(settings).quorum and requests_queue(settings).dead_letter_spec().quorum
    assert not reply_queue(settings, "c").quorum  # exclusive to its connection: never quorum
    monkeypatch.setenv("TROPICAL_QUEUE_TYPE", "mirrored")
    with pytest.raises(ValueError, match="queue_type"):
        Settings()


# --- quorum queues on RabbitMQ -----------------------------------------------------------------


async def assert_quorum(bus: Bus, name: str) -> None:
    """RabbitMQ refuses to declare a quorum queue again as a classic one, naming its type: that is how its kind shows."""
    for queue in (name, dead_letter_queue(name)):
        with pytest.raises(QueueMismatch, match="quorum"):
            await bus.declare_queue(QueueSpec(queue, dead_letter=queue == name))


@pytest.mark.integration
async def test_an_embedded_deployment_serves_over_quorum_queues() -> None:
    settings = Settings(broker_url=RABBITMQ_URL, redis_url=REDIS_URL, namespace=f"test-{uuid.uuid4().hex[:8]}", queue_type="quorum")
    deployment = Deployment("unified", (Role.MULTIPLEX, Role.MULTIPLEX), engine, MODEL, settings)
    prompts = [[(7 * i + j) % 256 for j in range(3 + i)] for i in range(8)]
    admin = await connect_rabbit()
    redis = Redis.from_url(REDIS_URL)
    try:
        await deployment.start()
        async with await deployment.client() as client:
            slo = Slo(ttft_ms=600_000, tpot_ms=60_000)
            outputs = await asyncio.wait_for(asyncio.gather(*(client.complete(p, max_tokens=6, slo=slo) for p in prompts)), WAIT_S)
        for name in (requests_queue(settings).name, worker_queue(settings, "worker-0"), worker_queue(settings, "worker-1")):
            await assert_quorum(admin, name)
    finally:
        await deployment.stop()
        for name in (requests_queue(settings).name, worker_queue(settings, "worker-0"), worker_queue(settings, "worker-1")):
            await admin.delete_queue(name)
        await admin.close()
        keys = [key async for key in redis.scan_iter(match=f"{settings.namespace}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    assert outputs == [g.token_ids for g in engine().generate(prompts, max_tokens=6)]


# --- Redis Sentinel ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class SentinelRedis:
    """A private primary, its replica and one sentinel watching them as SERVICE."""

    primary: int
    replica: int
    sentinel: int

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{SERVICE}/0"


async def _until(what: str, check: Callable[[], Awaitable[bool]], deadline_s: float = WAIT_S) -> None:
    """`eventually`, with errors of a server that is failing over counted as not yet."""

    async def holds() -> bool:
        try:
            return await check()
        except (RedisError, OSError):
            return False

    await eventually(holds, deadline_s, interval=0.05, what=what)


@pytest.fixture
async def sentinel_redis(tmp_path: Path) -> AsyncIterator[SentinelRedis]:
    servers = SentinelRedis(_free_port(), _free_port(), _free_port())
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", "--dir", str(tmp_path)]
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> None:
        try:
            processes.append(subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        except FileNotFoundError:
            pytest.fail("redis-server is not installed; scripts/services.sh installs it", pytrace=False)

    clients: list[Redis] = []

    def client(port: int) -> Redis:
        clients.append(Redis(port=port, decode_responses=True, socket_timeout=5))
        return clients[-1]

    try:
        start("--port", str(servers.primary), *common, "--logfile", str(tmp_path / "primary.log"))
        start("--port", str(servers.replica), *common, "--replicaof", "127.0.0.1", str(servers.primary), "--logfile", str(tmp_path / "replica.log"))
        replica = client(servers.replica)

        async def replicating() -> bool:
            return (await replica.info("replication")).get("master_link_status") == "up"

        await _until("the replica's sync", replicating)
        config = tmp_path / "sentinel.conf"
        config.write_text(
            f"port {servers.sentinel}\nbind 127.0.0.1\ndir {tmp_path}\nlogfile {tmp_path / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {servers.primary} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\nsentinel failover-timeout {SERVICE} 10000\n"
        )
        start(str(config), "--sentinel")
        sentinel = client(servers.sentinel)

        async def replica_known() -> bool:
            replicas = await sentinel.execute_command("SENTINEL", "REPLICAS", SERVICE)
            return any(r["flags"] == "slave" and r["master-link-status"] == "ok" for r in replicas)

        await _until("the sentinel's discovery of the replica", replica_known)
        yield servers
    finally:
        for opened in clients:
            await opened.aclose()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _record(request_id: str) -> RequestRecord:
    return RequestRecord(request_id=request_id, state=RequestState.QUEUED, timings=Timings(arrival=1.0), updated_at=1.0)


@pytest.mark.integration
async def test_the_store_and_kv_transport_follow_a_sentinel_failover(sentinel_redis: SentinelRedis) -> None:
    servers = sentinel_redis
    settings = Settings(broker_url="memory://", redis_url=servers.url, namespace="sentinel-test")
    store = open_store(settings)
    sentinel = Redis(port=servers.sentinel, decode_responses=True, socket_timeout=5)
    old, new = Redis(port=servers.primary, socket_timeout=5), Redis(port=servers.replica, socket_timeout=5)
    transport = make_transport(KvTransport.REDIS, redis_url=servers.url, prefix=settings.namespace)
    kv = KvExport("r", [1, 2, 3], [], SamplingParams(), 4, 16, torch.arange(2 * 2 * 3 * 2 * 8, dtype=torch.float32).reshape(2, 2, 3, 2, 8))
    try:
        await store.put_request_record(_record("before"), ttl_s=600)
        assert await store.get_request_record("before") == _record("before")
        offer = await transport.offer(kv, lease_s=600)
        assert await old.wait(1, 5000) == 1  # the replica has it all: a failover loses nothing

        assert await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)

        async def replica_promoted() -> bool:
            host, port = await sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            return int(port) == servers.replica

        async def old_primary_demoted() -> bool:
            return (await old.execute_command("ROLE"))[0] == b"slave"

        await _until("the sentinel naming the replica as the primary", replica_promoted)
        # Until the sentinel demotes the old primary, clients still connected to it may write there (Redis's
        # replication is asynchronous); once demoted, it refuses writes and the store moves to the new one.
        await _until("the old primary's demotion", old_primary_demoted, FAILOVER_S)

        assert await store.get_request_record("before") == _record("before")
        await store.put_request_record(_record("after"), ttl_s=600)
        assert await new.exists("sentinel-test:request_record:after") == 1  # written on the new primary
        assert await store.get_request_record("after") == _record("after")
        assert torch.equal(await transport.fetch(offer.handle, offer.layout, timeout_s=WAIT_S), kv.data)
        again = await transport.offer(kv, lease_s=600)
        assert await new.exists(again.handle) == 1
    finally:
        await transport.close()
        await store.close()
        for client in (sentinel, old, new):
            await client.aclose()
