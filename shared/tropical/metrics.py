"""SLO metrics: per-request outcomes, run summaries, goodput and SLO-scale searches.

Definitions follow DistServe's evaluation, the reference point of the papers we
compare with: TTFT = first token − arrival; TPOT = (finish − first token)/(n − 1),
0 for a single-token output; a request attains its SLO only if it meets both;
goodput is the highest rate at which at least 90 % of requests attain. Summary
JSON uses the key names of `vllm bench serve` so existing tooling can read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tropical.protocol import Timings


@dataclass(frozen=True)
class RequestOutcome:
    """What happened to one request, in seconds on one clock.

    A dropped request, or one that never finished, meets no SLO. A request
    flagged infeasible (its SLO cannot be met even on an idle cluster) stays
    in every denominator and counts as a miss whatever its times say, so that
    attainment is always out of all requests offered.
    """

    request_id: str
    arrival: float
    first_token: float | None
    finish: float | None
    output_tokens: int
    ttft_slo: float
    tpot_slo: float
    dropped: bool = False
    infeasible: bool = False
    prompt_tokens: int = 0
    # Where the time went (seconds), when the run records it.
    queue_s: float | None = None
    prefill_s: float | None = None
    kv_transfer_s: float | None = None
    decode_s: float | None = None

    @property
    def finished(self) -> bool:
        return not self.dropped and self.first_token is not None and self.finish is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.finish is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def meets_ttft(self) -> bool:
        ttft = self.ttft
        return self._countable and ttft is not None and ttft <= self.ttft_slo

    @property
    def meets_tpot(self) -> bool:
        tpot = self.tpot
        return self._countable and tpot is not None and tpot <= self.tpot_slo

    @property
    def meets_both(self) -> bool:
        return self.meets_ttft and self.meets_tpot

    @property
    def _countable(self) -> bool:
        return self.finished and not self.infeasible


def request_record(outcome: RequestOutcome) -> dict[str, Any]:
    """One request as a line of `sim --requests-out`, for scoring outside: seconds from the replay's start,
    milliseconds for TTFT and TPOT ((last − first) / (n − 1), 0 for one token), None where it never got there."""
    ttft, tpot = outcome.ttft, outcome.tpot
    return {
        "arrival_s": outcome.arrival,
        "prompt_tokens": outcome.prompt_tokens,
        "output_tokens": outcome.output_tokens,
        "first_token_s": outcome.first_token,
        "finish_s": outcome.finish,
        "ttft_ms": None if ttft is None else ttft * 1000.0,
        "tpot_ms": None if tpot is None else tpot * 1000.0,
        "dropped": outcome.dropped,
    }


def phase_seconds(timings: Timings) -> dict[str, float | None]:
    """Where a request's time went, from its milestones: queue, prefill, KV transfer and decode (`RequestOutcome`'s
    fields, the simulator's definitions); None where an end of the phase is unknown."""
    decode_start = timings.kv_transferred if timings.kv_transferred is not None else timings.first_token
    return {
        "queue_s": _gap(timings.arrival, timings.prefill_start),
        "prefill_s": _gap(timings.prefill_start, timings.first_token),
        "kv_transfer_s": _gap(timings.first_token, timings.kv_transferred),
        "decode_s": _gap(decode_start, timings.finished),
    }


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


@dataclass(frozen=True)
class Summary:
    """One run in numbers. Latencies in ms; NaN where no request finished."""

    count: int
    finished: int
    dropped: int
    infeasible: int
    good: int  # requests meeting both SLOs
    attainment: float  # good / count: joint TTFT and TPOT attainment
    ttft_attainment: float
    tpot_attainment: float
    duration: float  # seconds
    request_throughput: float  # finished requests per second
    goodput: float  # good requests per second
    total_input_tokens: int
    total_output_tokens: int
    mean_ttft_ms: float
    p50_ttft_ms: float
    p90_ttft_ms: float
    p99_ttft_ms: float
    std_ttft_ms: float
    mean_tpot_ms: float
    p50_tpot_ms: float
    p90_tpot_ms: float
    p99_tpot_ms: float
    std_tpot_ms: float
    mean_e2el_ms: float
    p50_e2el_ms: float
    p99_e2el_ms: float
    mean_queue_ms: float
    mean_prefill_ms: float
    mean_kv_transfer_ms: float
    mean_decode_ms: float

    def as_vllm_json(self) -> dict[str, float | int]:
        """The result keys of `vllm bench serve` (plus attainment and the phase breakdown)."""
        return {
            "duration": self.duration,
            "completed": self.finished,
            "failed": self.count - self.finished,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.goodput,
            "output_throughput": self.total_output_tokens / self.duration if self.duration > 0 else 0.0,
            "total_token_throughput": (self.total_input_tokens + self.total_output_tokens) / self.duration if self.duration > 0 else 0.0,
            "mean_ttft_ms": self.mean_ttft_ms,
            "median_ttft_ms": self.p50_ttft_ms,
            "std_ttft_ms": self.std_ttft_ms,
            "p90_ttft_ms": self.p90_ttft_ms,
            "p99_ttft_ms": self.p99_ttft_ms,
            "mean_tpot_ms": self.mean_tpot_ms,
            "median_tpot_ms": self.p50_tpot_ms,
            "std_tpot_ms": self.std_tpot_ms,
            "p90_tpot_ms": self.p90_tpot_ms,
            "p99_tpot_ms": self.p99_tpot_ms,
            "mean_e2el_ms": self.mean_e2el_ms,
            "median_e2el_ms": self.p50_e2el_ms,
            "p99_e2el_ms": self.p99_e2el_ms,
            "slo_attainment": self.attainment,
            "ttft_slo_attainment": self.ttft_attainment,
            "tpot_slo_attainment": self.tpot_attainment,
            "dropped": self.dropped,
            "infeasible": self.infeasible,
            "mean_queue_ms": self.mean_queue_ms,
            "mean_prefill_ms": self.mean_prefill_ms,
            "mean_kv_transfer_ms": self.mean_kv_transfer_ms,
            "mean_decode_ms": self.mean_decode_ms,
        }


def summarize(outcomes: Iterable[RequestOutcome], *, duration: float | None = None) -> Summary:
    """Aggregate a run; `duration` defaults to first arrival → last finish.

    Latency statistics cover finished requests, as `vllm bench serve` covers
    completed ones; TPOT statistics leave out single-token outputs, which have
    no inter-token gap to measure (they still count towards attainment).
    Percentiles interpolate linearly (numpy's default, as vLLM's do).
    """
    outcomes = list(outcomes)
    done = [o for o in outcomes if o.finished]
    if duration is None:
        duration = _span(outcomes)
    count = len(outcomes)
    good = sum(o.meets_both for o in outcomes)
    ttft_ms = _ms(o.ttft for o in done)
    tpot_ms = _ms(o.tpot for o in done if o.output_tokens > 1)
    e2el_ms = _ms(o.latency for o in done)
    return Summary(
        count=count,
        finished=len(done),
        dropped=sum(o.dropped for o in outcomes),
        infeasible=sum(o.infeasible for o in outcomes),
        good=good,
        attainment=_fraction(good, count),
        ttft_attainment=_fraction(sum(o.meets_ttft for o in outcomes), count),
        tpot_attainment=_fraction(sum(o.meets_tpot for o in outcomes), count),
        duration=duration,
        request_throughput=len(done) / duration if duration > 0 else 0.0,
        goodput=good / duration if duration > 0 else 0.0,
        total_input_tokens=sum(o.prompt_tokens for o in done),
        total_output_tokens=sum(o.output_tokens for o in done),
        mean_ttft_ms=_mean(ttft_ms),
        p50_ttft_ms=_percentile(ttft_ms, 50),
        p90_ttft_ms=_percentile(ttft_ms, 90),
        p99_ttft_ms=_percentile(ttft_ms, 99),
        std_ttft_ms=_std(ttft_ms),
        mean_tpot_ms=_mean(tpot_ms),
        p50_tpot_ms=_percentile(tpot_ms, 50),
        p90_tpot_ms=_percentile(tpot_ms, 90),
        p99_tpot_ms=_percentile(tpot_ms, 99),
        std_tpot_ms=_std(tpot_ms),
        mean_e2el_ms=_mean(e2el_ms),
        p50_e2el_ms=_percentile(e2el_ms, 50),
        p99_e2el_ms=_percentile(e2el_ms, 99),
        mean_queue_ms=_mean(_ms(o.queue_s for o in done)),
        mean_prefill_ms=_mean(_ms(o.prefill_s for o in done)),
        mean_kv_transfer_ms=_mean(_ms(o.kv_transfer_s for o in done)),
        mean_decode_ms=_mean(_ms(o.decode_s for o in done)),
    )


def _span(outcomes: Sequence[RequestOutcome]) -> float:
    if not outcomes:
        return 0.0
    ends = [o.finish for o in outcomes if o.finish is not None] or [o.arrival for o in outcomes]
    return max(ends) - min(o.arrival for o in outcomes)


def _ms(values: Iterable[float | None]) -> np.ndarray:
    return np.array([v * 1000.0 for v in values if v is not None], dtype=float)


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def _std(values: np.ndarray) -> float:
    return float(values.std()) if len(values) else math.nan


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


# --- searches over a black box -----------------------------------------------------------


@dataclass(frozen=True)
class GoodputResult:
    """The highest rate found to attain `target`, and every evaluation on the way.

    `rate` is 0 when no rate down to the search's floor attains. `converged` is False when the
    evaluation budget ran out before the bracket [rate, upper] shrank to the
    tolerance (or before any failing rate was found, in which case `upper` is
    None and the goodput is at least `rate`).
    """

    rate: float
    target: float
    upper: float | None
    converged: bool
    evaluations: tuple[tuple[float, float], ...]  # (rate, attainment) in evaluation order


ZERO_HALVINGS = 10  # a search whose lowest rate fails halves it this many times before it calls the goodput 0


def find_goodput(
    attainment_at: Callable[[float], float],
    *,
    target: float = 0.9,
    low: float,
    high: float,
    rel_tolerance: float = 0.02,
    max_evaluations: int = 30,
) -> GoodputResult:
    """Bisect for the highest rate whose attainment is at least `target`.

    Assumes attainment falls as the rate rises. If `high` still passes, the
    bracket doubles upward until a rate fails; if `low` fails, it halves
    downward until a rate passes, and the goodput is 0 only when nothing down
    to `low` / 2^ZERO_HALVINGS does (a bursty trace can attain well below a
    preset's usual range). Bisection stops once (upper − lower) ≤
    rel_tolerance · lower.
    """
    if not 0.0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    if rel_tolerance <= 0.0 or max_evaluations < 2:
        raise ValueError("rel_tolerance must be positive and max_evaluations at least 2")
    evaluations: list[tuple[float, float]] = []

    def passes(rate: float) -> bool:
        attainment = float(attainment_at(rate))
        evaluations.append((rate, attainment))
        return attainment >= target

    def result(rate: float, upper: float | None, converged: bool) -> GoodputResult:
        return GoodputResult(rate, target, upper, converged, tuple(evaluations))

    if passes(low):
        while passes(high):
            if len(evaluations) >= max_evaluations:
                return result(high, None, False)
            low, high = high, high * 2.0
    else:
        floor = low / 2.0**ZERO_HALVINGS
        while True:
            if len(evaluations) >= max_evaluations:
                return result(0.0, low, False)
            low, high = low / 2.0, low
            if low < floor:
                return result(0.0, high, True)  # nothing attains down to the floor: no goodput
            if passes(low):
                break
    while high - low > rel_tolerance * low:
        if len(evaluations) >= max_evaluations:
            return result(low, high, False)
        middle = (low + high) / 2.0
        if passes(middle):
            low = middle
        else:
            high = middle
    return result(low, high, True)


@dataclass(frozen=True)
class SloScaleSweep:
    """Attainment at each SLO scale, and the tightest scale that attains `target`."""

    target: float
    points: tuple[tuple[float, float], ...]  # (scale, attainment), scales ascending
    min_scale: float | None  # None when no scale attains the target


def slo_scale_sweep(
    attainment_at: Callable[[float], float],
    scales: Sequence[float],
    *,
    target: float = 0.9,
) -> SloScaleSweep:
    """Evaluate attainment with both SLOs multiplied by each scale.

    `min_scale` is the smallest scale from which every larger swept scale also
    attains the target, so a lucky dip in a noisy curve is not reported as
    robustness the system does not have.
    """
    ordered = sorted(set(float(s) for s in scales))
    if not ordered or ordered[0] <= 0.0:
        raise ValueError("scales must be positive and non-empty")
    points = tuple((scale, float(attainment_at(scale))) for scale in ordered)
    min_scale = None
    for scale, attainment in reversed(points):
        if attainment < target:
            break
        min_scale = scale
    return SloScaleSweep(target, points, min_scale)
