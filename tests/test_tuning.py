"""Baselines at their faithful tunings and behind a load-aware router; policy options written as text."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.experiments import SearchSettings, policy_goodput, setting_named, tuned
from tropical.latency.model import LatencyModel
from tropical.policies import (
    POLICY_NAMES,
    AllowedStep,
    BatchSummary,
    LeastLoadedRouter,
    PlacementRule,
    RequestView,
    Role,
    WorkerView,
    make_policy,
)
from tropical.policies.serving import option_from_text
from tropical.policies.tuning import sarathi_token_budget, tunings

# prefill: 10 ms + 1 ms per token; decode: 10 ms + 1 ms per sequence + 20 µs per KV token
MODEL = LatencyModel(c0=0.0, c1=0.001, c2=0.01, d0=0.01, d1=0.001, d2=0.00002)


def colocated(id: int, *, queued: int = 0, decode_load: int = 0, busy: bool = False, step_end: float = 0.0) -> WorkerView:
    prefills = (RequestView(100 + id, 0.0, queued, 10.0, 0.1),) if queued else ()
    return WorkerView(
        id=id, role=Role.COLOCATED, kv_capacity=100_000, kv_used=0, busy=busy, step_begin=0.0, step_end=step_end, placed_since_step=0,
        prefills=prefills, prefill_load=queued, batch=BatchSummary(size=1, prompt_tokens=decode_load), waiting=(), incoming=(),
        decode_load=decode_load,
    )


def prompt(id: int, tokens: int) -> RequestView:
    return RequestView(id, 0.0, tokens, 10.0, 0.1)


# --- placement ---------------------------------------------------------------------------------


def test_the_load_aware_rule_places_on_the_worker_that_starts_the_prompt_first() -> None:
    """Two workers with nothing queued: INFaaS picks the one with less decode work although its long step ends later."""
    workers = [colocated(0, decode_load=100, busy=True, step_end=0.9), colocated(1, decode_load=5_000, busy=True, step_end=0.1)]
    load_aware = LeastLoadedRouter(Role.COLOCATED).place([prompt(1, 200)], workers, 0.0)
    infaas = LeastLoadedRouter(Role.COLOCATED, PlacementRule.INFAAS).place([prompt(1, 200)], workers, 0.0)
    assert [p.worker_id for p in load_aware.placements] == [1]
    assert [p.worker_id for p in infaas.placements] == [0]


def test_the_load_aware_rule_counts_queued_prompts_first_and_idle_workers_as_free_now() -> None:
    workers = [colocated(0, queued=300), colocated(1, busy=True, step_end=0.5), colocated(2)]
    decision = LeastLoadedRouter(Role.COLOCATED).place([prompt(1, 100), prompt(2, 100), prompt(3, 100)], workers, 0.2)
    # queued 300 | 0 | 0 → idle 2 (free now) → then 1 (0 queued, free at 0.5) → then 2 (100) before 1 (100, later) and 0 (300)
    assert [(p.request_id, p.worker_id) for p in decision.placements] == [(1, 2), (2, 1), (3, 2)]


# --- tunings -----------------------------------------------------------------------------------


def test_sarathi_budget_is_the_largest_whole_granule_whose_step_fits_one_tpot() -> None:
    # one decode plus a chunk of T − 1 tokens: 10 + 1 + (T − 1) ms = 10 + T ms
    assert sarathi_token_budget(MODEL, 0.3) == 256  # T ≤ 290
    assert sarathi_token_budget(MODEL, 0.266) == 256  # T ≤ 256 exactly
    assert sarathi_token_budget(MODEL, 0.265) == 128
    assert sarathi_token_budget(MODEL, 0.05) == 128  # never below one granule


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_tuning_is_a_valid_policy_and_sets_the_same_options(name: str) -> None:
    choices = tunings(name, MODEL, 0.3)
    assert len({choice.label for choice in choices}) == len(choices)
    assert len({frozenset(choice.options) for choice in choices}) == 1  # none leaks into another
    for choice in choices:
        make_policy(name, MODEL, **choice.options)


def test_tunings_are_every_combination_of_the_knobs_less_those_the_caller_fixes() -> None:
    vllm = tunings("vllm", MODEL, 0.3)
    assert len(vllm) == 4 * 2 and vllm[0].label == "max_num_batched_tokens 8192, load-aware placement"
    assert dict(vllm[1].options) == {"token_budget": 8192, "router.rule": PlacementRule.INFAAS}
    fixed = tunings("vllm", MODEL, 0.3, fixed={"router.rule": PlacementRule.INFAAS})
    assert [t.label for t in fixed] == [f"max_num_batched_tokens {n}" for n in (8192, 2048, 4096, 16384)]
    assert tunings("vllm", MODEL, 0.3, fixed={"router.rule", "token_budget"}) == (tunings("tropical", MODEL, 0.3)[0],)
    kairos = [t.label for t in tunings("kairos", MODEL, 0.3)]
    assert kairos[0] == "one prompt per prefill step, banked TPOT budget" and len(kairos) == 4


def test_kairos_defaults_to_one_prompt_per_step_with_the_banked_budget() -> None:
    policy = make_policy("kairos", MODEL, **tunings("kairos", MODEL, 0.1)[0].options)
    assert policy.router.max_batch == policy.prefill.max_batch == 1
    assert policy.batcher.allowed_step is AllowedStep.BANKED
    assert tuned(setting_named("chat-13b"), "kairos", {"allowed_step": AllowedStep.TPOT})["allowed_step"] is AllowedStep.TPOT


def test_the_goodput_search_keeps_the_best_tuning(lengths: Path) -> None:
    setting = replace(setting_named("chat-13b"), workers=2, requests=100, rate_bounds=(1.0, 12.0))
    search = SearchSettings(rel_tolerance=0.05)
    found = policy_goodput(setting, lengths, "sarathi", search)
    labels = [choice.label for choice in tunings("sarathi", setting.latency_model(), setting.slo.tpot)]
    assert set(found.by_tuning) == set(labels) and found.tuning in labels
    assert found.goodput_rps == max(found.by_tuning.values()) == found.by_tuning[found.tuning]
    default = policy_goodput(setting, lengths, "sarathi", replace(search, tune=False))
    assert default.tuning == labels[0] and default.by_tuning == {}
    assert found.goodput_rps >= default.goodput_rps


# --- options as text ---------------------------------------------------------------------------


def test_options_written_as_text_take_their_fields_types() -> None:
    vllm, unified = make_policy("vllm", MODEL), make_policy("unified", MODEL)
    assert option_from_text(vllm, "router.rule", "infaas") is PlacementRule.INFAAS
    assert option_from_text(vllm, "token_budget", "4096") == 4096
    assert option_from_text(unified, "batcher.abandon_hopeless", "false") is False
    assert option_from_text(unified, "abandon_after", "none") is None
    assert option_from_text(unified, "abandon_after", "30") == 30.0
    with pytest.raises(ValueError, match="takes one of load-aware, infaas"):
        option_from_text(vllm, "router.rule", "nearest")
    with pytest.raises(ValueError, match="no option"):
        option_from_text(vllm, "warp", "9")


def test_sim_and_goodput_take_options_and_report_them(lengths: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    args = ["--setting", "chat-13b", "--trace", str(lengths), "--requests", "60", "--option", "router.rule=infaas"]
    result = CliRunner().invoke(app, ["sim", "--policy", "vllm", "--rate", "3", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["options"] == {"router.rule": "infaas"}
    out = tmp_path / "goodput.json"
    result = CliRunner().invoke(app, ["goodput", "--policies", "vllm,sarathi", "--rel-tolerance", "0.2", "--no-tune", *args, "--json", str(out),
                                      "--plot", str(tmp_path / "curves")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["options"] == {"router.rule": "infaas"} and report["tuned"] is False
    assert report["figures"] and len(report["sweep"]["vllm"]) > 1  # the curves run at the tuning found, option included
    # the placement the option fixes is neither searched nor named
    assert {found["tuning"] for found in report["policies"].values()} == {"max_num_batched_tokens 8192", "token budget 640 (from the TPOT SLO)"}


@pytest.mark.parametrize(
    ("option", "problem"),
    [("router.rule=nearest", "takes one of"), ("router.rule", "KEY=VALUE"), ("router.order=edf", "no option 'router.order'")],
)
def test_a_bad_option_is_one_clear_error(lengths: Path, option: str, problem: str) -> None:
    result = CliRunner().invoke(app, ["goodput", "--setting", "chat-13b", "--trace", str(lengths), "--policies", "vllm", "--option", option])
    assert result.exit_code == 2 and problem in " ".join(result.output.split())
