"""The gateway: OpenAI's API over a deployment, spoken to by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tests.helpers import eventually
from tests.test_live_embedded import MODEL, SETTINGS, engine
from tropical.bus import Delivery, MemoryBroker, connect_bus
from tropical.cli import app
from tropical.engine.tokenizer import ByteTokenizer
from tropical.gateway.openai_api import ApiError, ChatBody, CompletionBody, chat_request, completion_request, parse_body
from tropical.gateway.server import Gateway, running_gateway
from tropical.gateway.text import TextStream
from tropical.live.deployment import Deployment
from tropical.messaging import MessageConsumer, send
from tropical.policies import Role
from tropical.protocol import (
    CancelRequest,
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    WorkerRole,
    WorkerStatus,
)
from tropical.queues import declare_requests_queue
from tropical.settings import Settings
from tropical.store import MemoryStore

KEY = "sk-test-key"
WAIT_S = 30.0


# --- the API's shapes, without a server ---------------------------------------------------------


def test_slo_headers_and_fields_become_the_requests_slo() -> None:
    body = parse_body(b'{"model": "m", "prompt": "hi", "tpot_slo_ms": 50}', CompletionBody)
    generation = completion_request(body, {"x-slo-ttft-ms": "250"})
    assert generation.slo(1000.0, 100.0).ttft_ms == 250.0
    assert generation.slo(1000.0, 100.0).tpot_ms == 50.0
    assert completion_request(body, {"x-ttft-slo-ms": "300"}).slo(1000.0, 100.0).ttft_ms == 300.0
    plain = completion_request(parse_body(b'{"model": "m", "prompt": "hi"}', CompletionBody), {})
    assert (plain.slo(1000.0, 100.0).ttft_ms, plain.slo(1000.0, 100.0).tpot_ms) == (1000.0, 100.0)
    assert plain.max_tokens == 16  # OpenAI's default for completions


@pytest.mark.parametrize(
    ("raw", "headers", "param"),
    [
        (b'{"model": "m", "prompt": "hi", "n": 2}', {}, "n"),
        (b'{"model": "m", "prompt": "hi", "logprobs": 3}', {}, "logprobs"),
        (b'{"model": "m", "prompt": ["a", "b"]}', {}, "prompt"),
        (b'{"model": "m", "prompt": ""}', {}, "prompt"),
        (b'{"model": "m", "prompt": "hi", "max_tokens": 0}', {}, "max_tokens"),
        (b'{"model": "m", "prompt": "hi", "temperature": "hot"}', {}, "temperature"),
        (b'{"model": "m", "prompt": "hi"}', {"x-slo-ttft-ms": "soon"}, "x-slo-ttft-ms"),
        (b'{"model": "m", "prompt": "hi"}', {"x-slo-tpot-ms": "-5"}, "x-slo-tpot-ms"),
        (b'{"prompt": "hi"}', {}, "model"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(raw: bytes, headers: dict[str, str], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        completion_request(parse_body(raw, CompletionBody), headers)
    assert refused.value.status == 400
    assert refused.value.param == param
    assert set(refused.value.body()["error"]) == {"message", "type", "param", "code"}


def test_not_json_is_a_400() -> None:
    with pytest.raises(ApiError) as refused:
        parse_body(b"{not json", CompletionBody)
    assert refused.value.status == 400


def test_chat_without_a_template_writes_the_roles_out() -> None:
    body = parse_body(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}', ChatBody)
    assert chat_request(body, {}, None).prompt == "user: hi\nassistant: "
    assert chat_request(body, {}, lambda messages: [7, 8]).prompt == [7, 8]


def test_text_stops_at_a_stop_string_even_across_tokens() -> None:
    text = TextStream(ByteTokenizer(), stop=("END",))
    pieces = [text.add(list(part.encode())) for part in ("hello E", "N", "D and more")]
    assert "".join(pieces) == "hello "
    assert text.stopped and text.finish() == ""


def test_text_holds_back_half_a_character() -> None:
    text = TextStream(ByteTokenizer())
    euro = "€".encode()
    assert text.add([euro[0]]) == ""
    assert text.add(list(euro[1:])) == "€"
    assert text.add([ord("x")]) == "x"
    assert text.finish() == ""
    assert text.text == "€x"


# --- a gateway on an embedded deployment -------------------------------------------------------------


@pytest.fixture
async def served() -> AsyncIterator[tuple[Deployment, str]]:
    deployment = Deployment("unified", (Role.MULTIPLEX, Role.MULTIPLEX), engine, MODEL, SETTINGS, tokenizer=ByteTokenizer())
    await deployment.start()
    bus, store = await deployment.connections()
    gateway = Gateway(bus, store, SETTINGS, model_name="tiny", tokenizer=ByteTokenizer(), telemetry=deployment.telemetry,
                      api_keys=frozenset({KEY}), max_model_len=256)
    try:
        async with running_gateway(gateway, "127.0.0.1", 0) as url:
            yield deployment, url
    finally:
        await deployment.stop()


def _client(url: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=WAIT_S)


async def _queue_tokens(deployment: Deployment, prompt: list[int], max_tokens: int) -> list[int]:
    async with await deployment.client() as client:
        return await client.complete(prompt, max_tokens=max_tokens, sampling=SamplingParams(ignore_eos=True))


async def test_the_openai_client_streams_completions_with_the_deployments_tokens(served: tuple[Deployment, str]) -> None:
    deployment, url = served
    expected = await _queue_tokens(deployment, list(b"Hello there"), 12)
    stream = await _client(url).completions.create(
        model="tiny", prompt="Hello there", max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}, extra_headers={"x-slo-ttft-ms": "5000", "x-slo-tpot-ms": "500"},
    )
    text, token_ids, finish, usage, timings = "", [], None, None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            token_ids += (choice.model_extra or {}).get("token_ids", [])
            finish = choice.finish_reason or finish
        timings = (chunk.model_extra or {}).get("timings") or timings
    assert token_ids == expected
    assert text == ByteTokenizer().decode(expected)
    assert finish == "length"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (11, 12)
    assert timings is not None and timings["arrival"] <= timings["first_token"] <= timings["finished"]


async def test_the_openai_client_streams_chat_and_takes_it_whole(served: tuple[Deployment, str]) -> None:
    deployment, url = served
    prompt = list(b"user: Hi\nassistant: ")
    expected = ByteTokenizer().decode(await _queue_tokens(deployment, prompt, 8))
    client = _client(url)
    pieces = []
    first_role = None
    async for chunk in await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
    ):
        for choice in chunk.choices:
            first_role = first_role or choice.delta.role
            pieces.append(choice.delta.content or "")
    assert "".join(pieces) == expected
    assert first_role == "assistant"
    whole = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def test_keys_models_and_bad_input_get_openai_shaped_errors(served: tuple[Deployment, str]) -> None:
    _, url = served
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        await _client(url, key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert unauthorized.value.status_code == 401
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models") as response:
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "authentication_error"
    client = _client(url)
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="tiny", prompt="hi", max_tokens=2, n=3)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.completions.create(model="tiny", prompt="x" * 250, max_tokens=20)
    assert too_long.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="tiny", prompt=[299, 300], max_tokens=2)  # outside the byte vocabulary


async def test_a_stop_string_ends_the_answer_and_frees_the_request(served: tuple[Deployment, str]) -> None:
    deployment, url = served
    expected = ByteTokenizer().decode(await _queue_tokens(deployment, list(b"abc"), 16))
    stop = expected[3:5]
    whole = await _client(url).completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0, stop=[stop],
                                                  extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected[: expected.index(stop)]
    assert whole.choices[0].finish_reason == "stop"
    await eventually(lambda: _nothing_running(deployment), WAIT_S, what="the stopped request leaving its worker")


async def test_metrics_parse_and_move_as_requests_complete(served: tuple[Deployment, str]) -> None:
    _, url = served
    before = await _scrape(url)
    for _ in range(3):
        await _client(url).completions.create(model="tiny", prompt="count me", max_tokens=4, extra_body={"ignore_eos": True})
    after = await _scrape(url)
    finished = ("tropical:request_success_total", (("outcome", "finished_length"), ("service", "gateway")))
    assert after[finished] - before.get(finished, 0.0) == 3
    ttft_count = ("tropical:time_to_first_token_seconds_count", (("service", "gateway"),))
    assert after[ttft_count] - before.get(ttft_count, 0.0) == 3
    assert after[("tropical:slo_attainment", (("service", "gateway"), ("slo", "joint")))] <= 1.0


async def test_health_counts_workers(served: tuple[Deployment, str]) -> None:
    _, url = served
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as response:
            assert response.status == 200
            assert (await response.json())["workers"] == 2


# --- what the deployment answers, mapped to HTTP ----------------------------------------------------


class _FakeRouter:
    """Serves the `requests` queue with a scripted answer, and records the cancels it gets."""

    def __init__(self, answer: Callable[[GenerateRequest], Awaitable[None]]) -> None:
        self.answer = answer
        self.cancelled: asyncio.Queue[str] = asyncio.Queue()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[tuple[str, _FakeRouter]]]]:
    broker, store = MemoryBroker(), MemoryStore()
    settings = Settings(broker_url="memory://", redis_url="memory://")
    stack: list[object] = []

    async def start(answer: Callable[[GenerateRequest, object], Awaitable[None]], *, timeout_s: float = WAIT_S) -> tuple[str, _FakeRouter]:
        bus = await connect_bus(settings, broker=broker)
        fake = _FakeRouter(lambda request: answer(request, bus))

        async def on_request(request: GenerateRequest, delivery: Delivery) -> None:
            asyncio.get_running_loop().create_task(fake.answer(request))

        async def on_cancel(cancel: CancelRequest, delivery: Delivery) -> None:
            fake.cancelled.put_nowait(cancel.request_id)

        consumer = MessageConsumer(bus, await declare_requests_queue(bus, settings), {GenerateRequest: on_request, CancelRequest: on_cancel})
        await consumer.start(prefetch=16)
        await store.put_worker_status(_status(), ttl_s=60.0)
        gateway = Gateway(bus, store, settings, model_name="m", tokenizer=ByteTokenizer(), request_timeout_s=timeout_s)
        context = running_gateway(gateway, "127.0.0.1", 0)
        url = await context.__aenter__()
        stack.append((context, consumer))
        return url, fake

    yield start
    for context, consumer in stack:  # type: ignore[misc]
        await context.__aexit__(None, None, None)
        await consumer.stop()


def _status() -> WorkerStatus:
    import time

    return WorkerStatus(worker_id="w", role=WorkerRole.COLOCATED, queue="q", sent_at=time.time() + 30.0, kv_capacity_tokens=1, kv_free_tokens=1)


async def test_a_shed_request_is_a_429_with_retry_after(scripted: Callable[..., Awaitable[tuple[str, _FakeRouter]]]) -> None:
    async def shed(request: GenerateRequest, bus: object) -> None:
        await send(bus, request.reply_to, ErrorReply(request_id=request.request_id, code=ErrorCode.OVERLOADED, message="refused"))  # type: ignore[arg-type]

    url, _ = await scripted(shed)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi", "stream": True}) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "overloaded"


async def test_no_answer_in_time_is_a_504_and_the_request_is_cancelled(scripted: Callable[..., Awaitable[tuple[str, _FakeRouter]]]) -> None:
    async def silent(request: GenerateRequest, bus: object) -> None:
        return None

    url, fake = await scripted(silent, timeout_s=0.2)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi"}) as response:
            assert response.status == 504
            assert (await response.json())["error"]["type"] == "timeout"
    assert await asyncio.wait_for(fake.cancelled.get(), timeout=WAIT_S)


async def test_a_client_that_hangs_up_cancels_its_request(scripted: Callable[..., Awaitable[tuple[str, _FakeRouter]]]) -> None:
    async def one_token(request: GenerateRequest, bus: object) -> None:
        import time

        await send(bus, request.reply_to, TokenChunk(request_id=request.request_id, index=0, token_ids=[65], emitted_at=time.time()))  # type: ignore[arg-type]

    url, fake = await scripted(one_token)
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi", "stream": True, "max_tokens": 50})
        first = await asyncio.wait_for(response.content.readline(), timeout=WAIT_S)
        assert json.loads(first.removeprefix(b"data: "))["choices"][0]["text"] == "A"
        response.close()  # the client goes away mid-stream
    assert await asyncio.wait_for(fake.cancelled.get(), timeout=WAIT_S)


async def test_a_stream_that_stalls_ends_with_an_error_event(scripted: Callable[..., Awaitable[tuple[str, _FakeRouter]]]) -> None:
    async def one_token(request: GenerateRequest, bus: object) -> None:
        import time

        await send(bus, request.reply_to, TokenChunk(request_id=request.request_id, index=0, token_ids=[66], emitted_at=time.time()))  # type: ignore[arg-type]

    url, fake = await scripted(one_token, timeout_s=0.5)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi", "stream": True, "max_tokens": 50}) as response:
            assert response.status == 200
            events = [line.removeprefix(b"data: ").strip() async for line in response.content if line.startswith(b"data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "B"
    assert json.loads(events[1])["error"]["code"] == "timeout"
    assert events[2] == b"[DONE]"
    assert await asyncio.wait_for(fake.cancelled.get(), timeout=WAIT_S)


async def test_without_workers_the_gateway_answers_503() -> None:
    settings = Settings(broker_url="memory://", redis_url="memory://")
    broker = MemoryBroker()
    gateway = Gateway(await connect_bus(settings, broker=broker), MemoryStore(), settings, model_name="m", tokenizer=ByteTokenizer())
    async with running_gateway(gateway, "127.0.0.1", 0) as url, aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi"}) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "no_workers"


def test_a_gateway_bound_beyond_localhost_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TROPICAL_API_KEYS", raising=False)
    result = CliRunner().invoke(app, ["serve", "gateway", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "needs an API key" in result.output


# --- helpers ------------------------------------------------------------------------------------------


async def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _nothing_running(deployment: Deployment) -> bool:
    return all(not (w.state.running or w.state.waiting or w.state.prefills or w.state.incoming) for w in deployment.workers)


def test_the_main_job_answers_through_the_gateway_with_the_real_model() -> None:
    """What `scripts/run.sh` runs by default: SmolLM2 on the CPU behind the gateway, asked over HTTP."""
    result = CliRunner().invoke(
        app, ["up", "--engine", "smollm2", "--workers", "1", "--port", "0", "--prompt", "What is the capital of France?"]
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
