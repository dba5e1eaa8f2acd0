"""Where a bench sends its requests: a deployment's queue through a bus client, or an OpenAI-compatible HTTP server.

Each target sends one request and measures its stream the same way; the
context managers open one (a deployment in this process, spawned processes, a
running deployment's queue, or a server at a base URL) and close it after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from tropical.bus import connect_bus
from tropical.gateway.openai_api import TPOT_HEADERS, TTFT_HEADERS
from tropical.live.bench.load import BenchRequest
from tropical.live.bench.measure import Measured, Seen, measured
from tropical.live.client import Client, RequestFailed
from tropical.protocol import SamplingParams
from tropical.settings import Settings

if TYPE_CHECKING:
    from tropical.live.deployment import Deployment
    from tropical.live.engines import EngineChoice
    from tropical.policies.records import Role

FORCED_LENGTH = SamplingParams(ignore_eos=True)


class Target(Protocol):
    """Where requests go: `measure` sends one at `arrival` (on the replay's clock `now`) and times its stream."""

    @property
    def backend(self) -> str: ...  # vLLM's word for the API spoken: openai, openai-chat; tropical for the bus

    @property
    def model_id(self) -> str | None: ...

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured: ...


@dataclass
class BusTarget:
    """A deployment's `requests` queue, through a bus client."""

    client: Client
    model_id: str | None = None
    backend: str = "tropical"

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured:
        request_id = f"bench-{self.client.name}-{index}"
        seen = Seen()
        error: str | None = None
        timed_out = False
        sent = now()
        try:
            async with asyncio.timeout(max(0.0, arrival + timeout_s - sent)):
                stream = self.client.generate(
                    list(request.prompt_token_ids), max_tokens=request.output_tokens, sampling=FORCED_LENGTH, slo=request.slo, request_id=request_id
                )
                async for chunk in stream:
                    if not seen.times:
                        seen.first_emitted = chunk.emitted_at
                    seen.content(now(), chunk.token_ids)
        except RequestFailed as failed:
            error = failed.reply.code.value
        except TimeoutError:
            timed_out = True
        finished = self.client.finished.pop(request_id, None)
        seen.timings = None if finished is None else finished.timings
        return measured(request_id, request, arrival, sent, seen, error=error, timed_out=timed_out)


class StreamError(ValueError):
    """An event stream this client cannot read."""


@dataclass
class HttpTarget:
    """An OpenAI-compatible server: streamed /v1/completions (token-id prompts) or /v1/chat/completions (word prompts)."""

    session: aiohttp.ClientSession
    base_url: str
    endpoint: str
    model_id: str
    api_key: str | None = None

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("/chat/completions")

    @property
    def backend(self) -> str:
        return "openai-chat" if self.chat else "openai"  # vLLM's names for these endpoints

    def body(self, request: BenchRequest) -> dict[str, Any]:
        common = {
            "model": self.model_id,
            "max_tokens": request.output_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            return {**common, "messages": [{"role": "user", "content": request.chat_text}]}
        return {**common, "prompt": list(request.prompt_token_ids)}

    def headers(self, request: BenchRequest) -> dict[str, str]:
        slo = request.slo
        headers = {TTFT_HEADERS[0]: f"{slo.ttft_ms:g}", TPOT_HEADERS[0]: f"{slo.tpot_ms:g}"}  # the names the gateway reads first
        return headers | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured:
        seen = Seen()
        error: str | None = None
        timed_out = False
        sent = now()
        try:
            async with asyncio.timeout(max(0.0, arrival + timeout_s - sent)):
                async with self.session.post(self.base_url + self.endpoint, json=self.body(request), headers=self.headers(request)) as response:
                    if response.status != 200:
                        error = f"http_{response.status}"
                    else:
                        async for data in sse_events(response.content):
                            seen.openai_chunk(now(), data)
                            if seen.error is not None:
                                break
        except TimeoutError:
            timed_out = True
        except aiohttp.ClientError:
            error = "connection_error"
        except StreamError:
            error = "bad_stream"
        return measured(f"bench-http-{index}", request, arrival, sent, seen, error=error, timed_out=timed_out)


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream's `data:` lines, up to `[DONE]`."""
    try:
        async for raw in content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[len(b"data:"):].strip()
            if payload == b"[DONE]":
                return
            data = json.loads(payload)
            if isinstance(data, dict):
                yield data
    except ValueError as exc:  # not JSON, or a line longer than the reader takes
        raise StreamError(str(exc)) from None


@contextlib.asynccontextmanager
async def embedded_target(deployment: Deployment, *, timeout_s: float = 300.0, model_id: str | None = None) -> AsyncIterator[BusTarget]:
    """Start the deployment, talk to it from a client in this process; drain it afterwards."""
    await deployment.start()
    try:
        async with await deployment.client() as client:
            client.timeout_s = timeout_s  # a request's own deadline bounds its stream; a long queue is no silence to give up on
            yield BusTarget(client, model_id)
    finally:
        await deployment.stop()


@contextlib.asynccontextmanager
async def remote_target(settings: Settings, *, timeout_s: float = 300.0, model_id: str | None = None) -> AsyncIterator[BusTarget]:
    """The running deployment whose `requests` queue the settings' broker holds."""
    bus = await connect_bus(settings)
    try:
        async with Client(bus, settings) as client:
            client.timeout_s = timeout_s
            yield BusTarget(client, model_id)
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def spawned_target(
    settings: Settings, policy: str, roles: Sequence[Role], engine: EngineChoice, *, timeout_s: float = 300.0
) -> AsyncIterator[BusTarget]:
    """Serve with the router and each worker a process of its own (`tropical serve`); drain them afterwards."""
    from tropical.live.spawn import spawned

    async with spawned(settings, policy, roles, engine), remote_target(settings, timeout_s=timeout_s, model_id=engine.source) as target:
        yield target


class ServerUnreachable(RuntimeError):
    """The server at --base-url could not be asked which model it serves."""


@contextlib.asynccontextmanager
async def http_target(
    base_url: str, *, endpoint: str = "/v1/completions", model: str | None = None, api_key: str | None = None
) -> AsyncIterator[HttpTarget]:
    """An HTTP session on the server; the model is the first that GET /v1/models lists unless named."""
    base = base_url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=0)  # no pool cap: requests wait for the server, never for a free connection
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield HttpTarget(session, base, endpoint, model or await served_model(session, base, api_key), api_key)


async def served_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    """The first id of GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with asyncio.timeout(timeout_s), session.get(f"{base_url}/v1/models", headers=headers) as response:
            if response.status != 200:
                raise ServerUnreachable(f"GET {base_url}/v1/models answered {response.status}")
            listed = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ServerUnreachable(f"GET {base_url}/v1/models failed: {exc or type(exc).__name__}") from None
    models = listed.get("data") if isinstance(listed, dict) else None
    if not models or not isinstance(models[0], dict) or not models[0].get("id"):
        raise ServerUnreachable(f"{base_url}/v1/models lists no model; give --model")
    return str(models[0]["id"])
