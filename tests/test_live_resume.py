"""A request whose worker is lost mid-answer continues elsewhere: the client resumes it after the tokens it has, and the
stream goes on with every token once, exactly as an undisturbed run's."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from tests.helpers import eventually
from tests.servers import connect_rabbit
from tests.test_live_embedded import MODEL, SETTINGS, deployment, engine
from tests.test_live_failover import Link
from tests.test_live_failover import SETTINGS as FAILOVER_SETTINGS
from tests.test_live_placements import request as placed_request
from tests.test_live_placements import status as placed_status
from tests.test_live_processes import MAX_MODEL_LEN, START_S, Processes, client, processes, statuses, store  # noqa: F401  (fixtures)
from tropical.bus import Bus, Delivery, MemoryBus, QueueSpec
from tropical.engine import Engine, EngineConfig, EmulatedEngine
from tropical.engine.bookkeeping import InvalidRequest
from tropical.engine.plan import EnginePlan, StepResult
from tropical.engine.serving import ServingEngine
from tropical.kv import make_transport
from tropical.kv.base import KvError
from tropical.live.client import MAX_RESUMES, Client, RequestFailed
from tropical.live.placements import Placements
from tropical.live.router_service import RouterService
from tropical.live.worker_service import WorkerService
from tropical.messaging import send
from tropical.policies import Role, make_policy
from tropical.protocol import (
    CancelRequest,
    Dispatch,
    ErrorCode,
    ErrorReply,
    FinishReason,
    GenerateRequest,
    KvHandoff,
    KvTransport,
    Message,
    RequestFinished,
    RequestSnapshot,
    SamplingParams,
    Slo,
    Timings,
    TokenChunk,
    WorkerRole,
    WorkerStatus,
    decode,
)
from tropical.queues import declare_requests_queue, worker_queue
from tropical.store import MemoryStore, Store

WAIT = 30.0  # seconds any one expected event may take before the test fails
SLO = Slo(ttft_ms=60_000, tpot_ms=10_000)
LONG = SamplingParams(ignore_eos=True)  # answers of exactly max_tokens: long enough to be cut in the middle


class Stall:
    """Holds an engine's steps from some moment on, as a dead process's are; `release()` lets them go at the test's end.

    The steps hang from step `after_steps + 1`, or from the first step after `arm()`; `on_hang` runs (on the engine's
    thread) as the first one is held.
    """

    def __init__(self, engine: ServingEngine, *, after_steps: int | None = None, on_hang: Callable[[], None] = lambda: None) -> None:
        self.held = threading.Event()
        self._armed = threading.Event()
        self._gate = threading.Event()
        steps = itertools.count(1)
        step: Callable[..., StepResult] = engine.step

        def step_or_hang(plan: EnginePlan | None = None, **options: Any) -> StepResult:
            if after_steps is not None and next(steps) > after_steps:
                self._armed.set()
            if self._armed.is_set():
                if not self.held.is_set():
                    on_hang()
                    self.held.set()
                if not self._gate.wait(timeout=WAIT * 4):
                    raise TimeoutError("the test never released the stalled engine")
            return step(plan, **options)

        engine.step = step_or_hang  # type: ignore[method-assign]

    def arm(self) -> None:
        self._armed.set()

    def release(self) -> None:
        self._gate.set()


def contiguous(chunks: list[TokenChunk], start: int = 0) -> bool:
    """Each chunk starts where the one before ended, the first at `start`: nothing repeated, nothing skipped."""
    return bool(chunks) and [c.index for c in chunks] == list(itertools.accumulate((len(c.token_ids) for c in chunks[:-1]), initial=start))


async def stream(client: Client, prompt: list[int], max_tokens: int, name: str) -> list[TokenChunk]:
    return [chunk async for chunk in client.generate(prompt, max_tokens=max_tokens, sampling=LONG, slo=SLO, request_id=name)]


# --- the engine continues an answer -----------------------------------------------------------


@pytest.mark.parametrize("sampling", [LONG, SamplingParams(temperature=0.8, top_k=40, seed=7, ignore_eos=True)], ids=["greedy", "seeded"])
@pytest.mark.parametrize("make", [engine, lambda: EmulatedEngine(MODEL, 4096, vocab_size=300, seed=3)], ids=["model", "emulated"])
def test_an_engine_given_an_answers_first_tokens_goes_on_as_the_undisturbed_run(make: Callable[[], ServingEngine], sampling: SamplingParams) -> None:
    prompt = [17, 4, 99, 250, 3, 3, 61]

    def run(served: ServingEngine, generated: list[int]) -> list[int]:
        served.add_request("r", prompt, sampling, 24, output_token_ids=generated)
        tokens = list(generated)
        while served.has_unfinished():
            tokens += [t for out in served.step().outputs for t in out.new_token_ids]
        return tokens

    whole = run(make(), [])
    assert len(whole) == 24
    for cut in (1, 9, 23):  # the seeded sampler's noise depends on the output position, not the step: a resume draws the same
        assert run(make(), whole[:cut]) == whole, cut


def test_an_engine_says_when_an_answer_has_ended_already_and_refuses_to_go_on_with_it() -> None:
    served = engine()  # the tiny model's end of sequence is 257
    assert served.ended([5, 6], LONG, 4) is None
    assert served.ended([5, 6, 7, 8], LONG, 4) is FinishReason.LENGTH
    assert served.ended([5, 257], SamplingParams(), 4) is FinishReason.STOP
    assert served.ended([5, 257], LONG, 4) is None  # ignore_eos: the end of sequence is just a token
    assert served.ended([5, 9], SamplingParams(stop_token_ids=[9]), 4) is FinishReason.STOP
    for generated in ([5, 257], [1, 2, 3, 4]):
        with pytest.raises(InvalidRequest):
            served.add_request("r", [1, 2], SamplingParams(), 4, output_token_ids=generated)
    assert not served.has_unfinished()


# --- the router and the worker take a resumed request ----------------------------------------------


def resumed(name: str, prompt: list[int], generated: list[int], max_tokens: int, reply_to: str = "replies") -> GenerateRequest:
    return GenerateRequest(
        request_id=name, prompt_token_ids=prompt, generated_token_ids=generated, max_tokens=max_tokens, sampling=LONG, slo=SLO,
        arrival_time=time.time(), reply_to=reply_to,
    )


async def test_the_router_queues_a_resumed_request_by_what_is_left_and_refuses_more_tokens_than_max_tokens() -> None:
    bus = MemoryBus()
    router = RouterService(make_policy("vllm", MODEL), bus, MemoryStore(), SETTINGS, max_model_len=64)
    checked = router._checked(resumed("r", [1] * 20, [7] * 10, 40))  # context: prompt + max_tokens = 60 ≤ 64, as for any request
    router._enqueue(checked)
    (job,) = router.router.queue.values()
    assert (job.prompt, job.output) == (30, 30)  # prefill the prompt and the answer so far; generate the rest
    assert router._checked(resumed("whole", [1] * 20, [7] * 40, 40)).generated_token_ids == [7] * 40  # its worker ends it
    with pytest.raises(ValueError, match="exceed max_tokens"):
        router._checked(resumed("over", [1] * 20, [7] * 41, 40))
    with pytest.raises(ValueError, match="context"):
        router._checked(resumed("long", [1] * 30, [7] * 5, 40))
    await bus.close()


async def _served_by_one_worker(requests: list[GenerateRequest]) -> dict[str, list[Message]]:
    """Each request dispatched straight to one colocated worker; every reply, by request, until each has ended."""
    bus, store = MemoryBus(), MemoryStore()
    worker = WorkerService("w", Role.COLOCATED, engine(), make_policy("vllm", MODEL), MODEL, bus, store, SETTINGS)
    replies: dict[str, list[Message]] = {r.request_id: [] for r in requests}
    ended = asyncio.Event()

    async def collect(delivery: Delivery) -> None:
        message = decode(delivery.body)
        replies[getattr(message, "request_id")].append(message)
        if all(r and isinstance(r[-1], (RequestFinished, ErrorReply)) for r in replies.values()):
            ended.set()

    await bus.declare_queue(QueueSpec("replies"))
    await bus.consume("replies", collect)
    await bus.declare_queue(QueueSpec(worker.queue))
    for request in requests:
        dispatch = Dispatch(request=request, prefill_worker="w", decode_worker="w", ttft_deadline=request.arrival_time + 60, dispatched_at=time.time())
        await send(bus, worker_queue(SETTINGS, "w"), dispatch)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(ended.wait(), timeout=WAIT)
    finally:
        async with asyncio.timeout(WAIT):
            await worker.stop()
            await task
            await bus.close()
    assert not worker.engine.engine.has_unfinished() and worker.state.view(time.time()).kv_used == 0
    return replies


async def test_a_worker_goes_on_after_the_tokens_a_resumed_request_has_and_numbers_them_on_from_there() -> None:
    prompt = [9, 8, 7, 6]
    (whole,) = engine().generate([prompt], LONG, max_tokens=20)
    replies = await _served_by_one_worker([resumed("r", prompt, whole.token_ids[:6], 20)])
    *chunks, finished = replies["r"]
    assert all(isinstance(c, TokenChunk) for c in chunks) and isinstance(finished, RequestFinished)
    tokens = cast(list[TokenChunk], chunks)
    assert contiguous(tokens, start=6)
    assert [t for c in tokens for t in c.token_ids] == whole.token_ids[6:]
    assert (finished.num_prompt_tokens, finished.num_output_tokens, finished.finish_reason) == (4, 20, FinishReason.LENGTH)


async def test_a_resumed_request_whose_answer_had_ended_is_finished_at_once() -> None:
    """Its last worker sent the answer's last token, then was lost before its `finished`: nothing is left to run."""
    ended_by_length = resumed("length", [1, 2], [5, 6, 7], 3)
    ended_by_stop = GenerateRequest(
        request_id="stop", prompt_token_ids=[1, 2], generated_token_ids=[5, 257], max_tokens=8, arrival_time=time.time(), reply_to="replies"
    )
    replies = await _served_by_one_worker([ended_by_length, ended_by_stop])
    for name, reason, count in (("length", FinishReason.LENGTH, 3), ("stop", FinishReason.STOP, 2)):
        (finished,) = replies[name]
        assert isinstance(finished, RequestFinished) and (finished.finish_reason, finished.num_output_tokens) == (reason, count)


@pytest.mark.parametrize(
    ("policy", "roles"),
    [("vllm", (Role.COLOCATED,)), ("distserve", (Role.PREFILL, Role.DECODE)), ("tropical", (Role.PREFILL, Role.MULTIPLEX))],
)
async def test_a_resumed_request_through_router_and_kv_handoff_gets_the_rest_of_the_greedy_answer(policy: str, roles: tuple[Role, ...]) -> None:
    """The whole path of a resumed request: the router queues it, a worker prefills prompt + answer so far, hands the KV on."""
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(30, 60))] for _ in range(4)]
    answers = [g.token_ids for g in engine().generate(prompts, LONG, max_tokens=16)]
    served = await deployment(policy, roles)
    bus, _ = await served.connections()
    replies: dict[str, list[Message]] = {f"r{i}": [] for i in range(len(prompts))}
    ended = asyncio.Event()

    async def collect(delivery: Delivery) -> None:
        message = decode(delivery.body)
        replies[getattr(message, "request_id")].append(message)
        if all(r and isinstance(r[-1], (RequestFinished, ErrorReply)) for r in replies.values()):
            ended.set()

    try:
        await bus.declare_queue(QueueSpec("replies"))
        await bus.consume("replies", collect)
        requests = await declare_requests_queue(bus, SETTINGS)
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            await send(bus, requests, resumed(f"r{i}", prompt, answer[: 1 + 3 * i], 16))
        await asyncio.wait_for(ended.wait(), timeout=WAIT)
    finally:
        await served.stop()
    for i, answer in enumerate(answers):
        *chunks, finished = replies[f"r{i}"]
        assert isinstance(finished, RequestFinished) and finished.num_output_tokens == 16, replies[f"r{i}"]
        tokens = cast(list[TokenChunk], chunks)
        assert contiguous(tokens, start=1 + 3 * i) and [t for c in tokens for t in c.token_ids] == answer[1 + 3 * i :]
    if policy != "vllm":  # the prefill worker did hand the resumed prompts on
        assert served.workers[1].steps > 0


# --- the router fails a lost worker's started requests at once ------------------------------------------------


async def test_a_silent_workers_started_request_fails_at_once_after_a_quiet_cancel_to_it() -> None:
    bus, store = MemoryBus(), MemoryStore()
    now = [1000.0]  # the router's clock, moved by hand; statuses live on in the store
    received: dict[str, asyncio.Queue[Message]] = {}
    for queue in (worker_queue(SETTINGS, "w"), "replies"):
        await bus.declare_queue(QueueSpec(queue))
        received[queue] = inbox = asyncio.Queue()

        async def take(delivery: Delivery, inbox: asyncio.Queue[Message] = inbox) -> None:
            inbox.put_nowait(decode(delivery.body))

        await bus.consume(queue, take)

    async def report(*started: str) -> None:
        begun = [RequestSnapshot(request_id=n, arrival=now[0], prompt_tokens=3, ttft_slo_s=60, tpot_slo_s=10, prefilled=3, generated=2) for n in started]
        status = WorkerStatus(
            worker_id="w", role=WorkerRole.COLOCATED, queue=worker_queue(SETTINGS, "w"), sent_at=now[0], kv_capacity_tokens=10_000,
            kv_free_tokens=10_000, waiting=begun,
        )
        await store.put_worker_status(status, ttl_s=60)

    await report()
    router = RouterService(make_policy("vllm", MODEL), bus, store, SETTINGS, clock=lambda: now[0])
    task = asyncio.create_task(router.run())
    try:
        await send(bus, await declare_requests_queue(bus, SETTINGS), resumed("r", [1, 2, 3], [], 8))
        dispatch = await asyncio.wait_for(received[worker_queue(SETTINGS, "w")].get(), timeout=WAIT)
        assert isinstance(dispatch, Dispatch)
        now[0] += 0.1
        await report("r")  # it has begun: two tokens out
        await eventually(lambda: router.placements.worker_of("r") == "w" and router.placements.unstarted("w") == [], WAIT, what="r seen started")
        assert received["replies"].empty()
        now[0] += 1.5  # silent past `stale_after_s`, its status still far from expiring
        cancel = await asyncio.wait_for(received[worker_queue(SETTINGS, "w")].get(), timeout=WAIT)
        assert isinstance(cancel, CancelRequest) and cancel.request_id == "r" and cancel.quiet
        lost = await asyncio.wait_for(received["replies"].get(), timeout=WAIT)
        assert isinstance(lost, ErrorReply) and lost.code is ErrorCode.WORKER_LOST and lost.request_id == "r"
    finally:
        async with asyncio.timeout(WAIT):
            await router.stop()
            await task
            await bus.close()


def test_a_failed_request_resumed_elsewhere_is_not_taken_back_by_its_lost_worker_coming_back() -> None:
    placements = Placements(forget_after=5.0)
    placements.dispatched(placed_request("r"), "lost")
    placements.observe([placed_status("lost", decoding=("r",))], 101.0)
    assert [p.request_id for p in placements.failed("lost", left=False)] == ["r"] and placements.worker_of("r") is None
    placements.dispatched(placed_request("r"), "spare")  # resumed by its client, placed again
    placements.observe([placed_status("lost", decoding=("r",)), placed_status("spare", waiting=("r",))], 102.0)  # both show it
    assert placements.worker_of("r") == "spare"
    placements.observe([placed_status("lost", decoding=("r",)), placed_status("spare", begun=("r",))], 103.0)
    assert placements.worker_of("r") == "spare" and placements.failed("spare", left=False)[0].request_id == "r"


# --- the client resumes ------------------------------------------------------------------------


async def _with_lossy_router(
    answer: Callable[[Bus, GenerateRequest], Awaitable[None]], run: Callable[[Client, list[Message]], Awaitable[None]]
) -> list[Message]:
    """A client whose requests a stand-in router answers by `answer`; what reached that router (`run` sees it grow)."""
    bus = MemoryBus()
    seen: list[Message] = []
    try:
        async with Client(bus, SETTINGS, timeout_s=WAIT) as client:

            async def router(delivery: Delivery) -> None:
                message = decode(delivery.body)
                seen.append(message)
                if isinstance(message, GenerateRequest):
                    await answer(bus, message)

            await bus.consume(await declare_requests_queue(bus, SETTINGS), router)
            await asyncio.wait_for(run(client, seen), timeout=WAIT)
    finally:
        await bus.close()
    return seen


async def test_a_request_lost_again_and_again_is_resumed_max_resumes_times_then_fails_with_every_token_once() -> None:
    async def lose_after_one_token(bus: Bus, request: GenerateRequest) -> None:
        position = len(request.generated_token_ids)
        await send(bus, request.reply_to, TokenChunk(request_id=request.request_id, index=position, token_ids=[100 + position], emitted_at=time.time()))
        await send(bus, request.reply_to, ErrorReply(request_id=request.request_id, code=ErrorCode.WORKER_LOST, message="worker w was lost"))

    chunks: list[TokenChunk] = []
    raised: list[RequestFailed] = []

    async def run(client: Client, seen: list[Message]) -> None:
        try:
            async for chunk in client.generate([1, 2], max_tokens=10, request_id="unlucky"):
                chunks.append(chunk)
        except RequestFailed as exc:
            raised.append(exc)
        assert client.resumes == MAX_RESUMES

    seen = cast(list[GenerateRequest], await _with_lossy_router(lose_after_one_token, run))
    assert len(raised) == 1 and raised[0].reply.code is ErrorCode.WORKER_LOST
    assert [(c.index, c.token_ids) for c in chunks] == [(i, [100 + i]) for i in range(MAX_RESUMES + 1)]
    assert [r.generated_token_ids for r in seen] == [[100 + j for j in range(i)] for i in range(MAX_RESUMES + 1)]
    assert {r.request_id for r in seen} == {"unlucky"} and all(a.arrival_time <= b.arrival_time for a, b in itertools.pairwise(seen))
    assert all(r.prompt_token_ids == [1, 2] and r.max_tokens == 10 for r in seen)


@pytest.mark.parametrize("code", [ErrorCode.OVERLOADED, ErrorCode.TIMEOUT, ErrorCode.INVALID])
async def test_any_other_error_is_raised_at_once(code: ErrorCode) -> None:
    async def refuse(bus: Bus, request: GenerateRequest) -> None:
        await send(bus, request.reply_to, ErrorReply(request_id=request.request_id, code=code, message="no"))

    async def run(client: Client, seen: list[Message]) -> None:
        with pytest.raises(RequestFailed) as failed:
            await client.complete([1, 2], max_tokens=4)
        assert failed.value.reply.code is code and client.resumes == 0

    assert len(await _with_lossy_router(refuse, run)) == 1


async def test_a_resumed_request_that_finishes_stops_any_other_placement_of_it_quietly() -> None:
    """Two errors for one loss (the decoding worker's and the router's) resume it twice; the one that finishes ends the stream."""

    async def lose_then_finish(bus: Bus, request: GenerateRequest) -> None:
        position, name = len(request.generated_token_ids), request.request_id
        if position == 0:
            await send(bus, request.reply_to, TokenChunk(request_id=name, index=0, token_ids=[50], emitted_at=time.time()))
            await send(bus, request.reply_to, ErrorReply(request_id=name, code=ErrorCode.KV_TRANSFER_FAILED, message="its KV is gone"))
            return
        await send(bus, request.reply_to, TokenChunk(request_id=name, index=1, token_ids=[51, 52], emitted_at=time.time()))
        timings = Timings(arrival=0.0)
        await send(bus, request.reply_to, RequestFinished(request_id=name, finish_reason=FinishReason.LENGTH, num_prompt_tokens=2, num_output_tokens=3, timings=timings))

    async def run(client: Client, seen: list[Message]) -> None:
        assert await client.complete([1, 2], max_tokens=3, request_id="twice") == [50, 51, 52]
        assert client.finished["twice"].num_output_tokens == 3 and client.resumes == 1
        await eventually(lambda: len(seen) == 3, WAIT, what="the quiet cancel reaching the router")

    seen = await _with_lossy_router(lose_then_finish, run)
    assert [type(m) for m in seen] == [GenerateRequest, GenerateRequest, CancelRequest]
    cancel = seen[-1]
    assert isinstance(cancel, CancelRequest) and cancel.request_id == "twice" and cancel.quiet


# --- workers lost mid-answer, in one process ----------------------------------------------------------


async def test_a_worker_lost_mid_answer_its_requests_go_on_elsewhere_with_every_token_once() -> None:
    bus, store = MemoryBus(), MemoryStore()
    link = Link(store)
    policy = make_policy("vllm", MODEL)
    doomed_engine = engine()
    stall = Stall(doomed_engine, after_steps=8, on_hang=lambda: setattr(link, "cut", True))  # dead after eight steps: silent, stuck
    doomed = WorkerService(  # every token out as it comes: the client holds all the doomed worker made
        "doomed", Role.COLOCATED, doomed_engine, policy, MODEL, bus, cast(Store, link), FAILOVER_SETTINGS, heartbeat_s=0.05, token_flush_s=0.0
    )
    spare = WorkerService("spare", Role.COLOCATED, engine(), policy, MODEL, bus, store, FAILOVER_SETTINGS, heartbeat_s=0.05)
    resumed_at: dict[str, int] = {}  # where each request resumed on the spare
    add = spare.engine.add

    def recording_add(job: Any, prompt: Any, sampling: Any, max_tokens: int, generated: Any = ()) -> None:
        resumed_at[spare.names.name_of(job.id)] = len(generated)
        add(job, prompt, sampling, max_tokens, generated)

    spare.engine.add = recording_add  # type: ignore[method-assign]
    router = RouterService(policy, bus, store, FAILOVER_SETTINGS)
    await bus.declare_queue(QueueSpec(doomed.queue))
    await doomed.publish_status()  # the only worker the router knows: it places every request there
    rng = random.Random(8)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 40))] for _ in range(4)]
    names = [f"r{i}" for i in range(len(prompts))]
    tasks = [asyncio.create_task(router.run())]
    try:
        async with Client(bus, FAILOVER_SETTINGS, timeout_s=WAIT) as client:
            requests = [asyncio.create_task(stream(client, p, 40, n)) for p, n in zip(prompts, names, strict=True)]
            await eventually(lambda: router.dispatched == len(prompts), WAIT, what="every request dispatched to the doomed worker")
            tasks.append(asyncio.create_task(doomed.run()))
            assert await asyncio.to_thread(stall.held.wait, WAIT), "the doomed worker never reached its ninth step"
            assert doomed.steps == 8
            tasks.append(asyncio.create_task(spare.run()))
            outputs = await asyncio.wait_for(asyncio.gather(*requests), timeout=WAIT * 2)
            resumes = client.resumes
    finally:
        stall.release()  # the dead worker's step ends; the quiet cancels waiting for it make it drop everything
        async with asyncio.timeout(WAIT):
            await router.stop()
            for worker in (doomed, spare):
                await worker.stop()
            await asyncio.gather(*tasks)
            await bus.close()
    reference = engine().generate(prompts, LONG, max_tokens=40)
    for name, chunks, expected in zip(names, outputs, reference, strict=True):
        assert contiguous(chunks), (name, [(c.index, len(c.token_ids)) for c in chunks])
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids, name
    assert resumes == len(prompts) and sorted(resumed_at) == names  # every one was lost with the doomed worker, once
    assert all(0 < n < 40 for n in resumed_at.values()), resumed_at  # each after the tokens the doomed worker had streamed


async def test_a_prefill_worker_lost_after_handing_off_its_requests_go_on_from_their_first_token() -> None:
    """distserve: the prefill worker dies once it has offered the KV; the decoding worker cannot pull it (its memory went
    with it) and says `kv_transfer_failed`; the clients resume, and another prefill worker prefills prompt + first token."""
    bus, store = MemoryBus(), MemoryStore()
    link = Link(store)
    policy = make_policy("distserve", MODEL)
    transports = {name: make_transport(KvTransport.HOST) for name in ("doomed", "prefill", "decode")}
    doomed_engine = engine()
    stall = Stall(doomed_engine)
    doomed = WorkerService(
        "doomed", Role.PREFILL, doomed_engine, policy, MODEL, bus, cast(Store, link), FAILOVER_SETTINGS, transport=transports["doomed"], heartbeat_s=0.05
    )
    spare = WorkerService("prefill", Role.PREFILL, engine(), policy, MODEL, bus, store, FAILOVER_SETTINGS, transport=transports["prefill"], heartbeat_s=0.05)
    decoder = WorkerService("decode", Role.DECODE, engine(), policy, MODEL, bus, store, FAILOVER_SETTINGS, transport=transports["decode"], heartbeat_s=0.05)
    died = asyncio.Event()
    orphaned: set[bytes] = set()  # KV the doomed worker offered: gone with it
    offer = transports["doomed"].offer

    async def offer_then_die(*args: Any, **kwargs: Any) -> Any:
        offered = await offer(*args, **kwargs)
        orphaned.add(offered.handle)
        link.cut = True  # silent from here on; its next step never ends
        stall.arm()
        died.set()
        return offered

    fetch = transports["decode"].fetch

    async def fetch_unless_orphaned(handle: bytes, *args: Any, **kwargs: Any) -> Any:
        if handle in orphaned:
            raise KvError("the sender is gone")
        return await fetch(handle, *args, **kwargs)

    transports["doomed"].offer = offer_then_die  # type: ignore[method-assign]
    transports["decode"].fetch = fetch_unless_orphaned  # type: ignore[method-assign]
    handoffs: list[KvHandoff] = []
    take_handoff = decoder._take_handoff

    def recording_take(handoff: KvHandoff) -> None:
        handoffs.append(handoff)
        take_handoff(handoff)

    decoder._take_handoff = recording_take  # type: ignore[method-assign]
    router = RouterService(policy, bus, store, FAILOVER_SETTINGS)
    rng = random.Random(9)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    names = [f"r{i}" for i in range(len(prompts))]
    await bus.declare_queue(QueueSpec(doomed.queue))
    await doomed.publish_status()  # the only prefill worker the router knows: it places every request there
    tasks = {"decode": asyncio.create_task(decoder.run()), "router": asyncio.create_task(router.run())}
    try:
        async with Client(bus, FAILOVER_SETTINGS, timeout_s=WAIT) as client:
            requests = [asyncio.create_task(stream(client, p, 12, n)) for p, n in zip(prompts, names, strict=True)]
            await eventually(lambda: router.dispatched == len(prompts), WAIT, what="every request dispatched to the doomed worker")
            tasks["doomed"] = asyncio.create_task(doomed.run())
            await asyncio.wait_for(died.wait(), timeout=WAIT)
            tasks["prefill"] = asyncio.create_task(spare.run())
            outputs = await asyncio.wait_for(asyncio.gather(*requests), timeout=WAIT * 2)
            resumes = client.resumes
            lost = {h.request.request_id for h in handoffs if h.source_worker == "doomed"}  # handed on before it died
    finally:
        stall.release()  # the dead worker's last step ends: it may still hand off what it had begun
        async with asyncio.timeout(WAIT):
            await router.stop()
            await doomed.stop()
            await tasks.pop("doomed")  # drained first: the decoding worker is there to let its leases go
            for worker in (spare, decoder):
                await worker.stop()
            await asyncio.gather(*tasks.values())
            await bus.close()
            for transport in transports.values():
                await transport.close()
    reference = engine().generate(prompts, LONG, max_tokens=12)
    for name, chunks, expected in zip(names, outputs, reference, strict=True):
        assert contiguous(chunks), (name, [(c.index, len(c.token_ids)) for c in chunks])
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids, name
    assert lost and len(lost) <= resumes <= 2 * len(prompts)  # the decoding worker's errors, and maybe the router's too
    again = [h for h in handoffs if h.source_worker == "prefill" and h.request.request_id in lost]
    assert {h.request.request_id for h in again} == lost and all(h.request.generated_token_ids for h in again)


# --- a real deployment: a multiplexing worker killed mid-stream ---------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("processes", ["tropical"], indirect=True)
async def test_a_multiplex_worker_killed_mid_stream_its_requests_finish_on_the_other_with_exact_tokens(
    processes: Processes, client: Client, store: Store
) -> None:
    workers = processes.start_deployment(workers=3)  # a prefill worker and two multiplexing ones
    await eventually(lambda: _reporting(store, set(workers)), START_S, interval=0.1, what="every worker reporting")
    rng = random.Random(12)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 40))] for _ in range(8)]
    max_tokens = MAX_MODEL_LEN - 48
    received: dict[str, list[TokenChunk]] = {f"r{i}": [] for i in range(len(prompts))}

    async def follow(prompt: list[int], name: str) -> None:
        async for chunk in client.generate(prompt, max_tokens=max_tokens, sampling=LONG, slo=SLO, request_id=name):
            received[name].append(chunk)

    requests = [asyncio.create_task(follow(p, n)) for p, n in zip(prompts, received, strict=True)]
    victim: str | None = None
    try:
        await eventually(lambda: all(len(c) >= 3 for c in received.values()), START_S, interval=0.01, what="every answer under way")
        listed = await asyncio.wait_for(store.list_worker_statuses(), timeout=5)
        decoding = {s.worker_id: len(s.decodes) for s in listed if s.role is WorkerRole.MULTIPLEX}
        victim = max(decoding, key=decoding.__getitem__)
        assert decoding[victim] > 0, decoding
        processes.running[victim].send_signal(signal.SIGKILL)
        assert processes.running[victim].wait(timeout=30) == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*requests), timeout=START_S + 90)
    finally:
        for task in requests:
            task.cancel()
        if victim is not None:
            await _delete_queue(worker_queue(processes.settings, victim))
    reference = Engine.load("tiny", EngineConfig(device="cpu", max_model_len=MAX_MODEL_LEN)).generate(prompts, LONG, max_tokens=max_tokens)
    for (name, chunks), expected in zip(received.items(), reference, strict=True):
        assert contiguous(chunks), (name, [(c.index, len(c.token_ids)) for c in chunks])
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids, (name, processes.tail("router"))
    assert client.resumes >= decoding[victim], (client.resumes, decoding)  # every answer it was decoding went on elsewhere


async def _reporting(store: Store, names: set[str]) -> bool:
    return set(await statuses(store)) >= names


async def _delete_queue(queue: str) -> None:
    """The killed worker's queue outlives it (its quiet cancels wait there): the test removes it."""
    bus = await connect_rabbit()
    try:
        await asyncio.wait_for(bus.delete_queue(queue), timeout=10)
    finally:
        await bus.close()
