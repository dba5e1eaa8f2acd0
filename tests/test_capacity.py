"""The provable goodput bound: its arithmetic, its search, and that no simulated policy beats it."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tropical.capacity import (
    CapacityBound,
    Offered,
    capacity_bound,
    clairvoyant_plan,
    must_serve,
    non_clairvoyant_plans,
    offered_bound,
    plan_holds,
    prefixes_fit,
    request_work,
)
from tropical.experiments import SETTINGS, Replay, Setting, run_policy, setting_named, workload
from tropical.metrics import summarize
from tropical.policies import POLICY_NAMES, AdmissionRule, make_policy
from tropical.simulator import SimRequest

REPLAYED = 150  # requests per simulated rate in the policy checks: small enough for CI
ABOVE = (1.02, 1.5, 3.0)  # multiples of the non-clairvoyant bound where every policy must miss the target
# Two replays per setting: a seed draws a length table's arrivals; a timed trace keeps its own, so it gets a later window.
VARIANTS = {
    "chat-13b": ((0, Replay(requests=REPLAYED)), (0, Replay(requests=REPLAYED, start_s=1800.0))),
    "long-66b": ((0, Replay(requests=REPLAYED)), (0, Replay(requests=REPLAYED, start_s=1800.0))),
    "longbench-70b": ((0, Replay(requests=REPLAYED)), (1, Replay(requests=REPLAYED))),
}
# Multiples of the non-clairvoyant bound where the best policy (any admission rule) still meets the target. The best
# goodput over the bound, measured on these replays: 0.47 and 0.2 on chat-13b (its later window is a burst of
# 4k-token prompts: the bound packs their prefills perfectly into their TTFT windows), 0.55 and 0.61 on longbench-70b,
# 0.39 and 0.3 on long-66b (14k-token prompts keep every policy far from the work limit).
BELOW = {"chat-13b": 0.15, "longbench-70b": 0.45, "long-66b": 0.22}


def timed_trace(path: Path, prompt: int, output: int, count: int) -> Path:
    """A DistServe-style trace of identical requests, one a second (any rate rescales the gaps evenly)."""
    path.write_text("arrival_s,prompt_len,output_len\n" + "".join(f"{i}.0,{prompt},{output}\n" for i in range(count)))
    return path


# --- the arithmetic ----------------------------------------------------------------------------


def hand_work(setting: Setting, prompt: int) -> tuple[float, float]:
    """Prompt terms, and the most any θ charges a request of that prompt with one decode step (output 2)."""
    m = setting.latency_model()
    prefill = m.c0 * prompt**2 + m.c1 * prompt
    tokens = prefill + m.d1 + m.d2 * (prompt + 1)  # one decode step holding P + 1 KV tokens
    kv = m.d0 * (prompt + 1) / setting.kv_capacity  # θ = 1: d0 by KV share
    start = m.d1 + m.d2 * prompt
    roots = 2.0 / (3.0 * m.d2) * ((start + m.d2) ** 1.5 - start**1.5)  # ∫_0^1 √(d1 + d2·(P + x)) dx
    tpot = m.d0 * roots**2 / (setting.slo.tpot - m.d0)  # θ = 0: d0 against the TPOT budget
    return prefill, tokens + max(kv, tpot)  # each charge is linear in θ: an end of the grid is the largest


@pytest.mark.parametrize("attainment, left_out", [(1.0, 0), (0.9, 2)])
def test_bound_matches_hand_arithmetic(tmp_path: Path, attainment: float, left_out: int) -> None:
    # 20 identical requests (2000 prompt, 2 output tokens), i/λ apart, one worker. Windows do not overlap
    # (1/λ > TPOT), so the tightest check is at the last prefill's deadline (19/λ + TTFT) from the first
    # arrival: 19 whole requests and the last prompt, less the `left_out` largest, must fit in that time.
    setting = replace(setting_named("chat-13b"), workers=1)
    path = timed_trace(tmp_path / "uniform.csv", 2000, 2, 20)
    prefill, whole = hand_work(setting, 2000)
    ttft = setting.slo.ttft(setting.latency_model(), 2000)
    expected = 19 / ((19 - left_out) * whole + prefill - ttft)
    assert expected * setting.slo.tpot < 1.0  # the windows really are apart
    bound = capacity_bound(setting, path, requests=20, attainment=attainment, clairvoyant=True)
    assert bound.rate == pytest.approx(expected, rel=2e-4)
    assert (bound.requests, bound.must_serve, bound.infeasible) == (20, 20 - left_out, 0)
    # a policy blind to outputs cannot tell identical requests apart: it serves them all or refuses them all
    blind = capacity_bound(setting, path, requests=20, attainment=attainment)
    assert blind.rate == pytest.approx(19 / (19 * whole + prefill - ttft), rel=2e-4)
    assert (blind.served, blind.decode_cap, blind.prompt_cap) == (20, 2, 2000)


def test_a_request_costs_its_prompt_terms_and_decode_terms() -> None:
    setting = setting_named("long-66b")
    m = setting.latency_model()
    prompt, steps, tpot = np.array([1000, 1000]), np.array([0, 99]), np.array([0.1, 0.1])
    kv_only = request_work(m, setting.kv_capacity, prompt, steps, tpot, 1.0)
    context = 99 * 1000 + 99 * 100 / 2
    assert kv_only[0] == pytest.approx(m.c0 * 1e6 + m.c1 * 1000)  # a 1-token output is its prefill only
    assert kv_only[1] == pytest.approx(kv_only[0] + 99 * m.d1 + (m.d2 + m.d0 / setting.kv_capacity) * context)
    tpot_only = request_work(m, setting.kv_capacity, prompt, steps, tpot, 0.0)
    assert tpot_only[1] > kv_only[0] + 99 * m.d1 + m.d2 * context  # d0 is charged against the TPOT budget
    assert tpot_only[1] < kv_only[0] + (99 * m.d1 + m.d2 * context) * 0.1 / (0.1 - m.d0)  # at most Σv·TPOT/(TPOT − d0)


def test_must_serve_matches_how_attainment_is_divided() -> None:
    assert must_serve(200, 0.9) == 180
    assert must_serve(150, 0.9) == 135
    assert must_serve(7, 0.9) == 7
    assert must_serve(10, 1.0) == 10
    for count in range(1, 60):
        need = must_serve(count, 0.9)
        assert need / count >= 0.9 and (need - 1) / count < 0.9


def test_arrivals_at_a_rate_are_those_at_rate_one_scaled() -> None:
    # the bisection relies on it: the same requests at every rate, every arrival α/λ
    for setting in SETTINGS.values():
        at_one = workload(setting, setting.trace, 1.0, replay=Replay(requests=100), seed=3).requests
        at_rate = workload(setting, setting.trace, 7.5, replay=Replay(requests=100), seed=3).requests
        assert [(r.prompt_tokens, r.output_tokens) for r in at_one] == [(r.prompt_tokens, r.output_tokens) for r in at_rate]
        assert [r.arrival * 7.5 for r in at_rate] == pytest.approx([r.arrival for r in at_one], rel=1e-9, abs=1e-9)


# --- the search and its relaxation -------------------------------------------------------------


def brute_prefixes_fit(members: list[int], raised: list[float], budget: list[float], skip: int) -> bool:
    counted: dict[int, float] = {}
    for who, more, limit in zip(members, raised, budget, strict=True):
        counted[who] = counted.get(who, 0.0) + more
        kept = sorted(counted.values())[: max(0, len(counted) - skip)]
        if sum(kept) > limit + 1e-9:
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 5), st.floats(0.0, 3.0), st.floats(0.0, 8.0)), min_size=1, max_size=14),
    skip=st.integers(0, 4),
)
def test_leaving_out_the_largest_is_checked_exactly(events: list[tuple[int, float, float]], skip: int) -> None:
    members, raised, budget = (list(column) for column in zip(*events, strict=True))
    budget = np.maximum.accumulate(budget).tolist()  # budgets grow with the deadline, as in the bound
    fast = prefixes_fit(np.array(members), np.array(raised), np.array(budget), skip)
    slow = brute_prefixes_fit(members, raised, budget, skip)
    assert fast == slow or abs(_margin(members, raised, budget, skip)) <= 2e-9  # they differ only within the brute force's tolerance


def _margin(members: list[int], raised: list[float], budget: list[float], skip: int) -> float:
    counted: dict[int, float] = {}
    worst = math.inf
    for who, more, limit in zip(members, raised, budget, strict=True):
        counted[who] = counted.get(who, 0.0) + more
        worst = min(worst, limit - sum(sorted(counted.values())[: max(0, len(counted) - skip)]))
    return worst


requests_strategy = st.lists(
    st.tuples(st.floats(0.0, 5.0), st.integers(1, 3000), st.integers(1, 400)), min_size=1, max_size=25
)


def random_offered(setting: Setting, rows: list[tuple[float, int, int]]) -> Offered:
    model = setting.latency_model()
    times = np.cumsum([gap for gap, _, _ in rows]) - rows[0][0]
    requests = [SimRequest(float(t), p, o, setting.slo.ttft(model, p), setting.slo.tpot) for t, (_, p, o) in zip(times, rows, strict=True)]
    return Offered.of(requests, 1.0, model, setting.kv_capacity)


@settings(max_examples=40, deadline=None)
@given(rows=requests_strategy, attainment=st.sampled_from([0.5, 0.9, 1.0]))
def test_the_condition_falls_with_the_rate(rows: list[tuple[float, int, int]], attainment: float) -> None:
    setting = replace(setting_named("longbench-70b"), workers=1)
    offered = random_offered(setting, rows)
    need = must_serve(offered.count, attainment)
    plans = [plan for _, _, plan in non_clairvoyant_plans(offered, need, setting.latency_model(), setting.kv_capacity)]
    plans.append(clairvoyant_plan(offered, need, setting.latency_model(), setting.kv_capacity))
    rates = [0.05 * 1.5**k for k in range(20)] + [math.inf]
    for plan in plans:
        if plan is None:
            continue
        verdicts = [plan_holds(plan, rate, setting.workers) for rate in rates]
        assert verdicts == sorted(verdicts, reverse=True)  # True up to some rate, False above


@settings(max_examples=40, deadline=None)
@given(rows=requests_strategy, attainment=st.sampled_from([0.5, 0.9, 1.0]))
def test_not_knowing_outputs_never_raises_the_bound(rows: list[tuple[float, int, int]], attainment: float) -> None:
    setting = replace(setting_named("chat-13b"), workers=2)
    offered = random_offered(setting, rows)
    blind = offered_bound(offered, setting, attainment=attainment).rate
    seeing = offered_bound(offered, setting, attainment=attainment, clairvoyant=True).rate
    assert blind <= seeing * 1.001


def test_bounds_order_by_what_the_policy_may_know_and_must_serve() -> None:
    setting = SETTINGS["longbench-70b"]
    blind = capacity_bound(setting, setting.trace, requests=300)
    seeing = capacity_bound(setting, setting.trace, requests=300, clairvoyant=True)
    everyone = capacity_bound(setting, setting.trace, requests=300, attainment=1.0, clairvoyant=True)
    assert 0.0 < everyone.rate <= seeing.rate * 1.001
    assert 0.0 < blind.rate <= seeing.rate * 1.001
    assert capacity_bound(setting, setting.trace, requests=300, attainment=1.0).rate <= blind.rate * 1.001
    assert blind.decode_cap is not None and blind.served >= blind.must_serve == 270
    assert capacity_bound(setting, setting.trace, requests=300, refuse_by="work").rate == seeing.rate


def test_bounds_grow_with_workers_and_kv_capacity() -> None:
    setting = replace(SETTINGS["chat-13b"], requests=300)
    for clairvoyant in (False, True):
        rates = [capacity_bound(replace(setting, workers=w), setting.trace, clairvoyant=clairvoyant).rate for w in (2, 4, 8)]
        assert rates == sorted(rates) and rates[0] < rates[-1]
    # (a larger cache makes more requests feasible, which a policy blind to outputs must then admit: clairvoyant only)
    rates = [capacity_bound(replace(setting, kv_capacity=k), setting.trace, clairvoyant=True).rate for k in (8_000, 20_000, 66_144)]
    assert rates == sorted(rates) and rates[0] < rates[-1]


def test_a_few_requests_on_many_workers_are_never_limited(tmp_path: Path) -> None:
    path = timed_trace(tmp_path / "few.csv", 100, 5, 3)
    assert capacity_bound(setting_named("chat-13b"), path, requests=3, clairvoyant=True).rate == math.inf


def test_a_window_on_a_length_table_is_scanned(tmp_path: Path) -> None:
    # the window keeps more requests the higher the rate, so the search cannot bisect; it still answers
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{200 + 37 * (i % 20)},{5 + i % 40}\n" for i in range(400)))
    setting = replace(setting_named("chat-13b"), workers=1)
    windowed = capacity_bound(setting, path, replay=Replay(duration_s=20.0), clairvoyant=True)
    assert isinstance(windowed, CapacityBound) and 0.0 < windowed.rate < math.inf


# --- no simulated policy beats it ----------------------------------------------------------------


@cache
def bounds(name: str, variant: int) -> tuple[float, float]:
    setting = SETTINGS[name]
    seed, replay = VARIANTS[name][variant]
    blind, seeing = (capacity_bound(setting, setting.trace, seed=seed, replay=replay, clairvoyant=c).rate for c in (False, True))
    return blind, seeing


def attainments(name: str, variant: int, rate: float) -> dict[tuple[str, AdmissionRule], float]:
    setting = SETTINGS[name]
    seed, replay = VARIANTS[name][variant]
    load = workload(setting, setting.trace, rate, replay=replay, seed=seed)
    return {
        (policy, rule): summarize(run_policy(setting, policy, load, seed=seed, admission=rule).outcomes()).attainment
        for policy in POLICY_NAMES
        for rule in AdmissionRule
    }


def test_every_policy_is_non_clairvoyant() -> None:
    model = SETTINGS["chat-13b"].latency_model()
    assert not any(make_policy(name, model).clairvoyant for name in POLICY_NAMES)


@pytest.mark.parametrize("variant", (0, 1))
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_no_policy_meets_the_target_above_the_bound(name: str, variant: int) -> None:
    blind, seeing = bounds(name, variant)
    assert 0.0 < blind <= seeing < math.inf
    for rate in [blind * factor for factor in ABOVE] + [seeing * 1.02]:
        beaten = {run: value for run, value in attainments(name, variant, rate).items() if value >= 0.9}
        assert not beaten, f"{name} at {rate:.4g} req/s (bounds {blind:.4g}, {seeing:.4g}): {beaten}"


@pytest.mark.parametrize("variant", (0, 1))
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_best_policy_comes_within_a_factor_of_the_bound(name: str, variant: int) -> None:
    blind, _ = bounds(name, variant)
    assert max(attainments(name, variant, BELOW[name] * blind).values()) >= 0.9
