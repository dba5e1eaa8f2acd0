"""Admission as its own axis: own, none and hopeless refusals over the same schedulers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from typer.testing import CliRunner

from tropical.cli import app
from tropical.experiments import setting_named
from tropical.live.bench.load import Load
from tropical.policies import POLICY_NAMES, AdmissionRule, Role, make_policy, under_admission
from tropical.policies.admission_rule import RefusingHopeless
from tropical.policies.records import EMPTY_BATCH, RequestView, WorkerView
from tropical.simulator import simulate

SETTING = setting_named("chat-13b")
MODEL = SETTING.latency_model()


def overloaded(policy_name: str, rule: AdmissionRule) -> tuple[int, int, int]:
    """Refused, abandoned and met-both counts of a policy on two workers at about three times their goodput."""
    policy = under_admission(make_policy(policy_name, MODEL), rule)
    load = Load(SETTING, count=200, seed=0).at(13.0)
    roles = policy.roles(2, 0 if policy.min_prefill_workers == 0 else 1) if policy.disaggregated else policy.roles(2)
    result = simulate(load, replace(SETTING.cluster(policy), roles=roles), policy)
    return result.refused, result.abandoned, sum(o.meets_both for o in result.outcomes())


def test_own_is_each_policy_as_it_is() -> None:
    for name in POLICY_NAMES:
        assert under_admission(make_policy(name, MODEL), AdmissionRule.OWN) == make_policy(name, MODEL)


def test_under_none_no_policy_refuses_or_abandons_anything() -> None:
    for name in POLICY_NAMES:
        refused, abandoned, _ = overloaded(name, AdmissionRule.NONE)
        assert (refused, abandoned) == (0, 0), name
    refused, abandoned, _ = overloaded("unified", AdmissionRule.OWN)
    assert refused + abandoned > 0  # its own rules do drop under this load


def test_under_hopeless_every_policy_drops_by_one_rule_and_only_by_it() -> None:
    for name in POLICY_NAMES:
        policy = under_admission(make_policy(name, MODEL), AdmissionRule.HOPELESS)
        assert isinstance(policy.router, RefusingHopeless)
        assert policy.prefill.abandon_hopeless and policy.batcher.abandon_hopeless and policy.batcher.abandon_after is None
        inner = policy.router.router
        assert not any(getattr(inner, field, False) for field in ("drop_hopeless", "reject_unattainable")), name
    for name in ("vllm", "unified"):
        refused, abandoned, _ = overloaded(name, AdmissionRule.HOPELESS)
        assert refused + abandoned > 0, name  # at three times the goodput some prompts become hopeless for everyone


def test_the_shared_router_rule_refuses_exactly_the_prompts_that_could_not_make_it_alone() -> None:
    policy = under_admission(make_policy("vllm", MODEL), AdmissionRule.HOPELESS)
    alone = MODEL.prefill_time(2000)
    doomed = RequestView(1, 0.0, 2000, alone - 0.001, 0.1)  # due just before it could be prefilled alone
    fine = RequestView(2, 0.0, 2000, alone + 0.001, 0.1)
    worker = WorkerView(0, Role.COLOCATED, 100_000, 0, False, 0.0, 0.0, 0, (), 0, EMPTY_BATCH, (), (), 0)
    decision = policy.place([doomed, fine], [worker], 0.0)
    assert decision.drops == (1,) and [p.request_id for p in decision.placements] == [2]


def test_commands_take_the_admission_rule_and_record_it(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(app, ["sim", "--setting", "chat-13b", "--policy", "unified", "--rate", "13", "--requests", "200",
                                      "--admission", "none", "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["admission"] == "none" and record["refused_requests"] == record["abandoned_requests"] == 0
    bad = CliRunner().invoke(app, ["sim", "--setting", "chat-13b", "--policy", "vllm", "--admission", "some"], env={"COLUMNS": "300"})
    assert bad.exit_code == 2 and "--admission" in bad.output
    report = tmp_path / "goodput.json"
    result = CliRunner().invoke(app, ["goodput", "--setting", "chat-13b", "--policies", "vllm", "--requests", "40", "--admission", "hopeless",
                                      "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["admission"] == "hopeless"
