"""The live router: the global queue of prompts, placed by the policy on the workers' latest heartbeats.

A request is checked and tokenized as it arrives, recorded in the store, and
waits in the core's `RouterState` until the policy places it. Its delivery is
acknowledged only once it is dispatched, refused or cancelled, and after its
record says so: a router that dies leaves the requests it had not placed on the
queue, redelivered to the next router, which skips one whose record shows it
refused or cancelled already. A dispatch is recorded before it is sent, so one
whose record names a worker may or may not have reached it: the next router
sends it again to that worker, marked `resent`, and the worker takes it only
if it never had it. No request is placed twice. The router
decides on every arrival, on a timer as heartbeats change, and at the policy's
review time; dispatches that no heartbeat shows yet are added to their worker's
view (`DispatchLedger`), so a burst is not piled on one worker.

Placed requests are followed through the heartbeats (`Placements`). A worker
silent for `stale_after_s` is out of placement, and what it had not started
goes back to the queue, with its arrival time, to be placed again (the worker
is told to drop it quietly, should it come back). A request it had started
fails with `worker_lost` at the same time, and its client resumes it after the
tokens it has (`generated_token_ids`).

Routers run active and standby: only the holder of the `router` lease in the
store consumes the `requests` queue. The active one renews the lease every
third of its TTL; one that cannot renew it in time (by a quarter of the TTL
before it could lapse) stops consuming at once, before another may take the
lease, and its unplaced requests go back to the queue (what it dispatched
stays its own to follow). A standby asks for the
lease every quarter of the TTL, so it takes over within about the TTL of the
active one's death, at once after a clean drain, which releases the lease.

Its metrics (`telemetry`): the queue's length, the time of each decision that
placed something, and the requests placed, refused or ended here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from tropical.bus import Bus, Delivery, Unroutable
from tropical.core.actions import Action
from tropical.core.request import RequestState
from tropical.core.router import DispatchLedger, RouterState
from tropical.core.status import RequestIds, held_requests, view_of
from tropical.engine.tokenizer import Tokenizer
from tropical.latency.model import LatencyModel
from tropical.live.model_feed import LatencyModelFeed
from tropical.live.placements import Placements
from tropical.live.policy import live_policy
from tropical.messaging import Held, MessageConsumer, reply_error, send
from tropical.policies.records import WorkerView
from tropical.policies.serving import ServingPolicy
from tropical.protocol import CancelRequest, Dispatch, ErrorCode, GenerateRequest, RequestRecord, RequestState as RecordState, Timings, WorkerStatus
from tropical.queues import declare_requests_queue, worker_queue
from tropical.settings import Settings
from tropical.store import UNAVAILABLE, Store, StoreError
from tropical.telemetry import Outcome, Telemetry

log = logging.getLogger(__name__)

LEASE = "router"  # the store's lease that the active router holds


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
        holder: str | None = None,
    ) -> None:
        """`stale_after_s`: a worker whose last heartbeat is older is out of placement, its unstarted work placed again
        and its started work failed (for its clients to resume). `refresh_s`: how often
        the workers' statuses are read again between arrivals (workers publish one whenever a step begins). `holder`:
        this router's name on the lease (default: the host's name and a random suffix)."""
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
        self.holder = holder or f"router-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.lease_ttl_s = settings.router_lease_ttl_s
        self._queue = ""  # the `requests` queue's name, once declared
        self._consumer: MessageConsumer | None = None  # consuming while this router holds the lease
        self._leading = False  # holds the lease and takes requests (False from the moment it stops)
        self._lease_held = False
        self._leasing: asyncio.Task[None] | None = None
        self._held: dict[str, Held] = {}  # each queued request's delivery, acked once the request is placed
        self._placing = asyncio.Lock()  # one request settled at a time, never while the queued ones are given back
        self.dispatched = 0
        if feed is not None:
            feed.listeners.append(self._model_changed)

    @property
    def leading(self) -> bool:
        """Whether this router holds the lease and takes requests (it stops taking them before the lease can lapse)."""
        return self._leading

    def _model_changed(self, model: LatencyModel) -> None:
        """A new latency model (profiled, or corrected online): the policy predicts with it from the next decision."""
        self.policy = self.router.policy = live_policy(self.policy.name, model, self.settings)

    async def run(self) -> None:
        """Serve until stopped: stand by until this router holds the lease, take requests while it holds it, and
        place what it holds (the requests it placed again stay its own, lease or not)."""
        self._queue = await declare_requests_queue(self.bus, self.settings)
        leasing = self._leasing = asyncio.create_task(self._hold_lease(), name=f"lease of {self.holder}")
        try:
            while not (self._stopping.is_set() and leasing.done() and not self.router.queue):
                if leasing.done() and not self._stopping.is_set():
                    leasing.result()  # it ends only when told to stop: anything else is its failure, raised here
                idle = not self._leading and not self.router.queue and not len(self.placements)
                if not idle:
                    try:
                        await self._decide()
                    except UNAVAILABLE as exc:  # the store is restarting or out of reach: decide again next time
                        log.warning("router %s could not decide: the store failed (%s)", self.holder, exc or type(exc).__name__)
                self.telemetry.router_queue(len(self.router.queue))
                timeout = self.lease_ttl_s / 4 if idle else self.refresh_s
                if self.router.wake < math.inf:
                    timeout = min(timeout, max(0.0, self.router.wake - self.clock()))
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                except TimeoutError:
                    pass
        finally:
            leasing.cancel()  # a no-op once it has ended; otherwise it stops consuming and releases the lease
            await asyncio.gather(leasing, return_exceptions=True)

    async def stop(self) -> None:
        """Drain: stop taking requests (the ones not placed yet go back to the queue, for the standby), release the
        lease so the standby takes over at once, place the requests placed again, then return from `run`."""
        self._stopping.set()
        self._wake.set()
        if self._leasing is not None:
            await asyncio.wait([self._leasing], timeout=2 * self.lease_ttl_s + self.settings.status_ttl_s)

    # --- the lease ----------------------------------------------------------------------------

    async def _hold_lease(self) -> None:
        """Stand by until the lease is this router's, consume while it renews the lease in time, and stand by again
        once it cannot."""
        loop = asyncio.get_running_loop()
        why_standing_by = ""  # logged once each time it changes
        try:
            while not self._stopping.is_set():
                asked = loop.time()
                try:
                    acquired = await asyncio.wait_for(
                        self.store.acquire_lease(LEASE, self.holder, self.lease_ttl_s), timeout=self.lease_ttl_s / 4
                    )
                except (StoreError, TimeoutError) as exc:
                    acquired, why = False, f"the store cannot be reached ({exc or 'no answer'})"
                else:
                    why = "" if acquired else f"{await self._holder() or 'another router'} holds the lease"
                if not acquired:
                    if why != why_standing_by:
                        why_standing_by = why
                        log.info("router %s stands by: %s", self.holder, why)
                    await self._pause(self.lease_ttl_s / 4)
                    continue
                why_standing_by = ""
                self._lease_held = True
                if self._stopping.is_set():
                    break
                await self._start_consuming()
                lost = await self._renew(asked + self.lease_ttl_s)
                if lost is None:
                    break  # told to stop
                self._lease_held = False
                await self._stop_consuming(f"lost the lease: {lost}", logging.WARNING)
        finally:
            await self._stop_consuming("draining", logging.INFO)
            if self._lease_held:
                await self._release()
            self._wake.set()

    async def _holder(self) -> str | None:
        try:
            return await asyncio.wait_for(self.store.lease_holder(LEASE), timeout=self.lease_ttl_s / 4)
        except (StoreError, TimeoutError):
            return None

    async def _renew(self, expires: float) -> str | None:
        """Renew the lease every third of its TTL until told to stop (None) or it is lost (why).

        `expires`: when the lease lapses in the store at the earliest (its TTL from when it was last asked for),
        from which moment another router may take it. One not renewed a quarter of the TTL before then counts as
        lost: the margin covers a late wake-up of this process.
        """
        loop = asyncio.get_running_loop()
        while True:
            deadline = expires - self.lease_ttl_s / 4
            await self._pause(max(0.0, min(self.lease_ttl_s / 3, deadline - loop.time())))
            if self._stopping.is_set():
                return None
            asked = loop.time()
            if asked >= deadline:
                return "the store could not be reached in time"
            try:
                renewed = await asyncio.wait_for(self.store.renew_lease(LEASE, self.holder, self.lease_ttl_s), timeout=deadline - asked)
            except TimeoutError:
                return "the store did not answer in time"
            except StoreError as exc:
                log.warning("router %s could not renew the lease (%s); trying again until it lapses", self.holder, exc)
                continue
            if not renewed:
                return "it lapsed, or another router holds it"
            expires = asked + self.lease_ttl_s

    async def _release(self) -> None:
        self._lease_held = False
        try:
            await asyncio.wait_for(self.store.release_lease(LEASE, self.holder), timeout=self.lease_ttl_s)
        except (StoreError, TimeoutError) as exc:
            log.warning("router %s could not release the lease (%s); it lapses by itself", self.holder, exc or "the store did not answer")
        else:
            log.info("router %s released the lease", self.holder)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less when told to stop."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _start_consuming(self) -> None:
        self._leading = True
        self._consumer = MessageConsumer(
            self.bus, self._queue, {GenerateRequest: self._on_request, CancelRequest: self._on_cancel},
            max_message_bytes=self.settings.max_message_bytes,
        )
        await self._consumer.start(prefetch=self.settings.router_prefetch)
        log.info("router %s holds the lease: taking requests from %s", self.holder, self._queue)
        self._wake.set()

    async def _stop_consuming(self, why: str, level: int) -> None:
        """Take no more requests; the queued ones whose deliveries are not acked yet go back to the queue for the next
        router (the subscription's end returns them), after the placement under way, if any, has been acked."""
        consumer, self._consumer = self._consumer, None
        self._leading = False
        if consumer is None:
            return
        async with self._placing:
            given_back = self._give_back()
        await consumer.stop()
        log.log(level, "router %s stopped taking requests (%s); %d queued ones went back to the queue", self.holder, why, given_back)

    def _give_back(self) -> int:
        """Forget the queued requests whose deliveries are not acked yet; how many."""
        for name in self._held:
            job_id = self.ids.id_of(name)
            self.router.remove(job_id)
            self._requests.pop(job_id, None)
            self._routed.pop(name, None)
            self.ids.forget(name)
        given_back = len(self._held)
        self._held.clear()
        return given_back

    # --- arrivals ---------------------------------------------------------------------------

    async def _on_request(self, request: GenerateRequest, delivery: Delivery) -> Held | None:
        """Check, record and queue a request; its delivery is held until the request is placed, refused or cancelled."""
        if delivery.redelivered and await self._settled_before(request):
            return None  # acked: an earlier router saw to it (and this one sent a dispatch of it again)
        self._routed[request.request_id] = self.clock()
        try:
            request = self._checked(request)
        except ValueError as exc:
            await delivery.nack(requeue=False)
            self._routed.pop(request.request_id, None)
            self._ended(request, "bad_request")
            await reply_error(self.bus, request.reply_to, request.request_id, ErrorCode.INVALID, str(exc))
            return None
        await self._put_record(self._record(request, RecordState.QUEUED))
        held = Held(delivery)
        if not self._leading:  # stopping: the subscription's end gives the message back to the queue
            self._routed.pop(request.request_id, None)
            return held
        older = self._held.get(request.request_id)
        self._held[request.request_id] = held
        self._enqueue(request)
        if older is not None:  # the same id again replaces the queued one, and so settles its message
            await older.ack()
        return held

    async def _settled_before(self, request: GenerateRequest) -> bool:
        """Whether a router that died before acking this very message had placed, refused or cancelled it already.

        Its record is past `queued` for the same arrival time (a client resuming a request sends it again with a
        new one)."""
        record = await asyncio.wait_for(self.store.get_request_record(request.request_id), timeout=self.settings.status_ttl_s)
        if record is None or record.state is RecordState.QUEUED or record.timings.arrival != request.arrival_time:
            return False
        worker = record.prefill_worker
        if record.state is RecordState.PREFILLING and worker is not None:
            # recorded, then maybe sent: the worker it names takes it only if it never had it
            status = await asyncio.wait_for(self.store.get_worker_status(worker), timeout=self.settings.status_ttl_s)
            if status is None:
                log.info("request %s came again; its worker %s is gone: placed anew", request.request_id, worker)
                return False  # wherever it got to died with its worker; its client skips the tokens it has
            try:
                await self._send_again(request, record, status)
            except ValueError:
                return False  # it no longer passes the checks (a new tokenizer, a shorter context): it is answered as new
        log.info("request %s came again, but its record says %s (worker %s): not placed twice", request.request_id, record.state, worker)
        return True

    async def _send_again(self, request: GenerateRequest, record: RequestRecord, status: WorkerStatus) -> None:
        """The dispatch an earlier router recorded, sent again to the same worker (`resent`) and followed from here."""
        checked = self._checked(request)
        dispatched = record.timings.dispatched if record.timings.dispatched is not None else self.clock()
        message = self._dispatch_message(checked, status.worker_id, dispatched, record.timings.routed, resent=True)
        self.placements.dispatched(checked, status.worker_id)
        await send(self.bus, worker_queue(self.settings, status.worker_id), message)

    def _dispatch_message(self, request: GenerateRequest, worker: str, dispatched_at: float, routed_at: float | None, *,
                          resent: bool = False) -> Dispatch:
        """The placement of `request` on `worker` (it prefills and decodes there, or hands on what it prefilled)."""
        ttft, _ = self._slo_s(request)
        return Dispatch(request=request, prefill_worker=worker, decode_worker=worker, ttft_deadline=request.arrival_time + ttft,
                        dispatched_at=dispatched_at, routed_at=routed_at, resent=resent)

    def _record(
        self, request: GenerateRequest, state: RecordState, *, worker: str | None = None, error: ErrorCode | None = None,
        routed: float | None = None, dispatched: float | None = None,
    ) -> RequestRecord:
        """The request's record in `state`; `worker`: where it was dispatched (it prefills there, and decodes there
        or wherever that worker hands it on)."""
        return RequestRecord(
            request_id=request.request_id, state=state, prefill_worker=worker, decode_worker=worker,
            num_prompt_tokens=len(request.prompt_token_ids or []), timings=Timings(arrival=request.arrival_time, routed=routed, dispatched=dispatched),
            error=error, updated_at=self.clock(),
        )

    async def _put_record(self, record: RequestRecord) -> None:
        await asyncio.wait_for(self.store.put_request_record(record, ttl_s=self.settings.request_record_ttl_s), timeout=self.settings.status_ttl_s)

    async def _settle(self, request: GenerateRequest, record: RequestRecord, before_ack: Awaitable[None] | None = None) -> None:
        """A request taken off the queue is recorded as what became of it, `before_ack` is done (its dispatch sent),
        and only then is its delivery acked (a request placed again has none: it was acked when first placed). A
        router that dies in between leaves the message to be redelivered, and the record tells the next router what
        became of it."""
        held = self._held.pop(request.request_id, None)
        try:
            await self._put_record(record)
        finally:
            if before_ack is not None:
                await before_ack  # awaited even if the record failed: the decision stands, its dispatch goes out
        if held is not None:
            await held.ack()

    def _enqueue(self, request: GenerateRequest) -> None:
        """Into the global queue, on its arrival time: a request placed again keeps its SLO deadlines."""
        ttft, tpot = self._slo_s(request)
        # a resumed request: the answer's delivered tokens are prompt to compute, only the rest of it is output
        generated = len(request.generated_token_ids)
        prompt = len(request.prompt_token_ids or []) + generated
        output = max(1, request.max_tokens - generated)  # 0 left: its worker says at once that the answer is whole
        job = RequestState(self.ids.id_of(request.request_id), request.arrival_time, prompt, output, ttft, tpot)
        self._requests[job.id] = request
        self.router.enqueue(job)
        self._wake.set()

    def _slo_s(self, request: GenerateRequest) -> tuple[float, float]:
        """The request's TTFT and TPOT SLOs in seconds (the deployment's defaults where it gives none)."""
        slo = request.slo
        ttft = (slo.ttft_ms if slo else self.settings.default_ttft_slo_ms) / 1000.0
        tpot = (slo.tpot_ms if slo else self.settings.default_tpot_slo_ms) / 1000.0
        return ttft, tpot

    async def _on_cancel(self, cancel: CancelRequest, delivery: Delivery) -> None:
        """A queued request leaves the queue; a placed one's cancel goes to its worker, which frees its KV (the worker
        its record names, when an earlier router placed it)."""
        async with self._placing:
            request_id = self.ids.id_of(cancel.request_id)
            job = self.router.remove(request_id)
            if job is not None:
                request, _ = self._dequeued(request_id)
                self.placements.forget(request.request_id)
                self._ended(request, "cancelled")
                await reply_error(self.bus, request.reply_to, request.request_id, ErrorCode.CANCELLED, cancel.reason or "cancelled")
                await self._settle(request, self._record(request, RecordState.CANCELLED))
                return
        worker = self.placements.worker_of(cancel.request_id) or await self._recorded_worker(cancel.request_id)
        if worker is not None:
            await self._tell(worker, cancel)

    async def _recorded_worker(self, request_id: str) -> str | None:
        """The worker an earlier router dispatched a request to, while its record says it is being served."""
        record = await asyncio.wait_for(self.store.get_request_record(request_id), timeout=self.settings.status_ttl_s)
        if record is None or record.state not in (RecordState.PREFILLING, RecordState.TRANSFERRING, RecordState.DECODING):
            return None
        return record.prefill_worker  # a prefill worker passes the cancel on to the worker it handed the request to

    def _checked(self, request: GenerateRequest) -> GenerateRequest:
        """The request with token ids, or ValueError naming what is wrong with it.

        A resumed request's `generated_token_ids` are part of its answer, so `max_tokens` (the whole answer) bounds them
        and the context it needs is prompt + max_tokens as before.
        """
        if request.prompt_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("this deployment takes prompt_token_ids only (no tokenizer is loaded)")
            request = GenerateRequest(**{**_fields(request), "prompt": None, "prompt_token_ids": self.tokenizer.encode(request.prompt or "")})
        if len(request.generated_token_ids) > request.max_tokens:
            raise ValueError(f"generated_token_ids ({len(request.generated_token_ids)} tokens) exceed max_tokens ({request.max_tokens})")
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
        # as the simulator refuses them at arrival: a request no idle worker could serve in SLO (a TPOT below one
        # lone decode step, say) only holds back the prompts behind it, and misses either way
        self.router.drop_infeasible(list(dict.fromkeys((v.role, self.policy.model, v.kv_capacity) for v in views)))
        placed: list[tuple[RequestState, WorkerStatus]] = []
        self.router.route(views, now, lambda job, worker, at: placed.append((job, statuses[worker])))
        dropped = before - set(self.router.queue) - {job.id for job, _ in placed}
        dispatched = refused = 0
        for job, status in placed:
            job.placed = now
            dispatched += await self._dispatch(job, status, now)
        for request_id in dropped:
            refused += await self._refuse(request_id)
        self.telemetry.router_decided(time.perf_counter() - began, placed=dispatched, refused=refused)
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
        """Track the placed requests on the fresh heartbeats; what a silent worker held goes on elsewhere.

        A worker out of placement is lost at once: what it had not started is
        placed again, and the requests it had started fail with `worker_lost`
        (after a quiet cancel, should it come back), which their clients answer
        by resuming them after the tokens they have. `present`: the workers
        whose status has not expired; one gone from the store after saying it
        was draining left once it had finished what it held.
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
            for placed in self.placements.failed(worker, left=worker not in present):
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

    async def _dispatch(self, job: RequestState, status: WorkerStatus, now: float) -> bool:
        """Send the request to its worker, record where it went, then ack its delivery; False when it went back to
        the queue (this router stopped taking requests) while the decision was being carried out."""
        async with self._placing:
            if job.id not in self._requests:
                return False
            request, routed_at = self._dequeued(job.id)
            message = self._dispatch_message(request, status.worker_id, now, routed_at)
            self.ledger.dispatched(status.worker_id, job.view, now)
            self.placements.dispatched(request, status.worker_id)
            # Recorded before it is sent: a router that dies in between leaves a record naming the worker, and the
            # next router sends the dispatch again to that worker, which takes it once (never lost, never placed twice).
            record = self._record(request, RecordState.PREFILLING, worker=status.worker_id, routed=routed_at, dispatched=now)
            await self._settle(request, record, before_ack=send(self.bus, worker_queue(self.settings, status.worker_id), message))
            self.dispatched += 1
        return True

    async def _refuse(self, job_id: int) -> bool:
        """The policy dropped a queued request: it cannot meet its SLO. False when it went back to the queue meanwhile."""
        async with self._placing:
            if job_id not in self._requests:
                return False
            request, _ = self._dequeued(job_id)
            self.placements.forget(request.request_id)
            self._ended(request, "refused")
            await reply_error(self.bus, request.reply_to, request.request_id, ErrorCode.OVERLOADED, "refused: it cannot meet its SLO")
            await self._settle(request, self._record(request, RecordState.FAILED, error=ErrorCode.OVERLOADED))
        return True


def _fields(request: GenerateRequest) -> dict[str, object]:
    return {name: getattr(request, name) for name in request.__struct_fields__}
