"""SLO metrics by hand: TPOT, attainment, percentiles, summaries, goodput bisection, SLO-scale sweeps."""

from __future__ import annotations

import math

import pytest

from tropical.metrics import RequestOutcome, find_goodput, slo_scale_sweep, summarize


def outcome(
    arrival: float = 0.0,
    first: float | None = 0.1,
    finish: float | None = 1.0,
    n: int = 10,
    *,
    ttft_slo: float = 0.2,
    tpot_slo: float = 0.1,
    **extra: object,
) -> RequestOutcome:
    return RequestOutcome(
        request_id=f"r{arrival}",
        arrival=arrival,
        first_token=first,
        finish=finish,
        output_tokens=n,
        ttft_slo=ttft_slo,
        tpot_slo=tpot_slo,
        **extra,
    )


# --- one request -------------------------------------------------------------------------


def test_ttft_and_tpot_formulas() -> None:
    r = outcome(arrival=1.0, first=1.5, finish=3.5, n=5)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.5)  # (3.5 − 1.5) / (5 − 1)
    assert r.latency == pytest.approx(2.5)


def test_single_token_output_has_zero_tpot_as_in_distserve() -> None:
    r = outcome(first=0.1, finish=0.1, n=1, tpot_slo=0.0)
    assert r.tpot == 0.0
    assert r.meets_tpot


def test_unfinished_requests_have_no_tpot_and_meet_nothing() -> None:
    started = outcome(first=0.1, finish=None)
    assert started.ttft == pytest.approx(0.1) and started.tpot is None
    assert not started.meets_ttft and not started.meets_tpot and not started.meets_both
    never = outcome(first=None, finish=None)
    assert never.ttft is None and not never.meets_ttft


def test_dropped_and_infeasible_requests_are_misses_whatever_their_times() -> None:
    assert outcome().meets_both
    assert not outcome(dropped=True).meets_ttft
    infeasible = outcome(infeasible=True)
    assert not infeasible.meets_ttft and not infeasible.meets_tpot and not infeasible.meets_both


def test_slo_boundaries_are_inclusive() -> None:
    r = outcome(arrival=0.0, first=0.25, finish=1.25, n=11, ttft_slo=0.25, tpot_slo=0.1)
    assert r.meets_ttft and r.meets_tpot


# --- a run -------------------------------------------------------------------------------


def test_joint_attainment_differs_from_per_slo_attainment() -> None:
    both = outcome(first=0.1, finish=1.0)  # ttft 0.1, tpot 0.1
    ttft_only = outcome(first=0.1, finish=2.0)  # tpot 0.211
    tpot_only = outcome(first=0.5, finish=1.4)  # ttft 0.5
    neither = outcome(first=0.5, finish=3.0)
    summary = summarize([both, ttft_only, tpot_only, neither])
    assert summary.attainment == pytest.approx(0.25)
    assert summary.ttft_attainment == pytest.approx(0.5)
    assert summary.tpot_attainment == pytest.approx(0.5)
    assert summary.good == 1


def test_percentiles_interpolate_linearly() -> None:
    # TTFTs 1..100 ms: the q-th percentile is 1 + 99·q/100.
    runs = [outcome(arrival=0.0, first=k / 1000, finish=1.0) for k in range(1, 101)]
    summary = summarize(runs)
    assert summary.p50_ttft_ms == pytest.approx(50.5)
    assert summary.p90_ttft_ms == pytest.approx(90.1)
    assert summary.p99_ttft_ms == pytest.approx(99.01)
    assert summary.mean_ttft_ms == pytest.approx(50.5)


def test_summary_counts_throughput_and_duration() -> None:
    runs = [
        outcome(arrival=0.0, first=0.1, finish=1.0, n=10, prompt_tokens=100),
        outcome(arrival=1.0, first=1.1, finish=4.0, n=1, prompt_tokens=50),
        outcome(arrival=2.0, first=None, finish=None, dropped=True),
        outcome(arrival=3.0, first=3.1, finish=None),
        outcome(arrival=3.5, first=3.6, finish=4.5, n=10, infeasible=True, prompt_tokens=10),
    ]
    summary = summarize(runs)
    assert (summary.count, summary.finished, summary.dropped, summary.infeasible) == (5, 3, 1, 1)
    assert summary.duration == pytest.approx(4.5)  # first arrival to last finish
    assert summary.request_throughput == pytest.approx(3 / 4.5)
    assert summary.good == 2 and summary.goodput == pytest.approx(2 / 4.5)
    assert summary.attainment == pytest.approx(2 / 5)
    assert summary.total_input_tokens == 160 and summary.total_output_tokens == 21
    # TPOT statistics skip the single-token output: both others have TPOT 0.1 s.
    assert summary.mean_tpot_ms == pytest.approx(100.0) and summary.p99_tpot_ms == pytest.approx(100.0)
    assert summarize(runs, duration=10.0).request_throughput == pytest.approx(0.3)


def test_phase_breakdown_means() -> None:
    runs = [outcome(queue_s=0.01, prefill_s=0.05, kv_transfer_s=0.002, decode_s=0.9), outcome(queue_s=0.03, prefill_s=0.07)]
    summary = summarize(runs)
    assert summary.mean_queue_ms == pytest.approx(20.0)
    assert summary.mean_prefill_ms == pytest.approx(60.0)
    assert summary.mean_kv_transfer_ms == pytest.approx(2.0)
    assert summary.mean_decode_ms == pytest.approx(900.0)


def test_empty_run() -> None:
    summary = summarize([])
    assert summary.count == 0 and summary.duration == 0.0 and summary.request_throughput == 0.0
    assert math.isnan(summary.attainment) and math.isnan(summary.p99_ttft_ms)


def test_vllm_json_keys() -> None:
    runs = [
        outcome(arrival=0.0, first=0.1, finish=1.0, n=10, prompt_tokens=100),
        outcome(arrival=0.5, first=None, finish=None, dropped=True),
    ]
    result = summarize(runs).as_vllm_json()
    for key in (
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
        "request_goodput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
        "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms",
        "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
    ):  # fmt: skip
        assert key in result, key
    assert result["completed"] == 1 and result["failed"] == 1
    assert result["mean_ttft_ms"] == pytest.approx(100.0) and result["median_tpot_ms"] == pytest.approx(100.0)
    assert result["request_goodput"] == pytest.approx(1.0) and result["output_throughput"] == pytest.approx(10.0)
    assert result["slo_attainment"] == pytest.approx(0.5)


# --- goodput -----------------------------------------------------------------------------


def test_bisection_finds_a_step() -> None:
    result = find_goodput(lambda rate: 1.0 if rate <= 3.7 else 0.5, low=1.0, high=8.0)
    assert result.converged
    assert 3.7 * (1 - 0.02) <= result.rate <= 3.7
    assert result.upper is not None and result.upper > 3.7
    assert (result.upper - result.rate) <= 0.02 * result.rate
    assert result.evaluations[:2] == ((1.0, 1.0), (8.0, 0.5))
    assert len(result.evaluations) <= 30


def test_bisection_on_a_smooth_curve() -> None:
    # attainment e^(−r/10) ≥ 0.9 ⇔ r ≤ 10·ln(1/0.9) = 1.0536
    result = find_goodput(lambda rate: math.exp(-rate / 10), low=0.1, high=10.0, rel_tolerance=0.001)
    assert result.rate == pytest.approx(10 * math.log(1 / 0.9), rel=0.001)
    assert result.rate <= 10 * math.log(1 / 0.9)


def test_high_that_passes_is_expanded() -> None:
    result = find_goodput(lambda rate: 1.0 if rate <= 37.0 else 0.0, low=1.0, high=2.0)
    assert result.converged and 36.0 < result.rate <= 37.0
    assert [rate for rate, _ in result.evaluations[:6]] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_low_that_fails_is_halved_toward_zero() -> None:
    """A bursty trace may attain only well below a preset's lower rate: the search looks there before it says 0."""
    result = find_goodput(lambda rate: 1.0 if rate <= 0.14 else 0.5, low=1.0, high=4.0)
    assert result.converged and 0.14 * (1 - 0.02) <= result.rate <= 0.14
    assert [rate for rate, _ in result.evaluations[:4]] == [1.0, 0.5, 0.25, 0.125]


def test_nothing_attaining_down_to_the_floor_means_zero_goodput() -> None:
    result = find_goodput(lambda rate: 0.5, low=1.0, high=4.0)
    assert result.rate == 0.0 and result.converged and result.upper == 1.0 / 2**10
    assert len(result.evaluations) == 11
    out_of_budget = find_goodput(lambda rate: 0.5, low=1.0, high=4.0, max_evaluations=5)
    assert out_of_budget.rate == 0.0 and not out_of_budget.converged  # it did not look far enough down to say 0


def test_evaluation_budget_is_respected() -> None:
    calls: list[float] = []

    def attainment(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= 3.3 else 0.0

    result = find_goodput(attainment, low=1.0, high=8.0, rel_tolerance=1e-9, max_evaluations=5)
    assert len(calls) == 5 == len(result.evaluations)
    assert not result.converged and result.rate <= 3.3 < result.upper

    always = find_goodput(lambda rate: 1.0, low=1.0, high=2.0, max_evaluations=4)
    assert not always.converged and always.upper is None and always.rate == 8.0


@pytest.mark.parametrize("kwargs", [{"low": 0.0, "high": 1.0}, {"low": 2.0, "high": 1.0}, {"low": 1.0, "high": 2.0, "rel_tolerance": 0.0}])
def test_goodput_rejects_bad_brackets(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        find_goodput(lambda rate: 1.0, **kwargs)


# --- SLO scale ---------------------------------------------------------------------------


def test_slo_scale_sweep_finds_the_tightest_robust_scale() -> None:
    sweep = slo_scale_sweep(lambda s: min(1.0, s / 1.2), [1.6, 0.4, 0.8, 1.0, 1.2, 1.4])
    assert [scale for scale, _ in sweep.points] == [0.4, 0.8, 1.0, 1.2, 1.4, 1.6]
    assert sweep.min_scale == 1.2  # 1.08 is the exact crossing; 1.0 gives 0.833


def test_slo_scale_sweep_ignores_a_lucky_dip() -> None:
    curve = {0.5: 0.95, 1.0: 0.5, 1.5: 0.92, 2.0: 0.99}
    assert slo_scale_sweep(curve.__getitem__, list(curve)).min_scale == 1.5
    assert slo_scale_sweep(lambda s: 0.1, [1.0, 2.0]).min_scale is None
    with pytest.raises(ValueError):
        slo_scale_sweep(lambda s: 1.0, [])
