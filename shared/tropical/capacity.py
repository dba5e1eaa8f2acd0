"""Provable upper bounds on goodput: rates above which no policy of a stated class meets the attainment target.

Goodput is the highest offered rate at which at least `target` of ALL offered
requests meet both SLOs. For the very requests `tropical.experiments.workload`
replays at a rate λ, this module checks a necessary condition for that, built
from the latency model's terms and the setting alone (no queueing model), and
finds the highest λ at which it still holds. Steps are taken to last what the
model predicts: a run with the model's noise switched on may beat the bound.
Two classes of policy:

- clairvoyant: knows every output length and may refuse or abandon any
  requests it likes, as long as `target` of all offered ones are served;
- non-clairvoyant: sees prompts and the tokens generated so far, not output
  lengths (`NonClairvoyantClass` states the class exactly).

Why no run beats the clairvoyant bound. Fix a run and the set S of requests it
serves within SLO. Request r (prompt P, output O, n = O − 1 decode steps: the
prefill makes the first token) arrives at a_r; its prompt is done by
a_r + TTFT_r and everything spent on it by e_r = a_r + TTFT_r + n·TPOT_r.

1. Its prompt chunks [a, b) cost c0·(b² − a²) + c1·(b − a), which telescopes to
   c0·P² + c1·P however it is cut (c2 is left out: steps may share it).
2. Its j-th decode step holds P + j KV tokens: d1 + d2·(P + j) of that step.
3. A decode step's d0 is shared by its members, charged to them either by KV
   share (a step's Σctx ≤ K, the worker's KV capacity) or against the TPOT
   budget (r's decode steps run one after another within its span, so their
   durations add up to at most n·TPOT_r); `request_work` derives both, and
   why recomputing a preempted request never costs less. So each served
   request costs at least w_r worker-seconds, additively over requests.
4. Each of the W workers runs one step at a time, and a request's steps come
   after its arrival. So for a start position i (in arrival order) and any
   deadline E, the prompt terms of the served requests from i on whose
   prompts are due by E, and the whole w_r of those whose windows end by E,
   add up to at most W·(E − a_i).
5. A request the cluster refuses as infeasible (`tropical.core.router.feasible`)
   is always a miss, so S leaves out at most s = (eligible requests) − k of
   the eligible ones, k = ⌈target·N⌉.
   The amounts in 4 are additive and non-negative, so leaving out the s
   largest leaves the least: if even that exceeds W·(E − a_i), no S works.

The bound checks 5 at every deadline E, for a fixed set of starts and for
both ways of charging d0: each check is a necessary condition for the target.

Monotone in the rate: every arrival is a_r = α_r/λ (α_r its arrival at rate 1:
`load_trace` scales gaps by 1/rate, same seed, same requests) and the work does
not depend on λ. If the condition holds at λ2 it holds at any λ1 < λ2: for the
check at (i, E) at λ1, take the deadline E' among those counted there that is
latest at λ2; the check at (i, E') at λ2 counts at least as much, and its time
W·(E'(λ2) − a_i(λ2)) = W·((α' − α_i)/λ2 + offset') is at most the same at λ1,
at most W·(E − a_i) at λ1. So the bound is found by bisection over λ. (A time
window on a length table keeps a different set of requests at each rate; that
case is scanned on a grid instead.)
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tropical.core.request import RequestState
from tropical.core.router import feasible
from tropical.latency.model import LatencyModel
from tropical.simulator import SimRequest

if TYPE_CHECKING:
    from tropical.experiments import Replay, Setting

THETAS = (0.0, 1.0)  # shares of d0 charged by KV rather than TPOT (see `request_work`); mixes never bound tighter on the presets
STARTS = 32  # start positions checked: more is tighter (a little) and slower
REL_TOLERANCE = 1e-4  # the reported rate fails the condition and is within this of one that holds
MIN_RATE = 1e-9  # req/s: below this the bound is reported as 0
MAX_DOUBLINGS = 200  # a condition still holding after this many doublings is reported as holding at every rate
GRID_RATIO = 1.05  # rate grid of the scan used when the replayed set changes with the rate
GRID_STEPS = 60  # grid points each way from the first guess in that scan


@dataclass(frozen=True)
class CapacityBound:
    """An offered rate above which no policy of the class reaches `attainment` on these requests.

    `rate` is math.inf when even simultaneous arrivals pass the condition (a
    trace too small to load the cluster). For the non-clairvoyant class,
    `decode_cap` and `prompt_cap` describe the best policy of the class found
    (abandon after that many tokens, refuse longer prompts) and `served` how
    many requests it serves; for the clairvoyant one `served` is `must_serve`.
    """

    rate: float  # req/s
    clairvoyant: bool
    attainment: float  # the target
    requests: int  # offered at each rate (at rate 1 for a window on a length table, which keeps more the higher the rate)
    must_serve: int  # ⌈attainment · requests⌉
    infeasible: int  # refused by the cluster as unservable even when idle (always misses)
    served: int
    decode_cap: int | None = None
    prompt_cap: int | None = None
    seconds: float = 0.0

    @property
    def served_share(self) -> float:
        return self.served / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class NonClairvoyantClass:
    """The policies the non-clairvoyant bound covers, each fixed by two numbers before the run.

    With a prompt cap p and a decode cap t, such a policy refuses at arrival
    every prompt longer than p (and the cluster refuses the infeasible ones),
    prefills every other request within its TTFT and decodes it until it ends
    or has generated t tokens, when it is abandoned. Not knowing outputs, it
    treats every admitted request as one that may end at its next token: it
    keeps each on pace (token k within (k − 1)·TPOT of the first) for its first
    min(O, t) tokens, as it must to serve every admitted request with O ≤ t
    whatever the lengths turn out to be. So it serves the admitted requests
    with O ≤ t, and the clairvoyant argument applies to every admitted request
    with its output capped at t (the abandoned ones' tokens cost time too),
    none left out. The bound is the best (p, t): for each t only the smallest
    p serving `must_serve` matters (a larger one only adds work), and only caps
    equal to some output length (between two, the smaller serves the same
    requests for less work). It is never above the clairvoyant bound: those
    served requests are one choice the clairvoyant relaxation considers.

    Policies whose refusals or abandonments depend on the cluster's state are
    outside the class: on one fixed trace such a policy may happen to drop
    just the long outputs, so no bound below the clairvoyant one holds for all
    of them; the clairvoyant bound does.
    """

    prompt_cap: int
    decode_cap: int


@dataclass(frozen=True)
class Offered:
    """The replayed requests in arrival order, arrivals at rate 1 (at rate λ each is α/λ)."""

    alpha: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    ttft: np.ndarray
    tpot: np.ndarray
    eligible: np.ndarray  # not refused by the cluster as infeasible

    @property
    def count(self) -> int:
        return len(self.alpha)

    @classmethod
    def of(cls, requests: Sequence[SimRequest], rate: float, model: LatencyModel, kv_capacity: int) -> Offered:
        """`requests` as replayed at `rate`, re-expressed at rate 1."""
        eligible = [feasible(RequestState(i, r.arrival, r.prompt_tokens, r.output_tokens, r.ttft_slo, r.tpot_slo), model, kv_capacity)
                    for i, r in enumerate(requests)]
        return cls(
            alpha=np.array([r.arrival * rate for r in requests], dtype=float),
            prompt=np.array([r.prompt_tokens for r in requests], dtype=np.int64),
            output=np.array([r.output_tokens for r in requests], dtype=np.int64),
            ttft=np.array([r.ttft_slo for r in requests], dtype=float),
            tpot=np.array([r.tpot_slo for r in requests], dtype=float),
            eligible=np.array(eligible, dtype=bool),
        )


def prefill_work(model: LatencyModel, prompt: np.ndarray) -> np.ndarray:
    """A prompt's token terms, c0·P² + c1·P: what its chunks cost however it is cut (c2 left out, steps may share it)."""
    p = prompt.astype(float)
    return model.c0 * p * p + model.c1 * p


def request_work(model: LatencyModel, kv_capacity: int, prompt: np.ndarray, decode_steps: np.ndarray, tpot: np.ndarray,
                 theta: float) -> np.ndarray:
    """Worker-seconds a request with `decode_steps` decode steps costs at least, whoever schedules it, for weight θ.

    Prompt: c0·P² + c1·P. Decode step j (1..n) holds P + j KV tokens, so the
    steps' d1 and d2 terms add to d1·n + d2·Σctx, Σctx = n·P + n(n + 1)/2.
    A step's d0 is charged to its members, θ of it by KV share and the rest
    against the TPOT budget:

    KV share: a step's members hold at most K KV tokens together, so
    θ·d0 ≥ Σ_members θ·d0·ctx/K; r's share is θ·d0·Σctx/K.

    TPOT share: give each request a multiplier μ_r ≥ 0. A step s lasts
    D_s ≥ d0 + V_s, V_s = Σ_{m in s} v_m, v_m = d1 + d2·ctx_m; r's steps run one
    after another within its span, Σ_{s ∋ r} D_s ≤ n·TPOT_r, so the total time
    Σ_s D_s ≥ Σ_s D_s·(1 + M_s) − Σ_r μ_r·n_r·TPOT_r, M_s = Σ_{m in s} μ_m, and
    (1 − θ)·d0 + V_s·M_s ≥ 2·√((1 − θ)·d0·V_s·M_s) ≥ 2·√((1 − θ)·d0)·Σ_m √(v_m·μ_m)
    (AM-GM, then Cauchy-Schwarz). Each member's share is then
    v_m + θ·d0·ctx_m/K + d0·μ_r + 2·√((1 − θ)·d0·μ_r·v_m) − μ_r·TPOT_r, which
    depends on its own μ_r only; the best μ_r adds (1 − θ)·d0·R²/(n·(TPOT_r − d0)),
    R = Σ_j √v_j (μ_r = 0 when TPOT_r ≤ d0). R is taken as ∫_0^n √v(x) dx, below
    the sum since v grows with j.

    A preempted request gets one token from recomputing its x = P + g tokens
    instead of a decode step: a step within its span costing at least
    π = c0·x² + c1·x, which enters the sum above as π·(1 + μ_r) ≥ π. Each token's
    charge above is at most π (checked at the smallest x, with π growing
    faster in x than the charge), so recomputing never costs less; a request
    for which the check fails is charged its prompt terms only.
    """
    p = prompt.astype(float)
    n = decode_steps.astype(float)
    context = n * p + n * (n + 1.0) / 2.0
    decode = model.d1 * n + model.d2 * context + theta * model.d0 * context / kv_capacity
    share = (1.0 - theta) * model.d0
    spare = tpot - model.d0
    usable = (n > 0) & (spare > 0)
    roots = _root_integral(model.d1 + model.d2 * p, model.d2, n)
    gain = np.zeros_like(p)
    multiplier = np.zeros_like(p)
    gain[usable] = share * roots[usable] ** 2 / (n[usable] * spare[usable])
    multiplier[usable] = share * (roots[usable] / (n[usable] * spare[usable])) ** 2
    first = p + 1.0  # the smallest context a decode step of the request holds
    v_first = model.d1 + model.d2 * first
    charge = v_first + theta * model.d0 * first / kv_capacity + model.d0 * multiplier + 2.0 * np.sqrt(share * multiplier * v_first)
    recompute = model.c0 * first * first + model.c1 * first
    slope = model.d2 + theta * model.d0 / kv_capacity + np.sqrt(share * multiplier) * model.d2 / np.sqrt(v_first)
    recompute_dearer = (recompute >= charge) & (model.c1 >= slope)
    return prefill_work(model, prompt) + np.where(recompute_dearer, decode + gain, 0.0)


def _root_integral(start: np.ndarray, slope: float, n: np.ndarray) -> np.ndarray:
    """∫_0^n √(start + slope·x) dx, written without dividing by the slope (which may be 0)."""
    low = np.sqrt(start)
    high = np.sqrt(start + slope * n)
    return (2.0 / 3.0) * n * (high * high + high * low + low * low) / np.maximum(high + low, np.finfo(float).tiny)


@dataclass(frozen=True)
class Plan:
    """The requests a policy is held to: where they sit in the trace, their windows and work, and what may be left out."""

    position: np.ndarray  # in the offered order
    alpha: np.ndarray  # arrival at rate 1
    ttft: np.ndarray  # from arrival to the prefill's deadline
    span: np.ndarray  # from arrival to the window's end: TTFT + decode steps · TPOT
    prefill: np.ndarray  # the prompt's token terms, spent by the prefill's deadline
    work: tuple[np.ndarray, ...]  # the whole request's, per θ
    starts: tuple[tuple[int, float], ...]  # where the checked stretches of the trace begin: (position, its arrival at rate 1)
    skip: int  # members that may go unserved


def plan_holds(plan: Plan, rate: float, workers: int) -> bool:
    """Whether, at `rate`, every start's work fits the cluster's time by each deadline.

    Each member has two deadlines: its prefill's (by then its prompt terms are
    spent) and its window's end (by then all its work is). Taken in deadline
    order, each is an event raising the member's work counted so far.
    """
    arrival = plan.alpha / rate
    deadline = np.concatenate([arrival + plan.ttft, arrival + plan.span])
    member = np.tile(np.arange(len(arrival)), 2)
    order = np.argsort(deadline, kind="stable")  # a prefill's deadline first on a tie with its window's end
    raised = [np.concatenate([plan.prefill, work - plan.prefill]) for work in plan.work]
    for position, alpha in plan.starts:
        events = order[plan.position[member[order]] >= position]
        budget = workers * (deadline[events] - alpha / rate)
        if not all(prefixes_fit(member[events], more[events], budget, plan.skip) for more in raised):
            return False
    return True


def prefixes_fit(members: np.ndarray, raised: np.ndarray, budget: np.ndarray, skip: int) -> bool:
    """Whether, after each event, the members' work less the `skip` largest is within that event's budget.

    Work only grows, so the `skip` largest are kept as a min-heap whose
    entries go stale when their member grows again (it is pushed anew).
    """
    if skip <= 0:
        return bool(np.all(np.cumsum(raised) <= budget))
    counted: dict[int, float] = {}
    largest: dict[int, float] = {}  # the `skip` members with the most work counted, and that work
    heap: list[tuple[float, int]] = []
    total = left_out = 0.0
    for who, more, limit in zip(members.tolist(), raised.tolist(), budget.tolist(), strict=True):
        value = counted[who] = counted.get(who, 0.0) + more
        total += more
        if who in largest:
            left_out += more
            largest[who] = value
            heapq.heappush(heap, (value, who))
        elif len(largest) < skip:
            largest[who] = value
            left_out += value
            heapq.heappush(heap, (value, who))
        else:
            while largest.get(heap[0][1]) != heap[0][0]:
                heapq.heappop(heap)
            if value > heap[0][0]:
                smallest, evicted = heapq.heapreplace(heap, (value, who))
                del largest[evicted]
                largest[who] = value
                left_out += value - smallest
        if total - left_out > limit:
            return False
    return True


def _start_positions(must_serve: int) -> list[int]:
    """Positions where the checked stretches of the trace begin, spread evenly before `must_serve` (later ones
    may hold only requests a run leaves out)."""
    return sorted({round(i * must_serve / STARTS) for i in range(STARTS)} - {must_serve})


def _plan(offered: Offered, members: np.ndarray, decode_steps: np.ndarray, skip: int, must_serve: int, model: LatencyModel,
          kv_capacity: int) -> Plan:
    prompt, tpot = offered.prompt[members], offered.tpot[members]
    return Plan(
        position=members,
        alpha=offered.alpha[members],
        ttft=offered.ttft[members],
        span=offered.ttft[members] + decode_steps * tpot,
        prefill=prefill_work(model, prompt),
        work=tuple(request_work(model, kv_capacity, prompt, decode_steps, tpot, theta) for theta in THETAS),
        starts=tuple((start, float(offered.alpha[start])) for start in _start_positions(must_serve)),
        skip=skip,
    )


def clairvoyant_plan(offered: Offered, must_serve: int, model: LatencyModel, kv_capacity: int) -> Plan | None:
    """Every eligible request, any `eligible − must_serve` of which may go unserved; None if too few are eligible."""
    members = np.flatnonzero(offered.eligible)
    if len(members) < must_serve:
        return None
    return _plan(offered, members, offered.output[members] - 1, len(members) - must_serve, must_serve, model, kv_capacity)


def non_clairvoyant_plans(offered: Offered, must_serve: int, model: LatencyModel, kv_capacity: int) -> list[tuple[NonClairvoyantClass, int, Plan]]:
    """For each decode cap worth trying, the class member with the smallest prompt cap serving `must_serve`, and what it serves."""
    eligible = offered.eligible
    plans = []
    for cap in np.unique(offered.output[eligible]).tolist():
        within = eligible & (offered.output <= cap)
        if int(within.sum()) < must_serve:
            continue
        prompt_cap = int(np.sort(offered.prompt[within])[must_serve - 1])
        members = np.flatnonzero(eligible & (offered.prompt <= prompt_cap))
        served = int((offered.output[members] <= cap).sum())
        steps = np.minimum(offered.output[members], cap) - 1
        plan = _plan(offered, members, steps, 0, must_serve, model, kv_capacity)
        plans.append((NonClairvoyantClass(prompt_cap, int(cap)), served, plan))
    return plans


def _steady_rate(plan: Plan, workers: int) -> float:
    """A first guess: the rate at which the cluster's time just covers the plan's work, ignoring windows."""
    total = float(plan.work[-1].sum())
    return workers * len(plan.position) / total if total > 0 else 1.0


def highest_rate(holds: Callable[[float], bool], guess: float, low: float = 0.0) -> float:
    """A rate where `holds` fails, within REL_TOLERANCE of one where it holds (`holds` must fall with the rate).

    `low` is a rate known to hold (0: none). Everything above the returned
    rate fails; math.inf when the condition holds even at an infinite rate.
    """
    if holds(math.inf):
        return math.inf
    high = max(guess, low * (1.0 + 2.0 * REL_TOLERANCE))
    for _ in range(MAX_DOUBLINGS):
        if not holds(high):
            break
        low, high = high, high * 2.0
    else:
        return math.inf
    while low == 0.0:
        if high <= MIN_RATE:
            return 0.0
        if holds(high / 2.0):
            low = high / 2.0
        else:
            high /= 2.0
    return _bisect(holds, low, high)


def scanned_rate(holds: Callable[[float], bool], guess: float) -> float:
    """The search for a condition that need not fall with the rate: a geometric grid around `guess`, then bisection.

    The highest grid point that holds is refined against the next one up; one
    holding at the top of the grid gives math.inf. Rates between other grid
    points are not checked, so this is a careful estimate, not a proof.
    """
    grid = [guess * GRID_RATIO**k for k in range(-GRID_STEPS, GRID_STEPS + 1)]
    passing = [i for i, rate in enumerate(grid) if holds(rate)]
    if not passing:
        return grid[0]
    top = passing[-1]
    if top == len(grid) - 1:
        return math.inf
    return _bisect(holds, grid[top], grid[top + 1])


def _bisect(holds: Callable[[float], bool], low: float, high: float) -> float:
    """Narrow [low, high] (holds at low, fails at high) to REL_TOLERANCE; the failing end."""
    while high > low * (1.0 + REL_TOLERANCE):
        middle = math.sqrt(low * high)
        if holds(middle):
            low = middle
        else:
            high = middle
    return high


def must_serve(requests: int, attainment: float) -> int:
    """The fewest requests meeting both SLOs for good/requests ≥ attainment, as `summarize` divides."""
    count = max(0, math.ceil(attainment * requests - 1e-9))
    while count > 0 and (count - 1) / requests >= attainment:
        count -= 1
    while count < requests and count / requests < attainment:
        count += 1
    return count


def offered_bound(offered: Offered, setting: Setting, *, attainment: float = 0.9, clairvoyant: bool = False) -> CapacityBound:
    """The bound for these requests, replayed at any rate with arrivals α/rate (see the module's proof)."""
    started = time.perf_counter()
    need = must_serve(offered.count, attainment)
    model = setting.latency_model()
    found = _clairvoyant_bound(offered, need, model, setting) if clairvoyant else _non_clairvoyant_bound(offered, need, model, setting)
    return replace(found, attainment=attainment, requests=offered.count, must_serve=need,
                   infeasible=int((~offered.eligible).sum()), seconds=time.perf_counter() - started)


def _clairvoyant_bound(offered: Offered, need: int, model: LatencyModel, setting: Setting) -> CapacityBound:
    plan = clairvoyant_plan(offered, need, model, setting.kv_capacity)
    rate = 0.0 if plan is None else highest_rate(lambda r: plan_holds(plan, r, setting.workers), _steady_rate(plan, setting.workers))
    return CapacityBound(rate=rate, clairvoyant=True, attainment=0.0, requests=0, must_serve=need, infeasible=0, served=need)


def _non_clairvoyant_bound(offered: Offered, need: int, model: LatencyModel, setting: Setting) -> CapacityBound:
    """The best cap pair; a cap is searched only if it holds at the best rate so far (each condition falls with the rate)."""
    workers = setting.workers
    candidates = non_clairvoyant_plans(offered, need, model, setting.kv_capacity)
    candidates.sort(key=lambda found: float(found[2].work[-1].sum()))  # least work first: likely the best
    best = CapacityBound(rate=0.0, clairvoyant=False, attainment=0.0, requests=0, must_serve=need, infeasible=0, served=0)
    for caps, served, plan in candidates:
        if best.rate > 0.0 and not plan_holds(plan, best.rate, workers):
            continue  # its own bound is no higher
        rate = highest_rate(lambda r, plan=plan: plan_holds(plan, r, workers), _steady_rate(plan, workers), low=best.rate)
        if rate > best.rate or best.decode_cap is None:
            best = replace(best, rate=rate, served=served, decode_cap=caps.decode_cap, prompt_cap=caps.prompt_cap)
        if math.isinf(rate):
            break
    return best


def capacity_bound(
    setting: Setting,
    trace: Path,
    *,
    requests: int | None = None,
    attainment: float = 0.9,
    clairvoyant: bool = False,
    seed: int = 0,
    replay: Replay | None = None,
    refuse_by: str | None = None,
) -> CapacityBound:
    """The offered rate above which no policy of the class serves `attainment` of these requests within SLO.

    The requests are those `workload(setting, trace, rate, replay=replay,
    seed=seed)` replays (`requests`, when given, overrides the replay's count):
    the same requests at every rate, arrivals scaled by 1/rate, so the bound
    is found by bisection. A time window on a length table keeps a different
    set at each rate; that case is scanned (`scanned_rate`). `refuse_by` is
    the older spelling of the class: "work" for clairvoyant, "prompt" for not.
    """
    from tropical.experiments import Replay, workload

    started = time.perf_counter()
    if refuse_by is not None:
        if refuse_by not in ("prompt", "work"):
            raise ValueError(f"refuse_by must be 'prompt' or 'work', got {refuse_by!r}")
        clairvoyant = refuse_by == "work"
    if not 0.0 < attainment <= 1.0:
        raise ValueError(f"attainment must be in (0, 1], got {attainment}")
    replay = replay or Replay()
    if requests is not None:
        replay = replace(replay, requests=requests)
    model = setting.latency_model()

    def offered_at(rate: float) -> Offered:
        return Offered.of(workload(setting, trace, rate, replay=replay, seed=seed).requests, rate, model, setting.kv_capacity)

    base = offered_at(1.0)
    if not replay.windowed or _same_requests(base, offered_at(2.0)):
        found = offered_bound(base, setting, attainment=attainment, clairvoyant=clairvoyant)
        return replace(found, seconds=time.perf_counter() - started)

    def holds(rate: float) -> bool:
        try:
            offered = offered_at(rate)
        except ValueError:  # the window holds no request at this rate: nothing is served
            return False
        need = must_serve(offered.count, attainment)
        if clairvoyant:
            plan = clairvoyant_plan(offered, need, model, setting.kv_capacity)
            return plan is not None and plan_holds(plan, rate, setting.workers)
        return any(plan_holds(plan, rate, setting.workers) for _, _, plan in non_clairvoyant_plans(offered, need, model, setting.kv_capacity))

    need = must_serve(base.count, attainment)
    plan = clairvoyant_plan(base, need, model, setting.kv_capacity)
    rate = scanned_rate(holds, _steady_rate(plan, setting.workers) if plan is not None else 1.0)
    return CapacityBound(rate=rate, clairvoyant=clairvoyant, attainment=attainment, requests=base.count, must_serve=need,
                         infeasible=int((~base.eligible).sum()), served=need, seconds=time.perf_counter() - started)


def _same_requests(a: Offered, b: Offered) -> bool:
    """Whether two replays hold the same requests, with arrivals that scale as 1/rate."""
    return (
        a.count == b.count
        and bool(np.array_equal(a.prompt, b.prompt) and np.array_equal(a.output, b.output))
        and bool(np.allclose(a.alpha, b.alpha, rtol=1e-9, atol=1e-9))
    )
