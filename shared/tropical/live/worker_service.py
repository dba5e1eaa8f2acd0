"""A live worker: the core's state of one worker, its engine, and the bus around them.

One class serves every role (prefill, decode, multiplex, colocated): the role
only changes what the policy plans and where a finished prompt goes. Messages
arrive on the worker's own queue (`dispatch`, `kv_handoff`, `cancel`); each
engine step runs off the event loop, so heartbeats and messages keep flowing
while it computes; tokens stream to the request's reply queue as steps end,
several per message when steps are fast; a heartbeat carries the worker's whole
view (`tropical.core.status`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tropical.bus import Bus, Delivery, QueueSpec, Unroutable
from tropical.core.actions import Abandoned, Action
from tropical.core.request import RequestState
from tropical.core.status import RequestIds, status_of
from tropical.core.worker import WorkerState
from tropical.engine.plan import StepResult
from tropical.engine.serving import ServingEngine
from tropical.latency.model import LatencyModel
from tropical.live.engine_worker import EngineWorker
from tropical.messaging import MessageConsumer, send
from tropical.policies.records import Role
from tropical.policies.serving import ServingPolicy
from tropical.protocol import (
    CancelRequest,
    Dispatch,
    ErrorCode,
    ErrorReply,
    FinishReason,
    GenerateRequest,
    RequestFinished,
    Timings,
    TokenChunk,
)
from tropical.settings import Settings
from tropical.store import Store

log = logging.getLogger(__name__)

ROUNDING_SEQUENCES = 64


def worker_queue(settings: Settings, name: str) -> str:
    """Where the router and other workers reach worker `name`."""
    return settings.queue(f"worker.{name}")


@dataclass
class _Stream:
    """One request's reply stream on this worker."""

    request: GenerateRequest
    job: RequestState
    dispatched_at: float
    sent: int = 0  # output tokens already sent
    pending: list[int] = field(default_factory=list)


class WorkerService:
    """Serves one worker until stopped; `run()` returns after a drain."""

    def __init__(
        self,
        name: str,
        role: Role,
        engine: ServingEngine,
        policy: ServingPolicy,
        model: LatencyModel,
        bus: Bus,
        store: Store,
        settings: Settings,
        *,
        heartbeat_s: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.bus = bus
        self.store = store
        self.settings = settings
        self.policy = policy
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.queue = worker_queue(settings, name)
        self.names = RequestIds()
        self._out: list[Action] = []
        # the core counts tokens, the engine whole blocks: keep a block per sequence in hand for the rounding
        capacity = max(engine.kv_block_size, engine.kv_capacity_tokens - engine.kv_block_size * ROUNDING_SEQUENCES)
        self.state = WorkerState(0, role, capacity, model, self._out, spans=False)
        self.engine = EngineWorker(self.state, engine, self.names)
        self._streams: dict[str, _Stream] = {}
        self._accepted: list[int] = []
        self._tokens = itertools.count(1)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._consumer: MessageConsumer | None = None
        self.steps = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        await self.bus.declare_queue(QueueSpec(self.queue))
        self._consumer = MessageConsumer(
            self.bus, self.queue, {Dispatch: self._on_dispatch, CancelRequest: self._on_cancel}, max_message_bytes=self.settings.max_message_bytes
        )
        await self.publish_status()
        await self._consumer.start(prefetch=self.settings.prefetch)
        heartbeat = asyncio.create_task(self._heartbeats())
        try:
            await self._step_loop()
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self.store.remove_worker_status(self.name)

    async def stop(self) -> None:
        """Drain: take no new work, finish what is held, then return from `run`."""
        if self._consumer is not None:
            await self._consumer.stop()
        self._stopping.set()
        self._wake.set()

    async def publish_status(self) -> None:
        accepted, self._accepted = self._accepted, []
        status = status_of(
            self.state, self.clock(), worker_id=self.name, queue=self.queue, names=self.names, accepted=accepted,
            draining=self._stopping.is_set(),
        )
        await asyncio.wait_for(self.store.put_worker_status(status, ttl_s=self.settings.status_ttl_s), timeout=self.settings.status_ttl_s)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.publish_status()
            except (TimeoutError, ConnectionError) as exc:
                log.warning("worker %s could not publish its status: %s", self.name, exc)

    # --- messages -------------------------------------------------------------------------

    async def _on_dispatch(self, dispatch: Dispatch, delivery: Delivery) -> None:
        request = dispatch.request
        if request.request_id in self._streams:
            return  # a redelivered dispatch: it is here already
        prompt = list(request.prompt_token_ids or [])
        slo = request.slo
        ttft = (slo.ttft_ms if slo else self.settings.default_ttft_slo_ms) / 1000.0
        tpot = (slo.tpot_ms if slo else self.settings.default_tpot_slo_ms) / 1000.0
        job = RequestState(self.names.id_of(request.request_id), request.arrival_time, len(prompt), request.max_tokens, ttft, tpot)
        try:
            self.engine.add(job, prompt, request.sampling, request.max_tokens)
        except ValueError as exc:
            await self._error(request, ErrorCode.INVALID, str(exc))
            return
        self._streams[request.request_id] = _Stream(request, job, dispatch.dispatched_at)
        self.state.place(job, self.clock())
        self._accepted.append(job.id)
        self._wake.set()

    async def _on_cancel(self, cancel: CancelRequest, delivery: Delivery) -> None:
        stream = self._streams.get(cancel.request_id)
        if stream is None:
            return
        job = self.engine.jobs.get(cancel.request_id)
        if job is not None and job.finish is None and not (self.state.busy and self._in_step(job)):
            self.state.stop(job, self.clock())
            self.engine.engine.abort(cancel.request_id)
            del self.engine.jobs[cancel.request_id]
            await self._finish(stream, FinishReason.CANCELLED)
        self._wake.set()

    def _in_step(self, job: RequestState) -> bool:
        return job.id in self.state.running or any(j is job for j, _ in self.state.span_chunks)

    # --- steps ------------------------------------------------------------------------------

    async def _step_loop(self) -> None:
        while True:
            ran = await self._step_once()
            if ran:
                continue
            if self._stopping.is_set() and not self._streams:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.heartbeat_s)
            except TimeoutError:
                pass
            self.state.needs_plan = True

    async def _step_once(self) -> bool:
        state = self.state
        if state.busy or not state.needs_plan:
            return False
        state.needs_plan = False
        state.start_step(self.policy, self._tokens.__next__, self.clock())
        actions, self._out[:] = list(self._out), []
        plan = self.engine.plan(actions)
        for action in actions:
            if isinstance(action, Abandoned):
                stream = self._streams.pop(self.names.name_of(action.request), None)
                if stream is not None:
                    await self._error(stream.request, ErrorCode.TIMEOUT, "abandoned: it could no longer meet its SLO")
        if not state.busy:
            return False
        result: StepResult = await asyncio.to_thread(self.engine.run, plan)
        self.steps += 1
        self.engine.end(result, self.clock())
        await self._stream(result)
        return True

    async def _stream(self, result: StepResult) -> None:
        for output in result.outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.pending.extend(output.new_token_ids)
            if output.finished:
                await self._flush(stream)
                await self._finish(stream, output.finish_reason or FinishReason.LENGTH)
        for stream in list(self._streams.values()):
            if stream.pending:
                await self._flush(stream)

    async def _flush(self, stream: _Stream) -> None:
        tokens, stream.pending = stream.pending, []
        message = TokenChunk(request_id=stream.request.request_id, index=stream.sent, token_ids=tokens, emitted_at=self.clock())
        stream.sent += len(tokens)
        await self._reply(stream.request, message)

    async def _finish(self, stream: _Stream, reason: FinishReason) -> None:
        request, job = stream.request, stream.job
        self._streams.pop(request.request_id, None)
        timings = Timings(
            arrival=request.arrival_time,
            dispatched=stream.dispatched_at,
            prefill_start=job.prefill_start,
            first_token=job.first_token,
            kv_transferred=job.kv_ready,
            finished=job.finish if job.finish is not None else self.clock(),
        )
        finished = RequestFinished(
            request_id=request.request_id,
            finish_reason=reason,
            num_prompt_tokens=job.prompt,
            num_output_tokens=stream.sent,
            timings=timings,
        )
        await self._reply(request, finished)

    async def _error(self, request: GenerateRequest, code: ErrorCode, text: str) -> None:
        await self._reply(request, ErrorReply(request_id=request.request_id, code=code, message=text))

    async def _reply(self, request: GenerateRequest, message: TokenChunk | RequestFinished | ErrorReply) -> None:
        try:
            await send(self.bus, request.reply_to, message)
        except Unroutable:
            log.info("request %s: its reply queue is gone", request.request_id)
