"""Our placement: Tropical's multiplexing with Kairos's urgency, one notion of slack, and predicted completions.

For each waiting prompt, most urgent first (Moore–Hodgson order), the router
predicts when its first token would come out on every worker that takes
prompts and places it where that meets its TTFT deadline: on a prefill worker
if one can (it costs the decodes nothing), else on the multiplexing worker
that finishes it first.

- a prefill worker runs its queue as its planner will: what a step has begun,
  then Kairos's on-time set by deadline, so the prompt waits only for work
  that goes before it there (and its arrival may push some of those out of
  time, which counts against the placement); prompts already hopeless are
  abandoned by the worker and cost nothing;
- a multiplexing worker runs prompts as chunks that spend the banked TPOT
  slack of its decodes first, then fill what each step leaves under one TPOT,
  so the prediction follows the same two phases and no decode is put past its
  budget by construction. That closed form only shortlists: the worker it
  finds soonest is then looked ahead with its batcher's own plans
  (`tropical.policies.lookahead`), and a placement there after which a
  prompt placed before it, and due no earlier, would be late is refused
  instead (`keep_promises`). A worker
  with a waiting decode already behind its budget takes no prompt: its
  decodes have no slack to lend (Tropical's inlining check counts waiting
  decodes too).

A prompt that no worker can finish in time is a miss under the prediction.
By default it is refused at once (it counts as a miss either way, and serving
it late only takes capacity from prompts that can still make it); with
`drop_hopeless` off it waits until some worker has nothing to do. Prompts that
not even an idle worker could prefill in time are refused in any case unless
`reject_unattainable` is off.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from tropical.latency.model import LatencyModel
from tropical.policies.batching import on_time
from tropical.policies.inline_index import InlineIndex, begun_tokens, takes_prompts, unstarted_work
from tropical.policies.lookahead import first_tokens
from tropical.policies.prefill_queue import Job, PrefillOrder, moore_hodgson, order_prefills, unattainable, urgency_order
from tropical.policies.records import Placement, RequestView, Role, RouterDecision, WorkerView

if TYPE_CHECKING:
    from tropical.policies.batching import DecodeBatcher


def prompt_work(model: LatencyModel, r: RequestView, tokens: int | None = None) -> float:
    """Seconds of prefill compute for the last `tokens` (default: all not yet prefilled) of r's prompt, without the per-step cost."""
    end = r.prefill_tokens
    start = end - (r.remaining_prefill if tokens is None else tokens)
    return model.c0 * (end * end - start * start) + model.c1 * (end - start)


@dataclass(frozen=True)
class SlackAwareRouter:
    model: LatencyModel
    reserve_tpots: float = 0.0  # as in the batcher: banked TPOTs every decode keeps
    bank_steps: float = 1.0  # as in the batcher: a step spends 1/bank_steps of the banked surplus
    repay_steps: float = 64.0  # as in the batcher
    min_chunk: int = 64  # as in the batcher: the smallest chunk a full step still carries
    drop_hopeless: bool = True  # refuse prompts predicted to miss (otherwise they wait for spare capacity)
    reject_unattainable: bool = True  # refuse prompts no schedule could save: now + isolated prefill > TTFT deadline
    count_harm: bool = True  # charge a prefill-worker placement for queued prompts it makes late
    keep_promises: bool = True  # no placement on a decoding worker leaves a prompt placed there and due no earlier late: refused instead
    displace_longest: bool = True  # a prefill-worker placement may push out a longer placed prompt (Moore–Hodgson: as many on time, less work)
    kv_watermark: float = 0.01  # as in the batcher: KV kept free when a prompt starts
    lookahead: DecodeBatcher | None = None  # the decoding workers' batcher: predict inline prompts by its own plans (None: closed form)
    headroom: float = 0.0  # seconds a predicted first token must leave before its deadline: what the live path adds (dispatch, jitter)
    dispatch_lead: float = 0.0  # seconds a placement takes to reach a worker: a step planned sooner goes without it
    lookahead_tries: int = 1  # decoding workers looked ahead per prompt, the earliest by the closed form first
    prefer_prefill_workers: bool = True  # inline only where no prefill worker meets the deadline: decode steps stay short
    window: int = 32  # waiting prompts examined per call beyond those placed
    multiplexing: bool = True  # False: prompts go to prefill workers only
    protect_waiting: bool = True  # no prompt inline where a waiting decode is already behind its budget: chunks would delay it more
    order: PrefillOrder = PrefillOrder.URGENCY  # the order prompts are considered in
    # what it read of the workers at its last call: a cache, which changes no decision (`tropical.policies.inline_index`)
    index: InlineIndex = field(default_factory=InlineIndex, init=False, repr=False, compare=False)

    def place(self, queue: Sequence[RequestView], workers: Sequence[WorkerView], now: float) -> RouterDecision:
        if not queue:
            return RouterDecision()
        drops = unattainable(queue, self.model, now) if self.reject_unattainable else []
        if drops:
            refused = set(drops)
            queue = [r for r in queue if r.id not in refused]
        board = _Board(self, workers, now, min((r.arrival + r.ttft_slo for r in queue), default=math.inf))
        if not board.taker_count:
            return RouterDecision()
        placements: list[Placement] = []
        passed = 0  # late binding: prompts left waiting in this call; past `window` the rest wait without a look
        if self.order is PrefillOrder.URGENCY:
            ordered = urgency_order(queue, self.model, now, servers=board.taker_count)
        else:
            ordered = order_prefills(self.order, queue, self.model, now)
        for r in ordered:
            if passed >= self.window:
                break
            best = board.best_on_time(r)
            if best is None:  # a sure miss: spare capacity only, or refused
                if self.drop_hopeless:
                    drops.append(r.id)
                    continue
                spare = [w for w in board.takers() if self._spare(w, board.held(w)) and (r.prefill_tokens <= board.free_kv(w) or not w.kv_used)]
                if not spare:
                    passed += 1
                    continue
                best = min(spare, key=lambda w: self.predict(r, w, [], now)[0])
            placements.append(Placement(r.id, best.id))
            board.add(best, r)
        return RouterDecision(tuple(placements), tuple(drops))

    @staticmethod
    def _spare(w: WorkerView, queued: Sequence[RequestView]) -> bool:
        """Nothing for it to do: no prompt queued, and no decode either on a decoding worker."""
        return not queued and (w.role is Role.PREFILL or (w.batch.size == 0 and not w.waiting))

    def predict(self, r: RequestView, w: WorkerView, queued: Sequence[RequestView], now: float) -> tuple[float, int]:
        """When r's first token would come out on w, and how many queued prompts it would make late."""
        start = max(now, w.step_end) if w.busy else now
        if w.role is Role.PREFILL:
            return self._on_prefill_worker(r, w, queued, start, now)
        return start + self.inline_time(w, self._ahead(r, w, queued) + prompt_work(self.model, r), start), 0

    def _ahead(self, r: RequestView, w: WorkerView, queued: Sequence[RequestView]) -> float:
        """Prompt compute on w that runs before r: recomputes, and prompts due no later than r."""
        ahead = [q for q in queued if q.generated > 0 or q.ttft_deadline <= r.ttft_deadline]
        return sum(prompt_work(self.model, q, w.unstarted_prefill(q)) for q in ahead)

    def _on_prefill_worker(self, r: RequestView, w: WorkerView, queued: Sequence[RequestView], start: float, now: float) -> tuple[float, int]:
        """r's finish in the order the worker's planner will run its queue, and the prompts r pushes out of time.

        What a step has begun runs first; then the Moore–Hodgson on-time set
        by deadline. Prompts that cannot make it even if run now cost nothing:
        the worker abandons them. Harm is how many queued prompts on time
        without r no longer are with it.
        """
        begun = {request for request, _ in w.in_step}
        t = start
        jobs: list[Job] = []
        for q in queued:
            if q.prefilled > 0 or q.generated > 0 or q.id in begun:
                t += self._left(w, q)
                continue
            duration = self.model.prefill_time(q.remaining_prefill)
            if now + duration <= q.ttft_deadline:
                jobs.append(Job(q.id, duration, q.ttft_deadline))
        own = Job(r.id, self.model.prefill_time(r.remaining_prefill), r.ttft_deadline)
        with_r, _ = moore_hodgson([*jobs, own], t)
        finish = t
        for job in with_r:
            finish += job.duration
            if job.id == r.id:
                harm = len(moore_hodgson(jobs, t)[0]) + 1 - len(with_r) if self.count_harm else 0
                return finish, harm
        return t + sum(job.duration for job in jobs) + own.duration, 0  # demoted behind every prompt on time: a miss

    def _left(self, w: WorkerView, q: RequestView) -> float:
        """Seconds of prefill q still needs on w once the step in progress ends."""
        tokens = w.unstarted_prefill(q)
        return self.model.prefill_time(tokens) if tokens > 0 else 0.0

    def inline_time(self, w: WorkerView, work: float, now: float) -> float:
        """Seconds to run `work` of prompt compute as chunks riding on w's decode steps."""
        return self.inline_line(w, now).time(work)

    def inline_line(self, w: WorkerView, now: float) -> _InlineLine:
        """`inline_time` on w from `now` as a function of the work alone: a router asks it of many prompts per call."""
        batch, waiting = w.batch, w.waiting
        decodes = batch.size + len(waiting)
        if decodes == 0:
            return _InlineLine(now, self.model.c2)
        if waiting:
            context = batch.context_tokens + sum(q.context_tokens for q in waiting)
            tpot = min(batch.tpot_slo, min(q.tpot_slo for q in waiting))
            deadline = min(batch.on_time_deadline, min((q.token_deadline for q in waiting if on_time(q, self.model)), default=math.inf))
        else:
            context, tpot, deadline = batch.context_tokens, batch.tpot_slo, batch.on_time_deadline
        step = self.model.decode_time(decodes, context)
        if math.isinf(deadline):
            return _InlineLine(now, step)
        # the first step spends the spendable share of the bank; later ones carry what one TPOT leaves after the decodes
        surplus = max(0.0, deadline - self.reserve_tpots * tpot - now - tpot)
        floor = max(tpot - step, self.model.c0 * self.min_chunk**2 + self.model.c1 * self.min_chunk)
        return _InlineLine(now, step, max(0.0, tpot + surplus / self.bank_steps - step), floor, step + floor)


class _Board:
    """One `place` call's view of the workers it may place on: what it has placed there so far, and a fast best worker.

    The best worker for a prompt is the lexicographic least (harm, inline,
    predicted first token) that meets its deadline, the first such worker on a
    tie. Prefill workers are few and each predicted. Decoding workers are many:
    a prompt's first token there comes no sooner than the worker's start plus
    one decode step plus the prompt work that runs before it and its own
    (chunks only add to a step). The queued prompts that run before every
    prompt of the call (recomputes, and those due no later than the earliest)
    stay ahead whatever the call places, as placing only adds to a queue; so
    the workers are visited in order of that bound (the router's `InlineIndex`
    keeps it between calls, reading again only the views that changed), each
    prediction's numbers kept for the call, and the visit stops once the bound
    plus the prompt's own work passes the best finish found.
    """

    def __init__(self, router: SlackAwareRouter, workers: Sequence[WorkerView], now: float, earliest_due: float) -> None:
        self.router = router
        self.now = now
        self.earliest_due = earliest_due
        self.workers = workers
        self.queued: dict[int, list[RequestView]] = {}  # prompts placed in this call added to a worker's own queue
        self.free: dict[int, int] = {}
        self.lines: dict[int, _InlineLine] = {}
        self.works: dict[int, list[tuple[bool, float, float]]] = {}  # per queued prompt: (a recompute, its deadline, its work)
        model = router.model
        chunk = model.c0 * router.min_chunk**2 + model.c1 * router.min_chunk
        self.bounded = min(model.c0, model.c1, model.c2, model.d0, model.d1, model.d2) >= 0.0 and chunk > 0.0
        index = router.index
        index.read(workers, model, router.multiplexing)
        self.taker_count = index.takers  # workers that may take a prompt
        self.prefill = [(i, workers[i]) for i in index.prefill]

    def takers(self) -> list[WorkerView]:
        """Every worker that may take a prompt in this call."""
        multiplexing = self.router.multiplexing
        return [w for w in self.workers if takes_prompts(w.role, multiplexing)]

    def decoding(self) -> Iterator[tuple[float, int, WorkerView, float]]:
        """(bound, position, worker, queued work that runs before every prompt of the call) of each decoding worker
        that may lend steps to prompt chunks: by bound where the bounds hold, else by position."""
        protect = self.router.protect_waiting
        if self.bounded:
            return self.router.index.visit(self.now, self.earliest_due, protect)
        return ((0.0, i, w, 0.0) for i, w in self.router.index.lenders(self.now, protect))

    def held(self, w: WorkerView) -> Sequence[RequestView]:
        return self.queued.get(w.id, w.prefills)

    def free_kv(self, w: WorkerView) -> int:
        free = self.free.get(w.id)
        if free is None:
            free = w.kv_free - int(self.router.kv_watermark * w.kv_capacity) if w.kv_used else w.kv_free
            if w.prefills:
                free -= sum(r.prefill_tokens for r in w.prefills if r.prefilled == 0)
            self.free[w.id] = free
        return free

    def add(self, w: WorkerView, r: RequestView) -> None:
        self.queued[w.id] = [*self.held(w), r]
        self.free[w.id] = self.free_kv(w) - r.prefill_tokens
        self.works.pop(w.id, None)

    def ahead(self, r: RequestView, w: WorkerView, held: Sequence[RequestView]) -> float:
        """`SlackAwareRouter._ahead`, each queued prompt's work computed once per call."""
        deadline = r.ttft_deadline
        return sum([work for recompute, due, work in self._works(w, held) if recompute or due <= deadline])

    def looked_ahead(self, r: RequestView, w: WorkerView, held: Sequence[RequestView], start: float) -> float:
        """r's first token on w by the batcher's own plans; inf where r, or a prompt placed there due no earlier, would be late.

        Only prompts due no earlier than r can wait for it, so with
        `keep_promises` the look-ahead watches those with r and stops at the
        first that is late. Such a prompt is not asked whether it would have
        been late without r too: that would cost a second look-ahead, and a
        prompt placed on time that turns late anyway is rare (4 to 9 of the
        1,500 to 2,700 late prompts these checks find in each setting's
        goodput search; refusing on them changes no goodput).
        """
        router, margin = self.router, self.router.headroom
        assert router.lookahead is not None
        watch = [r]
        if router.keep_promises:
            watch += [q for q in held if q.ttft_deadline >= r.ttft_deadline and q.generated == 0]
        arriving = (r.id, self.now + router.dispatch_lead) if router.dispatch_lead > 0.0 else None
        firsts = first_tokens(router.lookahead, router.model, w, start, watch, arriving=arriving, stop_at_late=True, queued=(*held, r))
        if any(firsts.get(q.id, math.inf) > q.ttft_deadline - margin for q in watch):
            return math.inf  # late, given up, not settled, or making a promise late
        return firsts[r.id]

    def _works(self, w: WorkerView, held: Sequence[RequestView]) -> list[tuple[bool, float, float]]:
        works = self.works.get(w.id)
        if works is None:
            c0, c1 = self.router.model.c0, self.router.model.c1
            begun = begun_tokens(w) if w.in_step else {}
            works = self.works[w.id] = [(q.generated > 0, q.arrival + q.ttft_slo, unstarted_work(c0, c1, q, begun)) for q in held]
        return works

    def best_on_time(self, r: RequestView) -> WorkerView | None:
        router, now = self.router, self.now
        deadline = r.ttft_deadline - router.headroom
        if now + router.model.prefill_time(r.remaining_prefill) > deadline:
            return None  # not even an idle worker could make it
        tokens = r.prefill_tokens
        best: tuple[tuple[float, bool, float], int, WorkerView] | None = None
        for i, w in self.prefill:
            held = self.held(w)
            if tokens > self.free_kv(w) and (w.kv_used or held):
                continue
            finish, harm = router.predict(r, w, held, now)
            if harm and not router.displace_longest:
                continue
            key = (harm, False, finish)
            if finish <= deadline and (best is None or key < best[0]):
                best = (key, i, w)
        inline = self._best_inline(r, deadline, tokens)
        if inline is not None:
            finish, i, w = inline
            key = (0, router.prefer_prefill_workers, finish)
            if best is None or (key, i) < (best[0], best[1]):
                best = (key, i, w)
        return None if best is None else best[2]

    def _best_inline(self, r: RequestView, deadline: float, tokens: int) -> tuple[float, int, WorkerView] | None:
        """The decoding worker with the earliest predicted first token within the deadline, the first on a tie.

        With a look-ahead, the closed form only shortlists: the `lookahead_tries`
        earliest by it are looked ahead in that order, and the first whose
        batcher's own plans bring r out in time (and keep every prompt placed
        there on time) wins.
        """
        router = self.router
        work = prompt_work(router.model, r)
        tries = max(1, router.lookahead_tries) if router.lookahead is not None else 1
        best: list[tuple[float, int, WorkerView]] = []  # the earliest by the closed form, at most `tries`
        limit = deadline
        bounded = self.bounded
        for bound, i, w, floor in self.decoding():
            margin = 1e-9 + 1e-12 * abs(limit)  # covers rounding
            if bounded and bound + work > limit + margin:
                break  # every later worker finishes it later still
            line = self.lines.get(w.id)
            if line is None:
                line = self.lines[w.id] = router.inline_line(w, max(self.now, w.step_end) if w.busy else self.now)
            if bounded and line.start + line.time(floor + work) > limit + margin:
                continue  # chunks stretched over its decode steps: no sooner than this
            held = self.held(w)
            if tokens > self.free_kv(w) and (w.kv_used or held):
                continue
            ahead = self.ahead(r, w, held) if held else 0
            finish = line.start + line.time(ahead + work)
            if finish <= deadline and (len(best) < tries or (finish, i) < best[-1][:2]):
                bisect.insort(best, (finish, i, w), key=lambda entry: entry[:2])
                del best[tries:]
                if len(best) == tries:
                    limit = best[-1][0]
        if router.lookahead is None:
            return best[0] if best else None
        for finish, i, w in best:
            finish = self.looked_ahead(r, w, self.held(w), self.lines[w.id].start)
            if finish <= deadline:
                return finish, i, w
        return None


class _InlineLine(NamedTuple):
    """Seconds to run prompt work as chunks on one worker's decode steps, from `start`: a fixed step, or banked steps.

    Without a banked deadline the work runs in one step of `step` seconds more;
    with one, the first step spends up to `first` of it, and the rest rides at
    `floor` seconds of work per `stride` seconds.
    """

    start: float
    step: float
    first: float | None = None
    floor: float = 0.0
    stride: float = 0.0

    def time(self, work: float) -> float:
        """Until the end of the step that runs the last of `work`: a first token comes out only when its step ends."""
        if self.first is None or work <= self.first:
            return work + self.step
        steps, rest = divmod(work - self.first, self.floor)
        return self.first + self.step + steps * self.stride + (self.step + rest if rest > 0.0 else 0.0)
