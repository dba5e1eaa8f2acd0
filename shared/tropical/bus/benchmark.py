"""Bus round trips per second: a request out, a typed reply back, as a worker and a client do.

One echo worker serves a work queue; the client sends GenerateRequests and waits
for a TokenChunk for each on its reply queue. Unbatched, the client waits for each
reply before sending the next (latency-bound); batched, it publishes `batch`
requests in one pipelined call and waits for all their replies.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from tropical.bus import Bus, Delivery, QueueSpec
from tropical.protocol import GenerateRequest, Slo, TokenChunk, decode, encode


@dataclass(frozen=True)
class RoundTripResult:
    broker: str
    batch: int
    messages: int
    seconds: float
    round_trips_per_s: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _request(request_id: str, reply_to: str) -> bytes:
    return encode(
        GenerateRequest(
            request_id=request_id,
            prompt_token_ids=list(range(256)),
            max_tokens=128,
            slo=Slo(ttft_ms=500, tpot_ms=50),
            arrival_time=time.time(),
            reply_to=reply_to,
        )
    )


async def measure_round_trips(broker: str, connect: Callable[[], Awaitable[Bus]], *, messages: int, batch: int) -> RoundTripResult:
    """Round trips through a real worker/client pair on two connections of one broker."""
    worker, client = await connect(), await connect()
    work, replies = f"bench.work.{uuid.uuid4().hex[:8]}", f"bench.reply.{uuid.uuid4().hex[:8]}"
    try:
        await worker.declare_queue(QueueSpec(work, durable=False, dead_letter=False))
        await client.declare_queue(QueueSpec.reply(replies))

        async def echo(delivery: Delivery) -> None:
            request = decode(delivery.body)
            assert isinstance(request, GenerateRequest)
            chunk = TokenChunk(request_id=request.request_id, index=0, token_ids=[1, 2, 3, 4], emitted_at=time.time())
            await worker.publish(request.reply_to, encode(chunk))

        sent_at: dict[str, float] = {}
        latencies: list[float] = []
        waiters: dict[str, asyncio.Future[None]] = {}

        async def on_reply(delivery: Delivery) -> None:
            chunk = decode(delivery.body)
            assert isinstance(chunk, TokenChunk)
            latencies.append(time.perf_counter() - sent_at.pop(chunk.request_id))
            waiters.pop(chunk.request_id).set_result(None)

        await worker.consume(work, echo, prefetch=max(batch, 1) * 2)
        await client.consume(replies, on_reply, prefetch=max(batch, 1) * 2)
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for first in range(0, messages, batch):
            ids = [f"r{i}" for i in range(first, min(first + batch, messages))]
            replied = [waiters.setdefault(request_id, loop.create_future()) for request_id in ids]
            for request_id in ids:
                sent_at[request_id] = time.perf_counter()
            bodies = [_request(request_id, replies) for request_id in ids]
            if batch == 1:
                await client.publish(work, bodies[0])
            else:
                await client.publish_many(work, bodies)
            await asyncio.wait_for(asyncio.gather(*replied), 30)
        seconds = time.perf_counter() - start
    finally:
        await worker.delete_queue(work)
        await worker.close()
        await client.close()
    latencies.sort()
    return RoundTripResult(
        broker=broker,
        batch=batch,
        messages=messages,
        seconds=round(seconds, 4),
        round_trips_per_s=round(messages / seconds, 1),
        p50_ms=round(statistics.median(latencies) * 1e3, 3),
        p99_ms=round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3, 3),
    )
