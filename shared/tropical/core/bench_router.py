"""How long one router decision takes on a loaded cluster: what `tropical bench-router` measures.

A live router calls `place` on every arrival, every worker status change and
the policy's review time, so its cost bounds how fast the cluster can react.
The inputs here are real states, not empty ones: each policy runs on the
`chat-13b` setting scaled to N workers (its role split scaled from the best
8-worker split in docs/results.md) at a load near vLLM's goodput per GPU, so
batches are full and prompts wait; snapshots of the router's queue and every
worker's heartbeat are taken in the last third of the run. The queue is then
filled up to its size with the trace's next prompts, as if a burst of them had
arrived over the last second.

Two things are timed on each state:

- the burst: decode every worker's heartbeat from its wire bytes and turn it
  into a `WorkerView` (`view_of`), then `place` on the whole queue,
  `route_decode` of one prefilled request and one worker's `plan_step`
  (together the `decision`); `place` over the prompts it decided is the
  burst's cost per prompt;
- one event in steady state, what a live router pays per arrival or status
  change: the burst is first left to the policy (what it places is queued on
  the workers, as the router's dispatch ledger shows them until a heartbeat
  does; what it refuses is gone; the rest waits at the router), then one
  prompt arrives (`arrival`), or one prompt-taking worker reports it has
  drained its prompt queue (`status_change`), and `place` decides on the
  backlog. Heartbeats are timed one at a time (`heartbeat`): a router that
  converts each heartbeat once, when it arrives, pays that per heartbeat and
  not per decision.

The garbage collector stays on, but the captured states are frozen out of it
while timing: they are the benchmark's heap, not the router's, and full
collections walking them added tens of milliseconds to the tail at 256 workers.
"""

from __future__ import annotations

import bisect
import cProfile
import gc
import math
import pstats
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tropical.core.cluster import ClusterCore
from tropical.core.router import DispatchLedger
from tropical.core.status import RequestIds, status_of, view_of
from tropical.experiments import SETTINGS, Replay, Setting, workload
from tropical.policies.records import RequestView, Role, WorkerView
from tropical.policies.serving import ServingPolicy, make_policy
from tropical.protocol import WorkerStatus, decode, encode
from tropical.simulator import SimRequest, Simulation

SETTING = "chat-13b"
SIZES = (8, 64, 256)
QUEUE = 1000
LOAD_PER_WORKER = 2.0  # req/s per worker: about vLLM's goodput per GPU on chat-13b, so batches fill and prompts wait
SIMULATED_S = 60.0  # long enough for decode batches to reach their KV-bound size
SNAPSHOTS = 10  # states captured per run, evenly over its last third; timed decisions cycle through them
BURST_S = 1.0  # the prompts added to fill the queue arrived over this many seconds before the snapshot
ARRIVALS = 16  # prompts per snapshot that arrive one at a time in the steady-state events
SETTLE_ROUNDS = 5  # `place` calls at most to leave the burst to the policy (one usually settles it)
PREFILL_SHARE = {"distserve": 3 / 8, "kairos": 3 / 8, "tropical": 1 / 8, "unified": 0.0}  # best chat-13b splits
COMPONENTS = ("decode", "view_of", "place", "route_decode", "plan_step")
EVENTS = ("arrival", "status_change")


@dataclass(frozen=True)
class RouterSnapshot:
    """The router's inputs at one instant of a simulated run."""

    now: float
    queue: tuple[RequestView, ...]  # the router's own queue filled up from the trace, in order of arrival
    views: tuple[WorkerView, ...]
    statuses: tuple[bytes, ...]  # each worker's heartbeat as it travels
    own_queue: int  # prompts of `queue` the router itself held (the rest were added)
    arrivals: tuple[RequestView, ...] = ()  # the trace's next prompts, arriving at `now`, one per event

    @property
    def busy_workers(self) -> int:
        return sum(w.busy for w in self.views)

    @property
    def running_decodes(self) -> int:
        return sum(w.batch.size for w in self.views)

    @property
    def queued_prefills(self) -> int:
        """Prompts placed on workers and not yet prefilled."""
        return sum(len(w.prefills) for w in self.views)


@dataclass(frozen=True)
class RouterCase:
    """One policy on one cluster size: the policy, its snapshots, and the request names its heartbeats use."""

    policy: ServingPolicy
    roles: dict[str, int]
    snapshots: tuple[RouterSnapshot, ...]
    names: RequestIds


@dataclass(frozen=True)
class Backlog:
    """A snapshot's burst once the policy has decided on it: the steady state events are timed in."""

    now: float
    queue: tuple[RequestView, ...]  # what the policy left waiting at the router
    views: tuple[WorkerView, ...]  # the workers with what it placed on them queued, not yet reported by a heartbeat
    arrivals: tuple[RequestView, ...]

    @property
    def held(self) -> int:
        """Prompts queued on the workers, placed before the snapshot or from the burst."""
        return sum(len(w.prefills) for w in self.views)

    def with_arrival(self, k: int) -> tuple[RequestView, ...]:
        return (*self.queue, self.arrivals[k % len(self.arrivals)])

    def with_drained(self, k: int) -> tuple[WorkerView, ...]:
        """The views after the k-th prompt-taking worker (cyclically) reports its prompt queue empty."""
        takers = [i for i, w in enumerate(self.views) if w.role.takes_prompts]
        i = takers[k % len(takers)]
        w = self.views[i]
        drained = replace(w, prefills=(), prefill_load=0, placed_since_step=0, in_step=(), busy=w.busy and w.role.decodes)
        return (*self.views[:i], drained, *self.views[i + 1 :])


def settle(policy: ServingPolicy, s: RouterSnapshot, rounds: int = SETTLE_ROUNDS) -> Backlog:
    """Apply the policy's decisions on the snapshot's queue until it places and refuses nothing more."""
    queue, views = s.queue, s.views
    for _ in range(rounds):
        decision = policy.place(queue, views, s.now)
        if not (decision.placements or decision.drops):
            break
        ledger = DispatchLedger()
        placed = {p.request_id: p.worker_id for p in decision.placements}
        for r in queue:
            if r.id in placed:
                ledger.dispatched(placed[r.id], r, s.now)
        decided = placed.keys() | set(decision.drops)
        queue = tuple(r for r in queue if r.id not in decided)
        views = tuple(ledger.view(w.id, w) for w in views)
    return Backlog(s.now, queue, views, s.arrivals)


@dataclass(frozen=True)
class Quantiles:
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Quantiles:
        ordered = sorted(samples_ns)
        return cls(_nearest_rank(ordered, 0.50) / 1e6, _nearest_rank(ordered, 0.99) / 1e6)


@dataclass(frozen=True)
class RouterTiming:
    """Decision times of one policy on one cluster size, with what the timed states held."""

    policy: str
    workers: int
    roles: dict[str, int]
    queued: int
    own_queue: float  # mean over snapshots of prompts the router itself held
    busy_workers: float  # mean over snapshots
    running_decodes: float  # mean over snapshots, the whole cluster
    queued_prefills: float  # mean over snapshots, the whole cluster
    placed: float  # mean over snapshots of prompts one `place` call places
    dropped: float  # ... and refuses
    decisions: int
    times: dict[str, Quantiles]  # by component, plus `views`, `decision` and `total`; the events; `heartbeat`, `place_per_prompt`
    backlog: float = 0.0  # mean over snapshots of prompts left at the router in steady state
    held: float = 0.0  # ... and queued on the workers

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "workers": self.workers,
            "roles": self.roles,
            "queued": self.queued,
            "own_queue": round(self.own_queue, 1),
            "busy_workers": round(self.busy_workers, 1),
            "running_decodes": round(self.running_decodes, 1),
            "queued_prefills": round(self.queued_prefills, 1),
            "placed": round(self.placed, 1),
            "dropped": round(self.dropped, 1),
            "decisions": self.decisions,
            "times_ms": {name: {"p50": q.p50_ms, "p99": q.p99_ms} for name, q in self.times.items()},
            "backlog": round(self.backlog, 1),
            "held": round(self.held, 1),
        }


def _nearest_rank(ordered: Sequence[int], q: float) -> int:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --- states --------------------------------------------------------------------------------


def scaled_setting(workers: int) -> Setting:
    return replace(SETTINGS[SETTING], workers=workers)


def prefill_split(policy: ServingPolicy, workers: int) -> int | None:
    """The policy's best 8-worker split, scaled to `workers` (None for colocated policies)."""
    if not policy.disaggregated:
        return None
    share = PREFILL_SHARE.get(policy.name, 0.5)
    return min(workers - 1, max(policy.min_prefill_workers, round(workers * share)))


def cluster_roles(policy_name: str, workers: int) -> tuple[Role, ...]:
    """The roles the benchmark gives `workers` workers under the policy; ValueError for a size it cannot split."""
    policy = make_policy(policy_name, scaled_setting(workers).latency_model())
    return policy.roles(workers, prefill_split(policy, workers))


def offered_requests(setting: Setting, rate: float, seconds: float, seed: int) -> list[SimRequest]:
    """The trace at `rate` for `seconds`, replayed again after its end when a large cluster needs more of it."""
    wanted = max(1, round(rate * seconds))
    base = workload(setting, setting.trace, rate, replay=Replay(requests=wanted), seed=seed).requests
    period = base[-1].arrival + 1.0 / rate
    return [replace(base[i % len(base)], arrival=base[i % len(base)].arrival + (i // len(base)) * period) for i in range(wanted)]


def capture(policy_name: str, workers: int, *, queue_size: int = QUEUE, snapshots: int = SNAPSHOTS, seed: int = 0) -> RouterCase:
    """Run the policy on the scaled setting and keep `snapshots` router states from the last third of the run."""
    setting = scaled_setting(workers)
    policy = make_policy(policy_name, setting.latency_model())
    requests = offered_requests(setting, LOAD_PER_WORKER * workers, SIMULATED_S, seed)
    names = RequestIds()
    for i in range(len(requests)):
        names.id_of(f"req-{i}")
    end = requests[-1].arrival
    targets = [end * (2 / 3 + k / (3 * snapshots)) for k in range(snapshots)]
    taken: list[RouterSnapshot] = []

    def observe(now: float, core: ClusterCore) -> None:
        if len(taken) < len(targets) and now >= targets[len(taken)]:
            taken.append(_snapshot(core, now, names, requests, queue_size))

    cluster = setting.cluster(policy, prefill_split(policy, workers))
    Simulation(cluster, policy, seed=seed, observe=observe).run(requests)
    roles = dict(Counter(role.value for role in cluster.roles))
    return RouterCase(policy, roles, tuple(taken), names)


def _snapshot(core: ClusterCore, now: float, names: RequestIds, requests: Sequence[SimRequest], size: int) -> RouterSnapshot:
    own = [job.view for job in core.router.queue.values()][:size]
    added = size - len(own)
    queue = sorted(own + _burst(requests, now, added), key=lambda r: (r.arrival, r.id))
    arrivals = tuple(replace(r, arrival=now) for r in _burst(requests, now, added + ARRIVALS)[added:])  # the next prompts, one per event
    statuses = tuple(
        encode(status_of(w, now, worker_id=f"worker-{w.id}", queue=f"worker.{w.id}", names=names)) for w in core.workers
    )
    return RouterSnapshot(now, tuple(queue), tuple(core.views(now)), statuses, len(own), arrivals)


def _burst(requests: Sequence[SimRequest], now: float, count: int) -> list[RequestView]:
    """`count` prompts that had not arrived yet by `now`, moved to arrive evenly over the last `BURST_S` seconds.

    Their ids follow the run's, so none names a request a worker holds.
    """
    first = bisect.bisect_right([r.arrival for r in requests], now)
    added = []
    for k in range(count):
        r = requests[(first + k) % len(requests)]
        arrival = now - BURST_S * (count - k) / count
        added.append(RequestView(len(requests) + k, arrival, r.prompt_tokens, r.ttft_slo, r.tpot_slo))
    return added


# --- timing --------------------------------------------------------------------------------


def time_decisions(case: RouterCase, decisions: int) -> dict[str, list[int]]:
    """Nanoseconds of each part of `decisions` decisions, cycling through the snapshots and their workers."""
    policy, names = case.policy, case.names
    samples: dict[str, list[int]] = {name: [] for name in COMPONENTS}
    clock = time.perf_counter_ns
    gc.collect()
    gc.freeze()  # the snapshots are the benchmark's heap, not a router's: full collections need not walk them
    try:
        for d in range(decisions):
            s = case.snapshots[d % len(case.snapshots)]
            t0 = clock()
            statuses = [decode(raw) for raw in s.statuses]
            t1 = clock()
            views = [view_of(status, i, names) for i, status in enumerate(statuses) if isinstance(status, WorkerStatus)]
            t2 = clock()
            policy.place(s.queue, views, s.now)
            t3 = clock()
            policy.route_decode(s.queue[d % len(s.queue)], views, s.now)
            t4 = clock()
            policy.plan_step(views[d % len(views)], s.now)
            t5 = clock()
            for name, begin, end in zip(COMPONENTS, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
                samples[name].append(end - begin)
    finally:
        gc.unfreeze()
    return samples


def time_events(policy: ServingPolicy, backlogs: Sequence[Backlog], decisions: int) -> dict[str, list[int]]:
    """Nanoseconds of `place` on each steady-state backlog after one arrival and after one worker's status change."""
    samples: dict[str, list[int]] = {name: [] for name in EVENTS}
    clock = time.perf_counter_ns
    gc.collect()
    gc.freeze()
    try:
        for d in range(decisions):
            b = backlogs[d % len(backlogs)]
            k = d // len(backlogs)
            queue, views = b.with_arrival(k), b.with_drained(k)
            t0 = clock()
            policy.place(queue, b.views, b.now)
            t1 = clock()
            policy.place(b.queue, views, b.now)
            t2 = clock()
            samples["arrival"].append(t1 - t0)
            samples["status_change"].append(t2 - t1)
    finally:
        gc.unfreeze()
    return samples


def time_heartbeats(case: RouterCase, count: int) -> list[int]:
    """Nanoseconds to decode one heartbeat and turn it into a view, for `count` heartbeats across the snapshots."""
    raw = [(i, status) for s in case.snapshots for i, status in enumerate(s.statuses)]
    clock = time.perf_counter_ns
    samples = []
    gc.collect()
    gc.freeze()
    try:
        for k in range(count):
            i, status = raw[k % len(raw)]
            t0 = clock()
            decoded = decode(status)
            if isinstance(decoded, WorkerStatus):
                view_of(decoded, i, case.names)
            samples.append(clock() - t0)
    finally:
        gc.unfreeze()
    return samples


def summarize(samples: dict[str, list[int]]) -> dict[str, Quantiles]:
    """Each part's quantiles, and those of the sums a router pays per decision."""
    sums = {
        "views": ("decode", "view_of"),
        "decision": ("place", "route_decode", "plan_step"),
        "total": COMPONENTS,
    }
    times = {name: Quantiles.of(values) for name, values in samples.items()}
    for name, parts in sums.items():
        times[name] = Quantiles.of([sum(values) for values in zip(*(samples[p] for p in parts), strict=True)])
    return times


def per_prompt(place_ns: Sequence[int], decided: Sequence[int]) -> list[int]:
    """Each burst `place` over the prompts it decided (placed or refused); calls that decided none are left out."""
    return [round(t / n) for t, n in zip(place_ns, decided, strict=True) if n > 0]


def measure(case: RouterCase, workers: int, decisions: int, backlogs: Sequence[Backlog] | None = None) -> RouterTiming:
    """Time the burst and the steady-state events on every snapshot (`backlogs`: the snapshots settled, if done already)."""
    snaps = case.snapshots
    if not snaps:
        raise RuntimeError(f"{case.policy.name} on {workers} workers: the run ended before any state was captured")

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    answers = [case.policy.place(s.queue, s.views, s.now) for s in snaps]
    if backlogs is None:
        backlogs = [settle(case.policy, s) for s in snaps]
    samples = time_decisions(case, decisions)
    times = summarize(samples)
    decided = [len(a.placements) + len(a.drops) for a in answers]
    prompt_ns = per_prompt(samples["place"], [decided[d % len(snaps)] for d in range(decisions)])
    if prompt_ns:
        times["place_per_prompt"] = Quantiles.of(prompt_ns)
    events = time_events(case.policy, backlogs, decisions)
    times.update({name: Quantiles.of(values) for name, values in events.items()})
    times["event"] = Quantiles.of([t for values in events.values() for t in values])
    times["heartbeat"] = Quantiles.of(time_heartbeats(case, decisions * 4))

    return RouterTiming(
        policy=case.policy.name,
        workers=workers,
        roles=case.roles,
        queued=len(snaps[0].queue),
        own_queue=mean([s.own_queue for s in snaps]),
        busy_workers=mean([s.busy_workers for s in snaps]),
        running_decodes=mean([s.running_decodes for s in snaps]),
        queued_prefills=mean([s.queued_prefills for s in snaps]),
        placed=mean([len(a.placements) for a in answers]),
        dropped=mean([len(a.drops) for a in answers]),
        decisions=decisions,
        times=times,
        backlog=mean([len(b.queue) for b in backlogs]),
        held=mean([b.held for b in backlogs]),
    )


def hot_functions(case: RouterCase, decisions: int, top: int = 5) -> list[dict[str, Any]]:
    """Where the burst's `place` spends its time on this case: the functions with the most time of their own, per decision."""

    def burst(d: int) -> None:
        s = case.snapshots[d % len(case.snapshots)]
        case.policy.place(s.queue, s.views, s.now)

    return _hot(burst, decisions, top)


def hot_event_functions(policy: ServingPolicy, backlogs: Sequence[Backlog], decisions: int, top: int = 5) -> list[dict[str, Any]]:
    """The same for the steady-state events: one arrival and one status change per decision."""

    def event(d: int) -> None:
        b = backlogs[d % len(backlogs)]
        policy.place(b.with_arrival(d), b.views, b.now)
        policy.place(b.queue, b.with_drained(d), b.now)

    return _hot(event, decisions, top)


def _hot(run: Callable[[int], None], decisions: int, top: int) -> list[dict[str, Any]]:
    profiler = cProfile.Profile()
    profiler.enable()
    for d in range(decisions):
        run(d)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # (file, line, name) -> (calls, calls, own, cumulative, callers)
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {
            "function": _function_name(key),
            "calls_per_decision": round(value[1] / decisions, 1),
            "own_ms_per_decision": round(1000 * value[2] / decisions, 3),
            "cumulative_ms_per_decision": round(1000 * value[3] / decisions, 3),
        }
        for key, value in rows
    ]


def _function_name(key: tuple[str, int, str]) -> str:
    path, line, name = key
    if path == "~":
        return name  # a built-in
    parts = Path(path).parts
    short = "/".join(parts[parts.index("tropical") :]) if "tropical" in parts else Path(path).name
    return f"{short}:{line} {name}"


def run_router_benchmark(
    policies: Sequence[str],
    sizes: Sequence[int],
    *,
    decisions: int,
    queue_size: int = QUEUE,
    seed: int = 0,
    profile_decisions: int = 50,
    progress: Callable[[RouterTiming], None] | None = None,
) -> dict[str, Any]:
    """Every policy on every size; the cases with the slowest p99 burst decision and p99 event are profiled."""
    results: list[RouterTiming] = []
    worst: tuple[float, RouterCase, RouterTiming] | None = None
    worst_event: tuple[float, RouterCase, list[Backlog], RouterTiming] | None = None
    for workers in sizes:
        for name in policies:
            case = capture(name, workers, queue_size=queue_size, seed=seed)
            backlogs = [settle(case.policy, s) for s in case.snapshots]
            timing = measure(case, workers, decisions, backlogs)
            results.append(timing)
            if progress is not None:
                progress(timing)
            p99 = timing.times["decision"].p99_ms
            if worst is None or p99 > worst[0]:
                worst = (p99, case, timing)
            p99 = timing.times["event"].p99_ms
            if worst_event is None or p99 > worst_event[0]:
                worst_event = (p99, case, backlogs, timing)
    report: dict[str, Any] = {
        "setting": SETTING,
        "load_per_worker_rps": LOAD_PER_WORKER,
        "simulated_s": SIMULATED_S,
        "burst_s": BURST_S,
        "results": [t.as_dict() for t in results],
    }
    if worst is not None:
        _, case, timing = worst
        report["profile"] = {
            "policy": timing.policy,
            "workers": timing.workers,
            "decisions": profile_decisions,
            "hot": hot_functions(case, profile_decisions),
        }
    if worst_event is not None:
        _, case, backlogs, timing = worst_event
        report["event_profile"] = {
            "policy": timing.policy,
            "workers": timing.workers,
            "decisions": profile_decisions,
            "hot": hot_event_functions(case.policy, backlogs, profile_decisions),
        }
    return report
