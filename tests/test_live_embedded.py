"""A whole deployment in one process on the in-memory bus and store: requests in, token streams out."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from tropical.bus import Delivery, MemoryBus, QueueSpec
from tropical.engine import Engine, EngineConfig, ModelConfig
from tropical.engine.tokenizer import ByteTokenizer
from tropical.latency.model import LatencyModel
from tropical.live.client import Client, RequestFailed
from tropical.live.deployment import Deployment
from tropical.live.model_feed import LatencyModelFeed
from tropical.live.router_service import RouterService
from tropical.live.worker_service import WorkerService
from tropical.messaging import send
from tropical.policies import Role, make_policy
from tropical.protocol import (
    Dispatch,
    ErrorCode,
    FinishReason,
    GenerateRequest,
    Message,
    RequestFinished,
    SamplingParams,
    Slo,
    Timings,
    TokenChunk,
    WorkerRole,
    WorkerStatus,
    decode,
)
from tropical.queues import declare_requests_queue, worker_queue
from tropical.settings import Settings
from tropical.store import MemoryStore

TINY = ModelConfig.tiny(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, eos_token_ids=(257,))
MODEL = LatencyModel(c0=0.0, c1=0.0005, c2=0.005, d0=0.005, d1=0.0005, d2=0.00001)
SETTINGS = Settings(broker_url="memory://", redis_url="memory://")


def engine() -> Engine:
    return Engine.load("tiny", EngineConfig(num_kv_blocks=512, block_size=4, device="cpu", max_model_len=256), tiny=TINY, weights_seed=3)


async def deployment(policy: str, roles: tuple[Role, ...]) -> Deployment:
    served = Deployment(policy, roles, engine, MODEL, SETTINGS, tokenizer=ByteTokenizer())
    await served.start()
    return served


@pytest.fixture
async def vllm() -> AsyncIterator[Deployment]:
    served = await deployment("vllm", (Role.COLOCATED, Role.COLOCATED))
    yield served
    await served.stop()


@pytest.mark.parametrize(
    ("policy", "roles"),
    [
        ("vllm", (Role.COLOCATED, Role.COLOCATED)),
        ("sarathi", (Role.COLOCATED,)),
        ("distserve", (Role.PREFILL, Role.DECODE)),
        ("tropical", (Role.PREFILL, Role.MULTIPLEX)),
        ("kairos", (Role.PREFILL, Role.DECODE, Role.DECODE)),
        ("unified", (Role.MULTIPLEX, Role.MULTIPLEX)),
    ],
)
async def test_fifty_requests_get_a_single_engines_greedy_tokens(policy: str, roles: tuple[Role, ...]) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 80))] for _ in range(50)]
    lengths = [rng.randint(1, 16) for _ in prompts]
    served = await deployment(policy, roles)
    try:
        async with await served.client() as client:
            outputs = await asyncio.wait_for(
                asyncio.gather(*(client.complete(p, max_tokens=n, slo=Slo(ttft_ms=60_000, tpot_ms=10_000)) for p, n in zip(prompts, lengths))),
                timeout=120,
            )
            finished = list(client.finished.values())
    finally:
        await served.stop()
    reference = engine().generate(prompts, max_tokens=16)
    for output, expected, n in zip(outputs, reference, lengths, strict=True):
        assert output == expected.token_ids[:n]
    assert len(finished) == 50
    for done in finished:
        t = done.timings
        assert t.dispatched is not None and t.first_token is not None and t.finished is not None
        assert t.arrival <= t.dispatched <= t.first_token <= t.finished
        assert done.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    busy = [w.steps > 0 for w in served.workers]
    assert all(busy) if policy != "tropical" else busy[1]  # tropical inlines short prompts on its multiplexing worker


async def test_tokens_stream_in_order_and_text_prompts_are_tokenized(vllm: Deployment) -> None:
    async with await vllm.client() as client:
        chunks = [chunk async for chunk in client.generate("hello there", max_tokens=10)]
    assert [c.index for c in chunks] == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
    expected = engine().generate([list(b"hello there")], max_tokens=10)[0].token_ids
    assert [t for c in chunks for t in c.token_ids] == expected


async def test_bad_requests_get_an_error_reply_and_disturb_nothing(vllm: Deployment) -> None:
    async with await vllm.client() as client:
        with pytest.raises(RequestFailed) as too_long:
            await asyncio.wait_for(client.complete([1] * 250, max_tokens=20), timeout=30)
        assert too_long.value.reply.code is ErrorCode.INVALID and "context" in too_long.value.reply.message
        assert await asyncio.wait_for(client.complete([1, 2, 3], max_tokens=4), timeout=30) == engine().generate([[1, 2, 3]], max_tokens=4)[0].token_ids


async def test_a_worker_silent_for_a_second_gets_no_placement() -> None:
    bus, store = MemoryBus(), MemoryStore()
    now = time.time()
    placed: dict[str, asyncio.Queue[Message]] = {}
    for name, sent_at in (("fresh", now), ("silent", now - 1.5)):
        queue = worker_queue(SETTINGS, name)
        status = WorkerStatus(worker_id=name, role=WorkerRole.COLOCATED, queue=queue, sent_at=sent_at, kv_capacity_tokens=10_000, kv_free_tokens=10_000)
        await store.put_worker_status(status, ttl_s=60)
        await bus.declare_queue(QueueSpec(queue))
        placed[name] = received = asyncio.Queue()

        async def take(delivery: Delivery, received: asyncio.Queue[Message] = received) -> None:
            received.put_nowait(decode(delivery.body))

        await bus.consume(queue, take)
    router = RouterService(make_policy("vllm", MODEL), bus, store, SETTINGS)
    task = asyncio.create_task(router.run())
    try:
        requests = await declare_requests_queue(bus, SETTINGS)
        for i in range(4):
            await send(bus, requests, GenerateRequest(request_id=f"r{i}", prompt_token_ids=[1, 2, 3], max_tokens=2, arrival_time=time.time(), reply_to="nobody"))
        dispatches = [await asyncio.wait_for(placed["fresh"].get(), timeout=10) for _ in range(4)]
        assert sorted(d.request.request_id for d in dispatches if isinstance(d, Dispatch)) == ["r0", "r1", "r2", "r3"]
        assert placed["silent"].empty()
    finally:
        await router.stop()
        await asyncio.wait_for(task, timeout=10)
        await bus.close()


async def test_a_worker_calibrates_on_its_whole_step_cycle() -> None:
    """An emulated engine's steps last exactly what the model predicts; the worker's own time around each step still
    counts, since a request's next token waits for it too, so the correction rises above 1."""
    from tropical.engine.emulated import EmulatedEngine

    bus, store = MemoryBus(), MemoryStore()
    feed = await LatencyModelFeed.open(store, "tiny@cpu/tp1", default=MODEL)
    worker = WorkerService("w", Role.COLOCATED, EmulatedEngine(MODEL, 4096, vocab_size=64), make_policy("vllm", MODEL), MODEL, bus, store,
                           SETTINGS, feed=feed)
    await bus.declare_queue(QueueSpec(worker.queue))
    task = asyncio.create_task(worker.run())
    try:
        async with Client(bus, SETTINGS) as client:
            request = GenerateRequest(request_id="r", prompt_token_ids=[5, 6, 7], max_tokens=8, arrival_time=time.time(), reply_to=client.reply_to,
                                      sampling=SamplingParams(ignore_eos=True))
            stream: asyncio.Queue[Message] = asyncio.Queue()
            client._streams["r"] = stream
            await send(bus, worker_queue(SETTINGS, "w"), Dispatch(request=request, prefill_worker="w", decode_worker="w",
                                                                  ttft_deadline=request.arrival_time + 60, dispatched_at=time.time()))
            while not isinstance(await asyncio.wait_for(stream.get(), timeout=30), RequestFinished):
                pass
        assert worker.steps >= 8 and feed.factor > 1.0
    finally:
        await worker.stop()
        await asyncio.wait_for(task, timeout=10)
        await feed.close()
        await bus.close()


async def test_a_worker_takes_a_resent_dispatch_only_if_it_never_had_the_request() -> None:
    """A router that took over sends again what the one before it recorded as dispatched (`resent`): the worker serves
    a request once however often it comes, and one it never got as new."""
    from tropical.engine.emulated import EmulatedEngine

    bus, store = MemoryBus(), MemoryStore()
    worker = WorkerService("w", Role.COLOCATED, EmulatedEngine(MODEL, 4096, vocab_size=64), make_policy("vllm", MODEL), MODEL, bus, store,
                           SETTINGS)
    await bus.declare_queue(QueueSpec(worker.queue))
    task = asyncio.create_task(worker.run())
    try:
        async with Client(bus, SETTINGS) as client:
            streams: dict[str, asyncio.Queue[Message]] = {}

            async def dispatch(name: str, arrival: float, *, resent: bool) -> None:
                request = GenerateRequest(request_id=name, prompt_token_ids=[5, 6, 7], max_tokens=4, arrival_time=arrival,
                                          reply_to=client.reply_to, sampling=SamplingParams(ignore_eos=True))
                client._streams[name] = streams.setdefault(name, asyncio.Queue())
                await send(bus, worker_queue(SETTINGS, "w"), Dispatch(request=request, prefill_worker="w", decode_worker="w",
                                                                      ttft_deadline=arrival + 60, dispatched_at=time.time(), resent=resent))

            async def finished(name: str) -> list[Message]:
                got = [await asyncio.wait_for(streams[name].get(), timeout=30)]
                while not isinstance(got[-1], RequestFinished):
                    got.append(await asyncio.wait_for(streams[name].get(), timeout=30))
                return got

            first = time.time()
            await dispatch("a", first, resent=False)
            await finished("a")
            await dispatch("a", first, resent=True)  # the router that sent it died before acking: its successor sends it again
            await dispatch("b", time.time(), resent=True)  # recorded, then the router died before sending it
            assert isinstance((await finished("b"))[-1], RequestFinished)
            await dispatch("c", time.time(), resent=False)  # its replies come after any of the steps that ran with "b"
            await finished("c")
            assert streams["a"].empty()  # "a" was not served again: its stream got nothing after its end
            await dispatch("a", time.time(), resent=False)  # its client resumed it: a new arrival is a new placement
            assert isinstance((await finished("a"))[-1], RequestFinished)
    finally:
        await worker.stop()
        await asyncio.wait_for(task, timeout=10)
        await bus.close()


async def test_a_worker_calibrates_and_switches_to_a_published_model() -> None:
    bus, store = MemoryBus(), MemoryStore()
    feed = await LatencyModelFeed.open(store, "tiny@cpu/tp1", default=MODEL)
    worker = WorkerService("w", Role.COLOCATED, engine(), make_policy("vllm", MODEL), MODEL, bus, store, SETTINGS, feed=feed)
    await bus.declare_queue(QueueSpec(worker.queue))  # declared by either side first, the same queue
    task = asyncio.create_task(worker.run())
    try:
        async with Client(bus, SETTINGS) as client:
            request = GenerateRequest(request_id="r", prompt_token_ids=[5, 6, 7], max_tokens=8, arrival_time=time.time(), reply_to=client.reply_to)
            stream: asyncio.Queue[Message] = asyncio.Queue()
            client._streams["r"] = stream
            await send(bus, worker_queue(SETTINGS, "w"), Dispatch(request=request, prefill_worker="w", decode_worker="w", ttft_deadline=request.arrival_time + 60, dispatched_at=time.time()))
            while not isinstance(await asyncio.wait_for(stream.get(), timeout=30), RequestFinished):
                pass
        assert feed.factor != 1.0  # the engine's measured steps moved the correction away from the default model's guess
        published = LatencyModel(c0=0.0, c1=0.002, c2=0.02, d0=0.02, d1=0.002, d2=0.00004).to_spec(
            model="tiny", hardware="cpu", tensor_parallel=1, samples=10, fitted_at=time.time()
        )
        await store.set_latency_model(published)
        await asyncio.wait_for(feed.changed.wait(), timeout=10)
        assert worker.state.model == feed.model and worker.policy.batcher.model == feed.model
        assert feed.base_model == LatencyModel.from_spec(published)
    finally:
        await worker.stop()
        await asyncio.wait_for(task, timeout=30)
        await feed.close()
        await bus.close()


@pytest.mark.parametrize(("policy", "roles"), [("vllm", (Role.COLOCATED,)), ("distserve", (Role.PREFILL, Role.DECODE))])
async def test_a_cancel_ends_the_stream_and_frees_the_kv(policy: str, roles: tuple[Role, ...]) -> None:
    served = await deployment(policy, roles)
    try:
        async with await served.client() as client:
            tokens, cancelled = 0, False
            stream = client.generate([9, 8, 7], max_tokens=200, sampling=SamplingParams(ignore_eos=True), request_id="long")
            async for chunk in stream:
                tokens += len(chunk.token_ids)
                if tokens >= 3 and not cancelled:
                    cancelled = True
                    await client.cancel("long")
            assert client.finished["long"].finish_reason is FinishReason.CANCELLED
            assert 3 <= client.finished["long"].num_output_tokens < 200
    finally:
        await served.stop()
    assert all(w.state.view(time.time()).kv_used == 0 and not w.engine.engine.has_unfinished() for w in served.workers)


async def test_a_client_that_vanishes_frees_its_requests() -> None:
    served = await deployment("vllm", (Role.COLOCATED,))
    try:
        async with await served.client() as client:
            stream = client.generate([4, 4, 4], max_tokens=200, sampling=SamplingParams(ignore_eos=True), request_id="orphan")
            await asyncio.wait_for(anext(stream), timeout=30)
        await stream.aclose()
    finally:
        await served.stop()  # drains: waits for every request it still holds
    worker = served.workers[0]
    # its reply queue gone, the worker stopped the request at its next message instead of running its 200 steps
    assert worker.steps < 100 and not worker.engine.engine.has_unfinished()


async def _cancel_after_first_token(served: Deployment, ready: asyncio.Event | None = None) -> None:
    async with await served.client() as client:
        stream = client.generate([9, 8, 7], max_tokens=50, sampling=SamplingParams(ignore_eos=True), request_id="handed")
        await asyncio.wait_for(anext(stream), timeout=30)  # the prefill worker's first token
        if ready is not None:
            await asyncio.wait_for(ready.wait(), timeout=30)
        await client.cancel("handed")
        async for _ in stream:
            pass
        assert client.finished["handed"].finish_reason is FinishReason.CANCELLED


async def test_a_cancel_frees_a_handed_over_kv_that_has_not_been_pulled() -> None:
    served = await deployment("distserve", (Role.PREFILL, Role.DECODE))
    prefill, decoder = served.workers
    decoder.state.pull = lambda now: None  # type: ignore[method-assign]  # the decoding worker never has room
    try:
        await _cancel_after_first_token(served)
    finally:
        await served.stop()  # a drain waits for every lease to be acked: the sender heard of the cancel
    assert not decoder.state.incoming and decoder.state.view(time.time()).kv_used == 0
    assert not prefill._outgoing and prefill.state.view(time.time()).kv_used == 0


async def test_a_cancel_during_the_pull_lets_the_kv_go_when_it_lands() -> None:
    served = await deployment("distserve", (Role.PREFILL, Role.DECODE))
    prefill, decoder = served.workers
    assert decoder.transport is not None
    fetch, started, release = decoder.transport.fetch, asyncio.Event(), asyncio.Event()

    async def held_fetch(*args: object, **kwargs: object) -> object:
        started.set()
        await asyncio.wait_for(release.wait(), timeout=30)
        return await fetch(*args, **kwargs)  # type: ignore[arg-type]

    decoder.transport.fetch = held_fetch  # type: ignore[method-assign]
    try:
        await _cancel_after_first_token(served, ready=started)
        release.set()
    finally:
        release.set()
        await served.stop()
    assert not decoder._cancelled_pulls and not decoder.state.incoming and not decoder.engine.engine.has_unfinished()
    assert decoder.state.view(time.time()).kv_used == 0 and not prefill._outgoing


async def test_a_stream_generated_again_from_its_start_yields_each_token_once() -> None:
    """A request placed again after its first worker went silent may repeat what that worker had sent."""
    bus = MemoryBus()
    async with Client(bus, SETTINGS) as client:
        requests = await declare_requests_queue(bus, SETTINGS)
        taken: asyncio.Queue[GenerateRequest] = asyncio.Queue()

        async def router(delivery: Delivery) -> None:
            message = decode(delivery.body)
            if isinstance(message, GenerateRequest):
                taken.put_nowait(message)

        await bus.consume(requests, router)
        stream = client.generate([1, 2], max_tokens=4, request_id="again")
        first = asyncio.ensure_future(anext(stream))
        request = await asyncio.wait_for(taken.get(), timeout=10)
        now = time.time()
        replies = [
            TokenChunk(request_id="again", index=0, token_ids=[7], emitted_at=now),  # the worker that went silent
            TokenChunk(request_id="again", index=0, token_ids=[7, 8], emitted_at=now),  # the one it was placed on again
            TokenChunk(request_id="again", index=2, token_ids=[9, 10], emitted_at=now),
            RequestFinished(request_id="again", finish_reason=FinishReason.LENGTH, num_prompt_tokens=2, num_output_tokens=4, timings=Timings(arrival=now)),
        ]
        for reply in replies:
            await send(bus, request.reply_to, reply)
        chunks = [await asyncio.wait_for(first, timeout=10)] + [chunk async for chunk in stream]
    assert [(c.index, c.token_ids) for c in chunks] == [(0, [7]), (1, [8]), (2, [9, 10])]
    await bus.close()
