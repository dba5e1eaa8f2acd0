"""A replay's report: vLLM's result keys, then Tropical's (SLO attainment, phases, failures, control-plane hops).

The outcomes go through the simulator's own `summarize`, so a live run and
`tropical sim` on the same requests report the same numbers in the same keys;
`simulated_summary` is that reference. What was not measured is None, never 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from tropical.live.bench.dialect import ALWAYS_PERCENTILES, DEFAULT_PERCENTILES, METRICS, percentile_word
from tropical.live.bench.replays import BenchResult
from tropical.metrics import RequestOutcome, Summary, summarize
from tropical.simulator import SimRequest, simulate

if TYPE_CHECKING:
    from tropical.experiments import Setting
    from tropical.policies.records import Role


def bench_report(
    result: BenchResult, *, percentiles: Sequence[float] = DEFAULT_PERCENTILES, goodput: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """vLLM's result keys and per-request lists, then Tropical's: SLO attainment, phases, failures by cause, control-plane hops.

    Latency statistics cover finished requests, as vLLM's cover successful
    ones. Goodput counts the requests that meet `goodput`'s limits (ms, as
    `--goodput` gives them), or, without any, their own SLOs. Whatever was not
    measured (no request finished, a server that sends no milestones) is None.
    """
    summary = summarize(result.outcomes)
    done = [m for m in result.measured if m.outcome.finished]
    values = {
        "ttft": [m.outcome.ttft for m in done],
        "tpot": [m.outcome.tpot for m in done if m.outcome.output_tokens > 1],
        "itl": [gap for m in done for gap in m.chunk_gaps],
        "e2el": [m.outcome.latency for m in done],
    }
    good = sum(_good(m.outcome, goodput) for m in result.measured) if goodput else summary.good
    vllm = summary.as_vllm_json()
    lags = np.array([m.send_lag * 1000.0 for m in result.measured], dtype=float)
    report: dict[str, Any] = {
        "num_prompts": result.requests,
        **{key: vllm[key] for key in ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput")},
        "request_goodput": good / summary.duration if summary.duration > 0 else 0.0,
        "output_throughput": vllm["output_throughput"],
        "total_token_throughput": vllm["total_token_throughput"],
    }
    quantiles = sorted(set(ALWAYS_PERCENTILES) | set(percentiles))
    for metric in METRICS:
        report |= _metric_stats(metric, np.array(values[metric], dtype=float) * 1000.0, quantiles)
    report |= {
        "input_lens": [m.outcome.prompt_tokens for m in result.measured],
        "output_lens": [m.tokens_seen for m in result.measured],
        "ttfts": [m.outcome.ttft if m.outcome.finished else None for m in result.measured],
        "itls": [list(m.chunk_gaps) if m.outcome.finished else [] for m in result.measured],
        "errors": [m.cause or "" for m in result.measured],
        # Tropical's own
        "goodput_slo_ms": dict(goodput) if goodput else None,
        **{key: vllm[key] for key in ("slo_attainment", "ttft_slo_attainment", "tpot_slo_attainment", "dropped", "infeasible")},
        **{key: vllm[key] for key in ("mean_queue_ms", "mean_prefill_ms", "mean_kv_transfer_ms", "mean_decode_ms")},
        "failures": dict(Counter(m.cause for m in result.measured if m.cause is not None)),
        "error_replies": sum(m.error is not None for m in result.measured),
        "error_codes": dict(Counter(m.error for m in result.measured if m.error is not None)),
        "timeouts": sum(m.timed_out for m in result.measured),
        "mean_send_lag_ms": _stat(lags, np.mean),
        "max_send_lag_ms": _stat(lags, np.max),
        **_control_plane(result),
    }
    return nulled(report)


def _good(o: RequestOutcome, limits: Mapping[str, float]) -> bool:
    """Within every limit of `--goodput` (ms); TPOT of a single-token output is 0, as vLLM takes it."""
    if not o.finished:
        return False
    seconds = {"ttft": o.ttft, "tpot": o.tpot, "e2el": o.latency}
    for name, limit in limits.items():
        value = seconds[name]
        if value is None or value * 1000.0 > limit:
            return False
    return True


def _metric_stats(metric: str, ms: np.ndarray, quantiles: Sequence[float]) -> dict[str, float]:
    return {
        f"mean_{metric}_ms": _stat(ms, np.mean),
        f"median_{metric}_ms": _stat(ms, np.median),
        f"std_{metric}_ms": _stat(ms, np.std),
        **{f"p{percentile_word(q)}_{metric}_ms": _stat(ms, lambda a, q=q: np.percentile(a, q)) for q in quantiles},
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


def nulled(value: Any) -> Any:
    """NaN (nothing measured) as None, in dicts and lists too: JSON has no NaN, and 0 would claim a measurement."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: nulled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [nulled(item) for item in value]
    return value


def simulated_summary(setting: Setting, policy_name: str, roles: Sequence[Role], load: Sequence[SimRequest], *, seed: int = 0) -> Summary:
    """`tropical sim` on the same requests and the live deployment's roles: the reference a live run is held to."""
    from tropical.policies import make_policy

    policy = make_policy(policy_name, setting.latency_model())
    cluster = replace(setting.cluster(policy), roles=tuple(roles))
    return summarize(simulate(load, cluster, policy, seed=seed).outcomes())
