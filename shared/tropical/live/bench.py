"""Replay a workload onto a live deployment and measure it as `vllm bench serve` does.

Each request is published at its arrival time (a timer from the start), forces
its output length (`ignore_eos`, `max_tokens`), and is timed on the client: the
arrival is the scheduled one, so a publish that comes late counts against the
system that kept the loop busy, not for it; the first token and the end are
when the client receives them. The outcomes go through the simulator's own
`summarize`, so a live run and `tropical sim` on the same requests report the
same numbers in the same keys; the per-phase breakdown comes from the
milestones the workers stamp into `RequestFinished.timings`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from tropical.bus import connect_bus
from tropical.live.client import Client, RequestFailed
from tropical.metrics import RequestOutcome, Summary, summarize
from tropical.protocol import SamplingParams, Slo, Timings
from tropical.settings import Settings
from tropical.simulator import SimRequest, simulate
from tropical.traces import synthetic_arrivals

if TYPE_CHECKING:
    from tropical.experiments import Setting
    from tropical.live.deployment import Deployment
    from tropical.live.engines import EngineChoice
    from tropical.policies.records import Role

PROMPT_TOKEN_KINDS = 250  # request i's prompt repeats token (i % 250) + 1: inside every engine's vocabulary
FORCED_LENGTH = SamplingParams(ignore_eos=True)


@dataclass(frozen=True)
class BenchRequest:
    """One request to replay: its arrival (seconds after the start), prompt, forced output length and SLOs."""

    arrival: float
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    ttft_slo: float  # seconds
    tpot_slo: float  # seconds

    @property
    def slo(self) -> Slo:
        return Slo(ttft_ms=self.ttft_slo * 1000.0, tpot_ms=self.tpot_slo * 1000.0)


def bench_requests(load: Sequence[SimRequest]) -> list[BenchRequest]:
    """The simulator's requests with synthetic prompts of their lengths, first arrival at 0."""
    first = min((r.arrival for r in load), default=0.0)
    return [
        BenchRequest(r.arrival - first, synthetic_prompt(i, r.prompt_tokens), r.output_tokens, r.ttft_slo, r.tpot_slo)
        for i, r in enumerate(load)
    ]


def synthetic_prompt(index: int, length: int) -> tuple[int, ...]:
    return ((index % PROMPT_TOKEN_KINDS) + 1,) * length


def poisson_load(
    count: int, *, rate: float, input_len: int, output_len: int, ttft_slo: float, tpot_slo: float, seed: int = 0
) -> tuple[SimRequest, ...]:
    """Fixed-length requests with Poisson arrivals: the synthetic load when no trace is replayed."""
    arrivals = synthetic_arrivals(count, rate=rate, seed=seed)
    return tuple(SimRequest(float(t), input_len, output_len, ttft_slo, tpot_slo) for t in arrivals)


# --- one replay ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One request seen from the client: its outcome, how late it was published, its gaps between chunks."""

    outcome: RequestOutcome
    send_lag: float
    chunk_gaps: tuple[float, ...] = ()
    error: str | None = None  # the code of the error reply that ended it
    timed_out: bool = False
    hops: ControlHops | None = None


@dataclass(frozen=True)
class ControlHops:
    """What the control plane added to one request (seconds): the time its messages spent between the services.

    `to_router`: published → the router took it off the queue; `to_worker`: the
    router dispatched it → its worker took it; `to_client`: its first token
    left the worker → the client had it. Queueing by the policy and engine time
    are not in it: they are the serving itself, which the simulator also has.
    """

    to_router: float
    to_worker: float
    to_client: float

    @property
    def total(self) -> float:
        return self.to_router + self.to_worker + self.to_client


@dataclass(frozen=True)
class BenchResult:
    """Every request of one replay, in the order given."""

    requests: int
    measured: tuple[Measured, ...]

    @property
    def outcomes(self) -> list[RequestOutcome]:
        return [m.outcome for m in self.measured]


async def replay(client: Client, requests: Sequence[BenchRequest], *, start: float, timeout_s: float = 300.0) -> BenchResult:
    """Publish each request at `start` + its arrival (on the loop's clock) and measure every stream.

    A request that gets an error reply or is not done `timeout_s` after its
    arrival fails; the whole replay is bounded by the last arrival plus that.
    """
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(_timed(client, i, r, start, timeout_s, loop.time)) for i, r in enumerate(requests)]
    last = max((r.arrival for r in requests), default=0.0)
    try:
        async with asyncio.timeout_at(start + last + timeout_s + 5.0):
            measured = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)  # let cancelled streams close their reply routes
    return BenchResult(len(requests), tuple(measured))


async def _timed(client: Client, index: int, request: BenchRequest, start: float, timeout_s: float, clock: Callable[[], float]) -> Measured:
    """Wait for the request's arrival, then measure it (times relative to `start`)."""
    await asyncio.sleep(max(0.0, start + request.arrival - clock()))
    return await _measure(client, index, request, lambda: clock() - start, timeout_s)


async def _measure(client: Client, index: int, request: BenchRequest, now: Callable[[], float], timeout_s: float) -> Measured:
    request_id = f"bench-{client.name}-{index}"
    sent = now()
    chunks: list[float] = []
    first_emitted: float | None = None  # the worker's clock (Unix time), as the milestones
    first_received: float | None = None
    tokens = 0
    error: str | None = None
    timed_out = False
    try:
        async with asyncio.timeout(max(0.0, request.arrival + timeout_s - sent)):
            stream = client.generate(
                list(request.prompt_token_ids), max_tokens=request.output_tokens, sampling=FORCED_LENGTH, slo=request.slo, request_id=request_id
            )
            async for chunk in stream:
                if not chunks:
                    first_emitted, first_received = chunk.emitted_at, time.time()
                chunks.append(now())
                tokens += len(chunk.token_ids)
    except RequestFailed as failed:
        error = failed.reply.code.value
    except TimeoutError:
        timed_out = True
    end = None if error is not None or timed_out else now()
    finished = client.finished.pop(request_id, None)
    outcome = RequestOutcome(
        request_id=request_id,
        arrival=request.arrival,
        first_token=chunks[0] if chunks else None,
        finish=end,
        output_tokens=request.output_tokens if end is None else tokens,
        ttft_slo=request.ttft_slo,
        tpot_slo=request.tpot_slo,
        dropped=error is not None,
        prompt_tokens=len(request.prompt_token_ids),
        **(_phases(finished.timings) if finished is not None else {}),
    )
    gaps = tuple(b - a for a, b in zip(chunks, chunks[1:]))
    hops = None
    if finished is not None and first_emitted is not None and first_received is not None:
        hops = _hops(finished.timings, first_emitted, first_received)
    return Measured(outcome, sent - request.arrival, gaps, error=error, timed_out=timed_out, hops=hops)


def _hops(t: Timings, first_emitted: float, first_received: float) -> ControlHops | None:
    if t.routed is None or t.dispatched is None or t.taken is None:
        return None
    return ControlHops(t.routed - t.arrival, t.taken - t.dispatched, first_received - first_emitted)


def _phases(t: Timings) -> dict[str, float | None]:
    """Queue, prefill, KV transfer and decode time from a worker's milestones (the simulator's definitions)."""
    decode_start = t.kv_transferred if t.kv_transferred is not None else t.first_token
    return {
        "queue_s": _gap(t.arrival, t.prefill_start),
        "prefill_s": _gap(t.prefill_start, t.first_token),
        "kv_transfer_s": _gap(t.first_token, t.kv_transferred),
        "decode_s": _gap(decode_start, t.finished),
    }


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


# --- reports ---------------------------------------------------------------------------------


def bench_report(result: BenchResult) -> dict[str, Any]:
    """`summarize`'s vllm-style keys, plus inter-chunk latency, failure causes and how well the client kept time."""
    summary = summarize(result.outcomes)
    gaps = np.array([g * 1000.0 for m in result.measured for g in m.chunk_gaps], dtype=float)
    lags = np.array([m.send_lag * 1000.0 for m in result.measured], dtype=float)
    return {
        "num_prompts": result.requests,
        **summary.as_vllm_json(),
        "error_replies": sum(m.error is not None for m in result.measured),
        "error_codes": dict(Counter(m.error for m in result.measured if m.error is not None)),
        "timeouts": sum(m.timed_out for m in result.measured),
        "mean_itl_ms": _stat(gaps, np.mean),
        "median_itl_ms": _stat(gaps, np.median),
        "p99_itl_ms": _stat(gaps, lambda a: np.percentile(a, 99)),
        "mean_send_lag_ms": _stat(lags, np.mean),
        "max_send_lag_ms": _stat(lags, np.max),
        **_control_plane(result),
    }


def _control_plane(result: BenchResult) -> dict[str, Any]:
    """p50 / p99 of each hop and of their sum per request (ms), over the requests whose milestones all arrived."""
    hops = [m.hops for m in result.measured if m.hops is not None]
    report: dict[str, Any] = {"control_plane_requests": len(hops)}
    for name in ("to_router", "to_worker", "to_client", "total"):
        values = np.array([getattr(h, name) * 1000.0 for h in hops], dtype=float)
        report[f"p50_control_{name}_ms"] = _stat(values, np.median)
        report[f"p99_control_{name}_ms"] = _stat(values, lambda a: np.percentile(a, 99))
    return report


def _stat(values: np.ndarray, reduce: Callable[[np.ndarray], Any]) -> float:
    return float(reduce(values)) if len(values) else float("nan")


def simulated_summary(setting: Setting, policy_name: str, roles: Sequence[Role], load: Sequence[SimRequest], *, seed: int = 0) -> Summary:
    """`tropical sim` on the same requests and the live deployment's roles: the reference a live run is held to."""
    from tropical.policies import make_policy

    policy = make_policy(policy_name, setting.latency_model())
    cluster = replace(setting.cluster(policy), roles=tuple(roles))
    return summarize(simulate(load, cluster, policy, seed=seed).outcomes())


async def bench_embedded(deployment: Deployment, requests: Sequence[BenchRequest], *, timeout_s: float = 300.0) -> BenchResult:
    """Start the deployment, replay onto it from a client in the same process, drain it."""
    await deployment.start()
    try:
        async with await deployment.client() as client:
            return await _replay_now(client, requests, timeout_s)
    finally:
        await deployment.stop()


async def bench_remote(settings: Settings, requests: Sequence[BenchRequest], *, timeout_s: float = 300.0) -> BenchResult:
    """Replay onto the running deployment whose `requests` queue the settings' broker holds."""
    bus = await connect_bus(settings)
    try:
        async with Client(bus, settings) as client:
            return await _replay_now(client, requests, timeout_s)
    finally:
        await bus.close()


async def bench_spawned(
    settings: Settings, policy: str, roles: Sequence[Role], engine: EngineChoice, requests: Sequence[BenchRequest], *, timeout_s: float = 300.0
) -> BenchResult:
    """Serve with the router and each worker a process of its own (`tropical serve`), replay onto it, drain it."""
    from tropical.live.spawn import spawned

    async with spawned(settings, policy, roles, engine):
        return await bench_remote(settings, requests, timeout_s=timeout_s)


async def _replay_now(client: Client, requests: Sequence[BenchRequest], timeout_s: float) -> BenchResult:
    client.timeout_s = timeout_s  # a request's own deadline bounds its stream; a long queue is no silence to give up on
    return await replay(client, requests, start=asyncio.get_running_loop().time(), timeout_s=timeout_s)
