"""The live router: the global queue of prompts, placed by the policy on the workers' latest heartbeats.

A request is checked and tokenized as it arrives, recorded in the store (only
then is it acknowledged on the queue, so a router that dies loses nothing),
and waits in the core's `RouterState` until the policy places it. The router
decides on every arrival, on a timer as heartbeats change, and at the policy's
review time; dispatches that no heartbeat shows yet are added to their worker's
view (`DispatchLedger`), so a burst is not piled on one worker.

Placed requests are followed through the heartbeats (`Placements`). A worker
silent for `stale_after_s` is out of placement, and what it had not started
goes back to the queue, with its arrival time, to be placed again (the worker
is told to drop it quietly, should it come back). A request it had started
fails with `worker_lost` once the worker is gone: its status expired.

Its metrics (`telemetry`): the queue's length, the time of each decision that
placed something, and the requests placed, refused or ended here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from tropical.bus import Bus, Delivery, Unroutable
from tropical.core.actions import Action
from tropical.core.request import RequestState
from tropical.core.router import DispatchLedger, RouterState
from tropical.core.status import RequestIds, held_requests, view_of
from tropical.engine.tokenizer import Tokenizer
from tropical.latency.model import LatencyModel
from tropical.live.model_feed import LatencyModelFeed
from tropical.live.placements import Placements
from tropical.messaging import MessageConsumer, reply_error, send
from tropical.policies.records import WorkerView
from tropical.policies.serving import ServingPolicy, make_policy
from tropical.protocol import CancelRequest, Dispatch, ErrorCode, GenerateRequest, RequestRecord, RequestState as RecordState, Timings, WorkerStatus
from tropical.queues import declare_requests_queue, worker_queue
from tropical.settings import Settings
from tropical.store import Store
from tropical.telemetry import Outcome, Telemetry

log = logging.getLogger(__name__)


class RouterService:
    """Serves the `requests` queue until stopped."""

    def __init__(
        self,
        policy: ServingPolicy,
        bus: Bus,
        store: Store,
        settings: Settings,
        *,
        tokenizer: Tokenizer | None = None,
        max_model_len: int | None = None,
        refresh_s: float = 0.01,
        stale_after_s: float = 1.0,
        feed: LatencyModelFeed | None = None,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
    ) -> None:
        """`stale_after_s`: a worker whose last heartbeat is older is out of placement and its unstarted work placed again
        (its status may live longer in the store; the started work fails once that is gone too). `refresh_s`: how often
        the workers' statuses are read again between arrivals (workers publish one whenever a step begins)."""
        self.policy = policy
        self.bus = bus
        self.store = store
        self.settings = settings
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.telemetry = telemetry or Telemetry()
        self.ids = RequestIds()
        self._out: list[Action] = []
        self.router = RouterState(policy, self._out)
        self.ledger = DispatchLedger(confirm_after=settings.status_ttl_s)
        self._requests: dict[int, GenerateRequest] = {}  # the queued ones
        self._routed: dict[str, float] = {}  # when each queued one was taken off the `requests` queue
        self.placements = Placements(forget_after=settings.status_ttl_s)  # the placed ones, until done
        self._made: dict[str, tuple[WorkerStatus, int, WorkerView]] = {}  # each worker's latest status, its position, its view
        self._heard: dict[str, float] = {}  # each live worker's latest heartbeat already followed (its `sent_at`)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._consumer: MessageConsumer | None = None
        self.dispatched = 0
        if feed is not None:
            feed.listeners.append(self._model_changed)

    def _model_changed(self, model: LatencyModel) -> None:
        """A new latency model (profiled, or corrected online): the policy predicts with it from the next decision."""
        self.policy = self.router.policy = make_policy(self.policy.name, model)

    async def run(self) -> None:
        queue = await declare_requests_queue(self.bus, self.settings)
        self._consumer = MessageConsumer(
            self.bus, queue, {GenerateRequest: self._on_request, CancelRequest: self._on_cancel}, max_message_bytes=self.settings.max_message_bytes
        )
        await self._consumer.start(prefetch=self.settings.prefetch)
        while not (self._stopping.is_set() and not self.router.queue):
            await self._decide()
            self.telemetry.router_queue(len(self.router.queue))
            timeout = self.refresh_s
            if self.router.wake < math.inf:
                timeout = min(timeout, max(0.0, self.router.wake - self.clock()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Drain: take no new requests, place the queued ones, then return from `run`."""
        if self._consumer is not None:
            await self._consumer.stop()
        self._stopping.set()
        self._wake.set()

    # --- arrivals ---------------------------------------------------------------------------

    async def _on_request(self, request: GenerateRequest, delivery: Delivery) -> None:
        self._routed[request.request_id] = self.clock()
        try:
            request = self._checked(request)
        except ValueError as exc:
            await delivery.nack(requeue=False)
            self._routed.pop(request.request_id, None)
            self._ended(request, "bad_request")
            await reply_error(self.bus, request.reply_to, request.request_id, ErrorCode.INVALID, str(exc))
            return
        record = RequestRecord(
            request_id=request.request_id, state=RecordState.QUEUED, num_prompt_tokens=len(request.prompt_token_ids or []),
            timings=Timings(arrival=request.arrival_time), updated_at=self.clock(),
        )
        await asyncio.wait_for(self.store.put_request_record(record, ttl_s=self.settings.request_record_ttl_s), timeout=self.settings.status_ttl_s)
        self._enqueue(request)

    def _enqueue(self, request: GenerateRequest) -> None:
        """Into the global queue, on its arrival time: a request placed again keeps its SLO deadlines."""
        slo = request.slo
        ttft = (slo.ttft_ms if slo else self.settings.default_ttft_slo_ms) / 1000.0
        tpot = (slo.tpot_ms if slo else self.settings.default_tpot_slo_ms) / 1000.0
        prompt = len(request.prompt_token_ids or [])
        job = RequestState(self.ids.id_of(request.request_id), request.arrival_time, prompt, request.max_tokens, ttft, tpot)
        self._requests[job.id] = request
        self.router.enqueue(job)
        self._wake.set()

    async def _on_cancel(self, cancel: CancelRequest, delivery: Delivery) -> None:
        """A queued request leaves the queue; a placed one's cancel goes to its worker, which frees its KV."""
        request_id = self.ids.id_of(cancel.request_id)
        job = self.router.remove(request_id)
        if job is not None:
            request, _ = self._dequeued(request_id)
            self.placements.forget(request.request_id)
            self._ended(request, "cancelled")
            await reply_error(self.bus, request.reply_to, request.request_id, ErrorCode.CANCELLED, cancel.reason or "cancelled")
            return
        worker = self.placements.worker_of(cancel.request_id)
        if worker is not None:
            await self._tell(worker, cancel)

    def _checked(self, request: GenerateRequest) -> GenerateRequest:
        """The request with token ids, or ValueError naming what is wrong with it."""
        if request.prompt_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("this deployment takes prompt_token_ids only (no tokenizer is loaded)")
            request = GenerateRequest(**{**_fields(request), "prompt": None, "prompt_token_ids": self.tokenizer.encode(request.prompt or "")})
        total = len(request.prompt_token_ids or []) + request.max_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(request.prompt_token_ids or [])} tokens) + max_tokens ({request.max_tokens}) exceeds the model's context of {self.max_model_len}"
            )
        return request

    # --- decisions ----------------------------------------------------------------------------

    async def _decide(self) -> None:
        began = time.perf_counter()
        statuses = await asyncio.wait_for(self.store.list_worker_statuses(), timeout=self.settings.status_ttl_s)
        now = self.clock()
        live = [s for s in statuses if now - s.sent_at <= self.stale_after_s]
        await self._follow(live, {s.worker_id for s in statuses if now - s.sent_at <= self.settings.status_ttl_s}, now)
        statuses = [s for s in live if not s.draining]
        self.router.woken(now)
        if not self.router.queue or not statuses:
            return
        views = self._views(statuses)
        before = set(self.router.queue)
        placed: list[tuple[RequestState, WorkerStatus]] = []
        self.router.route(views, now, lambda job, worker, at: placed.append((job, statuses[worker])))
        for job, status in placed:
            job.placed = now
            await self._dispatch(job, status, now)
        dropped = before - set(self.router.queue) - {job.id for job, _ in placed}
        for request_id in dropped:
            request, _ = self._dequeued(request_id)
            self.placements.forget(request.request_id)
            self._ended(request, "refused")
            await reply_error(self.bus, request.reply_to, request.request_id, ErrorCode.OVERLOADED, "refused: it cannot meet its SLO")
        self.telemetry.router_decided(time.perf_counter() - began, placed=len(placed), refused=len(dropped))
        self._out.clear()  # a RouterWake moved `router.wake`, which `run` sleeps until

    def _views(self, statuses: list[WorkerStatus]) -> list[WorkerView]:
        """Each worker's view, made once per heartbeat (the store hands back the same status object until it changes),
        plus the dispatches its heartbeats do not show yet."""
        made: dict[str, tuple[WorkerStatus, int, WorkerView]] = {}
        views = []
        for index, status in enumerate(statuses):
            seen = self._made.get(status.worker_id)
            if seen is None or seen[0] is not status or seen[1] != index:
                seen = (status, index, view_of(status, index, self.ids))
            made[status.worker_id] = seen
            views.append(self.ledger.view(status.worker_id, seen[2]))
        self._made = made
        return views

    async def _follow(self, live: list[WorkerStatus], present: set[str], now: float) -> None:
        """Track the placed requests on the fresh heartbeats; place again what silent workers had not started.

        `present`: the workers whose status has not expired yet; one missing is
        gone, and the requests it had started fail.
        """
        heard = [s for s in live if self._heard.get(s.worker_id) != s.sent_at]  # each heartbeat is read once
        self._heard = {s.worker_id: s.sent_at for s in live}
        for status in heard:
            self.ledger.confirm(status.worker_id, (self.ids.id_of(name) for name in held_requests(status)))
        for name in self.placements.observe(heard, now):
            self.ids.forget(name)
        for worker, view in self.ledger.lost(now):
            request = self.placements.take_back(self.ids.name_of(view.id), str(worker))
            if request is not None:
                await self._place_again(request, str(worker), "no heartbeat of its worker showed it")
        for worker in self.placements.workers() - {s.worker_id for s in live}:
            self.ledger.forget_worker(worker)
            for request in self.placements.lost(worker):
                await self._place_again(request, worker, "its worker went silent before starting it")
            if worker in present:
                continue
            for placed in self.placements.failed(worker):
                log.warning("request %s: worker %s was lost while serving it", placed.request_id, worker)
                await self._tell(worker, CancelRequest(request_id=placed.request_id, reason="its worker was lost", quiet=True))
                self.telemetry.request_counted("router", "error")  # its times are with the lost worker
                await reply_error(self.bus, placed.reply_to, placed.request_id, ErrorCode.WORKER_LOST, f"worker {worker} was lost while serving it")
                self.ids.forget(placed.request_id)

    def _ended(self, request: GenerateRequest, outcome: Outcome) -> None:
        """A request whose end the router sends (the workers report the ones they serve); the router sees no
        tokens, so it checks no SLO."""
        self.telemetry.request_done(
            "router", outcome, arrival=request.arrival_time, first_token=None, finished=self.clock(), output_tokens=0,
            prompt_tokens=len(request.prompt_token_ids or []), ttft_slo_s=None, tpot_slo_s=None,
        )

    async def _place_again(self, request: GenerateRequest, worker: str, why: str) -> None:
        """Back into the queue; the worker, should it come back, drops it without a word."""
        log.info("request %s: placed again, away from %s: %s", request.request_id, worker, why)
        await self._tell(worker, CancelRequest(request_id=request.request_id, reason=f"placed again: {why}", quiet=True))
        self._enqueue(request)

    async def _tell(self, worker: str, cancel: CancelRequest) -> None:
        try:
            await send(self.bus, worker_queue(self.settings, worker), cancel)
        except Unroutable:
            log.info("worker %s has no queue any more; its cancel of %s is moot", worker, cancel.request_id)

    def _dequeued(self, job_id: int) -> tuple[GenerateRequest, float | None]:
        """A request leaves the queue (placed, refused or cancelled), with when the router took it (None: placed again)."""
        request = self._requests.pop(job_id)
        return request, self._routed.pop(request.request_id, None)

    async def _dispatch(self, job: RequestState, status: WorkerStatus, now: float) -> None:
        request, routed_at = self._dequeued(job.id)
        message = Dispatch(
            request=request,
            prefill_worker=status.worker_id,
            decode_worker=status.worker_id,
            ttft_deadline=request.arrival_time + job.ttft_slo,
            dispatched_at=now,
            routed_at=routed_at,
        )
        self.ledger.dispatched(status.worker_id, job.view, now)
        self.placements.dispatched(request, status.worker_id)
        await send(self.bus, worker_queue(self.settings, status.worker_id), message)
        self.dispatched += 1


def _fields(request: GenerateRequest) -> dict[str, object]:
    return {name: getattr(request, name) for name in request.__struct_fields__}
