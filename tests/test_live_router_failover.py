"""Active and standby routers: only the lease's holder takes requests, a request is acked only once placed, and a
router that dies or loses the lease leaves its unplaced requests to the next one, which places none of them twice."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from redis.exceptions import RedisError

from tests.helpers import eventually
from tests.servers import REDIS_URL, START_HINT, connect_rabbit
from tests.test_live_embedded import MODEL
from tests.test_live_processes import MAX_MODEL_LEN, START_S, Processes
from tropical.bus import Bus, Delivery, MemoryBroker, QueueSpec
from tropical.engine import Engine, EngineConfig
from tropical.live.client import Client
from tropical.live.router_service import LEASE, RouterService
from tropical.messaging import Held, MessageConsumer, send
from tropical.policies import make_policy
from tropical.protocol import (
    CancelRequest,
    Dispatch,
    GenerateRequest,
    Message,
    RequestFinished,
    RequestRecord,
    RequestState,
    Slo,
    Timings,
    WorkerRole,
    WorkerStatus,
    decode,
)
from tropical.queues import declare_requests_queue, worker_queue, worker_queue_spec
from tropical.settings import Settings
from tropical.store import MemoryStore, Store, StoreError, open_store

# status_ttl_s: long, so a dispatch that no heartbeat of the stand-in worker shows is not placed again within a test
SETTINGS = Settings(broker_url="memory://", redis_url="memory://", status_ttl_s=60.0, router_lease_ttl_s=0.4)
WAIT = 30.0  # seconds any one expected event may take before the test fails
SLO = Slo(ttft_ms=600_000, tpot_ms=60_000)


class StandInWorker:
    """A worker's queue and heartbeat, nothing behind them: it keeps what the routers send it, to be counted."""

    def __init__(self, bus: Bus, store: Store, settings: Settings = SETTINGS, name: str = "w") -> None:
        self.bus, self.store, self.settings, self.name = bus, store, settings, name
        self.received: list[Message] = []

    async def start(self) -> None:
        spec = worker_queue_spec(self.settings, self.name)
        await self.bus.declare_queue(spec)

        async def take(delivery: Delivery) -> None:
            self.received.append(decode(delivery.body))

        await self.bus.consume(spec.name, take)

    async def report(self) -> None:
        """One heartbeat, fresh for as long as the test runs: the routers may place on it from now on."""
        status = WorkerStatus(
            worker_id=self.name, role=WorkerRole.COLOCATED, queue=worker_queue(self.settings, self.name), sent_at=time.time(),
            kv_capacity_tokens=100_000, kv_free_tokens=100_000,
        )
        await self.store.put_worker_status(status, ttl_s=600)

    def dispatches(self) -> Counter[str]:
        return Counter(m.request.request_id for m in self.received if isinstance(m, Dispatch))


def router(bus: Bus, store: Store, holder: str, settings: Settings = SETTINGS) -> RouterService:
    return RouterService(make_policy("vllm", MODEL), bus, store, settings, stale_after_s=600, holder=holder)


def request(name: str, arrival_time: float | None = None) -> GenerateRequest:
    return GenerateRequest(
        request_id=name, prompt_token_ids=[1, 2, 3], max_tokens=2, arrival_time=arrival_time or time.time(), reply_to="nobody", slo=SLO
    )


@asynccontextmanager
async def running(*routers: RouterService) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Each router's `run` as a task; on the way out every router is stopped and its task awaited (a failed one raises)."""
    tasks = [asyncio.create_task(r.run()) for r in routers]
    try:
        yield tasks
    finally:
        async with asyncio.timeout(WAIT):
            for r in routers:
                await r.stop()
            await asyncio.gather(*tasks)


class Unreachable:
    """A store whose lease calls fail, as when Redis cannot be reached, once `cut`; everything else gets through."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.store, name)
        if not name.endswith("_lease") or not callable(call):
            return call

        async def maybe_cut(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                raise StoreError("connection refused")
            return await call(*args, **kwargs)

        return maybe_cut


class Freezing:
    """A store that stops answering for good (a process frozen, then killed) right after it records a dispatch."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.frozen = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.store, name)
        if not callable(call):
            return call

        async def unless_frozen(*args: Any, **kwargs: Any) -> Any:
            if self.frozen.is_set():
                await asyncio.Event().wait()  # never answers: the caller's own deadline ends the wait
            result = await call(*args, **kwargs)
            record = args[0] if args else None
            if name == "put_request_record" and isinstance(record, RequestRecord) and record.state is RequestState.PREFILLING:
                self.frozen.set()
                await asyncio.Event().wait()
            return result

        return unless_frozen


# --- a consumer whose handler holds its delivery -------------------------------------------------------------------


async def test_a_held_delivery_is_acked_when_its_holder_settles_it_and_goes_back_to_the_queue_if_the_consumer_stops_first() -> None:
    bus = MemoryBroker().connect()
    await bus.declare_queue(QueueSpec("jobs"))
    held: asyncio.Queue[Held] = asyncio.Queue()

    async def hold(message: CancelRequest, delivery: Delivery) -> Held:
        kept = Held(delivery)
        held.put_nowait(kept)
        return kept

    consumer = MessageConsumer(bus, "jobs", {CancelRequest: hold})
    await consumer.start(prefetch=1)
    for name in ("a", "b"):
        await send(bus, "jobs", CancelRequest(request_id=name))
    first = await asyncio.wait_for(held.get(), WAIT)
    assert decode(first.delivery.body) == CancelRequest(request_id="a")
    assert await bus.queue_depth("jobs") == 1  # "b" waits: "a", returned from its handler but not settled, fills the window
    await first.ack()
    second = await asyncio.wait_for(held.get(), WAIT)
    assert decode(second.delivery.body) == CancelRequest(request_id="b") and await bus.queue_depth("jobs") == 0
    await consumer.stop()  # "b" was never settled: it goes back to the queue
    assert await bus.queue_depth("jobs") == 1
    await second.ack()  # too late to take it: changes nothing
    assert await bus.queue_depth("jobs") == 1
    other = MessageConsumer(bus, "jobs", {CancelRequest: hold})
    await other.start(prefetch=1)
    again = await asyncio.wait_for(held.get(), WAIT)
    assert decode(again.delivery.body) == CancelRequest(request_id="b") and again.delivery.redelivered
    await again.ack()
    await other.stop()
    assert await bus.queue_depth("jobs") == 0
    await bus.close()


# --- routers on the in-memory bus and store ---------------------------------------------------------------------


async def test_only_the_lease_holder_takes_requests_and_a_clean_stop_hands_them_to_the_standby_at_once() -> None:
    settings = SETTINGS.with_overrides(router_lease_ttl_s=4.0)  # without the release, the standby would wait 4 s
    broker, store = MemoryBroker(), MemoryStore()
    worker = StandInWorker(broker.connect(), store, settings)
    await worker.start()
    active, standby = router(broker.connect(), store, "active", settings), router(broker.connect(), store, "standby", settings)
    active_task = asyncio.create_task(active.run())
    await eventually(lambda: active.leading, WAIT, what="the first router taking the lease")
    async with running(standby):
        bus = broker.connect()
        queue = await declare_requests_queue(bus, settings)
        names = [f"r{i}" for i in range(6)]
        for name in names:  # no worker reports yet: the active router keeps them all queued, unacked
            await send(bus, queue, request(name))
        await eventually(lambda: len(active.router.queue) == len(names), WAIT, what="the active router queueing every request")
        assert await store.lease_holder(LEASE) == "active"
        assert not standby.leading and not standby.router.queue

        stopping = time.monotonic()
        await active.stop()
        await asyncio.wait_for(active_task, WAIT)
        await eventually(lambda: standby.leading, WAIT, what="the standby taking the lease")
        assert time.monotonic() - stopping < settings.router_lease_ttl_s  # released, not waited out
        assert await store.lease_holder(LEASE) == "standby"

        await worker.report()
        await eventually(lambda: sum(worker.dispatches().values()) == len(names), WAIT, what="every request dispatched")
        assert worker.dispatches() == Counter(names)  # once each, by the standby
        assert active.dispatched == 0 and standby.dispatched == len(names)
        assert await bus.queue_depth(queue) == 0
    assert await store.lease_holder(LEASE) is None  # the standby released it too when it stopped
    await bus.close()


async def test_a_router_that_cannot_renew_its_lease_stops_taking_requests_before_another_can_take_it() -> None:
    settings = SETTINGS.with_overrides(router_lease_ttl_s=2.0)  # the first stops half a second before the lease can lapse
    broker, store = MemoryBroker(), MemoryStore()
    worker = StandInWorker(broker.connect(), store, settings)
    await worker.start()
    link = Unreachable(store)
    first = router(broker.connect(), cast(Store, link), "first", settings)
    taken_while_first_led: list[bool] = []

    class Watched(Unreachable):
        """The second router's store: notes whether the first still took requests when the lease became the second's."""

        def __getattr__(self, name: str) -> Any:
            call = super().__getattr__(name)
            if name != "acquire_lease":
                return call

            async def acquire(*args: Any, **kwargs: Any) -> bool:
                taken = bool(await call(*args, **kwargs))
                if taken:
                    taken_while_first_led.append(first.leading)
                return taken

            return acquire

    second = router(broker.connect(), cast(Store, Watched(store)), "second", settings)
    async with running(first):
        await eventually(lambda: first.leading, WAIT, what="the first router taking the lease")
        async with running(second):
            bus = broker.connect()
            queue = await declare_requests_queue(bus, settings)
            names = [f"r{i}" for i in range(4)]
            for name in names:
                await send(bus, queue, request(name))
            await eventually(lambda: len(first.router.queue) == len(names), WAIT, what="the first router queueing every request")
            link.cut = True  # the first router's store is out of reach: it cannot renew
            await eventually(lambda: second.leading, WAIT, what="the second router taking the lapsed lease")
            assert taken_while_first_led == [False]
            assert not first.leading and not first.router.queue  # its queued requests went back to the queue

            await worker.report()
            await eventually(lambda: sum(worker.dispatches().values()) == len(names), WAIT, what="every request dispatched")
            assert worker.dispatches() == Counter(names)
            assert first.dispatched == 0 and second.dispatched == len(names)
            link.cut = False  # the first router can reach the store again: it stands by, the lease being held
    await bus.close()


@asynccontextmanager
async def frozen_after_recording(broker: MemoryBroker, store: Store, placed: GenerateRequest) -> AsyncIterator[tuple[Bus, str, Bus]]:
    """A router that takes the lease and `placed`, records its dispatch, and freezes before sending it or acking it.

    Yields a client's bus, the requests queue and the frozen router's own bus (closing it is the router's death).
    """
    freezing = Freezing(store)
    doomed_bus = broker.connect()
    doomed_task = asyncio.create_task(router(doomed_bus, cast(Store, freezing), "doomed").run())
    bus = broker.connect()
    try:
        queue = await declare_requests_queue(bus, SETTINGS)
        await send(bus, queue, placed)
        await asyncio.wait_for(freezing.frozen.wait(), WAIT)  # recorded; never sent, never acked
        yield bus, queue, doomed_bus
    finally:
        doomed_task.cancel()
        await asyncio.gather(doomed_task, return_exceptions=True)
        await bus.close()


async def test_a_request_a_router_recorded_as_dispatched_before_it_died_goes_once_to_the_worker_the_record_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dispatch is recorded before it is sent; the router dies in between: the next router sends it to that worker."""
    caplog.set_level(logging.INFO, logger="tropical.live.router_service")
    broker, store = MemoryBroker(), MemoryStore()
    worker = StandInWorker(broker.connect(), store)
    await worker.start()
    await worker.report()
    placed = request("placed")
    async with frozen_after_recording(broker, store, placed) as (bus, queue, doomed_bus):
        assert worker.dispatches() == Counter()
        await doomed_bus.close()  # the broker loses the dead router's connection: its unacked message is redelivered

        successor = router(broker.connect(), store, "successor")
        async with running(successor):
            await eventually(lambda: successor.leading, WAIT, what="the next router taking the lapsed lease")
            await eventually(lambda: any("not placed twice" in r.getMessage() for r in caplog.records), WAIT, what="the redelivery seen")
            await send(bus, queue, request("after"))
            await eventually(lambda: worker.dispatches()["after"] == 1, WAIT, what="a new request placed by the successor")
            assert worker.dispatches() == Counter({"placed": 1, "after": 1})  # the redelivered one went where it was recorded
            assert [m.resent for m in worker.received if isinstance(m, Dispatch)] == [True, False]
            assert await bus.queue_depth(queue) == 0

            resumed = request("placed", arrival_time=placed.arrival_time + 5)  # its client sends it again: a new arrival
            await send(bus, queue, resumed)
            await eventually(lambda: worker.dispatches()["placed"] == 2, WAIT, what="the resumed request placed")
            assert [(m.request.arrival_time, m.resent) for m in worker.received if isinstance(m, Dispatch) and m.request.request_id == "placed"] == [
                (placed.arrival_time, True), (resumed.arrival_time, False)
            ]


async def test_a_request_recorded_as_dispatched_to_a_worker_that_died_since_is_placed_anew() -> None:
    broker, store = MemoryBroker(), MemoryStore()
    gone, other = StandInWorker(broker.connect(), store), StandInWorker(broker.connect(), store, name="v")
    await gone.start()
    await gone.report()
    async with frozen_after_recording(broker, store, request("placed")) as (_, _, doomed_bus):
        await store.remove_worker_status("w")  # and w died too
        await other.start()
        await other.report()
        await doomed_bus.close()
        successor = router(broker.connect(), store, "successor")
        async with running(successor):
            await eventually(lambda: other.dispatches()["placed"] == 1, WAIT, what="the request placed on the living worker")
        assert gone.dispatches() == Counter() and [m.resent for m in other.received if isinstance(m, Dispatch)] == [False]


async def test_a_cancel_for_a_request_an_earlier_router_placed_goes_to_the_worker_its_record_names() -> None:
    broker, store = MemoryBroker(), MemoryStore()
    worker = StandInWorker(broker.connect(), store)
    await worker.start()
    record = RequestRecord(request_id="x", state=RequestState.PREFILLING, prefill_worker="w", decode_worker="w", timings=Timings(arrival=1.0), updated_at=1.0)
    await store.put_request_record(record, ttl_s=60)
    successor = router(broker.connect(), store, "successor")
    bus = broker.connect()
    async with running(successor):
        await eventually(lambda: successor.leading, WAIT, what="the router taking the lease")
        await send(bus, await declare_requests_queue(bus, SETTINGS), CancelRequest(request_id="x", reason="the client hung up"))
        await eventually(lambda: bool(worker.received), WAIT, what="the cancel reaching the worker")
    assert worker.received == [CancelRequest(request_id="x", reason="the client hung up")]
    await bus.close()


# --- router processes on RabbitMQ and Redis ---------------------------------------------------------------------------------


class CountingClient(Client):
    """Counts every `finished` that reaches it, also after a request's stream has ended: a request served twice shows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finishes: Counter[str] = Counter()

    async def _on_reply(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        if isinstance(message, RequestFinished):
            self.finishes[message.request_id] += 1
        await super()._on_reply(delivery)


async def _lease_holder(store: Store) -> str | None:
    return await asyncio.wait_for(store.lease_holder(LEASE), timeout=5)


def _holder_in(log: str) -> str | None:
    """The lease name a router process logged for itself, taking the lease or standing by."""
    found = re.search(r"router (\S+) (?:holds the lease|stands by)", log)
    return found.group(1) if found else None


TTL_S = 2.0  # the router processes' lease


@pytest.mark.integration
@pytest.mark.timeout(360)
async def test_a_standby_router_process_takes_over_from_one_killed_under_load_and_every_request_finishes_once(tmp_path: Path) -> None:
    rng = random.Random(11)
    count, lanes, kill_after = 48, 4, 12
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 30))] for _ in range(count)]
    lengths = [rng.randint(2, 8) for _ in prompts]
    generated = Engine.load("tiny", EngineConfig(device="cpu", max_model_len=MAX_MODEL_LEN)).generate(prompts, max_tokens=max(lengths))
    expected = [g.token_ids[:n] for g, n in zip(generated, lengths, strict=True)]

    processes = Processes("vllm", tmp_path)
    processes.env["TROPICAL_ROUTER_LEASE_TTL_S"] = str(TTL_S)
    store = open_store(processes.settings)
    bus = await connect_rabbit()
    try:
        try:
            await _lease_holder(store)
        except (OSError, TimeoutError, StoreError, RedisError) as exc:
            pytest.fail(f"Redis at {REDIS_URL} cannot be reached ({exc!r}); {START_HINT}", pytrace=False)
        for name in ("r0", "r1"):
            processes.start(name, "services.router")
        for name in ("w0", "w1"):
            processes.start(name, "tropical.cli", "serve", "colocated", "--name", name)

        def tails() -> str:
            return "\n".join(processes.tail(n) for n in processes.running)

        await eventually(lambda: all(_holder_in(processes.log(n)) for n in ("r0", "r1")), START_S * 2, interval=0.2, what="both routers up")
        holders = {n: _holder_in(processes.log(n)) for n in ("r0", "r1")}
        leader = await _lease_holder(store)
        active, standby = ("r0", "r1") if holders["r0"] == leader else ("r1", "r0")
        assert holders[active] == leader, tails()

        results: dict[int, list[int]] = {}
        enough = asyncio.Event()
        async with CountingClient(bus, processes.settings, timeout_s=START_S * 2) as client:

            async def lane(indices: range) -> None:
                """One request after another: `lanes` of them keep a steady load on the deployment."""
                for i in indices:
                    results[i] = await client.complete(prompts[i], max_tokens=lengths[i], slo=SLO, request_id=f"req-{i}")
                    if len(results) >= kill_after:
                        enough.set()

            load = [asyncio.create_task(lane(range(k, count, lanes))) for k in range(lanes)]
            try:
                await asyncio.wait_for(enough.wait(), START_S * 2)
                processes.running[active].send_signal(signal.SIGKILL)
                killed = time.monotonic()
                assert processes.running[active].wait(timeout=30) == -signal.SIGKILL
                await eventually(lambda: _taken_by(store, holders[standby]), WAIT, interval=0.05, what="the standby taking the lease")
                took_over_s = time.monotonic() - killed
                await asyncio.wait_for(asyncio.gather(*load), START_S * 2)
            finally:
                for task in load:
                    task.cancel()
                await asyncio.gather(*load, return_exceptions=True)
            assert [results[i] for i in range(count)] == expected, tails()
            for name in ("w0", "w1"):  # a drain ends whatever they still held: a request placed twice would finish twice by now
                assert processes.stop(name) == 0, processes.tail(name)
            assert client.finishes == Counter(f"req-{i}" for i in range(count)), tails()
        assert took_over_s < TTL_S + TTL_S / 4 + 2.0, tails()  # the lease's TTL, a standby's poll, and room for a loaded machine
        assert "holds the lease" in processes.log(standby), processes.tail(standby)
    finally:
        processes.stop_all()
        await store.close()
        await bus.close()


async def _taken_by(store: Store, holder: str | None) -> bool:
    return holder is not None and await _lease_holder(store) == holder
