"""Does a cluster that grows at constant load per worker keep its attainment, and does its simulation stay cheap?

Pooling more workers at the same load per worker should never hurt: every
prompt has more places to go. A policy whose attainment falls as the cluster
grows places badly at scale (INFaaS-style placement by unfinished tokens did:
vLLM on the Azure trace fell from 0.959 on 4 workers to 0.884 on 32). And a
simulator whose cost per request grows with the cluster cannot replay a
thousand-GPU hour. So each policy runs on `chat-13b` scaled to each size, at
`per_worker_rps` × workers, with its split scaled from its best 8-worker one,
and we record the attainment and the wall time per request.

Two ways to offer the load. `poisson` (the default) draws the requests'
lengths from the Azure trace and their arrivals from a Poisson process: every
size sees the same load per worker, so any fall is the policy's. `trace`
replays the trace itself, rescaled (again after its end when a large cluster
needs more of it): its own bursts, but a larger cluster replays more of the
hour, whose load swings more than its first minutes do, so a fall there
mixes the policy's doing with the hour's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tropical.core.bench_router import offered_requests, prefill_split, scaled_setting
from tropical.experiments import Replay, Setting, tuned, workload
from tropical.metrics import summarize
from tropical.policies import make_policy
from tropical.simulator.cluster import SimRequest
from tropical.simulator.simulation import simulate
from tropical.traces import synthetic_arrivals

PER_WORKER_RPS = 1.75  # req/s per worker
REQUESTS_PER_WORKER = 125  # 16,000 requests on 128 workers
ARRIVALS = ("poisson", "trace")


@dataclass(frozen=True)
class ScalePoint:
    policy: str
    workers: int
    prefill_workers: int | None
    requests: int
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    wall_s: float

    @property
    def us_per_request(self) -> float:
        return 1e6 * self.wall_s / self.requests

    def as_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "workers": self.workers,
            "prefill_workers": self.prefill_workers,
            "requests": self.requests,
            "attainment": self.attainment,
            "ttft_attainment": self.ttft_attainment,
            "tpot_attainment": self.tpot_attainment,
            "wall_s": round(self.wall_s, 3),
            "us_per_request": round(self.us_per_request, 1),
        }


def poisson_requests(setting: Setting, rate: float, count: int, seed: int) -> list[SimRequest]:
    """`count` requests with lengths drawn from the setting's trace (with its SLOs) and Poisson arrivals at `rate`."""
    pool = workload(setting, setting.trace, None, replay=Replay(requests=1 << 30)).requests
    picks = random.Random(seed).choices(pool, k=count)
    arrivals = synthetic_arrivals(count, rate=rate, seed=seed)
    return [replace(r, arrival=float(a)) for r, a in zip(picks, arrivals, strict=True)]


def scale_point(policy_name: str, workers: int, *, per_worker_rps: float = PER_WORKER_RPS, requests_per_worker: int = REQUESTS_PER_WORKER,
                arrival: str = "poisson", seed: int = 0) -> ScalePoint:
    """One policy on `workers` workers at constant load per worker."""
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, not {arrival!r}")
    setting = scaled_setting(workers)
    policy = make_policy(policy_name, setting.latency_model(), **tuned(setting, policy_name))
    split = prefill_split(policy, workers)
    rate = per_worker_rps * workers
    count = requests_per_worker * workers
    if arrival == "poisson":
        requests = poisson_requests(setting, rate, count, seed)
    else:
        requests = offered_requests(setting, rate, count / rate, seed)
    started = time.perf_counter()
    result = simulate(requests, setting.cluster(policy, split), policy, seed=seed)
    wall = time.perf_counter() - started
    summary = summarize(result.outcomes())
    return ScalePoint(policy_name, workers, split, len(requests), summary.attainment, summary.ttft_attainment, summary.tpot_attainment, wall)


def scale_benchmark(policies: Sequence[str], sizes: Sequence[int], *, per_worker_rps: float = PER_WORKER_RPS,
                    requests_per_worker: int = REQUESTS_PER_WORKER, arrival: str = "poisson", seed: int = 0,
                    progress: Callable[[ScalePoint], None] | None = None) -> list[ScalePoint]:
    points = []
    for name in policies:
        for size in sizes:
            point = scale_point(name, size, per_worker_rps=per_worker_rps, requests_per_worker=requests_per_worker, arrival=arrival, seed=seed)
            if progress:
                progress(point)
            points.append(point)
    return points


def attainment_drops(points: Sequence[ScalePoint], tolerance: float = 0.005) -> list[tuple[str, int, int, float]]:
    """(policy, smaller, larger, drop) wherever a policy's attainment falls by more than `tolerance` as its cluster grows."""
    drops = []
    for name in dict.fromkeys(p.policy for p in points):
        own = sorted((p for p in points if p.policy == name), key=lambda p: p.workers)
        for small, large in zip(own, own[1:], strict=False):
            if small.attainment - large.attainment > tolerance:
                drops.append((name, small.workers, large.workers, small.attainment - large.attainment))
    return drops
