"""Settings, SLO rules, the goodput search and the `tropical sim` / `tropical goodput` commands."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.experiments import (
    SETTINGS,
    Replay,
    SearchSettings,
    SloRule,
    policy_goodput,
    run_policy,
    setting_named,
    slo_sweep_report,
    workload,
)
from tropical.latency.model import LatencyModel

MODEL = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.00002)


@pytest.fixture
def timed(tmp_path: Path) -> Path:
    """An Azure-style trace: 120 requests, one every half second, with a burst of ten at 30 s."""
    path = tmp_path / "azure.csv"
    times = [0.5 * i for i in range(110)] + [30.0 + 0.01 * i for i in range(10)]
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:{int(t // 60):02d}:{t % 60:09.6f},{200 + 7 * i},{10 + i % 30}" for i, t in enumerate(sorted(times))
    ]
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
    load = workload(setting, lengths, rate=4.0, replay=Replay(requests=100))
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
    usage = record["worker_usage"]  # where the time went while requests arrived
    assert [u["role"] for u in usage] == ["prefill"] * 3 + ["decode"] * 5
    assert all(0.0 < u["busy_share"] <= 1.0 for u in usage[:3]) and all(u["decode_tokens_per_s"] == 0 for u in usage[:3])
    assert sum(u["decode_tokens_per_s"] for u in usage[3:]) > 0 and "Busy share while arriving (per worker):" in result.output


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
    bound = report["capacity_bound_rps"]
    assert 0.0 < bound["non_clairvoyant"] <= bound["clairvoyant"]  # tropical.capacity, on the requests searched
    for found in report["policies"].values():
        assert found["share_of_bound"] == pytest.approx(found["goodput_rps"] / bound["non_clairvoyant"]) and found["share_of_bound"] <= 1.0


def test_goodput_command_rejects_unknown_policies(lengths: Path) -> None:
    result = CliRunner().invoke(app, ["goodput", "--setting", "chat-13b", "--trace", str(lengths), "--policies", "orca"])
    assert result.exit_code != 0


def test_a_window_replays_every_request_in_it_unless_capped(timed: Path) -> None:
    setting = replace(setting_named("chat-13b"), requests=50)
    assert len(workload(setting, timed, None).requests) == 50  # no window: the setting's count
    window = workload(setting, timed, None, replay=Replay(start_s=10.0, duration_s=30.0))
    assert len(window.requests) == 60 + 10  # 10 s to 40 s: one every half second, plus the burst
    assert window.requests[0].arrival == 0.0 and window.requests[-1].arrival == pytest.approx(29.5)
    capped = workload(setting, timed, None, replay=Replay(requests=5, start_s=10.0, duration_s=30.0))
    assert [r.prompt_tokens for r in capped.requests] == [r.prompt_tokens for r in window.requests[:5]]
    faster = workload(setting, timed, 4.0, replay=Replay(start_s=10.0, duration_s=30.0))
    assert faster.requests[-1].arrival == pytest.approx(69 / 4.0)  # rescaled to 4 req/s, bursts kept
    with pytest.raises(ValueError, match="holds none"):
        workload(setting, timed, None, replay=Replay(start_s=500.0))


def test_gamma_arrivals_are_burstier_on_a_length_table(lengths: Path) -> None:
    setting = setting_named("chat-13b")

    def gap_cv(replay: Replay) -> float:
        times = [r.arrival for r in workload(setting, lengths, 2.0, replay=replay).requests]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean

    assert gap_cv(Replay(requests=200)) == pytest.approx(1.0, abs=0.25)
    assert gap_cv(Replay(requests=200, arrival="gamma", cv=3.0)) > 2.0


def test_sim_command_replays_a_window_of_a_timed_trace_at_its_own_rate(timed: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    args = ["sim", "--setting", "chat-13b", "--trace", str(timed), "--policy", "vllm", "--start-s", "10", "--duration-s", "30"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["simulated_requests"] == 70 and record["rate"] is None
    assert f"{timed.name}: 70 requests at the trace's own times" in result.output  # it says what it replayed
    assert record["replay"] == {"requests": None, "start_s": 10.0, "duration_s": 30.0, "arrival": "poisson", "cv": 1.0}
    result = CliRunner().invoke(app, [*args, "--num-requests", "12", "--rate", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["simulated_requests"] == 12 and "12 requests at 2 req/s" in result.output


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--policy", "vllm"], "give a rate"),  # a length table has no arrival times of its own
        (["--policy", "vllm", "--rate", "2", "--cv", "2"], "--arrival gamma"),
        (["--policy", "vllm", "--rate", "2", "--duration-s", "0"], "--duration-s must be positive"),
        (["--policy", "vllm", "--rate", "2", "--start-s", "1e6"], "holds none"),
        (["--policy", "vllm", "--rate", "2", "--num-requests", "0"], "greater than or equal to 1"),
    ],
)
def test_sim_command_names_bad_replay_options(lengths: Path, extra: list[str], problem: str) -> None:
    result = CliRunner().invoke(app, ["sim", "--setting", "chat-13b", "--trace", str(lengths), *extra], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert problem in result.output


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["sim", "--policy", "vllm", "--rate", "2", "--ttft-slo-ms", "0"], "'--ttft-slo-ms': must be a positive number, got 0"),
        (["sim", "--policy", "vllm", "--rate", "2", "--tpot-slo-ms", "nan"], "'--tpot-slo-ms': must be a positive number, got nan"),
        (["sim", "--policy", "vllm", "--rate", "2", "--ttft-slo-scale", "-1"], "'--ttft-slo-scale': must be a positive number, got -1"),
        (["sim", "--policy", "sarathi", "--rate", "2", "--prefill-workers", "2"], "sarathi runs prompts and decodes on every worker"),
        (["sim", "--policy", "orca", "--rate", "2"], "unknown policy 'orca'"),
        (["sim", "--policy", "vllm", "--rate", "2", "--json", "."], "is a folder; give a file's path"),
        (["goodput", "--policies", ""], "no policy given"),
        (["goodput", "--policies", " , "], "no policy given"),
        (["goodput", "--policies", "vllm,kairos,vllm"], "vllm given twice"),
        (["slo-sweep", "--rate", "1", "--policies", "vllm", "--scales", "nan,1"], "--scales must be positive numbers"),
        (["slo-sweep", "--rate", "1", "--policies", "vllm", "--scales", "0"], "--scales must be positive numbers"),
        (["bench-router", "--policies", "unified,unified"], "unified given twice"),
    ],
)
def test_commands_refuse_bad_slos_policies_scales_splits_and_json_targets(lengths: Path, args: list[str], problem: str) -> None:
    setting = [] if args[0] == "bench-router" else ["--setting", "chat-13b", "--trace", str(lengths)]
    result = CliRunner().invoke(app, [*args, *setting], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert problem in result.output and "Traceback" not in result.output


def test_json_goes_into_a_folder_made_for_it_but_not_under_a_file(lengths: Path, tmp_path: Path) -> None:
    args = ["sim", "--setting", "chat-13b", "--trace", str(lengths), "--policy", "vllm", "--rate", "2", "--requests", "20"]
    out = tmp_path / "new" / "folder" / "sim.json"
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["simulated_requests"] == 20
    result = CliRunner().invoke(app, [*args, "--json", str(out / "under-a-file.json")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


def test_sim_command_draws_gamma_arrivals_for_a_length_table(lengths: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(
        app,
        ["sim", "--setting", "chat-13b", "--trace", str(lengths), "--policy", "vllm", "--rate", "2",
         "--arrival", "gamma", "--cv", "2.5", "--requests", "40", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["replay"]["arrival"] == "gamma" and record["replay"]["cv"] == 2.5 and record["simulated_requests"] == 40


def test_slo_sweep_finds_the_tightest_scale_each_policy_sustains(lengths: Path) -> None:
    setting = replace(setting_named("longbench-70b"), requests=80)
    report = slo_sweep_report(setting, lengths, ["vllm", "kairos"], 0.5, [0.05, 1.0, 50.0])
    for found in report["policies"].values():
        at = found["attainment_at_scale"]
        assert at["0.05"] == 0.0  # TPOT 5 ms is below any decode step: every request infeasible
        assert at["50"] == 1.0  # a light load with SLOs fifty times looser: everyone served in time
        assert found["min_scale"] in (1.0, 50.0) and (found["min_scale"] == 1.0) == (at["1"] >= 0.9)
    assert report["policies"]["kairos"]["prefill_workers_at_scale"]["1"] == 1  # its only split on two workers
    assert report["policies"]["vllm"]["prefill_workers_at_scale"]["1"] is None
    with pytest.raises(ValueError, match="unknown policy"):
        slo_sweep_report(setting, lengths, ["orca"], 0.5, [1.0])
    with pytest.raises(ValueError, match="positive"):
        slo_sweep_report(setting, lengths, ["vllm"], 0.5, [0.0, 1.0])


def test_slo_sweep_command_writes_json_and_a_plot(lengths: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    result = CliRunner().invoke(
        app,
        ["slo-sweep", "--setting", "longbench-70b", "--trace", str(lengths), "--rate", "0.5", "--policies", "distserve,unified",
         "--scales", "1,2", "--requests", "40", "--json", str(out), "--plot", str(png)],
    )
    assert result.exit_code == 0, result.output
    assert "tightest scale attaining" in result.output
    report = json.loads(out.read_text())
    assert set(report["policies"]) == {"distserve", "unified"} and report["scales"] == [1.0, 2.0]
    assert png.read_bytes().startswith(b"\x89PNG")
    bad = CliRunner().invoke(app, ["slo-sweep", "--setting", "longbench-70b", "--rate", "1", "--scales", "1,x"], env={"COLUMNS": "300"})
    assert bad.exit_code == 2 and "comma-separated numbers" in bad.output


def test_a_goodput_search_reports_each_point_as_it_goes(lengths: Path) -> None:
    points: list[tuple[str, int | None, float, float, str]] = []
    found = policy_goodput(SETTINGS["chat-13b"], lengths, "vllm", SearchSettings(replay=Replay(requests=30)), evaluated=lambda *p: points.append(p))
    assert points and {p[0] for p in points} == {"vllm"} and all(p[1] is None for p in points)
    assert {p[4] for p in points} == set(found.by_tuning)  # every tuning searched says which it is
    assert [(rate, value) for _, _, rate, value, tuning in points if tuning == found.tuning] == list(found.attainment_at.items())
