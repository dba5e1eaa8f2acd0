"""Deployment files: worker groups read from TOML, the presets' clusters among them, and bad files refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.experiments import SETTINGS
from tropical.latency.profiles import distserve_kv_capacity, distserve_model
from tropical.policies import make_policy
from tropical.policies.records import Role
from tropical.simulator import ClusterSpec
from tropical.simulator.deployment import DeploymentError, load_deployment

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


def same_cluster(a: ClusterSpec, b: ClusterSpec) -> bool:
    keys = ("roles", "models", "kv_capacities", "kv_bytes_per_token", "link_bandwidth", "link_latency", "gpus")
    return all(getattr(a, key) == getattr(b, key) for key in keys)


@pytest.mark.parametrize(
    ("file", "setting", "policy", "split"),
    [("chat-13b-colocated.toml", "chat-13b", "vllm", None), ("longbench-70b-unified.toml", "longbench-70b", "unified", 1)],
)
def test_the_shipped_files_describe_the_presets_clusters(file: str, setting: str, policy: str, split: int | None) -> None:
    preset = SETTINGS[setting]
    assert same_cluster(load_deployment(DEPLOYMENTS / file), preset.cluster(make_policy(policy, preset.latency_model()), split))


def test_groups_differ_in_profile_and_kv() -> None:
    cluster = load_deployment(DEPLOYMENTS / "distserve-opt13b-p2d1.toml")
    assert cluster.roles == (Role.PREFILL, Role.DECODE) and cluster.gpus == 3
    assert cluster.models == (distserve_model("opt-13b", 2), distserve_model("opt-13b", 1))
    assert cluster.kv_capacities == (distserve_kv_capacity("opt-13b", 2), distserve_kv_capacity("opt-13b", 1))
    assert cluster.link_bandwidth == 150e9 and cluster.kv_bytes_per_token == 2 * 40 * 5120 * 2


def test_a_group_may_carry_its_engine_overhead(tmp_path: Path) -> None:
    path = tmp_path / "slow.toml"
    path.write_text('model = "opt-13b"\n[[group]]\nrole = "colocated"\nstep_overhead_ms = 2\nsequence_overhead_ms = 0.25\n')
    (model,) = load_deployment(path).models
    assert model == distserve_model("opt-13b", 1).with_overhead(0.002, 0.00025)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('model = "opt-13b"\n[[group]\n', "not TOML"),
        ('model = "opt-13b"\ncolour = 1\n[[group]]\nrole = "colocated"\n', "unknown keys colour"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\nspeed = 2\n', "a group has unknown keys speed"),
        ('model = "opt-13b"\n[[group]]\nrole = "leader"\n', "'leader' is not a valid Role"),
        ('model = "opt-13b"\n[[group]]\nrole = "decode"\npipeline_parallel = 2\n', "pipeline parallelism is not simulated yet"),
        ('model = "llama-2-70b"\n[[group]]\nrole = "colocated"\ntensor_parallel = 4\n', "give the colocated group's kv_capacity"),
        ('[[group]]\nrole = "colocated"\n', "missing 'model'"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\ncount = 0\n', "needs at least one worker"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\nstep_overhead_ms = -1\n', "an overhead cannot be negative"),
    ],
)
def test_a_bad_file_is_refused_in_one_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(DeploymentError, match="bad.toml: ") as caught:
        load_deployment(path)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_sim_runs_a_policy_on_a_deployment_file(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    args = ["sim", "--setting", "chat-13b", "--policy", "distserve", "--rate", "4", "--num-requests", "60",
            "--cluster", str(DEPLOYMENTS / "distserve-opt13b-p2d1.toml"), "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 prefill + 1 decode" in result.output
    record = json.loads(out.read_text())
    assert record["cluster_file"].endswith("distserve-opt13b-p2d1.toml") and record["workers"] == {"prefill": 1, "decode": 1}
    assert [u["role"] for u in record["worker_usage"]] == ["prefill", "decode"]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--policy", "vllm"], "vllm runs prompts and decodes on every worker (colocated), not on 1 prefill, 1 decode"),
        (["--policy", "distserve", "--prefill-workers", "1"], "a deployment file sets the prefill workers itself"),
    ],
)
def test_sim_refuses_a_deployment_the_policy_cannot_run(extra: list[str], problem: str) -> None:
    args = ["sim", "--setting", "chat-13b", "--rate", "4", "--cluster", str(DEPLOYMENTS / "distserve-opt13b-p2d1.toml"), *extra]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2 and problem in result.output
