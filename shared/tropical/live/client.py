"""A client in a few lines: publish a request onto the deployment's queue and iterate its tokens.

    async with Client(bus, settings) as client:
        async for chunk in client.generate([1, 2, 3], max_tokens=16):
            print(chunk.token_ids)

A request whose worker is lost mid-answer (`worker_lost`, `kv_transfer_failed`)
is published again, up to `MAX_RESUMES` times, with the tokens already yielded
as its `generated_token_ids`: the deployment continues the answer after them,
and the stream goes on with no token repeated or skipped (a greedy or seeded
answer is the one an undisturbed run gives).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Self

import msgspec

from tropical.bus import Bus, Delivery, Subscription
from tropical.messaging import send
from tropical.protocol import (
    CancelRequest,
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    Message,
    RequestFinished,
    SamplingParams,
    Slo,
    TokenChunk,
    decode,
)
from tropical.queues import declare_requests_queue, reply_queue
from tropical.settings import Settings

MAX_RESUMES = 3  # times one request is resumed after losing its worker before its error is raised
RESUMABLE = frozenset({ErrorCode.WORKER_LOST, ErrorCode.KV_TRANSFER_FAILED})  # lost with a worker, not refused: it can go on elsewhere


class RequestFailed(RuntimeError):
    """The deployment answered a request with an error reply."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class Client:
    def __init__(self, bus: Bus, settings: Settings, *, timeout_s: float = 60.0) -> None:
        """`timeout_s` bounds the wait for each message of a stream."""
        self.bus = bus
        self.settings = settings
        self.timeout_s = timeout_s
        self.name = uuid.uuid4().hex[:12]
        self.reply_to = reply_queue(settings, self.name).name
        self._streams: dict[str, asyncio.Queue[Message]] = {}
        self._ids = itertools.count()
        self._subscription: Subscription | None = None
        self.finished: dict[str, RequestFinished] = {}
        self.resumes = 0  # requests published again after losing their worker, over this client's life

    async def __aenter__(self) -> Self:
        await self.bus.declare_queue(reply_queue(self.settings, self.name))
        self._requests = await declare_requests_queue(self.bus, self.settings)
        self._subscription = await self.bus.consume(self.reply_to, self._on_reply, prefetch=1024, auto_ack=True)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
        await self.bus.delete_queue(self.reply_to)

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        slo: Slo | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[TokenChunk]:
        """Yield the request's token chunks in order; `finished[request_id]` holds its timings afterwards (a resumed
        request's are its last placement's; its token counts are the whole answer's).

        A lost worker's request is resumed where it stopped (see the module's
        docstring); the error is raised when it cannot be, or after `MAX_RESUMES`.
        """
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        request = GenerateRequest(
            request_id=request_id, prompt=text, prompt_token_ids=ids, max_tokens=max_tokens, sampling=sampling,
            slo=slo, arrival_time=time.time(), reply_to=self.reply_to,
        )
        stream: asyncio.Queue[Message] = asyncio.Queue()
        self._streams[request_id] = stream
        try:
            await send(self.bus, self._requests, request)
            yielded: list[int] = []  # the answer so far: what a resumed request continues after
            resumes = 0
            while True:
                message = await asyncio.wait_for(stream.get(), timeout=self.timeout_s)
                if isinstance(message, TokenChunk):
                    fresh = unseen(message, len(yielded))
                    if fresh is not None:
                        yielded.extend(fresh.token_ids)
                        yield fresh
                elif isinstance(message, RequestFinished):
                    self.finished[request_id] = message
                    if resumes:  # another placement of it may still run (the error was about one that then went on): it stops
                        await send(self.bus, self._requests, CancelRequest(request_id=request_id, reason="answered", quiet=True))
                    return
                elif isinstance(message, ErrorReply):
                    if message.code not in RESUMABLE or resumes >= MAX_RESUMES:
                        raise RequestFailed(message)
                    resumes += 1
                    self.resumes += 1
                    request = msgspec.structs.replace(request, arrival_time=time.time(), generated_token_ids=list(yielded))
                    await send(self.bus, self._requests, request)
        finally:
            del self._streams[request_id]

    async def cancel(self, request_id: str, reason: str = "") -> None:
        """Stop a request: its stream ends with `finished` (reason `cancelled`), or an error if it was still queued."""
        await send(self.bus, self._requests, CancelRequest(request_id=request_id, reason=reason))

    async def complete(self, prompt: str | Sequence[int], **options: object) -> list[int]:
        """All of a request's output tokens at once."""
        tokens: list[int] = []
        async for chunk in self.generate(prompt, **options):  # type: ignore[arg-type]
            tokens.extend(chunk.token_ids)
        return tokens

    async def _on_reply(self, delivery: Delivery) -> None:
        message = decode(delivery.body, max_bytes=self.settings.max_message_bytes)
        stream = self._streams.get(getattr(message, "request_id", None) or "")
        if stream is not None:
            stream.put_nowait(message)


def unseen(chunk: TokenChunk, next_index: int) -> TokenChunk | None:
    """The part of `chunk` from output position `next_index` on (None: all of it was yielded already).

    A request placed again or resumed may be answered at the same positions
    twice (the worker that went silent had sent them after all): what the
    client has already seen is not repeated.
    """
    skip = next_index - chunk.index
    if skip <= 0:
        return chunk
    if skip >= len(chunk.token_ids):
        return None
    return msgspec.structs.replace(chunk, index=next_index, token_ids=chunk.token_ids[skip:])
