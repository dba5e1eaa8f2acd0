"""A client in a few lines: publish a request onto the deployment's queue and iterate its tokens.

    async with Client(bus, settings) as client:
        async for chunk in client.generate([1, 2, 3], max_tokens=16):
            print(chunk.token_ids)
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
from tropical.protocol import CancelRequest, ErrorReply, GenerateRequest, Message, RequestFinished, SamplingParams, Slo, TokenChunk, decode
from tropical.queues import declare_requests_queue, reply_queue
from tropical.settings import Settings


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
        """Yield the request's token chunks in order; `finished[request_id]` holds its timings afterwards."""
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
            next_index = 0
            while True:
                message = await asyncio.wait_for(stream.get(), timeout=self.timeout_s)
                if isinstance(message, TokenChunk):
                    fresh = unseen(message, next_index)
                    if fresh is not None:
                        next_index = fresh.index + len(fresh.token_ids)
                        yield fresh
                elif isinstance(message, RequestFinished):
                    self.finished[request_id] = message
                    return
                elif isinstance(message, ErrorReply):
                    raise RequestFailed(message)
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

    A request the router placed again, after the worker that had begun it went
    silent, is generated again from its first token: what the client has
    already seen is not repeated.
    """
    skip = next_index - chunk.index
    if skip <= 0:
        return chunk
    if skip >= len(chunk.token_ids):
        return None
    return msgspec.structs.replace(chunk, index=next_index, token_ids=chunk.token_ids[skip:])
