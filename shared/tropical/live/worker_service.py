"""A live worker: the core's state of one worker, its engine, and the bus around them.

One class serves every role (prefill, decode, multiplex, colocated): the role
only changes what the policy plans and where a finished prompt goes. Messages
arrive on the worker's own queue (`dispatch`, `kv_handoff`, `kv_ack`,
`cancel`) and wait in an inbox; the step loop applies them between steps, so
only the loop touches the engine and the core while a step runs off the event
loop in a thread. Tokens stream to the request's reply queue as steps end,
several per message when steps are fast; a heartbeat carries the worker's whole
view (`tropical.core.status`).

A prefill worker's finished prompt goes to the decoding worker the policy
picks (on the workers' heartbeats); its KV is offered through a KV transport
and leased until the receiver acks. A decoding worker pulls the KV when the
core says it has room, imports it, and acks.

A request resumed after its worker was lost carries the answer so far
(`generated_token_ids`): it is prefilled as prompt + those tokens, and its
tokens are numbered on from them; a KV lease that runs out unacked tells the
client `kv_transfer_failed`, so it resumes the request too.

Its metrics (`telemetry`): how each request it ends here ended, each step's
time against the latency model's prediction, the KV it hands on or pulls, and
its load whenever it publishes its status.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from tropical.bus import Bus, Delivery, Unroutable
from tropical.core.actions import Abandoned, Action, TransferStarted
from tropical.core.request import RequestState
from tropical.core.status import RequestIds, status_of, view_of
from tropical.core.worker import WorkerState
from tropical.engine.kv_transfer import KvExport
from tropical.engine.plan import StepResult
from tropical.engine.serving import ServingEngine
from tropical.kv.base import KvError, Transport
from tropical.latency.model import LatencyModel
from tropical.live.engine_worker import EngineWorker
from tropical.live.model_feed import LatencyModelFeed
from tropical.live.policy import live_policy
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
    KvAck,
    KvHandoff,
    Message,
    RequestFinished,
    Timings,
    TokenChunk,
    encode,
)
from tropical.queues import worker_queue, worker_queue_spec
from tropical.settings import Settings
from tropical.store import UNAVAILABLE, Store
from tropical.telemetry import Telemetry, error_outcome, finish_outcome

log = logging.getLogger(__name__)

ROUNDING_SEQUENCES = 64  # the core counts KV in tokens, the engine in blocks: a block per sequence is kept in hand
KV_LEASE_S = 30.0  # how long a prefill worker keeps a handed-off KV for its receiver
KV_FETCH_TIMEOUT_S = 10.0
ACCEPTED_WINDOW_S = 1.0  # a request taken stays in this long of heartbeats: a router that misses one still sees it
HANDED_TO_REMEMBERED = 10_000  # handed-off requests a cancel can still be forwarded for
STALE_AFTER_S = 1.0  # a worker silent this long is handed no prompt's KV (the router places nothing on it either)
REPLY_GRACE_S = 15.0  # a reply queue missing this long means its client has gone (a broker restart hides one for seconds)
BATCHES_IN_FLIGHT = 8  # steps' replies waiting on the broker before the step loop waits for it too


@dataclass
class _Stream:
    """One request's reply stream on this worker."""

    request: GenerateRequest
    job: RequestState
    dispatched_at: float | None
    routed_at: float | None = None
    taken_at: float | None = None
    sent: int = 0  # output positions sent: a resumed answer's earlier tokens, and the prefill worker's first one after a handoff
    pending: list[int] = field(default_factory=list)
    flushed_at: float = 0.0
    handoff_id: str | None = None  # the handoff it came here by (None: placed here)

    @property
    def resumed_at(self) -> int:
        """The output position this placement began at (0 unless the request was resumed after its worker was lost)."""
        return len(self.request.generated_token_ids)

    @property
    def first_due(self) -> bool:
        """No token of this placement has gone out: the next is its first (its TTFT), sent at once."""
        return self.sent == self.resumed_at


@dataclass
class _Outgoing:
    """A handed-off request whose KV this worker leases until the receiver acks."""

    job: RequestState
    request: GenerateRequest
    handle: bytes


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
        transport: Transport | None = None,  # type: ignore[type-arg]
        feed: LatencyModelFeed | None = None,
        heartbeat_s: float = 0.2,
        status_interval_s: float = 0.005,
        token_flush_s: float | None = None,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
    ) -> None:
        """`token_flush_s` (default: the settings' `token_flush_ms`): tokens of one request go out together unless this long
        has passed since its last message (the first token always goes at once: it is the request's TTFT). `heartbeat_s`: the longest silence between two
        statuses; `status_interval_s`: the shortest gap between two (a status goes out whenever a step begins)."""
        if transport is None and role in (Role.PREFILL, Role.DECODE):
            raise ValueError(f"a {role} worker moves KV between workers: it needs a KV transport")
        self.name = name
        self.bus = bus
        self.store = store
        self.settings = settings
        self.policy = policy
        self.transport = transport
        self.feed = feed
        self.heartbeat_s = heartbeat_s
        self.status_interval_s = status_interval_s
        self.token_flush_s = settings.token_flush_ms / 1000.0 if token_flush_s is None else token_flush_s
        self.clock = clock
        self.telemetry = telemetry or Telemetry()
        self.metrics = self.telemetry.worker(name, role)
        self.queue = worker_queue(settings, name)
        self.names = RequestIds()
        self._out: list[Action] = []
        capacity = max(engine.kv_block_size, engine.kv_capacity_tokens - engine.kv_block_size * ROUNDING_SEQUENCES)
        self.state = WorkerState(0, role, capacity, model, self._out, spans=False)
        self.engine = EngineWorker(self.state, engine, self.names)
        self._streams: dict[str, _Stream] = {}
        self._inbox: list[Message] = []
        self._taken: dict[str, float] = {}  # when each dispatch in the inbox arrived (its `taken` milestone)
        self._arrived: list[tuple[RequestState, KvHandoff, KvExport | None]] = []  # pulled KV, imported between steps
        self._handoffs_in: dict[int, KvHandoff] = {}
        self._cancelled_pulls: set[int] = set()  # requests cancelled while their KV was being pulled
        self._outgoing: dict[str, _Outgoing] = {}  # by handoff id
        self._stranded: list[RequestState] = []  # prefilled here, no decoding worker chosen yet
        self._handed_to: dict[str, str] = {}  # request → the worker decoding it, for a cancel that follows
        self._expired: list[bytes] = []  # leases that ran out before their receiver acked
        self._workers = RequestIds()  # other workers' names as the core's integers
        self._accepted: deque[tuple[float, int]] = deque()  # (when, request) taken in the last ACCEPTED_WINDOW_S
        self._placed: dict[tuple[str, float], float] = {}  # (request, arrival) → when placed here, for as long as records last
        self._tokens = itertools.count(1)
        self._handoff_ids = itertools.count()
        self._wake = asyncio.Event()
        self._outbox: list[tuple[GenerateRequest, TokenChunk | RequestFinished | ErrorReply]] = []  # replies of the last step
        self._sending: asyncio.Task[None] | None = None  # the last batch of replies handed to the broker; it sends after the one before
        self._in_flight = 0  # batches not sent yet
        self._firsts: set[asyncio.Future[None]] = set()  # first tokens in flight, each sent on its own
        self._changed = asyncio.Event()  # the state changed in a way the router places by: publish a status
        self._stopping = asyncio.Event()
        self._consumer: MessageConsumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._parked: dict[str, list[tuple[GenerateRequest, TokenChunk | RequestFinished | ErrorReply]]] = {}  # by reply queue
        # one engine, one thread of its own: workers sharing the loop's default pool would wait for each other
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self.steps = 0
        if feed is not None:
            feed.listeners.append(self._model_changed)

    def _model_changed(self, model: LatencyModel) -> None:
        """The profiler published a model (or the services converged on a new correction): plan with it from now on."""
        self.policy = live_policy(self.policy.name, model, self.settings)
        self.state.model = model

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        await self.bus.declare_queue(worker_queue_spec(self.settings, self.name))
        handlers = {Dispatch: self._receive, KvHandoff: self._receive, KvAck: self._receive, CancelRequest: self._receive}
        self._consumer = MessageConsumer(self.bus, self.queue, handlers, max_message_bytes=self.settings.max_message_bytes)
        await self.publish_status()
        await self._consumer.start(prefetch=self.settings.prefetch)
        done = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeats(done))
        try:
            await self._step_loop()
        finally:
            await self._consumer.stop()
            done.set()  # an event, not a cancel: a cancel can be lost inside wait_for on Python 3.11
            await asyncio.gather(self._sent(), return_exceptions=True)
            await asyncio.gather(heartbeat, *self._tasks, return_exceptions=True)
            self._engine_thread.shutdown(wait=False)
            self.metrics.close()
            await self.store.remove_worker_status(self.name)

    async def stop(self) -> None:
        """Drain: say so in the status (the router places nothing more here), finish what is held, then return from `run`.

        The queue is read until then: acks of our handoffs and cancels still
        arrive, and a dispatch already on its way is served, not lost.
        """
        self._stopping.set()
        self._wake.set()
        self._changed.set()

    async def publish_status(self) -> None:
        now = self.clock()
        while self._accepted and now - self._accepted[0][0] > ACCEPTED_WINDOW_S:
            self._accepted.popleft()
        accepted = [job for _, job in self._accepted]
        status = status_of(
            self.state, now, worker_id=self.name, queue=self.queue, names=self.names, accepted=accepted,
            draining=self._stopping.is_set(),
        )
        used = 1.0 - status.kv_free_tokens / status.kv_capacity_tokens if status.kv_capacity_tokens else 0.0
        self.metrics.load(status.batch.size, len(status.waiting), status.queued_prefills, used)
        await asyncio.wait_for(self.store.put_worker_status(status, ttl_s=self.settings.status_ttl_s), timeout=self.settings.status_ttl_s)

    async def _heartbeats(self, done: asyncio.Event) -> None:
        """Publish the status when the state changes for the router (a step begins, the worker goes idle), at most
        every `status_interval_s`, and at least every `heartbeat_s`: a router sees each worker as it is, not as it was."""
        while not done.is_set():
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self.heartbeat_s)
            except TimeoutError:
                pass
            if done.is_set():
                return
            self._changed.clear()
            try:
                await self.publish_status()
                if self.transport is not None and (expired := await self.transport.expire()):
                    self._expired.extend(expired)
                    self._wake.set()
            except (*UNAVAILABLE, KvError) as exc:  # the store is restarting: try again
                log.warning("worker %s could not publish its status: %s", self.name, exc or type(exc).__name__)
            try:  # the floor between two statuses; a drain still ends at once
                await asyncio.wait_for(done.wait(), timeout=self.status_interval_s)
                return
            except TimeoutError:
                pass

    async def _receive(self, message: Message, delivery: Delivery) -> None:
        """Messages wait for the step loop, the only place that changes the engine and the core."""
        if isinstance(message, Dispatch):
            self._taken[message.request.request_id] = self.clock()
        self._inbox.append(message)
        self._wake.set()

    # --- the loop ---------------------------------------------------------------------------

    async def _step_loop(self) -> None:
        stepping = False
        while True:
            await self._apply_inbox()
            ran = await self._step_once()
            await self._post()
            if ran:
                stepping = True
                continue
            if self._stopping.is_set() and self._drained():
                return
            self._wake.clear()
            if self._inbox or self._arrived:
                continue
            if stepping:
                stepping = False
                self._changed.set()  # idle now: the router may place here
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.heartbeat_s)
            except TimeoutError:
                pass
            self.state.needs_plan = True

    def _drained(self) -> bool:
        """Nothing held: no request, no lease of ours, no message to read, no cancelled KV still to let go of."""
        return not (self._streams or self._outgoing or self._inbox or self._arrived or self._cancelled_pulls or self._parked)

    async def _apply_inbox(self) -> None:
        inbox, self._inbox = self._inbox, []
        for message in inbox:
            if isinstance(message, Dispatch):
                await self._place(message)
            elif isinstance(message, KvHandoff):
                self._take_handoff(message)
            elif isinstance(message, KvAck):
                await self._acked(message.handoff_id, message.ok, message.error)
            elif isinstance(message, CancelRequest):
                await self._cancel(message)
        expired, self._expired = self._expired, []
        for handoff_id in [h for h, out in self._outgoing.items() if out.handle in expired]:
            request = self._outgoing[handoff_id].request
            await self._acked(handoff_id, False, "the lease ran out before the receiver acked")
            # no word from the receiver (it is gone, or never took the handoff): the client resumes the request elsewhere
            self._error(request, ErrorCode.KV_TRANSFER_FAILED, "its decoding worker never took its KV cache")
        arrived, self._arrived = self._arrived, []
        for job, handoff, kv in arrived:
            await self._import(job, handoff, kv)
        if self._stranded:
            stranded, self._stranded = self._stranded, []
            await self._hand_off(stranded)
        self._carry_out()

    async def _step_once(self) -> bool:
        state = self.state
        if state.busy or not state.needs_plan:
            return False
        state.needs_plan = False
        started = self.clock()
        state.start_step(self.policy, self._tokens.__next__, started)
        actions = self._carry_out()
        plan = self.engine.plan(actions)
        if not state.busy:
            return False
        self._changed.set()
        batch, context, chunks = state.step_shape()
        predicted = state.span_end - state.span_start  # one step: a live worker plans no spans
        result: StepResult = await asyncio.get_running_loop().run_in_executor(self._engine_thread, self.engine.run, plan)
        self.metrics.step(result.step_time_s, predicted)
        self.steps += 1
        self.engine.end(result, self.clock())
        self._stream(result)
        handoffs, self.engine.handoffs = self.engine.handoffs, []
        if handoffs:
            await self._hand_off(handoffs)
        self._carry_out()
        if self.feed is not None:  # keeps the predictions calibrated
            # on the whole cycle, the worker's own time around the engine's step included: a request's next token waits
            # for all of it (5-6 % more than the step alone on average, on the emulated engines of docs/benchmarks.md)
            self.feed.observe_step(batch, context, chunks, max(result.step_time_s, self.clock() - started))
        return True

    def _carry_out(self) -> list[Action]:
        """The core's actions since the last look: pulls start, abandoned requests are told; the rest is returned."""
        actions, self._out[:] = list(self._out), []
        for action in actions:
            if isinstance(action, Abandoned):
                stream = self._streams.pop(self.names.name_of(action.request), None)
                if stream is not None:
                    self._error(stream.request, ErrorCode.TIMEOUT, "abandoned: it could no longer meet its SLO")
            elif isinstance(action, TransferStarted):
                self._spawn(self._pull(action.request))
        return actions

    def _spawn(self, work: asyncio.Future[None] | asyncio.Task[None] | object) -> None:
        task = asyncio.ensure_future(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- placing, cancelling ---------------------------------------------------------------

    async def _place(self, dispatch: Dispatch) -> None:
        """Take a dispatched request (a resumed one goes on after the tokens its client has); it is reported taken
        however it ends here, so the router does not place it again."""
        request = dispatch.request
        taken_at = self._taken.pop(request.request_id, None)
        if request.request_id in self._streams:
            return  # a redelivered dispatch: it is here already
        if not self._first_placement(request, resent=dispatch.resent):
            log.info("request %s sent again by a router that took over: placed here already", request.request_id)
            return
        await self._let_go_of_earlier(request.request_id)
        job = self._job(request)
        self._accepted.append((self.clock(), job.id))
        generated = request.generated_token_ids
        stream = _Stream(request, job, dispatch.dispatched_at, routed_at=dispatch.routed_at, taken_at=taken_at, sent=len(generated))
        over = self.engine.engine.ended(generated, request.sampling, request.max_tokens)
        if over is not None:  # resumed after its last token had gone out, but not its end: the answer is whole
            self._finish(stream, over)
            return
        try:
            self.engine.add(job, list(request.prompt_token_ids or []), request.sampling, request.max_tokens, generated)
        except ValueError as exc:
            self._error(request, ErrorCode.INVALID, str(exc))
            return
        self._streams[request.request_id] = stream
        self.state.place(job, self.clock())

    def _first_placement(self, request: GenerateRequest, *, resent: bool) -> bool:
        """Whether this placement of the request (its id and arrival) is its first here; remembered for as long as the
        routers keep request records, the only source of a resent dispatch."""
        now = self.clock()
        placed = self._placed
        while placed:
            oldest, at = next(iter(placed.items()))
            if now - at <= self.settings.request_record_ttl_s:
                break
            del placed[oldest]
        key = (request.request_id, request.arrival_time)
        if resent and key in placed:
            return False
        placed.pop(key, None)
        placed[key] = now  # at the end: the dict stays in order of placement
        return True

    async def _let_go_of_earlier(self, request_id: str) -> None:
        """A request placed here again (resumed after its decoding worker was lost) may still have its earlier prefill's
        KV leased here, awaiting an ack that will not come: it goes, so the engine can take the request anew."""
        job_id = self.names.id_of(request_id)
        for handoff_id in [h for h, out in self._outgoing.items() if out.job.id == job_id]:
            await self._acked(handoff_id, False, "the request was placed here again")

    def _job(self, request: GenerateRequest) -> RequestState:
        """The core's request: a resumed one's delivered tokens count as prompt, and only the rest of the answer as output."""
        ttft, tpot = self._slo_s(request)
        generated = len(request.generated_token_ids)
        prompt = len(request.prompt_token_ids or []) + generated
        return RequestState(self.names.id_of(request.request_id), request.arrival_time, prompt, request.max_tokens - generated, ttft, tpot)

    def _slo_s(self, request: GenerateRequest) -> tuple[float, float]:
        """The request's TTFT and TPOT SLOs in seconds (the deployment's defaults where it gives none)."""
        slo = request.slo
        ttft = (slo.ttft_ms if slo else self.settings.default_ttft_slo_ms) / 1000.0
        tpot = (slo.tpot_ms if slo else self.settings.default_tpot_slo_ms) / 1000.0
        return ttft, tpot

    async def _cancel(self, cancel: CancelRequest) -> None:
        """Stop a request wherever it is here and free its KV; one handed on goes on to its decoding worker."""
        request_id = cancel.request_id
        onward = self._handed_to.pop(request_id, None)
        if onward is not None:
            await send(self.bus, worker_queue(self.settings, onward), cancel)
            return
        stream = self._streams.get(request_id)
        if stream is not None and stream.job.id in self.state.incoming:
            await self._cancel_incoming(stream.job)
        else:
            job = self.engine.jobs.pop(request_id, None)
            if stream is None or job is None or job.finish is not None:
                return
            self.state.stop(job, self.clock())
            self.engine.engine.abort(request_id)
        if cancel.quiet:  # placed again elsewhere (or failed): the client hears nothing more from here
            del self._streams[request_id]
            return
        self._finish(stream, FinishReason.CANCELLED)

    async def _cancel_incoming(self, job: RequestState) -> None:
        """A handed-over request whose KV has not arrived: the room held for it is freed, and so is the sender's lease
        (told now, or when a pull already under way ends)."""
        handoff = self._handoffs_in.pop(job.id, None)
        self.state.transfer_failed(job, self.clock())
        if handoff is None:  # its pull is under way: `_import` lets the KV go when it lands
            self._cancelled_pulls.add(job.id)
            return
        await self._ack(handoff, ok=False, error="cancelled")

    # --- streaming -------------------------------------------------------------------------

    def _stream(self, result: StepResult) -> None:
        for output in result.outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.pending.extend(output.new_token_ids)
            if output.finished:
                self._flush(stream)
                self._finish(stream, output.finish_reason or FinishReason.LENGTH)
        now = self.clock()
        for stream in list(self._streams.values()):
            if stream.pending and (stream.first_due or now - stream.flushed_at >= self.token_flush_s):
                self._flush(stream)

    def _flush(self, stream: _Stream) -> None:
        tokens, stream.pending = stream.pending, []
        stream.flushed_at = self.clock()
        message = TokenChunk(request_id=stream.request.request_id, index=stream.sent, token_ids=tokens, emitted_at=stream.flushed_at)
        first, stream.sent = stream.first_due, stream.sent + len(tokens)
        if first:  # the request's TTFT: out at once, not behind the step's batch of replies
            task = asyncio.ensure_future(self._send_to(stream.request.reply_to, [(stream.request, message)]))
            self._firsts.add(task)
            task.add_done_callback(self._firsts.discard)
        else:
            self._reply(stream.request, message)

    def _finish(self, stream: _Stream, reason: FinishReason) -> None:
        request, job = stream.request, stream.job
        self._streams.pop(request.request_id, None)
        timings = Timings(
            arrival=request.arrival_time,
            dispatched=stream.dispatched_at,
            prefill_start=job.prefill_start,
            routed=stream.routed_at,
            taken=stream.taken_at,
            first_token=job.first_token,
            kv_transferred=job.kv_ready,
            finished=job.finish if job.finish is not None else self.clock(),
        )
        finished = RequestFinished(  # the whole answer's count, a resumed request's earlier tokens included
            request_id=request.request_id, finish_reason=reason, num_prompt_tokens=len(request.prompt_token_ids or []),
            num_output_tokens=stream.sent, timings=timings,
        )
        self.telemetry.request_done(  # what this placement computed and produced, from its own first token
            "worker", finish_outcome(reason), arrival=timings.arrival, first_token=timings.first_token, finished=timings.finished,
            output_tokens=stream.sent - stream.resumed_at, prompt_tokens=job.prompt, ttft_slo_s=job.ttft_slo, tpot_slo_s=job.tpot_slo,
            timings=timings,
        )
        self._reply(request, finished)

    def _error(self, request: GenerateRequest, code: ErrorCode, text: str) -> None:
        ttft_slo, tpot_slo = self._slo_s(request)
        self.telemetry.request_done(
            "worker", error_outcome(code), arrival=request.arrival_time, first_token=None, finished=None, output_tokens=0,
            prompt_tokens=len(request.prompt_token_ids or []), ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo,
        )
        self._reply(request, ErrorReply(request_id=request.request_id, code=code, message=text))

    def _reply(self, request: GenerateRequest, message: TokenChunk | RequestFinished | ErrorReply) -> None:
        self._outbox.append((request, message))

    async def _post(self) -> None:
        """Send what the steps produced while the next steps run: batches in order, each after the one before.

        A broker confirms each publish; awaited inside the loop, even once per
        step, a confirm's round trip would be added to every step (and to every
        prefill worker's step, as each has first tokens out). The loop waits
        only once `BATCHES_IN_FLIGHT` batches are still unsent.
        """
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        if self._in_flight >= BATCHES_IN_FLIGHT:
            await self._sent()  # bounded by the bus's own publish deadline
        self._in_flight += 1
        self._sending = asyncio.create_task(self._send_batch(batch, self._sending))

    async def _sent(self) -> None:
        """Wait until every reply handed to `_post`, and every first token, is out."""
        if self._sending is not None:
            await self._sending
        await self._firsts_sent()

    async def _firsts_sent(self) -> None:
        if not self._firsts:
            return
        for result in await asyncio.gather(*self._firsts, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("worker %s could not send a first token: %s", self.name, result)

    async def _send_batch(
        self, batch: list[tuple[GenerateRequest, TokenChunk | RequestFinished | ErrorReply]], previous: asyncio.Task[None] | None
    ) -> None:
        """After the batch before (its failure is this one's): one publish per client, its messages in order, confirmed
        together; different clients at once."""
        try:
            if previous is not None:
                await previous
            await self._firsts_sent()  # a request's first token goes before anything else of it
            by_client: dict[str, list[tuple[GenerateRequest, TokenChunk | RequestFinished | ErrorReply]]] = {}
            for request, message in batch:
                by_client.setdefault(request.reply_to, []).append((request, message))
            await asyncio.gather(*(self._send_to(queue, messages) for queue, messages in by_client.items()))
        finally:
            self._in_flight -= 1

    async def _send_to(self, queue: str, messages: list[tuple[GenerateRequest, TokenChunk | RequestFinished | ErrorReply]]) -> None:
        parked = self._parked.get(queue)
        if parked is not None:  # this client's earlier replies wait for its queue to come back: these go after them
            parked.extend(messages)
            return
        try:
            await self.bus.publish_many(queue, [encode(message) for _, message in messages])
        except Unroutable:
            if self.bus.reconnected_at is not None and time.monotonic() - self.bus.reconnected_at < REPLY_GRACE_S:
                self._parked[queue] = list(messages)  # after a broker restart: its client may not be back yet
                self._spawn(self._redeliver(queue))
            else:
                self._stop_for_gone(messages)

    def _stop_for_gone(self, messages: list[tuple[GenerateRequest, TokenChunk | RequestFinished | ErrorReply]]) -> None:
        """The client has gone: what it asked for is stopped and its KV freed, as on a cancel."""
        for request_id in dict.fromkeys(request.request_id for request, _ in messages):
            log.info("request %s: its reply queue is gone; stopping it", request_id)
            if request_id in self._streams:
                self._inbox.append(CancelRequest(request_id=request_id, reason="the client has gone"))
        self._wake.set()

    async def _redeliver(self, queue: str) -> None:
        """Replies to a queue missing just after a broker restart, sent again until it is back, in order, while other
        clients' go on: a client declares its reply queue again only once its own connection is back. One still
        missing after REPLY_GRACE_S has gone for good."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLY_GRACE_S
        delay = 0.05
        parked = self._parked[queue]
        while parked:
            batch = list(parked)
            try:
                await self.bus.publish_many(queue, [encode(message) for _, message in batch])
            except Unroutable:
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            del parked[: len(batch)]
        del self._parked[queue]
        self._stop_for_gone(parked)

    # --- KV handoff: the sending side --------------------------------------------------------

    async def _hand_off(self, jobs: list[RequestState]) -> None:
        """Offer the prompts prefilled here to the decoding workers the policy picks (one read of the statuses for all,
        each choice counted in the next one's view); one no worker can take yet is kept until one can.

        The messages go out from a task, after the first tokens: the next step need not wait for the broker.
        """
        assert self.transport is not None
        listed = await asyncio.wait_for(self.store.list_worker_statuses(), timeout=self.settings.status_ttl_s)
        now = self.clock()
        statuses = [s for s in listed if not s.draining and now - s.sent_at <= STALE_AFTER_S]
        views = [view_of(s, i, self.names) for i, s in enumerate(statuses)]
        messages: list[tuple[str, KvHandoff]] = []
        for job in jobs:
            name = self.names.name_of(job.id)
            stream = self._streams.get(name)
            if stream is None:
                continue
            target = self.policy.route_decode(job.view, views, now)
            if target is None:
                self._stranded.append(job)
                continue
            chosen = views[target]
            views[target] = replace(chosen, incoming=chosen.incoming + (job.view,), decode_load=chosen.decode_load + job.prompt)
            began = time.perf_counter()
            kv = self.engine.export(job)
            offer = await self.transport.offer(kv, lease_s=KV_LEASE_S)
            self.metrics.kv("sent", offer.nbytes, time.perf_counter() - began)
            handoff_id = f"{name}@{self.name}#{next(self._handoff_ids)}"  # unique: a resumed request may pass here again
            self._outgoing[handoff_id] = _Outgoing(job, stream.request, offer.handle)
            messages.append((statuses[target].worker_id, KvHandoff(
                handoff_id=handoff_id,
                request=stream.request,
                prompt_token_ids=kv.prompt_token_ids,
                first_token_id=kv.output_token_ids[-1],  # after the answer's earlier tokens, for a resumed request
                first_token_time=job.first_token or now,
                source_worker=self.name,
                transport=self.transport.kind,
                handle=offer.handle,
                layout=offer.layout,
                nbytes=offer.nbytes,
                lease_expires_at=offer.lease_expires_at,
                dispatched_at=stream.dispatched_at,
                prefill_start=job.prefill_start,
                routed_at=stream.routed_at,
                taken_at=stream.taken_at,
            )))
            if stream.pending:
                self._flush(stream)
            del self._streams[name]  # the decoding worker streams the rest
            self._handed_to[name] = statuses[target].worker_id
            if len(self._handed_to) > HANDED_TO_REMEMBERED:
                del self._handed_to[next(iter(self._handed_to))]
        if messages:
            await self._post()
            self._spawn(self._send_handoffs(messages))

    async def _send_handoffs(self, messages: list[tuple[str, KvHandoff]]) -> None:
        """After the first tokens are out (a decoding worker must not send the second before them), each to its receiver."""
        await self._sent()
        results = await asyncio.gather(
            *(send(self.bus, worker_queue(self.settings, worker), message) for worker, message in messages), return_exceptions=True
        )
        for (worker, message), result in zip(messages, results, strict=True):
            if isinstance(result, Exception):  # the receiver is gone (or the broker refused): the lease goes, the client is told
                log.warning("handoff %s to %s could not be sent: %s", message.handoff_id, worker, result)
                self._inbox.append(KvAck(handoff_id=message.handoff_id, request_id=message.request.request_id, receiver=worker, ok=False, error=str(result)))
                self._error(message.request, ErrorCode.KV_TRANSFER_FAILED, f"its KV cache could not be offered to worker {worker}")
                self._wake.set()

    async def _acked(self, handoff_id: str, ok: bool, error: str) -> None:
        """The receiver has the KV (or gave up on it, or the lease ran out): this worker lets it go."""
        outgoing = self._outgoing.pop(handoff_id, None)
        if outgoing is None or self.transport is None:
            return
        await self.transport.release(outgoing.handle)
        self.state.handed_over(outgoing.job, self.clock())
        self.engine.handed_over(outgoing.job)
        if not ok:
            log.warning("handoff %s failed: %s", handoff_id, error)

    # --- KV handoff: the receiving side ------------------------------------------------------

    def _take_handoff(self, handoff: KvHandoff) -> None:
        request = handoff.request
        held = self._streams.get(request.request_id)
        if held is not None:
            if held.handoff_id != handoff.handoff_id:  # served here already (a resume that raced it): the sender lets this KV go
                self._spawn(self._ack(handoff, ok=False, error=f"request {request.request_id} is served on {self.name} already"))
            return  # else a redelivered handoff, taken already
        if self.transport is None or self.transport.kind is not handoff.transport:
            self._error(request, ErrorCode.KV_TRANSFER_FAILED, f"worker {self.name} cannot pull KV over {handoff.transport}")
            self._spawn(self._ack(handoff, ok=False, error=f"no {handoff.transport} transport here"))
            return
        job = self._job(request)
        job.prefilled, job.generated, job.kv = job.prompt, 1, job.prompt
        job.prefill_start = handoff.prefill_start
        self.state.first_token_out(job, handoff.first_token_time)
        self._handoffs_in[job.id] = handoff
        self._streams[request.request_id] = _Stream(
            request, job, handoff.dispatched_at, routed_at=handoff.routed_at, taken_at=handoff.taken_at,
            sent=len(request.generated_token_ids) + 1,  # the prefill worker sent the first token of its placement
            handoff_id=handoff.handoff_id,
        )
        self.state.receive(job, self._workers.id_of(handoff.source_worker), self.clock())
        self._accepted.append((self.clock(), job.id))

    async def _pull(self, request_id: int) -> None:
        """Fetch a handed-over KV (the core made room); the step loop imports it between steps."""
        assert self.transport is not None
        handoff = self._handoffs_in.pop(request_id, None)
        if handoff is None:
            return  # cancelled before its pull began
        job = self.state.incoming[request_id]
        began = time.perf_counter()
        try:
            data = await self.transport.fetch(handoff.handle, handoff.layout, timeout_s=KV_FETCH_TIMEOUT_S)
        except KvError as exc:
            log.warning("could not pull the KV of %s: %s", handoff.request.request_id, exc)
            self._arrived.append((job, handoff, None))
        else:
            self.metrics.kv("received", handoff.nbytes, time.perf_counter() - began)
            request = handoff.request
            kv = KvExport(
                request_id=request.request_id,
                prompt_token_ids=list(handoff.prompt_token_ids),
                output_token_ids=[*request.generated_token_ids, handoff.first_token_id],
                sampling=request.sampling,
                max_tokens=request.max_tokens,
                block_size=handoff.layout.block_size,
                data=data,
            )
            self._arrived.append((job, handoff, kv))
        self._wake.set()

    async def _import(self, job: RequestState, handoff: KvHandoff, kv: KvExport | None) -> None:
        if job.id in self._cancelled_pulls:  # cancelled while its KV was on the way: nothing to import
            self._cancelled_pulls.discard(job.id)
            await self._ack(handoff, ok=False, error="cancelled")
            return
        refused = "" if kv is not None else "its KV could not be pulled"  # why it was not taken: the sender logs it
        if kv is not None:
            try:
                self.engine.receive(job, kv)
            except ValueError as exc:
                kv, refused = None, str(exc)
        if kv is None:
            self.state.transfer_failed(job, self.clock())
            stream = self._streams.pop(handoff.request.request_id, None)
            if stream is not None:
                self._error(stream.request, ErrorCode.KV_TRANSFER_FAILED, "its KV cache could not be moved to the decoding worker")
        else:
            self.state.kv_arrived(job, self.clock())
        await self._ack(handoff, ok=not refused, error=refused)

    async def _ack(self, handoff: KvHandoff, *, ok: bool, error: str = "") -> None:
        """Tell the sender it may let the KV go (`ok=False`: it was not taken, and why)."""
        ack = KvAck(handoff_id=handoff.handoff_id, request_id=handoff.request.request_id, receiver=self.name, ok=ok, error=error)
        try:
            await send(self.bus, worker_queue(self.settings, handoff.source_worker), ack)
        except Unroutable:
            log.info("handoff %s: its sender is gone", handoff.handoff_id)
