"""The HTTP gateway: OpenAI's API in front of the deployment's `requests` queue.

Each HTTP request becomes one `generate` message published as any client
publishes it (`tropical.live.client.Client`), and its reply stream becomes the
HTTP response: Server-Sent Events when asked to stream, one JSON body
otherwise. The response starts only when the first token (or an error) has
come back, so a request the router sheds gets its 429 rather than a stream
that breaks. A client that hangs up cancels its request, so the workers free
its KV. aiohttp serves it: an asyncio-native server and client in one
maintained library, with handler cancellation on disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tropical.bus import Bus
from tropical.engine.tokenizer import Tokenizer
from tropical.gateway.openai_api import (
    DEFAULT_CHAT_TOKENS,
    ApiError,
    ChatBody,
    CompletionBody,
    Generation,
    Reply,
    bad_request,
    chat_request,
    completion_request,
    models_list,
    parse_body,
)
from tropical.gateway.text import TextStream
from tropical.live.client import Client, RequestFailed
from tropical.protocol import ErrorCode, FinishReason, RequestFinished, TokenChunk
from tropical.settings import Settings
from tropical.store import Store
from tropical.telemetry import Telemetry

log = logging.getLogger(__name__)

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RETRY_AFTER_S = 1  # what a shed request is told to wait: the router decides again on every arrival
CANCEL_TIMEOUT_S = 5.0
WORKERS_FRESH_S = 0.5  # how long a count of live workers is reused before the store is read again
IO_TIMEOUT_S = 30.0  # reading a body, or writing one piece to a client that stopped reading: then it is gone

# How each error reply of the deployment reads over HTTP: status, OpenAI's error type.
_ERROR_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.OVERLOADED: (429, "rate_limit_exceeded"),
    ErrorCode.TIMEOUT: (504, "timeout"),
    ErrorCode.WORKER_LOST: (503, "server_error"),
    ErrorCode.KV_TRANSFER_FAILED: (503, "server_error"),
    ErrorCode.CANCELLED: (499, "cancelled"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


@dataclass
class _Outcome:
    """What the gateway saw of one request, for its metrics."""

    request_id: str
    arrival: float
    prompt_tokens: int = 0
    first_token: float | None = None
    finished: RequestFinished | None = None
    output_tokens: int = 0
    label: str = "error"
    response: web.StreamResponse | None = None  # once a stream has begun, errors go into it


class Gateway:
    """Serves OpenAI's completions and chat completions for one model on the deployment behind `bus` and `store`."""

    def __init__(
        self,
        bus: Bus,
        store: Store,
        settings: Settings,
        *,
        model_name: str,
        tokenizer: Tokenizer | None,
        telemetry: Telemetry | None = None,
        api_keys: frozenset[str] = frozenset(),
        request_timeout_s: float = 300.0,
        max_model_len: int | None = None,
    ) -> None:
        """`api_keys` adds to the settings' (`TROPICAL_API_KEYS`); with none at all, no key is needed."""
        self.bus = bus
        self.store = store
        self.settings = settings
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.telemetry = telemetry or Telemetry()
        self.api_keys = api_keys | settings.api_key_set()
        self.request_timeout_s = request_timeout_s
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self._client: Client | None = None
        self._workers: tuple[float, int] = (-float("inf"), 0)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.settings.max_message_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> None:
        self._client = Client(self.bus, self.settings, timeout_s=self.request_timeout_s)
        await asyncio.wait_for(self._client.__aenter__(), timeout=self.settings.status_ttl_s)

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.wait_for(self._client.__aexit__(None, None, None), timeout=self.settings.status_ttl_s)
            self._client = None

    # --- endpoints ---------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response(models_list(self.model_name, self.created))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name, "workers": await self._live_workers()})

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.telemetry.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        body = parse_body(await _body(request), CompletionBody)
        self._check_model(body.model)
        return await self._serve(request, completion_request(body, request.headers), chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        body = parse_body(await _body(request), ChatBody)
        self._check_model(body.model)
        template = getattr(self.tokenizer, "apply_chat_template", None)
        return await self._serve(request, chat_request(body, request.headers, template), chat=True)

    # --- one request ---------------------------------------------------------------------------

    async def _serve(self, http: web.Request, generation: Generation, chat: bool) -> web.StreamResponse:
        prompt = self._prompt_ids(generation.prompt)
        max_tokens = self._max_tokens(generation.max_tokens, len(prompt))
        if await self._live_workers() == 0:
            raise ApiError(503, "no workers are serving: try again once one has started", type="server_error", code="no_workers")
        assert self._client is not None, "the gateway is not started"
        request_id = uuid.uuid4().hex
        reply = Reply.new(request_id, chat, self.model_name)
        slo = generation.slo(self.settings.default_ttft_slo_ms, self.settings.default_tpot_slo_ms)
        seen = _Outcome(request_id, arrival=time.time(), prompt_tokens=len(prompt))
        chunks = self._client.generate(prompt, max_tokens=max_tokens, sampling=generation.sampling, slo=slo, request_id=request_id)
        text = TextStream(self.tokenizer, generation.stop)
        self.telemetry.gateway_in_flight(1)
        try:
            async with asyncio.timeout(self.request_timeout_s):
                first = await self._first(chunks, seen)
                if generation.stream:
                    return await self._stream(http, reply, generation, first, chunks, text, seen)
                return await self._whole(reply, first, chunks, text, seen)
        except TimeoutError:
            seen.label = "timeout"
            late = ApiError(504, f"no answer within {self.request_timeout_s:g} s", type="timeout", code="timeout")
            if seen.response is None:
                raise late from None
            with suppress(ConnectionResetError, TimeoutError):  # the stream had begun: it ends with the error
                await _event(seen.response, late.body())
                await _write(seen.response, b"data: [DONE]\n\n")
            return seen.response
        except RequestFailed as exc:
            seen.label = "refused" if exc.reply.code is ErrorCode.OVERLOADED else "error"
            raise _api_error(exc) from None
        except (asyncio.CancelledError, ConnectionResetError):
            seen.label = "cancelled"
            raise
        finally:
            self.telemetry.gateway_in_flight(-1)
            await chunks.aclose()
            if seen.finished is None and seen.label != "refused":
                await self._cancel(request_id)
            self._client.finished.pop(request_id, None)
            self._record(seen, slo.ttft_ms / 1000.0, slo.tpot_ms / 1000.0)

    async def _first(self, chunks: AsyncIterator[TokenChunk], seen: _Outcome) -> TokenChunk | None:
        """The first chunk (None: the request finished without a token)."""
        first = await anext(chunks, None)
        if first is not None:
            seen.first_token = time.time()
            seen.output_tokens = len(first.token_ids)
        return first

    async def _stream(
        self, http: web.Request, reply: Reply, generation: Generation, first: TokenChunk | None,
        chunks: AsyncIterator[TokenChunk], text: TextStream, seen: _Outcome,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": reply.id})
        await asyncio.wait_for(response.prepare(http), timeout=IO_TIMEOUT_S)
        seen.response = response
        opening = True
        pending = first
        while pending is not None:
            piece = text.add(pending.token_ids)
            if text.stopped:
                break
            await _event(response, reply.chunk(piece, pending.token_ids, first=opening))
            opening = False
            pending = await anext(chunks, None)
            if pending is not None:
                seen.output_tokens += len(pending.token_ids)
        finish = self._finished(seen, text)
        tail = piece if text.stopped else text.finish()
        await _event(response, reply.chunk(tail, pending.token_ids if text.stopped and pending else [], first=opening,
                                           finish_reason=finish, timings=seen.finished.timings if seen.finished else None))
        if generation.include_usage:
            await _event(response, reply.usage_chunk(seen.prompt_tokens, seen.output_tokens))
        await _write(response, b"data: [DONE]\n\n")
        await asyncio.wait_for(response.write_eof(), timeout=IO_TIMEOUT_S)
        return response

    async def _whole(self, reply: Reply, first: TokenChunk | None, chunks: AsyncIterator[TokenChunk], text: TextStream,
                     seen: _Outcome) -> web.Response:
        pending = first
        while pending is not None and not text.stopped:
            text.add(pending.token_ids)
            pending = await anext(chunks, None)
            if pending is not None:
                seen.output_tokens += len(pending.token_ids)
        finish = self._finished(seen, text)
        text.finish()
        body = reply.whole(text.text, text.token_ids, finish, seen.prompt_tokens, seen.finished.timings if seen.finished else None)
        return web.json_response(body, headers={"X-Request-Id": reply.id})

    def _finished(self, seen: _Outcome, text: TextStream) -> str:
        """The finish reason, once the stream has ended or a stop string ended it here."""
        assert self._client is not None
        if text.stopped:
            seen.label = "finished_stop"
            return "stop"
        seen.finished = self._client.finished.get(seen.request_id)
        reason = seen.finished.finish_reason if seen.finished else FinishReason.STOP
        seen.label = f"finished_{reason.value}" if reason is not FinishReason.CANCELLED else "cancelled"
        return "length" if reason is FinishReason.LENGTH else "stop"

    # --- checks ---------------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        if not self.api_keys:
            return
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip(), k) for k in self.api_keys):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", type="authentication_error", code="invalid_api_key")

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this gateway serves {self.model_name!r}", param="model", code="model_not_found")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this model takes prompts as token ids (it has no tokenizer)", "prompt")
            prompt = self.tokenizer.encode(prompt)
        elif self.tokenizer is not None and max(prompt) >= self.tokenizer.vocab_size:
            raise bad_request(f"token id {max(prompt)} is outside the vocabulary of {self.tokenizer.vocab_size}", "prompt")
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        return prompt

    def _max_tokens(self, asked: int | None, prompt_tokens: int) -> int:
        room = None if self.max_model_len is None else self.max_model_len - prompt_tokens
        if room is not None and room < 1:
            raise bad_request(f"the prompt ({prompt_tokens} tokens) fills the model's context of {self.max_model_len}", "prompt")
        if asked is None:
            return DEFAULT_CHAT_TOKENS if room is None else min(DEFAULT_CHAT_TOKENS, room)
        if room is not None and asked > room:
            raise bad_request(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({asked}) exceeds the model's context of {self.max_model_len}", "max_tokens"
            )
        return asked

    async def _live_workers(self) -> int:
        """Workers with a fresh heartbeat that take work (read from the store at most every WORKERS_FRESH_S)."""
        now = time.time()
        read_at, count = self._workers
        if now - read_at > WORKERS_FRESH_S:
            statuses = await asyncio.wait_for(self.store.list_worker_statuses(), timeout=self.settings.status_ttl_s)
            count = sum(1 for s in statuses if not s.draining and now - s.sent_at <= self.settings.status_ttl_s)
            self._workers = (now, count)
        return count

    async def _cancel(self, request_id: str) -> None:
        """Tell the deployment a request's answer is no longer wanted (its workers free its KV)."""
        assert self._client is not None
        try:
            await asyncio.shield(asyncio.wait_for(self._client.cancel(request_id, "the client went away"), timeout=CANCEL_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - a cancel that cannot be sent is logged, the request still ends
            log.warning("could not cancel %s: %s", request_id, exc)

    def _record(self, seen: _Outcome, ttft_slo_s: float, tpot_slo_s: float) -> None:
        done = seen.finished
        self.telemetry.request_done(
            "gateway", seen.label, arrival=seen.arrival, first_token=seen.first_token,
            finished=time.time() if seen.label.startswith("finished") else None,
            output_tokens=seen.output_tokens, prompt_tokens=seen.prompt_tokens,
            ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s, timings=done.timings if done else None,
        )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every error as OpenAI shapes it; counted when it never reached the deployment."""
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status in (400, 401, 404):
                label = {400: "bad_request", 401: "unauthorized", 404: "bad_request"}[exc.status]
                self.telemetry.request_done("gateway", label, arrival=time.time(), first_token=None, finished=None, output_tokens=0,
                                            prompt_tokens=0, ttft_slo_s=None, tpot_slo_s=None)
            headers = {} if exc.retry_after_s is None else {"Retry-After": f"{exc.retry_after_s:g}"}
            return web.json_response(exc.body(), status=exc.status, headers=headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.json_response(ApiError(exc.status, exc.reason).body(), status=exc.status)


def _api_error(failed: RequestFailed) -> ApiError:
    code = failed.reply.code
    status, kind = _ERROR_STATUS.get(code, (400, "invalid_request_error"))
    return ApiError(status, failed.reply.message, type=kind, code=code.value, retry_after_s=RETRY_AFTER_S if status == 429 else None)


async def _body(request: web.Request) -> bytes:
    try:
        return await asyncio.wait_for(request.read(), timeout=IO_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {IO_TIMEOUT_S:g} s", code="timeout") from None


async def _event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await _write(response, b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """One piece of a stream; a client that has not taken it within IO_TIMEOUT_S has gone (its request is cancelled)."""
    try:
        await asyncio.wait_for(response.write(data), timeout=IO_TIMEOUT_S)
    except TimeoutError:
        raise ConnectionResetError("the client stopped reading") from None


def check_binding(host: str, api_keys: frozenset[str]) -> None:
    """A gateway reachable beyond this machine must ask for a key: ValueError otherwise."""
    if host not in LOCAL_HOSTS and not api_keys:
        raise ValueError(f"a gateway bound to {host} needs an API key: set TROPICAL_API_KEYS or give --api-key")


@asynccontextmanager
async def running_gateway(gateway: Gateway, host: str = "127.0.0.1", port: int = 8000) -> AsyncIterator[str]:
    """Serve `gateway` on host:port until the block ends; yields its base URL (the real port when 0 was asked)."""
    check_binding(host, gateway.api_keys)
    await gateway.start()
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = "127.0.0.1" if host in ("0.0.0.0", "localhost") else f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}"
        log.info("gateway serving %s at %s", gateway.model_name, url)
        yield url
    finally:
        await runner.cleanup()
        with suppress(TimeoutError):
            await gateway.close()


async def serve_gateway(
    settings: Settings,
    *,
    model_name: str,
    tokenizer: Tokenizer | None,
    host: str,
    port: int,
    api_keys: frozenset[str] = frozenset(),
    request_timeout_s: float = 300.0,
    max_model_len: int | None = None,
) -> None:
    """The gateway as its own service, on the deployment's broker and store, until SIGTERM or SIGINT."""
    from tropical.bus import connect_bus
    from tropical.live.run import until_signalled
    from tropical.store import open_store

    check_binding(host, api_keys | settings.api_key_set())
    bus = await connect_bus(settings)
    store = open_store(settings)
    try:
        gateway = Gateway(bus, store, settings, model_name=model_name, tokenizer=tokenizer, api_keys=api_keys,
                          request_timeout_s=request_timeout_s, max_model_len=max_model_len)
        done = asyncio.Event()

        async def stop() -> None:
            done.set()

        async with running_gateway(gateway, host, port):
            await until_signalled(stop)
            await done.wait()
    finally:
        await bus.close()
        await store.close()
