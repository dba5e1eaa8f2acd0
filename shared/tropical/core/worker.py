"""What one worker holds and how its step plans are applied: clock-free, shared by every driver.

A worker has prompts placed on it (`prefills`), a running decode batch,
decodes resident but outside the batch (`waiting`) and decodes handed to it
whose KV has not arrived (`incoming`). The running batch is kept in closed
form: after `steps` decode steps a member that joined at step s with g tokens
has g + steps − s, so a step costs O(1) bookkeeping however large the batch.

Mechanism, not policy, lives here: KV accounting (a prompt's KV is reserved
when its first chunk starts; a decode grows by one token per step; when a step
would overflow the cache the most recently admitted decode is preempted and
later recomputed, as vLLM does) and the pull rule of a KV handoff (the
receiver pulls, oldest first, once it has room; the sender keeps the KV until
the transfer ends). Whatever needs a clock or a device leaves as an action.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

from tropical.core.actions import Abandoned, Action, Placed, Preempted, StepScheduled, TransferStarted, WorkerWake
from tropical.core.request import RequestState
from tropical.latency.model import LatencyModel
from tropical.policies.batching import Preemption, on_time
from tropical.policies.records import EMPTY_BATCH, BatchSummary, RequestId, RequestView, Role, StepPlan, WorkerView
from tropical.policies.serving import ServingPolicy

# a view's queues: prefills, waiting, incoming, and the prompt chunks of the step in progress
ViewQueues = tuple[tuple[RequestView, ...], tuple[RequestView, ...], tuple[RequestView, ...], tuple[tuple[RequestId, int], ...]]

PULL_HEADROOM = 0.01  # fraction of a worker's KV left free when pulling a handoff in

Perturb = Callable[[bool], float]  # a step's time factor, given whether it prefills (the simulator's noise)
HandOff = Callable[[RequestState, "WorkerState", float], None]  # a prefill worker's finished prompt, to route


def no_perturbation(prefill: bool) -> float:
    return 1.0


class WorkerState:
    """One worker: its queues, its running batch (kept in closed form) and the step in progress.

    A step in progress is a span of `span_n` steps whose i-th (from 1) ends at
    span_start + i·a + b·i(i−1)/2: the simulator advances an unchanging decode
    batch many steps at once; a live worker runs one step at a time (n = 1).
    """

    def __init__(
        self,
        index: int,
        role: Role,
        capacity: int,
        model: LatencyModel,
        out: list[Action],
        perturb: Perturb = no_perturbation,
        *,
        spans: bool = True,
        changes: set[int] | None = None,
        plans: set[int] | None = None,
        swap_per_token: float | None = None,
    ) -> None:
        self.model = model
        self.swap_per_token = swap_per_token  # s to copy one token's KV to or from host memory (None: it cannot swap)
        self.swap_tokens = 0  # KV tokens copied to or from host memory since the last step began: the next step waits for them
        self.swapped: set[int] = set()  # requests among `incoming` whose KV waits in this worker's host memory
        self.changes = changes  # where this worker's id is noted whenever its view goes stale (the core's view cache)
        self.plans = plans  # where its id is kept while it needs a plan (so the core need not ask every worker)
        self.peers: list[WorkerState] = []  # the other lanes of its pipelined instance, which share its stages
        self.spans = spans  # False: one step at a time, as a live worker runs them
        self.out = out  # the core's actions, drained by the driver
        self.perturb = perturb
        self.id = index
        self.role = role
        self.capacity = capacity
        self.kv_static = 0  # KV of requests outside the running batch
        # running batch: generated(job) = join_gen + steps − join_step
        self.running: dict[int, RequestState] = {}
        self.ctx_offset = 0  # Σ (prompt + join_gen − join_step): batch KV = ctx_offset + size·steps
        self.prompt_sum = 0
        self.steps = 0  # decode steps this worker has run
        self.finishes: list[tuple[int, int, RequestState]] = []  # (step it finishes at, token, job)
        # (tpot, met its TTFT) → heap of (next token deadline − tpot·steps, token, job), and its live members
        self.deadlines: dict[tuple[float, bool], list[tuple[float, int, RequestState]]] = {}
        self.members: dict[tuple[float, bool], int] = {}
        self.prefills: dict[int, RequestState] = {}
        self.prefill_load = 0
        self.waiting: dict[int, RequestState] = {}
        self.incoming: dict[int, RequestState] = {}
        self.sources: dict[int, int] = {}  # incoming request → the worker holding its KV until it is pulled
        self.side_prompt = 0  # Σ prompt of waiting and incoming
        # the span in progress
        self.busy = False
        self.span_id = 0
        self.span_start = 0.0
        self.span_a = 0.0
        self.span_b = 0.0
        self.span_n = 0
        self.span_end = 0.0
        self.span_decode = False
        self.span_chunks: tuple[tuple[RequestState, int], ...] = ()
        self.placed_since_step = 0
        self._needs_plan = False
        self.wake_id = 0
        self.version = 0
        self._view: WorkerView | None = None
        self._view_steps = -1
        self._view_from = self._view_until = 0.0  # while nothing changes, the view holds for `now` in [from, until) ...
        self._view_base = (-1, -1)  # ... and as long as `steps` and the span are what they were (steps end without a change)
        self._view_heads: tuple[tuple[float, float, bool], ...] = ()  # the batch's `heads` when the view was made afresh

    @property
    def needs_plan(self) -> bool:
        """Something may have changed what this worker should do next: plan a step once it is idle."""
        return self._needs_plan

    @needs_plan.setter
    def needs_plan(self, value: bool) -> None:
        self._needs_plan = value
        if self.plans is not None:
            if value:
                self.plans.add(self.id)
            else:
                self.plans.discard(self.id)

    # --- running batch in closed form ----------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.running)

    def join(self, job: RequestState, token: int) -> None:
        steps = self.steps
        job.join_step, job.join_gen, job.token = steps, job.generated, token
        self.running[job.id] = job
        self.ctx_offset += job.prompt + job.generated - steps
        self.prompt_sum += job.prompt
        heapq.heappush(self.finishes, (steps + job.output - job.generated, token, job))
        tpot, first = job.tpot_slo, job.first_token
        assert first is not None, "only prefilled requests decode"
        group = (tpot, job.on_time)
        heap = self.deadlines.get(group)
        if heap is None:
            heap = self.deadlines[group] = []
        heapq.heappush(heap, (first + tpot * (job.generated - steps), token, job))
        self.members[group] = self.members.get(group, 0) + 1

    def generated(self, job: RequestState, steps: int) -> int:
        """Output tokens of a running member after `steps` decode steps of this worker."""
        return job.join_gen + steps - job.join_step

    def leave(self, job: RequestState) -> None:
        del self.running[job.id]
        job.generated = self.generated(job, self.steps)
        job.token = 0
        job.changed()
        self.ctx_offset -= job.prompt + job.join_gen - job.join_step
        self.prompt_sum -= job.prompt
        self.members[(job.tpot_slo, job.on_time)] -= 1

    def batch_kv(self, steps: int) -> int:
        return self.ctx_offset + len(self.running) * steps

    def heads(self) -> tuple[tuple[float, float, bool], ...]:
        """Per (TPOT, met its TTFT) group of the batch, its earliest next-token deadline at step 0 (they move on by
        one TPOT a step): what a summary needs, unchanged for as long as the batch is."""
        heads = []
        for (tpot, punctual), heap in self.deadlines.items():
            if not self.members[(tpot, punctual)]:
                continue
            while heap[0][2].token != heap[0][1]:
                heapq.heappop(heap)
            heads.append((heap[0][0], tpot, punctual))
        return tuple(heads)

    def summary(self, steps: int, heads: tuple[tuple[float, float, bool], ...]) -> BatchSummary:
        """The running batch after `steps` decode steps of this worker, from its `heads`."""
        if not self.running:
            return EMPTY_BATCH
        earliest = reserve = tightest = on_time = math.inf
        for head, tpot, punctual in heads:
            deadline = head + tpot * steps
            if deadline < earliest:
                earliest = deadline
            if deadline - tpot < reserve:
                reserve = deadline - tpot
            if tpot < tightest:
                tightest = tpot
            if punctual and deadline < on_time:
                on_time = deadline
        return BatchSummary(len(self.running), self.batch_kv(steps), self.prompt_sum, earliest, reserve, tightest, on_time)

    # --- span arithmetic ------------------------------------------------------------------

    def span_time(self, m: int) -> float:
        """End of the m-th step of the current span."""
        return self.span_start + m * self.span_a + self.span_b * m * (m - 1) / 2.0

    def steps_done(self, now: float) -> int:
        """Steps of the current span completed by `now`."""
        if not self.busy or now >= self.span_end:
            return self.span_n if self.busy else 0
        m = self._steps_for(now - self.span_start)
        while m > 0 and self.span_time(m) > now:
            m -= 1
        while m + 1 < self.span_n and self.span_time(m + 1) <= now:
            m += 1
        return m

    def boundary_after(self, now: float) -> int:
        """The first step boundary of the current span at or after `now` (as a step count ≥ 1)."""
        m = max(1, self.steps_done(now))
        if self.span_time(m) < now:
            m += 1
        return min(m, self.span_n)

    def _steps_for(self, elapsed: float) -> int:
        a, b = self.span_a, self.span_b
        if b <= 0.0:
            return int(elapsed / a) if a > 0.0 else self.span_n
        half = a - b / 2.0
        return int((-half + math.sqrt(half * half + 2.0 * b * elapsed)) / b)

    def current_steps(self, now: float) -> int:
        """Decode steps run by `now`, counting the completed part of a decode span."""
        if self.busy and self.span_decode and self.span_n > 1:
            return self.steps + self.steps_done(now)
        return self.steps

    # --- the view a policy sees -----------------------------------------------------------

    def changed(self) -> None:
        self.version += 1
        self._view = None
        if self.changes is not None:
            self.changes.add(self.id)

    @property
    def view_until(self) -> float:
        """Until when the view last made holds if nothing changes (its next step boundary)."""
        return self._view_until

    def view(self, now: float) -> WorkerView:
        view = self._view
        base = (self.steps, self.span_id)
        if view is not None and self._view_base == base:
            if self._view_from <= now < self._view_until:
                return view  # a router asks every worker on every event: most have not moved since
            if self.busy and self.span_decode and self.span_n > 1:
                return self._further(view, now)
        steps = self.current_steps(now)  # something changed since the last view: make it afresh
        valid_from, valid_until = -math.inf, math.inf  # until something changes
        if self.busy and self.span_n > 1:
            done = steps - self.steps if self.span_decode else 0
            begin, end = self.span_time(done), self.span_time(min(done + 1, self.span_n))
            if self.span_decode:  # the view moves on at each step boundary of the span (`_further`)
                valid_from = begin if done > 0 else -math.inf
                valid_until = math.inf if done >= self.span_n else (self.span_end if done + 1 == self.span_n else end)
        elif self.busy:
            begin, end = self.span_start, self.span_end
        else:
            begin = end = self.span_end
        held = self.prefills.values()
        prefills = tuple(
            [j.view for j in held if j.prefilled > 0]
            + [j.view for j in held if j.prefilled == 0 and j.generated > 0]
            + [j.view for j in held if j.prefilled == 0 and j.generated == 0]
        )
        waiting = tuple(j.view for j in self.waiting.values())
        incoming = tuple(j.view for j in self.incoming.values())
        in_step = tuple((job.id, tokens) for job, tokens in self.span_chunks) if self.busy else ()
        self._view_base = base
        return self._keep(steps, begin, end, (prefills, waiting, incoming, in_step), self.heads(), (valid_from, valid_until))

    def _further(self, view: WorkerView, now: float) -> WorkerView:
        """`view` moved to the step of its decode span in progress at `now`: nothing changed but the steps done,
        which a router asking at every arrival sees move on a step or two at a time."""
        n, done, span_time = self.span_n, self._view_steps - self.steps, self.span_time
        if now >= self.span_end:
            done = n
            begin = end = self.span_end
        else:  # the steps done are those whose end is not after `now`: walk from the last view's
            begin = span_time(done)
            while done > 0 and begin > now:
                done -= 1
                begin = span_time(done)
            end = span_time(done + 1)
            while end <= now:  # never past the last step, which ends at span_end > now
                done += 1
                begin, end = end, span_time(done + 1)
        steps = self.steps + done
        if steps == self._view_steps:
            return view
        queues = (view.prefills, view.waiting, view.incoming, view.in_step)
        valid = (begin if done > 0 else -math.inf, math.inf if done >= n else end)
        return self._keep(steps, begin, end, queues, self._view_heads, valid)

    def _keep(
        self,
        steps: int,
        begin: float,
        end: float,
        queues: ViewQueues,
        heads: tuple[tuple[float, float, bool], ...],
        valid: tuple[float, float],
    ) -> WorkerView:
        """The view after `steps` with these queues (prefills, waiting, incoming, in step) and batch heads, kept for
        `now` in [valid)."""
        prefills, waiting, incoming, in_step = queues
        view = WorkerView(
            self.id,
            self.role,
            self.capacity,
            self.kv_static + self.batch_kv(steps),  # kv_used
            self.busy,
            begin,  # step_begin
            end,  # step_end
            self.placed_since_step,
            prefills,
            self.prefill_load,
            self.summary(steps, heads),  # batch
            waiting,
            incoming,
            self.prompt_sum + self.side_prompt,  # decode_load
            in_step,
        )
        self._view, self._view_steps, self._view_heads = view, steps, heads
        self._view_from, self._view_until = valid
        return view

    # --- what arrives at the worker ---------------------------------------------------------

    def place(self, job: RequestState, now: float) -> None:
        """The router put `job`'s prompt here."""
        job.placed = now
        self.prefills[job.id] = job
        self.prefill_load += job.prompt + job.generated
        self.placed_since_step += 1
        self.out.append(Placed(self.id, job.id))
        self.poke(now)

    def receive(self, job: RequestState, source: int, now: float) -> None:
        """`job` was prefilled on worker `source` and decodes here: it waits for its KV to be pulled."""
        job.decode_worker = self.id
        job.in_transfer = False
        self.incoming[job.id] = job
        self.sources[job.id] = source
        self.side_prompt += job.prompt
        self.poke(now)
        if not self.busy:
            self.pull(now)

    def poke(self, now: float) -> None:
        """Something concerns this worker: re-plan it now if idle, else at its next step boundary."""
        self.changed()
        if not self.busy:
            self.needs_plan = True
            return
        if self.span_n > 1 and self.span_end > now:
            m = self.boundary_after(now)
            if m < self.span_n:
                self.span_n = m
                self.span_end = self.span_time(m)
                self.span_id += 1
                self.out.append(StepScheduled(self.id, self.span_id, self.span_end))

    # --- a step ---------------------------------------------------------------------------

    def start_step(self, policy: ServingPolicy, token: Callable[[], int], now: float) -> bool:
        """Plan the next step with `policy` and apply the plan; whether anything changed.

        `token` numbers memberships of running batches (unique across workers).
        """
        plan: StepPlan = policy.plan_step(self.view(now), now)
        for request_id in plan.abandon:
            self._abandon(request_id)
        for request_id in plan.admit:
            job = self.waiting.pop(request_id)
            self.side_prompt -= job.prompt
            self.kv_static -= job.kv
            job.kv = 0
            self.join(job, token())
        chunks = []
        for request_id, tokens in plan.chunks:
            job = self.prefills[request_id]
            if tokens <= 0 or tokens > job.remaining_prefill:
                raise ValueError(f"{policy.name} planned {tokens} prompt tokens for request {request_id}")
            if job.prefilled == 0:
                job.kv = job.prompt + job.generated
                self.kv_static += job.kv
                if job.prefill_start is None:
                    job.prefill_start, job.prefill_worker = now, self.id
            chunks.append((job, tokens))
        decode = (plan.decode or bool(plan.admit)) and bool(self.running)
        if decode:
            self.make_room(swap=getattr(policy.batcher, "preemption", Preemption.RECOMPUTE) == Preemption.SWAP)  # a batcher may not say
            decode = bool(self.running)
        if self.kv_static + self.batch_kv(self.steps) > self.capacity:
            raise ValueError(f"{policy.name} overfilled the KV cache of worker {self.id}")
        self.changed()
        if not decode and not chunks:
            if plan.abandon:  # the freed KV may let a handoff in, or the next plan start something
                self.placed_since_step = 0  # it has dealt with what was placed: given up on it
                if self.incoming:
                    self.pull(now)
                self.needs_plan = True
                return True
            if plan.review_at is not None and plan.review_at > now:
                self.wake_id += 1
                self.out.append(WorkerWake(self.id, self.wake_id, plan.review_at))
            return False
        padded = getattr(policy.batcher, "max_paddings", None) is not None  # the prompt batch runs padded to its longest
        self._begin(decode, tuple(chunks), plan.review_at, now, padded=padded)
        return True

    def _abandon(self, request_id: int) -> None:
        job = self.waiting.pop(request_id, None)
        if job is not None:
            self.side_prompt -= job.prompt
        else:
            job = self.prefills.pop(request_id)
            self.prefill_load -= job.prompt + job.generated - job.prefilled
        self.kv_static -= job.kv
        job.kv = 0
        job.dropped = True
        self.out.append(Abandoned(self.id, job.id))

    def _begin(self, decode: bool, chunks: tuple[tuple[RequestState, int], ...], review_at: float | None, now: float,
               *, padded: bool = False) -> None:
        """Time the step: one step with prompt chunks, or a span of decode steps up to the next change.

        `padded`: every prompt chunk is computed as long as the longest, pad tokens and all (vLLM before chunked
        prefill ran a prompt batch as one padded tensor)."""
        model = self.model
        size = self.size if decode else 0
        context = self.batch_kv(self.steps) if decode else 0
        factor = self.perturb(bool(chunks))
        if chunks:
            longest = max(tokens for _, tokens in chunks) if padded else 0
            spans = [(job.prefilled, job.prefilled + max(tokens, longest)) for job, tokens in chunks]
            a = factor * model.step_time(size, context, spans)
            b, n = 0.0, 1
        else:
            a = factor * model.decode_time(size, context)
            b = factor * model.d2 * size
            finishes = self.finishes
            while finishes[0][2].token != finishes[0][1]:
                heapq.heappop(finishes)
            n = finishes[0][0] - self.steps
            room = self.capacity - self.kv_static - context
            n = max(1, min(n, room // size)) if self.spans else 1
        if self.peers:
            a = max(a, self.pipeline_pace(now))
        if self.swap_tokens:  # the step starts once its swaps are copied (vLLM waits for them), so it runs alone
            assert self.swap_per_token is not None
            a += self.swap_tokens * self.swap_per_token
            self.swap_tokens = 0
            n = 1
        self.busy = True
        self.span_id += 1
        self.span_start, self.span_a, self.span_b, self.span_n = now, a, b, n
        self.span_decode, self.span_chunks = decode, chunks
        if review_at is not None and n > 1 and self.span_time(n) > review_at:
            self.span_n = n = self.boundary_after(review_at)
        self.span_end = self.span_time(n)
        self.placed_since_step = 0
        self.changed()
        self.out.append(StepScheduled(self.id, self.span_id, self.span_end))

    def pipeline_pace(self, now: float) -> float:
        """The longest step a peer lane has in progress. The lanes' micro-batches take turns in the same stages,
        so each moves on no faster than the slowest one in flight: a light lane beside a heavy one waits in
        every stage (the pipeline's bubble)."""
        pace = 0.0
        for peer in self.peers:
            if peer.busy and now < peer.span_end:
                done = peer.steps_done(now) if peer.span_decode else 0
                pace = max(pace, peer.span_a + peer.span_b * done)
        return pace

    def step_shape(self) -> tuple[int, int, list[tuple[int, int]]]:
        """The step in progress as the latency model takes it: decodes, their KV tokens, prompt chunks [start, end)."""
        if not self.busy:
            return 0, 0, []
        batch = self.size if self.span_decode else 0
        context = self.batch_kv(self.steps) if self.span_decode else 0
        return batch, context, [(job.prefilled, job.prefilled + tokens) for job, tokens in self.span_chunks]

    def make_room(self, swap: bool = False) -> None:
        """Preempt the most recently admitted decodes until one more step's KV fits, as vLLM does: by recompute
        (the victim is prefilled again), or with `swap` by copying its KV to host memory, whence it comes back
        like a handed-over request once there is room (`pull`)."""
        if swap and self.swap_per_token is None:
            raise ValueError(f"worker {self.id} has no host memory to swap to")
        while self.running and self.kv_static + self.batch_kv(self.steps) + self.size > self.capacity:
            victim = next(reversed(self.running.values()))
            self.leave(victim)
            victim.preemptions += 1
            self.out.append(Preempted(self.id, victim.id))
            if swap:
                victim.kv = victim.prompt + victim.generated
                self.swap_tokens += victim.kv
                self.incoming[victim.id] = victim
                self.swapped.add(victim.id)
                self.side_prompt += victim.prompt
                continue
            victim.prefilled = 0
            self.prefills[victim.id] = victim
            self.prefill_load += victim.prompt + victim.generated

    def end_step(self, now: float, hand_off: HandOff) -> None:
        """The step in progress ended at `now`: advance the batch, finish requests, complete prompts."""
        n = self.span_n
        self.busy = False
        if self.span_decode:
            self.steps += n
            finishes = self.finishes
            while finishes and finishes[0][0] <= self.steps:
                _, token, job = heapq.heappop(finishes)
                if job.token != token:
                    continue
                self.leave(job)
                job.finish = now
        for job, tokens in self.span_chunks:
            job.prefilled += tokens
            job.changed()
            self.prefill_load -= tokens
            if job.prefilled == job.prompt + job.generated:
                del self.prefills[job.id]
                self._prefilled(job, now, hand_off)
        self.span_chunks = ()
        self.needs_plan = True
        self.changed()
        if self.incoming:
            self.pull(now)

    def first_token_out(self, job: RequestState, at: float) -> None:
        """`job`'s first token came out at `at` (here, or on the prefill worker that hands it here): whether it is on
        time, the one kind a batch that lets late decodes go keeps on pace, is judged by the policies' own rule."""
        job.first_token = at
        job.changed()
        job.on_time = on_time(job.view, self.model)

    def _prefilled(self, job: RequestState, now: float, hand_off: HandOff) -> None:
        """A prompt (or a preempted request's recompute) is done: its step produced a token."""
        if job.generated == 0:
            self.first_token_out(job, now)
        job.generated += 1
        job.changed()
        if job.generated >= job.output:
            job.finish = now
            self.kv_static -= job.kv
            job.kv = 0
            if job.decode_worker is None:
                job.decode_worker = self.id
                job.kv_ready = now
            return
        if self.role is Role.PREFILL:
            hand_off(job, self, now)
            return
        if job.decode_worker is None:
            job.decode_worker, job.kv_ready = self.id, now
        self.waiting[job.id] = job
        self.side_prompt += job.prompt

    def stop(self, job: RequestState, now: float) -> None:
        """`job` ended before its expected length (its own end of sequence, or a cancel): it leaves, its KV is freed."""
        if job.token and job.id in self.running:
            self.leave(job)
        elif self.waiting.pop(job.id, None) is not None:
            self.side_prompt -= job.prompt
        elif self.prefills.pop(job.id, None) is not None:
            self.prefill_load -= job.remaining_prefill
        elif job.id in self.swapped:  # its KV is in host memory: nothing on the GPU to free
            self.swapped.discard(job.id)
            del self.incoming[job.id]
            self.side_prompt -= job.prompt
            job.kv = 0
        self.kv_static -= job.kv
        job.kv = 0
        job.finish = now
        self.changed()

    # --- KV handoff -------------------------------------------------------------------------

    def pull(self, now: float) -> None:
        """Start transfers into this worker, oldest first, while its KV has room."""
        used = self.kv_static + self.batch_kv(self.current_steps(now))
        free = self.capacity - used - PULL_HEADROOM * self.capacity
        for job in list(self.incoming.values()):
            if job.in_transfer:
                continue
            if job.kv > free and not (used == 0 and job.kv <= self.capacity):  # an empty worker takes any request that fits
                break
            used += job.kv
            free -= job.kv
            self.kv_static += job.kv
            self.changed()
            if job.id in self.swapped:  # copied back in from host memory before the next step, which waits for it
                self.swapped.discard(job.id)
                self.swap_tokens += job.kv
                del self.incoming[job.id]
                self.waiting[job.id] = job
                continue
            job.in_transfer = True
            self.out.append(TransferStarted(job.id, self.sources.pop(job.id), self.id, job.kv))

    def handed_over(self, job: RequestState, now: float) -> None:
        """`job`'s KV reached its decoding worker: the sender frees its copy."""
        self.kv_static -= job.kv
        self.poke(now)

    def transfer_failed(self, job: RequestState, now: float) -> None:
        """`job`'s KV never arrived: it leaves, and the room held for it is free again."""
        del self.incoming[job.id]
        self.sources.pop(job.id, None)
        self.side_prompt -= job.prompt
        if job.in_transfer:
            self.kv_static -= job.kv
        job.in_transfer = False
        job.kv = 0
        job.dropped = True
        self.poke(now)

    def kv_arrived(self, job: RequestState, now: float) -> None:
        """`job`'s KV is resident here: it waits to be admitted to the batch."""
        del self.incoming[job.id]
        job.in_transfer = False
        job.kv_ready = now
        self.waiting[job.id] = job
        self.poke(now)
