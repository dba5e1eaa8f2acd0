"""One suite for every KV transport that runs in one process: shared memory, and Redis on the real server.

The sender and the receiver are two transport objects, as they would be in two
workers; the lease clock is a fake one, so expiry happens when a test moves it.
NCCL (two ranks) and CUDA IPC (two processes on a GPU) have suites of their own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from multiprocessing.shared_memory import SharedMemory

import msgspec

import pytest
import torch
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tropical.engine import Engine, EngineConfig, FakeClock, KvExport, ModelConfig
from tropical.kv import (
    BadHandle,
    FetchTimeout,
    HostTransport,
    KvError,
    KvGone,
    LayoutMismatch,
    NcclTransport,
    RedisTransport,
    TransferRecord,
    Transport,
    TransportClosed,
    make_transport,
)
from tropical.kv import shm
from tropical.kv.base import OFF_LOOP_BYTES
from tropical.protocol import KvTransport, SamplingParams
from tests.helpers import eventually
from tests.servers import REDIS_URL

WAIT = 10.0  # seconds any one fetch may take before the test fails
LEASE = 30.0
T0 = 1_000.0
GREEDY = SamplingParams(ignore_eos=True)
SMALL = ModelConfig.tiny(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_position=4096
)
REDIS_START_HINT = (
    "start it with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no"
    " (or set TROPICAL_TEST_REDIS_URL, or deselect with -m 'not integration')"
)


# --- fixtures -------------------------------------------------------------------


@dataclass
class Pair:
    """Two workers' transports of one kind, their shared fake lease clock and what they recorded."""

    sender: Transport[Any]
    receiver: Transport[Any]
    clock: FakeClock
    stored: Callable[[bytes], Awaitable[bool]]  # is the data behind a handle still held where it lives?
    unknown_handle: Callable[[], bytes]  # well formed, never offered
    records: list[TransferRecord] = field(default_factory=list)


async def connect_redis() -> Redis:
    """A raw client for the test's own reads; an unreachable server fails the test."""
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2.0, socket_timeout=WAIT)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(f"Redis at {REDIS_URL} cannot be reached ({type(exc).__name__}: {exc}); {REDIS_START_HINT}", pytrace=False)
    return client


def tropical_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(shm.PREFIX)}


@asynccontextmanager
async def host_pair() -> AsyncIterator[Pair]:
    before = tropical_segments()
    clock = FakeClock(T0)
    records: list[TransferRecord] = []
    sender = HostTransport(clock=clock.now, on_transfer=records.append)
    receiver = HostTransport(clock=clock.now, on_transfer=records.append)

    async def stored(handle: bytes) -> bool:
        return shm.exists(handle.decode())

    def unknown() -> bytes:
        return shm.new_name().encode()

    try:
        yield Pair(sender, receiver, clock, stored, unknown, records)
    finally:
        await sender.close()
        await receiver.close()
    assert tropical_segments() <= before, "segments left behind"


@asynccontextmanager
async def redis_pair() -> AsyncIterator[Pair]:
    client = await connect_redis()
    prefix = f"test-kv-{uuid.uuid4().hex}"
    clock = FakeClock(T0)
    records: list[TransferRecord] = []

    def transport() -> RedisTransport:
        redis = Redis.from_url(REDIS_URL, socket_connect_timeout=2.0, socket_timeout=WAIT)
        return RedisTransport(redis, prefix=prefix, clock=clock.now, on_transfer=records.append)

    sender, receiver = transport(), transport()

    async def stored(handle: bytes) -> bool:
        return bool(await client.exists(handle))

    try:
        yield Pair(sender, receiver, clock, stored, lambda: sender.new_key().encode(), records)
    finally:
        await sender.close()
        await receiver.close()
        leftovers = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        await client.aclose()
    assert not leftovers, f"keys left behind: {leftovers}"


@pytest.fixture(params=["host", pytest.param("redis", marks=pytest.mark.integration)])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async with host_pair() if request.param == "host" else redis_pair() as opened:
        yield opened


# --- helpers --------------------------------------------------------------------


def small_engine(block_size: int = 8) -> Engine:
    config = EngineConfig(device="cpu", dtype="float32", block_size=block_size, num_kv_blocks=64)
    return Engine.load("tiny", config, tiny=SMALL)


def decode_all(engine: Engine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [token for out in engine.step().outputs for token in out.new_token_ids]
    return tokens


def random_kv(tokens: int, *, dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2) -> KvExport:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn((2, layers, tokens, 2, 16), generator=generator).to(dtype)
    return KvExport(f"r{seed}", list(range(tokens)), [], GREEDY, tokens + 1, 16, data)


# --- the handoff ----------------------------------------------------------------


async def test_an_engine_export_arrives_whole_and_the_receiver_decodes_what_the_sender_would(pair: Pair) -> None:
    prompt = [(37 * i) % 500 for i in range(45)]
    local = small_engine()
    local.add_request("r", prompt, GREEDY, max_tokens=10)
    expected = decode_all(local)

    sender = small_engine()
    sender.add_request("r", prompt, GREEDY, max_tokens=1, retain_kv=True)
    first = sender.step().outputs[0].new_token_ids
    export = sender.export_kv("r")
    offer = await pair.sender.offer(export, lease_s=LEASE)
    sender.abort("r")  # the engine's blocks go at once: the lease holds a copy

    assert (offer.layout, offer.nbytes, offer.lease_expires_at) == (export.layout, export.nbytes, T0 + LEASE)
    data = await pair.receiver.fetch(offer.handle, offer.layout, timeout_s=WAIT)
    assert torch.equal(data, export.data)

    receiver = small_engine(block_size=4)  # another block size: the KV is token-major
    receiver.import_kv(replace(export, data=data, max_tokens=10))
    assert first + decode_all(receiver) == expected
    assert await pair.sender.release(offer.handle)


@pytest.mark.parametrize(
    ("tokens", "dtype"),
    [(1, torch.float32), (2, torch.float32), (257, torch.float16), (1000, torch.bfloat16), (4096, torch.float32)],
)
async def test_any_size_and_dtype_round_trips(pair: Pair, tokens: int, dtype: torch.dtype) -> None:
    kv = random_kv(tokens, dtype=dtype, seed=tokens)
    offer = await pair.sender.offer(kv, lease_s=LEASE)
    assert offer.nbytes == kv.nbytes == tokens * 2 * 2 * 2 * 16 * kv.data.element_size()
    data = await pair.receiver.fetch(offer.handle, offer.layout, timeout_s=WAIT)
    assert data.dtype == dtype and torch.equal(data, kv.data)


def test_the_largest_size_is_copied_off_the_event_loop() -> None:
    assert random_kv(4096).nbytes >= OFF_LOOP_BYTES > random_kv(1000).nbytes


async def test_two_offers_at_once_do_not_mix(pair: Pair) -> None:
    first, second = random_kv(300, seed=1), random_kv(5, seed=2, layers=3)
    offers = await asyncio.gather(pair.sender.offer(first, lease_s=LEASE), pair.sender.offer(second, lease_s=LEASE))
    assert offers[0].handle != offers[1].handle
    assert pair.sender.leased_bytes == first.nbytes + second.nbytes
    got = await asyncio.gather(
        pair.receiver.fetch(offers[1].handle, offers[1].layout, timeout_s=WAIT),
        pair.receiver.fetch(offers[0].handle, offers[0].layout, timeout_s=WAIT),
    )
    assert torch.equal(got[1], first.data) and torch.equal(got[0], second.data)


# --- leases ---------------------------------------------------------------------


async def test_release_frees_the_data_at_once(pair: Pair) -> None:
    kv = random_kv(20)
    offer = await pair.sender.offer(kv, lease_s=LEASE)
    data = await pair.receiver.fetch(offer.handle, offer.layout, timeout_s=WAIT)
    assert await pair.stored(offer.handle) and pair.sender.leases == {offer.handle: T0 + LEASE}

    assert await pair.sender.release(offer.handle)
    assert not await pair.stored(offer.handle) and pair.sender.leases == {} and pair.sender.leased_bytes == 0
    with pytest.raises(KvGone, match="gone|no longer"):
        await pair.receiver.fetch(offer.handle, offer.layout, timeout_s=WAIT)
    assert torch.equal(data, kv.data), "what was fetched is the receiver's own copy"
    assert not await pair.sender.release(offer.handle), "a second release (a late ack after a cancel) is harmless"


async def test_an_expired_lease_frees_the_data_without_an_ack(pair: Pair) -> None:
    short = await pair.sender.offer(random_kv(3, seed=1), lease_s=5.0)
    long = await pair.sender.offer(random_kv(3, seed=2), lease_s=LEASE)

    pair.clock.sleep_until(T0 + 4.999)
    assert await pair.sender.expire() == []
    await pair.receiver.fetch(short.handle, short.layout, timeout_s=WAIT)

    pair.clock.sleep_until(T0 + 5.0)
    assert await pair.sender.expire() == [short.handle]
    assert not await pair.stored(short.handle) and await pair.stored(long.handle)
    with pytest.raises(KvGone):
        await pair.receiver.fetch(short.handle, short.layout, timeout_s=WAIT)
    assert await pair.sender.expire(now=T0 + LEASE) == [long.handle]
    assert pair.sender.leases == {}


async def test_close_frees_every_lease_and_refuses_more_work(pair: Pair) -> None:
    offers = [await pair.sender.offer(random_kv(4, seed=seed), lease_s=LEASE) for seed in range(3)]
    await pair.sender.close()
    for offer in offers:
        assert not await pair.stored(offer.handle)
        with pytest.raises(KvGone):
            await pair.receiver.fetch(offer.handle, offer.layout, timeout_s=WAIT)
    with pytest.raises(TransportClosed):
        await pair.sender.offer(random_kv(4), lease_s=LEASE)
    with pytest.raises(TransportClosed):
        await pair.sender.fetch(offers[0].handle, offers[0].layout, timeout_s=WAIT)


async def test_leases_and_deadlines_must_be_positive_and_finite(pair: Pair) -> None:
    for lease in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lease"):
            await pair.sender.offer(random_kv(1), lease_s=lease)
    offer = await pair.sender.offer(random_kv(1), lease_s=LEASE)
    for timeout in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="deadline"):
            await pair.receiver.fetch(offer.handle, offer.layout, timeout_s=timeout)
    assert pair.sender.leases.keys() == {offer.handle}


# --- records and errors ----------------------------------------------------------


async def test_each_transfer_is_recorded_with_its_bytes_and_duration(pair: Pair) -> None:
    kv = random_kv(64)
    offer = await pair.sender.offer(kv, lease_s=LEASE)
    await pair.receiver.fetch(offer.handle, offer.layout, timeout_s=WAIT)
    kind = pair.sender.kind
    assert [(r.transport, r.direction, r.handle, r.nbytes) for r in pair.records] == [
        (kind, "offer", offer.handle, kv.nbytes),
        (kind, "fetch", offer.handle, kv.nbytes),
    ]
    assert all(record.duration_s >= 0 and record.bytes_per_s > 0 for record in pair.records)


async def test_bad_handles_and_layouts_are_refused_clearly(pair: Pair) -> None:
    kv = random_kv(3)
    offer = await pair.sender.offer(kv, lease_s=LEASE)
    for garbage in (b"", b"\xff\x00nonsense", b"tropical-kv-XYZ", offer.handle + b"0", b"/etc/passwd"):
        with pytest.raises(BadHandle, match="not"):
            await pair.receiver.fetch(garbage, offer.layout, timeout_s=WAIT)
    with pytest.raises(KvGone):
        await pair.receiver.fetch(pair.unknown_handle(), offer.layout, timeout_s=WAIT)
    for wrong in (msgspec.structs.replace(offer.layout, num_tokens=4), msgspec.structs.replace(offer.layout, dtype="float16")):
        with pytest.raises(LayoutMismatch, match="layout says"):
            await pair.receiver.fetch(offer.handle, wrong, timeout_s=WAIT)
    # Bytes carry no shape: as many bytes in another shape is the layout's word against nobody's.
    reshaped = await pair.receiver.fetch(offer.handle, msgspec.structs.replace(offer.layout, num_tokens=6, num_kv_heads=1), timeout_s=WAIT)
    assert reshaped.shape == (2, 2, 6, 1, 16)
    assert issubclass(BadHandle, KvError) and issubclass(KvGone, KvError)


# --- one transport's own promises --------------------------------------------------


async def test_a_cancelled_host_offer_leaves_no_segment_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy runs on in its thread after the cancel; the segment it makes must still go."""
    entered, release_copy, copied = threading.Event(), threading.Event(), threading.Event()
    create = shm.create

    def gated_create(data: torch.Tensor) -> SharedMemory:
        entered.set()
        assert release_copy.wait(WAIT), "the test never let the copy run"
        segment = create(data)
        copied.set()
        return segment

    monkeypatch.setattr(shm, "create", gated_create)
    before = tropical_segments()
    async with HostTransport() as transport:
        offering = asyncio.create_task(transport.offer(random_kv(4096), lease_s=LEASE))
        await eventually(entered.is_set, WAIT, what="the offer's copy to start in its thread")
        offering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(offering, WAIT)
        release_copy.set()
        assert await asyncio.to_thread(copied.wait, WAIT)
        await eventually(lambda: tropical_segments() <= before, WAIT, what="the orphaned segment to be unlinked")
        assert transport.leases == {}


async def test_host_segments_are_unlinked_when_the_sender_closes() -> None:
    before = tropical_segments()
    transport = HostTransport()
    offers = [await transport.offer(random_kv(8, seed=seed), lease_s=LEASE) for seed in range(2)]
    assert tropical_segments() - before == {offer.handle.decode() for offer in offers}
    await transport.close()
    assert tropical_segments() <= before


@pytest.mark.integration
async def test_the_redis_key_lives_no_longer_than_the_lease() -> None:
    async with redis_pair() as pair:
        offer = await pair.sender.offer(random_kv(2), lease_s=7.5)
        client = await connect_redis()
        try:
            assert 0 < await client.pttl(offer.handle) <= 7_500
        finally:
            await client.aclose()


async def test_a_silent_redis_fails_the_fetch_at_its_deadline() -> None:
    """A server that accepts and never answers: the deadline, not the socket, ends the fetch."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = RedisTransport(Redis(host="127.0.0.1", port=port), prefix="silent")
    offer_layout = random_kv(2).layout
    try:
        with pytest.raises(FetchTimeout, match="within 0.2 s"):
            await transport.fetch(transport.new_key().encode(), offer_layout, timeout_s=0.2)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)
        await asyncio.wait_for(transport.close(), WAIT)


async def test_an_unreachable_redis_is_a_kv_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await asyncio.wait_for(probe.wait_closed(), WAIT)  # the port is free again: nothing listens there
    client = Redis(host="127.0.0.1", port=port, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), retries=0))
    transport = RedisTransport(client, prefix="nowhere")
    try:
        with pytest.raises(KvError, match="Redis"):
            await transport.offer(random_kv(2), lease_s=LEASE)
        with pytest.raises(KvError, match="Redis"):
            await transport.fetch(transport.new_key().encode(), random_kv(2).layout, timeout_s=WAIT)
        assert transport.leases == {}
    finally:
        await transport.close()


# --- the factory ------------------------------------------------------------------


async def test_make_transport_builds_each_kind_and_says_what_it_misses() -> None:
    host = make_transport("host")
    assert isinstance(host, HostTransport) and host.kind is KvTransport.HOST
    await host.close()
    redis = make_transport(KvTransport.REDIS, redis_url=REDIS_URL, prefix="factory")
    assert isinstance(redis, RedisTransport) and redis.prefix == "factory"
    await redis.close()
    with pytest.raises(ValueError, match="redis_url"):
        make_transport("redis")
    with pytest.raises(ValueError, match="store"):
        make_transport("nccl")
    with pytest.raises(ValueError, match="CUDA device"):
        make_transport("cuda_ipc", device="cpu")
    with pytest.raises(ValueError, match="carrier-pigeon"):
        make_transport("carrier-pigeon")
    assert NcclTransport.kind is KvTransport.NCCL
