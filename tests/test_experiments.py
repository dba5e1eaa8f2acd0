"""Settings, SLO rules, the goodput search and the `tropical sim` / `tropical goodput` commands."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.cli import app
from shared.experiments import (
    SETTINGS,
    SearchSettings,
    SloRule,
    capacity_bound,
    policy_goodput,
    run_policy,
    setting_named,
    workload,
)
from shared.latency.model import LatencyModel

MODEL = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.00002)


@pytest.fixture
def lengths(tmp_path: Path) -> Path:
    """A small length table: chat-like prompts and outputs."""
    rng = random.Random(11)
    path = tmp_path / "lengths.csv"
    rows = ["num_prefill_tokens,num_decode_tokens"] + [f"{rng.randint(50, 1500)},{rng.randint(5, 150)}" for _ in range(200)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_slo_rule_multiple_of_isolated_prefill_with_a_floor() -> None:
    rule = SloRule(ttft_scale=3.0, ttft_floor=0.25, tpot=0.1)
    assert rule.ttft(MODEL, 50) == 0.25  # 3 × 0.06 s is under the floor
    assert rule.ttft(MODEL, 990) == pytest.approx(3.0)  # 3 × (0.01 + 0.99)
    assert SloRule(ttft_fixed=0.4).ttft(MODEL, 10_000) == 0.4
    doubled = rule.scaled(2.0)
    assert (doubled.ttft_scale, doubled.ttft_floor, doubled.tpot) == (6.0, 0.5, 0.2)


def test_setting_flags_override_the_preset() -> None:
    assert setting_named("chat-13b").slo == SloRule(ttft_scale=3.0, ttft_floor=0.25, tpot=0.1)
    fixed = setting_named("longbench-70b", ttft_slo_ms=400, tpot_slo_ms=150)
    assert fixed.slo.ttft_fixed == 0.4 and fixed.slo.tpot == 0.15
    assert setting_named("long-66b", ttft_slo_scale=2.0).slo.ttft_scale == 2.0
    with pytest.raises(ValueError):
        setting_named("long-66b", ttft_slo_ms=100, ttft_slo_scale=2.0)
    with pytest.raises(ValueError, match="unknown setting"):
        setting_named("gpt-5")


def test_presets_use_the_same_gpus_for_every_policy() -> None:
    assert {name: s.gpus for name, s in SETTINGS.items()} == {"longbench-70b": 8, "long-66b": 8, "chat-13b": 8}


def test_workload_rescales_arrivals_and_attaches_slos(lengths: Path) -> None:
    setting = setting_named("chat-13b")
    load = workload(setting, lengths, rate=4.0, requests=100)
    assert len(load.requests) == 100 and load.requests[0].arrival == 0.0
    assert load.requests[-1].arrival / 99 == pytest.approx(0.25, rel=0.25)  # mean gap near 1/rate
    model = setting.latency_model()
    r = load.requests[7]
    assert r.ttft_slo == pytest.approx(max(0.25, 3 * model.prefill_time(r.prompt_tokens)))
    assert r.tpot_slo == 0.1


def test_goodput_is_the_highest_rate_that_attains(lengths: Path) -> None:
    setting = replace(setting_named("chat-13b"), workers=2, requests=120, rate_bounds=(1.0, 6.0))
    search = SearchSettings(rel_tolerance=0.05)
    found = policy_goodput(setting, lengths, "vllm", search)
    assert found.converged and found.goodput_rps > 1.0
    assert found.attainment_at[found.goodput_rps] >= 0.9
    failing_above = [rate for rate, value in found.attainment_at.items() if rate > found.goodput_rps and value < 0.9]
    assert failing_above and min(failing_above) <= found.goodput_rps * 1.05 + 1e-9
    assert found.per_gpu == pytest.approx(found.goodput_rps / setting.gpus)


def test_split_search_reports_the_best_split(lengths: Path) -> None:
    setting = replace(setting_named("chat-13b"), workers=4, requests=120, rate_bounds=(1.0, 6.0))
    found = policy_goodput(setting, lengths, "distserve", SearchSettings(rel_tolerance=0.1))
    assert set(found.splits) == {1, 2, 3}
    assert found.goodput_rps == max(found.splits.values())
    assert found.splits[found.prefill_workers] == found.goodput_rps


def test_sim_command_prints_a_summary_and_writes_json(lengths: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(
        app,
        ["sim", "--setting", "chat-13b", "--trace", str(lengths), "--policy", "distserve", "--rate", "3",
         "--requests", "50", "--prefill-workers", "3", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "Request goodput (req/s):" in result.output
    record = json.loads(out.read_text())
    assert record["policy"] == "distserve" and record["simulated_requests"] == 50
    assert 0.0 <= record["slo_attainment"] <= 1.0 and "p99_tpot_ms" in record
    assert record["refused_requests"] == record["abandoned_requests"] == 0  # distserve serves every request


def test_refused_and_abandoned_requests_are_told_apart(lengths: Path) -> None:
    setting = setting_named("longbench-70b")
    result = run_policy(setting, "unified", workload(setting, lengths, rate=20.0), prefill_workers=1)
    dropped = [t for t in result.timelines if t.dropped]
    assert result.refused > 0 and result.abandoned > 0  # overloaded: both happen
    assert result.refused + result.abandoned + sum(t.infeasible for t in dropped) == len(dropped)
    assert all(t.first_token is None for t in dropped if t.placed is None)


def test_goodput_command_writes_the_agreed_json(lengths: Path, tmp_path: Path) -> None:
    out = tmp_path / "goodput.json"
    result = CliRunner().invoke(
        app,
        ["goodput", "--setting", "longbench-70b", "--trace", str(lengths), "--policies", "vllm,kairos",
         "--requests", "60", "--rel-tolerance", "0.2", "--tpot-slo-ms", "150", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["setting"] == "longbench-70b" and report["trace"] == str(lengths)
    assert set(report["policies"]) == {"vllm", "kairos"}
    assert report["slo"] == "TTFT 5x isolated prefill, TPOT 150 ms"
    for found in report["policies"].values():
        assert found["goodput_rps"] >= 0.0 and found["attainment_at"]


def test_goodput_command_rejects_unknown_policies(lengths: Path) -> None:
    result = CliRunner().invoke(app, ["goodput", "--setting", "chat-13b", "--trace", str(lengths), "--policies", "orca"])
    assert result.exit_code != 0


def test_capacity_bound_matches_the_work_arithmetic(tmp_path: Path) -> None:
    # one colocated worker, every request 1000 prompt + 101 output tokens:
    # 10 decode steps a second pay d0 each; the rest covers λ·(101·(d1 + d2·1050.5) + prompt work)
    path = tmp_path / "uniform.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n" + "1000,101\n" * 50)
    setting = replace(setting_named("chat-13b"), workers=1, requests=50)
    m = setting.latency_model()
    expected = (1 - 10 * m.d0) / (101 * (m.d1 + m.d2 * 1050.5) + m.prefill_time(1000) - m.c2)
    assert capacity_bound(setting, path).rate == pytest.approx(expected, rel=1e-6)


def test_capacity_bounds_grow_with_what_a_policy_may_refuse(lengths: Path) -> None:
    setting = replace(setting_named("longbench-70b"), requests=200)
    everyone = capacity_bound(setting, lengths).rate
    by_prompt = capacity_bound(setting, lengths, attainment=0.9, refuse_by="prompt").rate
    clairvoyant = capacity_bound(setting, lengths, attainment=0.9, refuse_by="work").rate
    assert everyone < by_prompt <= clairvoyant
