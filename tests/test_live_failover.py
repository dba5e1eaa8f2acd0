"""A worker that goes silent, or never takes a dispatch: the router places its unstarted work again and fails its started work, which
the clients resume elsewhere; a worker that comes back drops both."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from tests.helpers import eventually
from tests.test_live_embedded import MODEL, engine
from tropical.bus import Delivery, MemoryBus, QueueSpec
from tropical.engine import Engine
from tropical.engine.plan import EnginePlan, StepResult
from tropical.live.client import Client
from tropical.live.router_service import RouterService
from tropical.live.worker_service import WorkerService
from tropical.messaging import send
from tropical.policies import Role, make_policy
from tropical.protocol import (
    CancelRequest,
    Dispatch,
    GenerateRequest,
    Message,
    RequestFinished,
    Slo,
    WorkerRole,
    WorkerStatus,
    decode,
)
from tropical.queues import declare_requests_queue, worker_queue
from tropical.settings import Settings
from tropical.store import MemoryStore, Store

SETTINGS = Settings(broker_url="memory://", redis_url="memory://", status_ttl_s=2.0)
WAIT = 30.0  # seconds any one expected event may take before the test fails
SLO = Slo(ttft_ms=60_000, tpot_ms=10_000)


class Link:
    """A worker's way to the store, which the test can cut: its heartbeats stop, as a hung process's do."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.cut = False
        self.last: WorkerStatus | None = None  # the latest heartbeat that got through

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def put_worker_status(self, status: WorkerStatus, *, ttl_s: float) -> None:
        if not self.cut:
            self.last = status
            await self.store.put_worker_status(status, ttl_s=ttl_s)


def gated(engine: Engine) -> tuple[threading.Event, threading.Event]:
    """Hold the engine's steps until `gate` is set (a hung step); `entered` is set once one is held."""
    gate, entered = threading.Event(), threading.Event()
    step: Callable[..., StepResult] = engine.step

    def held_step(plan: EnginePlan | None = None, **options: Any) -> StepResult:
        entered.set()
        if not gate.wait(timeout=WAIT * 4):
            raise TimeoutError("the test never opened the gate")
        return step(plan, **options)

    engine.step = held_step  # type: ignore[method-assign]
    return gate, entered


def unstarted(status: WorkerStatus) -> set[str]:
    """The prompts a heartbeat shows waiting, none of their tokens computed or in the step in progress."""
    begun = {c.request_id for c in status.in_step}
    return {p.request_id for p in status.prefills if p.prefilled == 0 and p.generated == 0 and p.request_id not in begun}


async def test_a_silent_workers_prompts_complete_elsewhere_once_and_it_drops_them_when_it_comes_back() -> None:
    bus, store = MemoryBus(), MemoryStore()
    link = Link(store)
    policy = make_policy("sarathi", MODEL)  # chunked prefill, 512 tokens a step: a step starts only a few of the prompts
    slow_engine = engine()
    gate, entered = gated(slow_engine)
    slow = WorkerService("slow", Role.COLOCATED, slow_engine, policy, MODEL, bus, cast(Store, link), SETTINGS, heartbeat_s=0.05)
    spare = WorkerService("spare", Role.COLOCATED, engine(), policy, MODEL, bus, store, SETTINGS, heartbeat_s=0.05)
    router = RouterService(policy, bus, store, SETTINGS)
    await bus.declare_queue(QueueSpec(slow.queue))
    await slow.publish_status()  # the only worker the router knows: it places every request there
    tasks = [asyncio.create_task(router.run())]
    prompts = [[(7 * i + j) % 256 for j in range(200)] for i in range(12)]
    names = [f"r{i}" for i in range(len(prompts))]
    try:
        async with Client(bus, SETTINGS, timeout_s=WAIT) as client:
            requests = [asyncio.create_task(client.complete(p, max_tokens=6, slo=SLO, request_id=n)) for p, n in zip(prompts, names)]
            await eventually(lambda: router.dispatched == len(prompts), WAIT, what="every request dispatched to the slow worker")
            tasks.append(asyncio.create_task(slow.run()))
            assert await asyncio.to_thread(entered.wait, WAIT), "the slow worker never started a step"
            await eventually(lambda: link.last is not None and bool(link.last.in_step), WAIT, what="a heartbeat during the hung step")
            link.cut = True  # silent from here on, its step still hung
            assert link.last is not None
            started = {c.request_id for c in link.last.in_step}
            waiting = unstarted(link.last)
            assert waiting and started and waiting | started <= set(names)
            tasks.append(asyncio.create_task(spare.run()))

            outcomes = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), timeout=WAIT * 2)
            resumes = client.resumes
            # nothing is kept for long of requests done or failed
            await eventually(lambda: len(router.placements) == 0, WAIT, what="the router forgetting the finished requests")
    finally:
        gate.set()  # the slow worker comes back: it ends its hung step and drops what was cancelled meanwhile
        async with asyncio.timeout(WAIT):
            await router.stop()
            for worker in (slow, spare):
                await worker.stop()
            await asyncio.gather(*tasks)
            await bus.close()
    reference = engine().generate(prompts, max_tokens=6)
    # placed again, never taken by the slow worker, or begun there (failed with it at once, and resumed by its client):
    # all served by the spare, each exactly as a single engine serves it
    for name, outcome, expected in zip(names, outcomes, reference, strict=True):
        assert outcome == expected.token_ids, (name, outcome)
    assert resumes == len(started)  # the router failed just the ones begun on the slow worker, each once
    assert spare.steps > 0 and slow.steps == 1  # the slow worker ran only its hung step: nothing ran twice
    assert not slow.engine.engine.has_unfinished() and slow.state.view(time.time()).kv_used == 0


async def test_a_worker_drops_a_dispatch_cancelled_quietly_and_ignores_cancels_for_what_it_does_not_hold() -> None:
    bus, store = MemoryBus(), MemoryStore()
    worker = WorkerService("w", Role.COLOCATED, engine(), make_policy("vllm", MODEL), MODEL, bus, store, SETTINGS)
    replies: list[Message] = []
    finished = asyncio.Event()

    async def collect(delivery: Delivery) -> None:
        message = decode(delivery.body)
        replies.append(message)
        if isinstance(message, RequestFinished) and message.request_id == "kept":
            finished.set()

    await bus.declare_queue(QueueSpec("replies"))
    await bus.consume("replies", collect)
    await bus.declare_queue(QueueSpec(worker.queue))
    queue = worker_queue(SETTINGS, "w")

    def dispatch(name: str) -> Dispatch:
        request = GenerateRequest(request_id=name, prompt_token_ids=[5, 6, 7], max_tokens=4, arrival_time=time.time(), reply_to="replies")
        return Dispatch(request=request, prefill_worker="w", decode_worker="w", ttft_deadline=request.arrival_time + 60, dispatched_at=time.time())

    # waiting before the worker starts: a request placed again elsewhere, then cancels of requests it never held
    await send(bus, queue, dispatch("moved"))
    await send(bus, queue, CancelRequest(request_id="moved", reason="placed again", quiet=True))
    await send(bus, queue, CancelRequest(request_id="ghost", quiet=True))
    await send(bus, queue, CancelRequest(request_id="ghost"))
    await send(bus, queue, dispatch("kept"))
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(finished.wait(), timeout=WAIT)
    finally:
        async with asyncio.timeout(WAIT):
            await worker.stop()
            await task
            await bus.close()
    assert {getattr(m, "request_id", None) for m in replies} == {"kept"}
    assert not worker.engine.engine.has_unfinished() and worker.state.view(time.time()).kv_used == 0


async def test_a_dispatch_that_raced_a_workers_drain_is_placed_again_on_its_arrival_time() -> None:
    bus, store = MemoryBus(), MemoryStore()
    now = [1000.0]  # the router's clock, moved by hand
    received: dict[str, asyncio.Queue[Message]] = {}
    for name in ("leaving", "other"):
        await bus.declare_queue(QueueSpec(worker_queue(SETTINGS, name)))
        received[name] = inbox = asyncio.Queue()

        async def take(delivery: Delivery, inbox: asyncio.Queue[Message] = inbox) -> None:
            inbox.put_nowait(decode(delivery.body))

        await bus.consume(worker_queue(SETTINGS, name), take)

    async def report(name: str, *, draining: bool = False) -> None:
        status = WorkerStatus(
            worker_id=name, role=WorkerRole.COLOCATED, queue=worker_queue(SETTINGS, name), sent_at=now[0], kv_capacity_tokens=10_000,
            kv_free_tokens=10_000, draining=draining,
        )
        await store.put_worker_status(status, ttl_s=60)

    await report("leaving")
    router = RouterService(make_policy("vllm", MODEL), bus, store, SETTINGS, clock=lambda: now[0])
    task = asyncio.create_task(router.run())
    try:
        request = GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3], max_tokens=2, arrival_time=now[0], reply_to="nobody")
        await send(bus, await declare_requests_queue(bus, SETTINGS), request)
        first = await asyncio.wait_for(received["leaving"].get(), timeout=WAIT)
        assert isinstance(first, Dispatch) and first.request.request_id == "r"
        # the worker drains (its consumer stopped, the dispatch never taken) and keeps reporting; another one joins
        now[0] += SETTINGS.status_ttl_s + 1
        await report("leaving", draining=True)
        await report("other")
        moved = await asyncio.wait_for(received["other"].get(), timeout=WAIT)
        assert isinstance(moved, Dispatch) and moved.request == request  # arrival time and all, as it came
        cancel = await asyncio.wait_for(received["leaving"].get(), timeout=WAIT)
        assert isinstance(cancel, CancelRequest) and cancel.request_id == "r" and cancel.quiet
    finally:
        async with asyncio.timeout(WAIT):
            await router.stop()
            await task
            await bus.close()
