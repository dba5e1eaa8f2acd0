"""One suite for every Store: the in-process store must behave like the Redis one."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from tropical.protocol import (
    CancelRequest,
    DecodeLoad,
    ErrorCode,
    LatencyModelSpec,
    Message,
    RequestRecord,
    RequestState,
    Timings,
    WorkerRole,
    WorkerStatus,
    encode,
)
from tropical.settings import Settings
from tropical.store import (
    CorruptValue,
    LatencyModelUpdates,
    MemoryStore,
    RedisStore,
    Store,
    StoreClosed,
    StoreError,
    open_store,
)
from tests.helpers import eventually
from tests.tcp_proxy import tcp_proxy
from tests.messages import T0, latency_model, request_record, worker_status
from tests.servers import REDIS_URL

WAIT = 10.0  # seconds any single expected event may take before the test fails
SHORT_TTL = 0.05
LONG_TTL = 60.0
REDIS_START_HINT = (
    "start it with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no"
    " (or set TROPICAL_TEST_REDIS_URL, or deselect with -m 'not integration')"
)

Kind = Literal["worker_status", "latency_model", "request_record"]
KINDS: list[Kind] = ["worker_status", "latency_model", "request_record"]


# --- fixtures -------------------------------------------------------------------


async def connect_redis(url: str = REDIS_URL) -> Redis:
    """A raw client for the test's own reads and writes; an unreachable server fails the test."""
    client = Redis.from_url(url, socket_connect_timeout=2.0)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(f"Redis at {url} cannot be reached ({type(exc).__name__}: {exc}); {REDIS_START_HINT}", pytrace=False)
    return client


@asynccontextmanager
async def redis_store_under_test(make: Callable[[str], RedisStore] | None = None) -> AsyncIterator[RedisStore]:
    """A RedisStore under a prefix of its own, whose keys are deleted afterwards."""
    client = await connect_redis()
    prefix = f"test-store-{uuid.uuid4().hex}"
    store = make(prefix) if make else RedisStore.from_url(REDIS_URL, prefix=prefix)
    try:
        yield store
    finally:
        await store.close()
        leftovers = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if leftovers:
            await client.delete(*leftovers)
        await client.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        memory = MemoryStore()
        yield memory
        await memory.close()
    else:
        async with redis_store_under_test() as redis_store:
            yield redis_store


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    async with redis_store_under_test() as opened:
        yield opened


class RawAccess:
    """Writes bytes past the store's checks, as a buggy or foreign writer would."""

    async def write(self, kind: Kind, name: str, data: bytes) -> None:
        raise NotImplementedError

    async def publish(self, data: bytes) -> None:
        raise NotImplementedError

    def location(self, kind: Kind, name: str) -> str:
        """Where the store says a value lives, in the errors it raises."""
        raise NotImplementedError


class MemoryRawAccess(RawAccess):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def write(self, kind: Kind, name: str, data: bytes) -> None:
        self.store._put_raw(kind, name, data)

    async def publish(self, data: bytes) -> None:
        self.store._publish(data)

    def location(self, kind: Kind, name: str) -> str:
        return f"{kind}:{name}"


class RedisRawAccess(RawAccess):
    def __init__(self, store: RedisStore, client: Redis) -> None:
        self.store = store
        self.client = client

    async def write(self, kind: Kind, name: str, data: bytes) -> None:
        if kind == "worker_status":
            await self.client.set(self.store.worker_status_key(name), data, px=int(LONG_TTL * 1000))
            await self.client.sadd(self.store.worker_index_key, name)
        elif kind == "latency_model":
            await self.client.hset(self.store.latency_models_key, name, data)
        else:
            await self.client.set(self.store.request_record_key(name), data, px=int(LONG_TTL * 1000))

    async def publish(self, data: bytes) -> None:
        await self.client.publish(self.store.latency_models_channel, data)

    def location(self, kind: Kind, name: str) -> str:
        if kind == "worker_status":
            return self.store.worker_status_key(name)
        if kind == "latency_model":
            return self.store.latency_model_location(name)
        return self.store.request_record_key(name)


@pytest.fixture
async def raw(store: Store) -> AsyncIterator[RawAccess]:
    if isinstance(store, MemoryStore):
        yield MemoryRawAccess(store)
        return
    assert isinstance(store, RedisStore)
    client = await connect_redis()
    try:
        yield RedisRawAccess(store, client)
    finally:
        await client.aclose()


# --- helpers --------------------------------------------------------------------


def full_worker_status(worker_id: str, **overrides: object) -> WorkerStatus:
    """Every field away from its default, so a round trip that drops one is seen."""
    fields: dict[str, object] = {
        "role": WorkerRole.PREFILL,
        "decodes": [
            DecodeLoad(request_id="req-a", context_tokens=1_000, tpot_slo_ms=50.0, slack_s=0.125),
            DecodeLoad(request_id="req-b", context_tokens=3, tpot_slo_ms=80.5, slack_s=-0.0625),
        ],
        "draining": True,
        "busy_until": T0 + 0.123456789,
    }
    fields.update(overrides)
    return worker_status(worker_id, **fields)


def full_request_record(request_id: str, **overrides: object) -> RequestRecord:
    fields: dict[str, object] = {
        "state": RequestState.FAILED,
        "error": ErrorCode.KV_TRANSFER_FAILED,
        "timings": Timings(
            arrival=T0,
            dispatched=T0 + 0.01,
            prefill_start=T0 + 0.02,
            first_token=T0 + 0.2,
            kv_transferred=T0 + 0.21,
            finished=T0 + 1.5,
        ),
    }
    fields.update(overrides)
    return request_record(request_id, **fields)


def model(name: str, **overrides: object) -> LatencyModelSpec:
    fields: dict[str, object] = {"correction": 1.25}
    fields.update(overrides)
    return latency_model(name, **fields)


async def next_update(updates: AsyncIterator[LatencyModelSpec]) -> LatencyModelSpec:
    return await asyncio.wait_for(anext(updates), WAIT)


async def take(updates: LatencyModelUpdates, count: int) -> list[LatencyModelSpec]:
    iterator = aiter(updates)
    return [await next_update(iterator) for _ in range(count)]


def read_one(store: Store, kind: Kind, name: str) -> Awaitable[Message | None]:
    if kind == "worker_status":
        return store.get_worker_status(name)
    if kind == "latency_model":
        return store.get_latency_model(name)
    return store.get_request_record(name)


def name_for(kind: Kind) -> str:
    """A name a real value of this kind could have (a model's name is its key)."""
    return model("m-bad").key if kind == "latency_model" else "bad-1"


def value_named_otherwise(kind: Kind) -> bytes:
    if kind == "worker_status":
        return encode(worker_status("someone-else"))
    if kind == "latency_model":
        return encode(model("another-model"))
    return encode(request_record("another-request"))


GARBAGE: dict[str, Callable[[Kind], bytes]] = {
    "not-msgpack": lambda kind: b"\xc1\xffgarbage",
    "no-envelope": lambda kind: msgspec.msgpack.encode({"hello": "world"}),
    "future-version": lambda kind: msgspec.msgpack.encode({"v": 99, "type": kind}),
    "broken-fields": lambda kind: msgspec.msgpack.encode({"v": 1, "type": kind}),
    "another-type": lambda kind: encode(CancelRequest(request_id="req-1")),
    "another-name": value_named_otherwise,
}


def warned_about(caplog: pytest.LogCaptureFixture, location: str) -> bool:
    return any(record.levelno == logging.WARNING and location in record.getMessage() for record in caplog.records)


# --- worker status --------------------------------------------------------------


async def test_worker_status_round_trips_exactly(store: Store) -> None:
    status = full_worker_status("prefill-0")
    await store.put_worker_status(status, ttl_s=LONG_TTL)
    assert await store.get_worker_status("prefill-0") == status
    assert await store.list_worker_statuses() == [status]


async def test_unknown_worker_has_no_status(store: Store) -> None:
    await store.put_worker_status(worker_status("w-known"), ttl_s=LONG_TTL)
    assert await store.get_worker_status("w-unknown") is None


async def test_worker_statuses_are_listed_by_worker_id(store: Store) -> None:
    assert await store.list_worker_statuses() == []
    worker_ids = [f"w-{index:02d}" for index in range(12)]
    for worker_id in random.Random(7).sample(worker_ids, len(worker_ids)):
        await store.put_worker_status(worker_status(worker_id), ttl_s=LONG_TTL)
    listed = await store.list_worker_statuses()
    assert listed == [worker_status(worker_id) for worker_id in worker_ids]


async def test_putting_a_status_again_replaces_it(store: Store) -> None:
    await store.put_worker_status(worker_status("w-1", kv_free_tokens=10), ttl_s=LONG_TTL)
    await store.put_worker_status(worker_status("w-1", kv_free_tokens=20), ttl_s=LONG_TTL)
    assert await store.get_worker_status("w-1") == worker_status("w-1", kv_free_tokens=20)
    assert await store.list_worker_statuses() == [worker_status("w-1", kv_free_tokens=20)]


async def test_listing_again_decodes_only_the_statuses_that_changed(store: Store) -> None:
    """The router lists every status every few milliseconds: an unchanged one comes back as the same object."""
    for worker_id in ("w-1", "w-2"):
        await store.put_worker_status(worker_status(worker_id, kv_free_tokens=10), ttl_s=LONG_TTL)
    first = await store.list_worker_statuses()
    await store.put_worker_status(worker_status("w-2", kv_free_tokens=20), ttl_s=LONG_TTL)
    second = await store.list_worker_statuses()
    assert second[0] is first[0]
    assert second[1] is not first[1] and second[1] == worker_status("w-2", kv_free_tokens=20)
    await store.remove_worker_status("w-1")
    assert await store.list_worker_statuses() == [second[1]]


async def test_removed_worker_status_is_gone_at_once(store: Store) -> None:
    await store.put_worker_status(worker_status("w-leaving"), ttl_s=LONG_TTL)
    await store.put_worker_status(worker_status("w-staying"), ttl_s=LONG_TTL)
    await store.remove_worker_status("w-leaving")
    await store.remove_worker_status("w-never-seen")
    assert await store.get_worker_status("w-leaving") is None
    assert await store.list_worker_statuses() == [worker_status("w-staying")]


async def test_worker_status_expires_after_its_ttl(store: Store) -> None:
    await store.put_worker_status(worker_status("w-silent"), ttl_s=SHORT_TTL)
    await store.put_worker_status(worker_status("w-alive"), ttl_s=LONG_TTL)

    async def expired() -> bool:
        return await store.get_worker_status("w-silent") is None

    await eventually(expired, WAIT, what="the short-lived status expiring")
    assert await store.list_worker_statuses() == [worker_status("w-alive")]
    assert await store.get_worker_status("w-alive") == worker_status("w-alive")


async def test_putting_a_status_again_refreshes_its_ttl(store: Store) -> None:
    await store.put_worker_status(worker_status("w-1", sent_at=T0), ttl_s=SHORT_TTL)
    await store.put_worker_status(worker_status("w-1", sent_at=T0 + 1), ttl_s=LONG_TTL)
    # Put after the first heartbeat with the same TTL, so it expires no earlier than that one would have.
    await store.put_worker_status(worker_status("w-sentinel"), ttl_s=SHORT_TTL)

    async def sentinel_expired() -> bool:
        return await store.get_worker_status("w-sentinel") is None

    await eventually(sentinel_expired, WAIT, what="the sentinel status expiring")
    assert await store.get_worker_status("w-1") == worker_status("w-1", sent_at=T0 + 1)
    assert await store.list_worker_statuses() == [worker_status("w-1", sent_at=T0 + 1)]


@pytest.mark.parametrize("ttl_s", [0.0, -1.0, math.nan, math.inf])
async def test_ttls_must_be_positive_and_finite(store: Store, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await store.put_worker_status(worker_status("w-1"), ttl_s=ttl_s)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.put_request_record(request_record("req-1"), ttl_s=ttl_s)
    assert await store.get_worker_status("w-1") is None
    assert await store.get_request_record("req-1") is None


# --- latency models -------------------------------------------------------------


async def test_latency_model_round_trips_exactly(store: Store) -> None:
    spec = model("llama-3-8b", tensor_parallel=2, samples=17)
    await store.set_latency_model(spec)
    assert await store.get_latency_model(spec.key) == spec
    assert await store.get_latency_model("nobody@nowhere/tp1") is None


async def test_latency_models_are_listed_by_key(store: Store) -> None:
    assert await store.list_latency_models() == []
    models = [model(f"m-{index:02d}") for index in range(12)]
    for spec in random.Random(7).sample(models, len(models)):
        await store.set_latency_model(spec)
    assert await store.list_latency_models() == models


async def test_setting_a_model_again_replaces_it(store: Store) -> None:
    first, other = model("m-1"), model("m-2")
    await store.set_latency_model(first)
    await store.set_latency_model(other)
    refitted = model("m-1", samples=999, correction=0.9)
    await store.set_latency_model(refitted)
    assert await store.get_latency_model(first.key) == refitted
    assert await store.list_latency_models() == [refitted, other]


async def test_subscription_gets_models_in_the_order_they_were_set(store: Store) -> None:
    async with await store.subscribe_latency_models() as updates:
        sent = [model("m-1"), model("m-2"), model("m-1", samples=2), model("m-3")]
        for spec in sent:
            await store.set_latency_model(spec)
        assert await take(updates, len(sent)) == sent


async def test_subscription_starts_with_models_set_after_it(store: Store) -> None:
    await store.set_latency_model(model("m-before"))
    async with await store.subscribe_latency_models() as updates:
        await store.set_latency_model(model("m-after"))
        assert await take(updates, 1) == [model("m-after")]


async def test_every_subscriber_gets_every_model(store: Store) -> None:
    first = await store.subscribe_latency_models()
    second = await store.subscribe_latency_models()
    sent = [model("m-1"), model("m-2")]
    for spec in sent:
        await store.set_latency_model(spec)
    assert await take(first, 2) == sent
    assert await take(second, 2) == sent
    await first.close()
    await second.close()


async def test_closed_subscription_stops_cleanly(store: Store) -> None:
    updates = await store.subscribe_latency_models()
    received: list[LatencyModelSpec] = []

    async def consume() -> None:
        async for spec in updates:
            received.append(spec)

    consumer = asyncio.create_task(consume())
    await store.set_latency_model(model("m-1"))
    await eventually(lambda: received == [model("m-1")], WAIT, what="the first update arriving")
    await updates.close()
    await asyncio.wait_for(consumer, WAIT)  # ends, and without an error

    await store.set_latency_model(model("m-2"))  # nobody listens; that is fine
    assert [spec async for spec in updates] == []
    await updates.close()
    assert received == [model("m-1")]


async def test_closing_a_subscription_ends_every_reader_of_it(store: Store) -> None:
    updates = await store.subscribe_latency_models()
    received: list[LatencyModelSpec] = []

    async def drain() -> None:
        async for spec in updates:
            received.append(spec)

    readers = [asyncio.create_task(drain()) for _ in range(3)]
    await store.set_latency_model(model("m-1"))
    await eventually(lambda: received == [model("m-1")], WAIT, what="a reader taking the update")
    await updates.close()
    await asyncio.wait_for(asyncio.gather(*readers), WAIT)


async def test_closing_the_store_ends_its_subscriptions(store: Store) -> None:
    updates = await store.subscribe_latency_models()
    received: list[LatencyModelSpec] = []

    async def consume() -> None:
        async for spec in updates:
            received.append(spec)

    consumer = asyncio.create_task(consume())
    await store.set_latency_model(model("m-1"))
    await eventually(lambda: received == [model("m-1")], WAIT, what="the update arriving")
    await store.close()
    await asyncio.wait_for(consumer, WAIT)  # the waiting reader was woken and ended
    await store.close()
    with pytest.raises(StoreClosed):
        await store.get_worker_status("w-1")
    with pytest.raises(StoreClosed):
        await store.set_latency_model(model("m-1"))
    with pytest.raises(StoreClosed):
        await store.subscribe_latency_models()


# --- request records ------------------------------------------------------------


async def test_request_record_round_trips_exactly(store: Store) -> None:
    record = full_request_record("req-1")
    await store.put_request_record(record, ttl_s=LONG_TTL)
    assert await store.get_request_record("req-1") == record
    assert await store.get_request_record("req-unknown") is None


async def test_putting_a_record_again_replaces_it(store: Store) -> None:
    await store.put_request_record(request_record("req-1", state=RequestState.QUEUED), ttl_s=LONG_TTL)
    await store.put_request_record(request_record("req-1", state=RequestState.FINISHED), ttl_s=LONG_TTL)
    assert await store.get_request_record("req-1") == request_record("req-1", state=RequestState.FINISHED)


async def test_deleted_request_record_is_gone(store: Store) -> None:
    await store.put_request_record(request_record("req-1"), ttl_s=LONG_TTL)
    await store.put_request_record(request_record("req-2"), ttl_s=LONG_TTL)
    await store.delete_request_record("req-1")
    await store.delete_request_record("req-never-seen")
    assert await store.get_request_record("req-1") is None
    assert await store.get_request_record("req-2") == request_record("req-2")


async def test_request_record_expires_after_its_ttl(store: Store) -> None:
    await store.put_request_record(request_record("req-old"), ttl_s=SHORT_TTL)
    await store.put_request_record(request_record("req-kept"), ttl_s=LONG_TTL)

    async def expired() -> bool:
        return await store.get_request_record("req-old") is None

    await eventually(expired, WAIT, what="the short-lived record expiring")
    assert await store.get_request_record("req-kept") == request_record("req-kept")


# --- leases -----------------------------------------------------------------------


async def test_a_lease_has_one_holder_at_a_time(store: Store) -> None:
    assert await store.lease_holder("router") is None
    assert await store.acquire_lease("router", "r-1", LONG_TTL)
    assert not await store.acquire_lease("router", "r-2", LONG_TTL)
    assert not await store.acquire_lease("router", "r-1", LONG_TTL)  # not even its holder takes it twice
    assert await store.lease_holder("router") == "r-1"
    assert await store.acquire_lease("profiler", "r-2", LONG_TTL)  # another lease is another name
    assert await store.lease_holder("profiler") == "r-2"


async def test_only_the_holder_renews_a_lease(store: Store) -> None:
    assert not await store.renew_lease("router", "r-1", LONG_TTL)  # nobody holds it: nothing to renew
    assert await store.lease_holder("router") is None
    assert await store.acquire_lease("router", "r-1", SHORT_TTL)
    assert not await store.renew_lease("router", "r-2", LONG_TTL)
    assert await store.renew_lease("router", "r-1", LONG_TTL)
    # renewed for LONG_TTL: it outlives a lease taken after it for SHORT_TTL
    assert await store.acquire_lease("sentinel", "r-1", SHORT_TTL)

    async def sentinel_lapsed() -> bool:
        return await store.lease_holder("sentinel") is None

    await eventually(sentinel_lapsed, WAIT, what="the sentinel lease lapsing")
    assert await store.lease_holder("router") == "r-1"


async def test_a_lease_not_renewed_lapses_and_another_takes_it(store: Store) -> None:
    assert await store.acquire_lease("router", "r-1", SHORT_TTL)

    async def taken_over() -> bool:
        return await store.acquire_lease("router", "r-2", LONG_TTL)

    await eventually(taken_over, WAIT, what="the lapsed lease taken by another holder")
    assert await store.lease_holder("router") == "r-2"
    assert not await store.renew_lease("router", "r-1", LONG_TTL)  # too late: it is another's now
    assert await store.lease_holder("router") == "r-2"


async def test_only_the_holder_releases_a_lease(store: Store) -> None:
    assert await store.acquire_lease("router", "r-1", LONG_TTL)
    await store.release_lease("router", "r-2")
    assert await store.lease_holder("router") == "r-1"
    await store.release_lease("router", "r-1")
    assert await store.lease_holder("router") is None
    assert await store.acquire_lease("router", "r-2", LONG_TTL)  # at once, not after the TTL
    await store.release_lease("router", "r-1")  # a former holder cannot release the new one's
    assert await store.lease_holder("router") == "r-2"
    await store.release_lease("nothing", "r-1")  # releasing a lease nobody holds is not an error


@pytest.mark.parametrize("ttl_s", [0.0, -1.0, math.nan, math.inf])
async def test_lease_ttls_must_be_positive_and_finite(store: Store, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await store.acquire_lease("router", "r-1", ttl_s)
    assert await store.lease_holder("router") is None
    assert await store.acquire_lease("router", "r-1", LONG_TTL)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.renew_lease("router", "r-1", ttl_s)
    assert await store.lease_holder("router") == "r-1"


async def test_a_lease_holder_must_be_named(store: Store) -> None:
    with pytest.raises(ValueError, match="holder"):
        await store.acquire_lease("router", "", LONG_TTL)
    assert await store.lease_holder("router") is None


# --- what was not written by a store ----------------------------------------------


@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("kind", KINDS)
async def test_reading_a_corrupt_value_names_its_key(store: Store, raw: RawAccess, kind: Kind, garbage: str) -> None:
    name = name_for(kind)
    await raw.write(kind, name, GARBAGE[garbage](kind))
    with pytest.raises(CorruptValue) as caught:
        await read_one(store, kind, name)
    assert caught.value.key == raw.location(kind, name)
    assert raw.location(kind, name) in str(caught.value)


async def test_listing_skips_and_logs_corrupt_worker_statuses(
    store: Store, raw: RawAccess, caplog: pytest.LogCaptureFixture
) -> None:
    await store.put_worker_status(worker_status("w-a"), ttl_s=LONG_TTL)
    await raw.write("worker_status", "w-b", b"\xc1garbage")
    await store.put_worker_status(worker_status("w-c"), ttl_s=LONG_TTL)
    with caplog.at_level(logging.WARNING):
        assert await store.list_worker_statuses() == [worker_status("w-a"), worker_status("w-c")]
    assert warned_about(caplog, raw.location("worker_status", "w-b"))


async def test_listing_skips_and_logs_corrupt_latency_models(
    store: Store, raw: RawAccess, caplog: pytest.LogCaptureFixture
) -> None:
    good = model("m-good")
    await store.set_latency_model(good)
    bad_key = model("m-bad").key
    await raw.write("latency_model", bad_key, encode(worker_status("w-1")))
    with caplog.at_level(logging.WARNING):
        assert await store.list_latency_models() == [good]
    assert warned_about(caplog, raw.location("latency_model", bad_key))


async def test_subscription_skips_and_logs_a_corrupt_update(
    store: Store, raw: RawAccess, caplog: pytest.LogCaptureFixture
) -> None:
    async with await store.subscribe_latency_models() as updates:
        with caplog.at_level(logging.WARNING):
            await raw.publish(b"\xc1garbage")
            await raw.publish(encode(worker_status("w-1")))
            await store.set_latency_model(model("m-1"))
            assert await take(updates, 1) == [model("m-1")]
    assert sum(record.levelno == logging.WARNING for record in caplog.records) == 2


# --- the Redis layout -------------------------------------------------------------


@pytest.mark.integration
async def test_redis_keeps_everything_under_its_prefix_with_expiries(redis_store: RedisStore) -> None:
    await redis_store.put_worker_status(worker_status("w-1"), ttl_s=LONG_TTL)
    await redis_store.set_latency_model(model("m-1"))
    await redis_store.put_request_record(request_record("req-1"), ttl_s=LONG_TTL)
    assert await redis_store.acquire_lease("router", "r-1", LONG_TTL)
    client = await connect_redis()
    try:
        keys = {key.decode() async for key in client.scan_iter(match=f"{redis_store.prefix}:*")}
        status_key = redis_store.worker_status_key("w-1")
        record_key = redis_store.request_record_key("req-1")
        lease_key = redis_store.lease_key("router")
        assert keys == {status_key, redis_store.worker_index_key, redis_store.latency_models_key, record_key, lease_key}
        assert await client.get(lease_key) == b"r-1"
        for key in (status_key, record_key, lease_key):
            assert 0 < await client.pttl(key) <= LONG_TTL * 1000
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_redis_prunes_expired_workers_from_its_index(redis_store: RedisStore) -> None:
    await redis_store.put_worker_status(worker_status("w-silent"), ttl_s=SHORT_TTL)
    await redis_store.put_worker_status(worker_status("w-alive"), ttl_s=LONG_TTL)
    client = await connect_redis()
    try:

        async def pruned() -> bool:
            listed = await redis_store.list_worker_statuses()
            members = await client.smembers(redis_store.worker_index_key)
            return listed == [worker_status("w-alive")] and members == {b"w-alive"}

        await eventually(pruned, WAIT, what="the expired worker leaving the index")
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_redis_closed_subscription_leaves_the_channel(redis_store: RedisStore) -> None:
    client = await connect_redis()

    async def subscribers() -> int:
        counts = dict(await client.pubsub_numsub(redis_store.latency_models_channel))
        return int(counts[redis_store.latency_models_channel.encode()])

    try:
        updates = await redis_store.subscribe_latency_models()
        assert await subscribers() == 1
        await updates.close()
        async def left() -> bool:
            return await subscribers() == 0

        await eventually(left, WAIT, what="the subscription leaving the channel")
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_redis_subscription_survives_a_lost_connection_and_replays_what_it_missed(redis_store: RedisStore) -> None:
    client = await connect_redis()
    try:
        async with await redis_store.subscribe_latency_models() as updates:
            await redis_store.set_latency_model(model("m-1"))
            assert await take(updates, 1) == [model("m-1")]
            # an update whose publication the subscriber never hears of: stored, not published
            missed = model("m-2", samples=7)
            await client.hset(redis_store.latency_models_key, missed.key, encode(missed))
            killed = await client.client_kill_filter(_type="pubsub", skipme=True)
            assert killed >= 1
            replayed = await take(updates, 2)  # every stored model, in key order
            assert replayed == [model("m-1"), missed]
            await redis_store.set_latency_model(model("m-3"))
            assert await take(updates, 1) == [model("m-3")]
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_redis_subscription_waits_out_an_outage_and_ends_after_a_long_one() -> None:
    server = urlsplit(REDIS_URL)
    async with tcp_proxy(server.hostname or "127.0.0.1", server.port or 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}"

        def through_proxy(prefix: str) -> RedisStore:
            return RedisStore.from_url(url, prefix=prefix, resubscribe_timeout_s=1.0)

        async with redis_store_under_test(through_proxy) as store:
            writer = await connect_redis()
            try:
                updates = await store.subscribe_latency_models()
                iterator = aiter(updates)
                # a short outage: the feed subscribes again and replays what was set meanwhile
                await proxy.cut()
                while_down = model("m-down")
                await writer.hset(store.latency_models_key, while_down.key, encode(while_down))
                await proxy.restore()
                assert await next_update(iterator) == while_down
                # a long one: past resubscribe_timeout_s the reader hears of it
                await proxy.cut()
                with pytest.raises(StoreError, match="could not renew it within 1.0 s"):
                    async with asyncio.timeout(WAIT):
                        await next_update(iterator)
                await updates.close()
            finally:
                await writer.aclose()
                await proxy.restore()  # lets the store's cleanup reach Redis


@pytest.mark.integration
async def test_redis_lease_calls_raise_store_errors_while_redis_is_out_of_reach() -> None:
    """A lease's holder rides out an outage shorter than its TTL: it must hear of one as a StoreError, not hang."""
    server = urlsplit(REDIS_URL)
    async with tcp_proxy(server.hostname or "127.0.0.1", server.port or 6379) as proxy:

        def through_proxy(prefix: str) -> RedisStore:
            return RedisStore(Redis.from_url(f"redis://127.0.0.1:{proxy.port}", socket_connect_timeout=2.0), prefix=prefix)

        async with redis_store_under_test(through_proxy) as store:
            try:
                assert await store.acquire_lease("router", "r-1", LONG_TTL)
                await proxy.cut()
                for call in (
                    store.acquire_lease("router", "r-2", LONG_TTL), store.renew_lease("router", "r-1", LONG_TTL),
                    store.release_lease("router", "r-1"), store.lease_holder("router"),
                ):
                    with pytest.raises(StoreError, match="lease 'router'"):
                        await asyncio.wait_for(call, WAIT)
                await proxy.restore()
                assert await store.renew_lease("router", "r-1", LONG_TTL)
            finally:
                await proxy.restore()  # lets the store's cleanup reach Redis


@pytest.mark.integration
async def test_redis_removal_drops_the_worker_from_its_index(redis_store: RedisStore) -> None:
    await redis_store.put_worker_status(worker_status("w-leaving"), ttl_s=LONG_TTL)
    await redis_store.put_worker_status(worker_status("w-staying"), ttl_s=LONG_TTL)
    await redis_store.remove_worker_status("w-leaving")
    client = await connect_redis()
    try:
        assert await client.smembers(redis_store.worker_index_key) == {b"w-staying"}
    finally:
        await client.aclose()


class GatedPubSub(PubSub):
    """Holds back every reply on the subscription until the test opens the gate."""

    def __init__(self, *args: Any, asked: asyncio.Event, gate: asyncio.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked = asked
        self.gate = gate

    async def get_message(self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0) -> Any:
        self.asked.set()
        await self.gate.wait()
        return await super().get_message(ignore_subscribe_messages=ignore_subscribe_messages, timeout=timeout)


class GatedRedis(Redis):
    asked: asyncio.Event
    gate: asyncio.Event

    def pubsub(self, **kwargs: Any) -> PubSub:
        return GatedPubSub(self.connection_pool, asked=self.asked, gate=self.gate, **kwargs)


@asynccontextmanager
async def gated_redis_store(*, subscribe_timeout_s: float = WAIT) -> AsyncIterator[tuple[RedisStore, GatedRedis]]:
    client = GatedRedis.from_url(REDIS_URL)
    assert isinstance(client, GatedRedis)
    client.asked, client.gate = asyncio.Event(), asyncio.Event()

    def make(prefix: str) -> RedisStore:
        return RedisStore(client, prefix=prefix, subscribe_timeout_s=subscribe_timeout_s)

    try:
        async with redis_store_under_test(make) as store:
            yield store, client
    finally:
        client.gate.set()


@pytest.mark.integration
async def test_redis_subscribe_returns_only_once_redis_confirms() -> None:
    async with gated_redis_store() as (store, client):
        subscribing = asyncio.create_task(store.subscribe_latency_models())
        await asyncio.wait_for(client.asked.wait(), WAIT)
        assert not subscribing.done(), "returned before reading Redis's confirmation"
        client.gate.set()
        updates = await asyncio.wait_for(subscribing, WAIT)
        await store.set_latency_model(model("m-1"))
        assert await take(updates, 1) == [model("m-1")]


@pytest.mark.integration
async def test_redis_subscribe_fails_when_redis_never_confirms() -> None:
    async with gated_redis_store(subscribe_timeout_s=0.05) as (store, client):
        with pytest.raises(StoreError, match="did not confirm"):
            await store.subscribe_latency_models()
        client.gate.set()
        async with await store.subscribe_latency_models() as updates:  # the store is still usable
            await store.set_latency_model(model("m-1"))
            assert await take(updates, 1) == [model("m-1")]


@pytest.mark.integration
async def test_redis_store_refuses_a_client_that_decodes_responses() -> None:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client, prefix="test")
    finally:
        await client.aclose()


async def test_unreachable_redis_fails_the_test_rather_than_skipping() -> None:
    with pytest.raises(pytest.fail.Exception, match="redis-server"):
        await connect_redis("redis://127.0.0.1:1/0")


# --- choosing a store -------------------------------------------------------------


async def test_open_store_chooses_by_the_redis_url() -> None:
    memory = open_store(Settings(redis_url="memory://"))
    assert isinstance(memory, MemoryStore)
    await memory.close()
    redis_store = open_store(Settings(redis_url=REDIS_URL, namespace="tenant-a", redis_resubscribe_timeout_s=7.5))
    assert isinstance(redis_store, RedisStore)
    assert redis_store.prefix == "tenant-a" and redis_store.resubscribe_timeout_s == 7.5
    assert redis_store.worker_status_key("w-1") == "tenant-a:worker_status:w-1"
    await redis_store.close()


async def test_services_of_one_process_share_the_memory_store() -> None:
    shared = MemoryStore()
    settings = Settings(redis_url="memory://")
    writer, reader = open_store(settings, memory=shared), open_store(settings, memory=shared)
    await writer.put_worker_status(worker_status("w-1"), ttl_s=5.0)
    assert await reader.get_worker_status("w-1") == worker_status("w-1")
    await shared.close()


# --- the memory store's own clock ---------------------------------------------------


async def test_memory_store_expires_by_its_clock() -> None:
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    await store.put_worker_status(worker_status("w-1"), ttl_s=5.0)
    await store.put_request_record(request_record("req-1"), ttl_s=10.0)
    now[0] = 104.999
    await store.put_worker_status(worker_status("w-2"), ttl_s=5.0)
    assert [s.worker_id for s in await store.list_worker_statuses()] == ["w-1", "w-2"]
    now[0] = 105.0
    assert [s.worker_id for s in await store.list_worker_statuses()] == ["w-2"]
    assert await store.get_request_record("req-1") == request_record("req-1")
    now[0] = 110.0
    assert await store.get_request_record("req-1") is None
    assert await store.list_worker_statuses() == []
    await store.close()


async def test_memory_store_leases_lapse_by_its_clock() -> None:
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    assert await store.acquire_lease("router", "r-1", 2.0)
    now[0] = 101.5
    assert await store.renew_lease("router", "r-1", 2.0)  # now until 103.5
    now[0] = 103.499
    assert not await store.acquire_lease("router", "r-2", 2.0)
    now[0] = 103.5
    assert await store.lease_holder("router") is None
    assert not await store.renew_lease("router", "r-1", 2.0)
    assert await store.acquire_lease("router", "r-2", 2.0)
    await store.close()
