"""Every consumer of a deployment under random input: the router's `requests` queue, a worker's queue, the gateway's bodies.

An example is random bytes, a random msgpack map, a valid message with one
field (at any depth) replaced or removed, or a well-formed message with odd
values. Whatever arrives, the service answers and carries on: what cannot be
read, or is not for that queue, is dead-lettered into `<queue>.dead` and its
sender told why; a request it cannot serve gets an error reply, never
`internal`; over HTTP, bad input gets an OpenAI-shaped 4xx, never a 500. After
every example the deployment still serves a valid request. It runs in memory
with one worker, so every message reaches the consumer under test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from tests.helpers import eventually
from tests.messages import EXAMPLES
from tests.test_live_embedded import MODEL, engine
from tests.test_protocol import msgpack_values
from tropical.bus import Bus, Delivery, QueueSpec, dead_letter_queue
from tropical.engine.tokenizer import ByteTokenizer
from tropical.gateway.server import Gateway, running_gateway
from tropical.live.deployment import Deployment
from tropical.policies import Role
from tropical.protocol import (
    MESSAGE_TYPES,
    CancelRequest,
    Dispatch,
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    KvAck,
    KvHandoff,
    KvLayout,
    KvTransport,
    Message,
    ProtocolError,
    RequestFinished,
    SamplingParams,
    Slo,
    decode,
    encode,
    request_id_of,
)
from tropical.queues import requests_queue, worker_queue_spec
from tropical.settings import Settings

SETTINGS = Settings(broker_url="memory://", redis_url="memory://", namespace="fuzz")
WORKER = "worker-0"
MAX_MODEL_LEN = 256
WAIT_S = 10.0  # any one answer
EXAMPLE_ID = "example"  # the correlation id every example is sent with
SLO = Slo(ttft_ms=60_000, tpot_ms=10_000)
# One deployment serves every example of a test (that it keeps serving is the point). A failure is mostly a wait
# running out, which would make shrinking take minutes: the failing example is reported as found.
FUZZ = settings(
    max_examples=100, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- the deployment under test ------------------------------------------------------------------


@dataclass
class Served:
    """A one-worker deployment with its gateway, and a sender's connection with a reply queue and eyes on the dead letters."""

    deployment: Deployment
    bus: Bus
    replies: str
    url: str
    answers: list[Message] = field(default_factory=list)
    dead: dict[str, list[bytes]] = field(default_factory=dict)
    expected: list[int] = field(default_factory=list)

    @property
    def requests(self) -> str:
        return requests_queue(SETTINGS).name

    @property
    def worker(self) -> str:
        return worker_queue_spec(SETTINGS, WORKER).name

    async def on_reply(self, delivery: Delivery) -> None:
        self.answers.append(decode(delivery.body))

    async def send(self, queue: str, payload: bytes) -> None:
        """One example with the transport's reply address and correlation id set, as `messaging.send` sets them:
        even the refusal of a message that cannot be read comes back here, naming it."""
        self.answers.clear()
        self.dead[queue].clear()
        await self.bus.publish(queue, payload, reply_to=self.replies, correlation_id=EXAMPLE_ID)

    async def refused(self, queue: str, payload: bytes, code: ErrorCode, request_id: str | None) -> None:
        """Dead-lettered, and the sender told why."""
        await eventually(
            lambda: payload in self.dead[queue] and ErrorReply(request_id=request_id, code=code, message="") in self._errors(),
            WAIT_S, what=f"a {code} refusal of {request_id!r}, dead-lettered",
        )

    def _errors(self) -> list[ErrorReply]:
        """The error replies so far, without their text."""
        return [msgspec.structs.replace(a, message="") for a in self.answers if isinstance(a, ErrorReply)]

    async def end_of(self, request_id: str) -> RequestFinished | ErrorReply:
        """The message that ends a request's reply stream."""

        def end() -> RequestFinished | ErrorReply | None:
            return next((a for a in self.answers if isinstance(a, RequestFinished | ErrorReply) and a.request_id == request_id), None)

        await eventually(lambda: end() is not None, WAIT_S, what=f"the end of request {request_id!r}")
        found = end()
        assert found is not None
        return found

    async def served_or_refused(self, request_id: str) -> None:
        """A request is answered to its end: served, or refused with a reason that is never `internal`."""
        end = await self.end_of(request_id)
        event(f"answered: {end.code if isinstance(end, ErrorReply) else end.finish_reason}")
        assert not (isinstance(end, ErrorReply) and end.code is ErrorCode.INTERNAL), end

    async def probe(self) -> list[int]:
        async with await self.deployment.client() as client:
            return await asyncio.wait_for(client.complete([1, 2, 3], max_tokens=3, sampling=SamplingParams(ignore_eos=True), slo=SLO), WAIT_S)

    async def still_serves(self) -> None:
        assert await self.probe() == self.expected


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    deployment = Deployment("unified", (Role.MULTIPLEX,), engine, MODEL, SETTINGS, tokenizer=ByteTokenizer(), heartbeat_s=0.05)
    await deployment.start()
    try:
        bus, store = await deployment.connections()
        served = Served(deployment, bus, SETTINGS.queue("reply.fuzz"), "")
        await bus.declare_queue(QueueSpec.reply(served.replies))
        await bus.consume(served.replies, served.on_reply, auto_ack=True)
        for spec in (requests_queue(SETTINGS), worker_queue_spec(SETTINGS, WORKER)):
            await bus.declare_queue(spec)  # as its consumer declares it: whichever comes first
            letters = served.dead[spec.name] = []

            async def keep(delivery: Delivery, letters: list[bytes] = letters) -> None:
                letters.append(delivery.body)

            await bus.consume(dead_letter_queue(spec.name), keep)
        gateway = Gateway(bus, store, SETTINGS, model_name="tiny", tokenizer=ByteTokenizer(), max_model_len=MAX_MODEL_LEN)
        async with running_gateway(gateway, "127.0.0.1", 0) as url:
            served.url = url
            served.expected = await served.probe()
            yield served
    finally:
        await deployment.stop()


# --- messages: random, mutated, and well-formed with odd values ---------------------------------

token_ids = st.integers(0, 2**31 - 1) | st.integers(0, 299)
timestamps = st.builds(lambda offset: time.time() + offset, st.floats(-2, 2)) | st.floats(0, 4e9) | st.just(0.0)
positive = st.floats(min_value=1e-300, max_value=1e300) | st.floats(1, 120_000)


def generate_requests(reply_to: str) -> st.SearchStrategy[GenerateRequest]:
    """Requests that decode: within the schema, otherwise anything (too long, impossible SLOs, out of the vocabulary)."""
    sampling = st.builds(
        SamplingParams,
        temperature=st.floats(0, 100),
        top_p=st.floats(0, 1, exclude_min=True),
        top_k=st.integers(0, 2**64 - 1),
        seed=st.none() | st.integers(-(2**63), 2**64 - 1),
        stop_token_ids=st.lists(token_ids, max_size=3),
        ignore_eos=st.booleans(),
    )
    common = {
        "request_id": st.text(min_size=1, max_size=12),
        "max_tokens": st.integers(1, 8) | st.integers(1, 1 << 20),
        "sampling": sampling,
        "slo": st.none() | st.builds(Slo, ttft_ms=positive, tpot_ms=positive),
        "arrival_time": timestamps,
        "reply_to": st.just(reply_to),
        "generated_token_ids": st.just([]) | st.lists(token_ids, max_size=10),  # a resumed request's answer so far
    }
    prompts = st.lists(st.integers(0, 299), min_size=1, max_size=40) | st.lists(token_ids, min_size=1, max_size=300)
    return st.builds(GenerateRequest, prompt_token_ids=prompts, **common) | st.builds(
        GenerateRequest, prompt=st.text(min_size=1, max_size=40), **common
    )


def worker_messages(reply_to: str) -> st.SearchStrategy[Message]:
    ids = st.text(min_size=1, max_size=12)
    layout = st.builds(
        KvLayout, num_layers=st.integers(1, 4), num_kv_heads=st.integers(1, 4), head_dim=st.integers(1, 64),
        block_size=st.integers(1, 16), num_tokens=st.integers(1, 64), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    )
    requests = generate_requests(reply_to)
    return st.one_of(
        st.builds(Dispatch, request=requests, prefill_worker=ids | st.just(WORKER), decode_worker=ids | st.just(WORKER),
                  ttft_deadline=timestamps, dispatched_at=timestamps, routed_at=st.none() | timestamps),
        st.builds(KvHandoff, handoff_id=ids, request=requests, prompt_token_ids=st.lists(token_ids, min_size=1, max_size=64),
                  first_token_id=token_ids, first_token_time=timestamps, source_worker=ids | st.just(WORKER),
                  transport=st.sampled_from(KvTransport), handle=st.binary(max_size=40), layout=layout,
                  nbytes=st.integers(0, 2**40), lease_expires_at=timestamps),
        st.builds(KvAck, handoff_id=ids, request_id=ids, receiver=ids, ok=st.booleans(), error=st.text(max_size=20)),
        st.builds(CancelRequest, request_id=ids, reason=st.text(max_size=20), quiet=st.booleans()),
    )


def _paths(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a decoded msgpack tree that holds a value."""
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in children:
        yield (*path, key)
        yield from _paths(child, (*path, key))


def mutated(messages: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """A valid message with one field, at any depth, replaced by an arbitrary value or removed."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        tree = msgpack.unpackb(encode(draw(messages)))
        *parents, key = draw(st.sampled_from(list(_paths(tree))))
        parent = tree
        for step in parents:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(msgpack_values)
        return msgpack.packb(tree)

    return mutate()


random_maps = st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6) | st.fixed_dictionaries(
    {"v": st.just(1) | msgpack_values, "type": st.sampled_from(sorted(MESSAGE_TYPES))},
    optional={"request_id": st.text(max_size=5), "request": msgpack_values, "reply_to": msgpack_values},
)


def payloads(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        random_maps.map(msgpack.packb),
        mutated(valid | st.sampled_from(EXAMPLES)),
        valid.map(encode),
        st.sampled_from(EXAMPLES).map(encode),  # every type, most of them not for this queue
    )


# --- the router's requests consumer and a worker's queue consumer --------------------------------


async def check_consumer(served: Served, queue: str, payload: bytes) -> None:
    """Send one example to `queue` and wait for what the consumer must do with it."""
    await served.send(queue, payload)
    try:
        message = decode(payload, max_bytes=SETTINGS.max_message_bytes)
    except ProtocolError as exc:
        event(f"refused: {exc.code}")
        await served.refused(queue, payload, exc.code, EXAMPLE_ID)
        return
    takes = (GenerateRequest, CancelRequest) if queue == served.requests else (Dispatch, KvHandoff, KvAck, CancelRequest)
    if not isinstance(message, takes):
        event(f"refused: {ErrorCode.UNEXPECTED}")
        await served.refused(queue, payload, ErrorCode.UNEXPECTED, request_id_of(message))
        return
    request = message.request if isinstance(message, Dispatch | KvHandoff) else message
    if isinstance(request, GenerateRequest) and request.reply_to == served.replies:
        await served.served_or_refused(request.request_id)
    else:
        event(f"taken: {type(message).__name__}, no answer here")
    # A cancel, an ack, or a request whose answer goes elsewhere: nothing comes back here; still_serves shows nothing broke.


@FUZZ
@given(data=st.data())
async def test_the_routers_requests_consumer_answers_everything_and_keeps_serving(served: Served, data: st.DataObject) -> None:
    valid = generate_requests(served.replies) | st.builds(CancelRequest, request_id=st.text(min_size=1, max_size=12))
    await check_consumer(served, served.requests, data.draw(payloads(valid)))
    await served.still_serves()


async def test_a_request_no_worker_could_serve_in_slo_is_refused_and_holds_nobody_back(served: Served) -> None:
    """A TPOT below one lone decode step can never be met: the router refuses the request, as the simulator does at
    arrival, instead of letting it hold back every prompt behind it (the next request once came back refused)."""
    impossible = GenerateRequest(request_id="hopeless", prompt_token_ids=[244, 1, 276], max_tokens=6, slo=Slo(ttft_ms=1e300, tpot_ms=1e-16),
                                 arrival_time=0.0, reply_to=served.replies)
    await served.send(served.requests, encode(impossible))
    end = await served.end_of("hopeless")
    assert isinstance(end, ErrorReply) and end.code is ErrorCode.OVERLOADED
    await served.still_serves()


@FUZZ
@given(data=st.data())
async def test_a_workers_queue_consumer_answers_everything_and_keeps_serving(served: Served, data: st.DataObject) -> None:
    await check_consumer(served, served.worker, data.draw(payloads(worker_messages(served.replies))))
    await served.still_serves()


# --- the gateway's request bodies ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
small_ids = st.lists(st.integers(0, 299), min_size=0, max_size=6)
big = st.integers(2**31, 2**80) | st.integers(-(2**80), -(2**31))  # past what the wire's integers hold
COMMON_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(-1, 8) | st.integers() | big,
    "max_completion_tokens": st.integers(-1, 8),
    "temperature": st.floats(0, 2) | st.floats(-10, 10),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(-2, 50) | big,
    "seed": st.integers() | big,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 299) | big, max_size=3),
    "ignore_eos": st.booleans(),
    "n": st.integers(0, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.none() | st.integers(0, 2),
    "ttft_slo_ms": positive | st.floats(-1, 1),
    "tpot_slo_ms": positive | st.floats(-1, 1),
}
COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "prompt": st.text(max_size=20) | small_ids | st.lists(st.integers() | big, max_size=3) | st.lists(st.text(max_size=5) | small_ids, max_size=2),
    "echo": st.booleans(),
    "suffix": st.none() | st.text(max_size=3),
    "best_of": st.integers(0, 2),
}
content = st.none() | st.text(max_size=20) | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=8) | json_values}), max_size=2
)
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]), "content": content}), max_size=3
    ),
}
# What a request the deployment serves has: a short prompt, or one user message.
COMPLETION = {"model": st.just("tiny"), "prompt": st.text(min_size=1, max_size=12) | st.lists(st.integers(0, 299), min_size=1, max_size=6)}
CHAT = {"model": st.just("tiny"), "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=12)}), min_size=1, max_size=2)}


def bodies(path: str) -> st.SearchStrategy[bytes]:
    """Raw bytes, any JSON, or a request the endpoint serves with a few more of its fields, one of them maybe spoilt."""
    served, fields = (COMPLETION, COMPLETION_FIELDS) if path == "/v1/completions" else (CHAT, CHAT_FIELDS)

    @st.composite
    def shaped(draw: st.DrawFn) -> bytes:
        body = {name: draw(value) for name, value in served.items()}
        for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4)):
            body[name] = draw(fields[name])
        if draw(st.booleans()):
            spoilt = draw(st.sampled_from(sorted(body)))
            if draw(st.booleans()):
                body[spoilt] = draw(json_values)
            else:
                del body[spoilt]
        return json.dumps(body).encode()

    return st.one_of(st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode()), shaped())


async def post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.post(f"{url}{path}", data=body, headers=headers) as response:
        return response.status, await response.read()


@FUZZ
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    data=st.data(),
    ttft_header=st.none() | st.sampled_from(["250", "-1", "nan", "inf", "soon", "1e400"]),
)
async def test_the_gateway_answers_every_body_with_a_response_or_an_openai_error(
    served: Served, path: str, data: st.DataObject, ttft_header: str | None
) -> None:
    body = data.draw(bodies(path))
    headers = {"Content-Type": "application/json"} | ({} if ttft_header is None else {"x-slo-ttft-ms": ttft_header})
    status, raw = await post(served.url, path, body, headers)
    event(f"status {status}")
    if status == 200:
        streamed = raw.startswith(b"data: ")
        assert raw.endswith(b"data: [DONE]\n\n") if streamed else "choices" in json.loads(raw)
    else:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        # a 4xx for what the body asks; 429 or 504 when its SLO cannot be met; never a 500
        assert 400 <= status < 500 or (status == 504 and error["code"] == "timeout"), (status, error)
    status, raw = await post(served.url, "/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}', {})
    assert status == 200, raw
    await served.still_serves()
