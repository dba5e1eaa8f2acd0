"""Deployment files: worker groups read from TOML, the presets' clusters among them, and bad files refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.experiments import SETTINGS
from tropical.latency.profiles import distserve_kv_capacity, distserve_model, stage_hop
from tropical.policies import make_policy
from tropical.policies.records import Role
from tropical.simulator import ClusterSpec
from tropical.simulator.cluster import SimRequest
from tropical.simulator.deployment import PRESETS, DeploymentError, cluster_of, load_deployment, load_pool
from tropical.simulator.simulation import simulate

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


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_presets_hardware_is_its_deployment_file(name: str) -> None:
    setting, pool = SETTINGS[name], load_pool(PRESETS / f"{name}.toml")
    assert (setting.model, setting.hardware, setting.profile, setting.tensor_parallel) == (pool.model, pool.hardware, pool.profile, pool.tensor_parallel)
    assert (setting.workers, setting.kv_capacity, setting.kv_bytes_per_token) == (pool.workers, pool.kv_capacity, pool.kv_bytes_per_token)
    colocated = setting.cluster(make_policy("vllm", setting.latency_model()))
    assert same_cluster(colocated, load_deployment(PRESETS / f"{name}.toml"))  # the file, read as any deployment, is the cluster


def test_a_pool_is_one_group_of_single_stage_workers(tmp_path: Path) -> None:
    path = tmp_path / "two.toml"
    path.write_text(DEPLOYMENTS.joinpath("distserve-opt13b-p2d1.toml").read_text())
    with pytest.raises(DeploymentError, match="two.toml: a pool of workers is one \\[\\[group\\]\\] of single-stage instances"):
        load_pool(path)


@pytest.mark.parametrize("file", sorted(path.name for path in DEPLOYMENTS.glob("*.toml")))
def test_every_shipped_file_is_a_deployment_its_kind_of_policy_runs(file: str) -> None:
    cluster = load_deployment(DEPLOYMENTS / file)
    kind = "vllm" if Role.COLOCATED in cluster.roles else "distserve" if Role.DECODE in cluster.roles else "unified"
    make_policy(kind, cluster.model).check_roles(cluster.roles)
    assert cluster.gpus >= len(set(cluster.instances))


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


def test_a_pipelined_instance_runs_as_one_lane_per_stage(tmp_path: Path) -> None:
    path = tmp_path / "pp.toml"
    path.write_text('model = "opt-13b"\n[[group]]\nrole = "prefill"\ntensor_parallel = 2\n'
                    '[[group]]\nrole = "decode"\ncount = 2\npipeline_parallel = 2\n')
    cluster = load_deployment(path)
    lane = distserve_kv_capacity("opt-13b", 1, 2) // 2  # the instance holds more KV than a TP-1 one: half the weights per GPU
    assert cluster.roles == (Role.PREFILL,) + (Role.DECODE,) * 4 and cluster.gpus == 2 + 2 * 2
    assert cluster.kv_capacities == (distserve_kv_capacity("opt-13b", 2),) + (lane,) * 4
    hop_latency, per_byte = stage_hop()
    assert cluster.models[1:] == (distserve_model("opt-13b", 1).with_stage_hops(1, hop_latency, per_byte * 5120 * 2),) * 4


def test_groups_on_different_nodes_move_kv_over_the_internode_link(tmp_path: Path) -> None:
    path = tmp_path / "two-nodes.toml"
    path.write_text('model = "opt-13b"\n[internode]\nbandwidth_gb_s = 12.5\nlatency_ms = 2\n'
                    '[[group]]\nrole = "prefill"\ntensor_parallel = 2\nnode = "a"\n'
                    '[[group]]\nrole = "decode"\nnode = "b"\n[[group]]\nrole = "decode"\nnode = "a"\n')
    cluster = load_deployment(path)
    kv = 1000 * cluster.kv_bytes_per_token
    assert cluster.transfer_time(1000, 0, 1) == pytest.approx(0.002 + kv / 12.5e9)  # to node b: one GPU pair over InfiniBand
    assert cluster.transfer_time(1000, 0, 2) == pytest.approx(0.001 + kv / 150e9)  # within node a: NVLink


def test_a_swap_copies_each_tokens_kv_over_the_hosts_link_from_every_gpu_at_once(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text('model = "opt-13b"\n[host]\nbandwidth_gb_s = 10\n[[group]]\nrole = "colocated"\ntensor_parallel = 2\n'
                    '[[group]]\nrole = "colocated"\npipeline_parallel = 2\n')
    per_token = 2 * 40 * 5120 * 2 / 10e9
    assert load_deployment(path).swap_per_token == (per_token / 2, per_token / 2, per_token / 2)


def test_a_stage_hands_its_activations_on_at_nvlink_speed() -> None:
    latency, per_byte = stage_hop()
    assert 5e-6 < latency < 30e-6 and 150e9 < 1.0 / per_byte < 400e9  # measured: 13 µs, 286 GB/s
    with pytest.raises(ValueError, match="profiled for a100-80g only"):
        stage_hop("h100-80g")


def decode_side(pipeline: int, prompts: int, output: int = 400) -> tuple[float, float]:
    """(time the last request finishes, mean TPOT) of `prompts` requests arriving together, decoded on one TP-1
    instance of `pipeline` stages behind a TP-2 prefill instance."""
    cluster = cluster_of({"model": "opt-13b", "group": [{"role": "prefill", "tensor_parallel": 2},
                                                         {"role": "decode", "pipeline_parallel": pipeline}]})
    requests = [SimRequest(0.0, 200, output, 1e3, 1e3) for _ in range(prompts)]
    result = simulate(requests, cluster, make_policy("distserve", cluster.model), refuse_infeasible=False)
    outcomes = result.outcomes()
    return max(o.finish for o in outcomes), sum((o.finish - o.first_token) / (output - 1) for o in outcomes) / prompts


def test_two_stages_decode_twice_the_batch_in_the_time_of_one_pass() -> None:
    # A lone request gains nothing: each token is a whole pass through both stages (plus the hop).
    (_, alone_1), (_, alone_2) = decode_side(1, 1), decode_side(2, 1)
    assert alone_2 >= alone_1 and alone_2 == pytest.approx(alone_1, rel=0.01)
    # A batch does: two micro-batches of half the batch each are in flight at once.
    (end_1, _), (end_2, _) = decode_side(1, 64), decode_side(2, 64)
    assert end_2 < 0.8 * end_1


def test_a_light_lane_waits_for_a_heavy_one_in_every_stage() -> None:
    # A 2,000-token prompt and a 50-token one arrive together on one vLLM instance of two stages: one lane each.
    # Alone, the short prompt would be prefilled in about 25 ms; beside the long one its micro-batch waits behind
    # the long one's in each stage, so its first token comes with the long prompt's.
    cluster = cluster_of({"model": "opt-13b", "group": [{"role": "colocated", "pipeline_parallel": 2}]})
    requests = [SimRequest(0.0, 2000, 2, 10.0, 1.0), SimRequest(0.0, 50, 2, 10.0, 1.0)]
    long_, short = simulate(requests, cluster, make_policy("vllm", cluster.model)).timelines
    assert {long_.prefill_worker, short.prefill_worker} == {0, 1}
    assert short.first_token == pytest.approx(long_.first_token) and long_.first_token == pytest.approx(cluster.model.prefill_time(2000))
    (alone,) = simulate(requests[1:], cluster, make_policy("vllm", cluster.model)).timelines
    assert alone.first_token == pytest.approx(cluster.model.prefill_time(50))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('model = "opt-13b"\n[[group]\n', "not TOML"),
        ('model = "opt-13b"\ncolour = 1\n[[group]]\nrole = "colocated"\n', "unknown keys colour"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\nspeed = 2\n', "a group has unknown keys speed"),
        ('model = "opt-13b"\n[[group]]\nrole = "leader"\n', "'leader' is not a valid Role"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\npipeline_parallel = 0\n', "pipeline_parallel must be at least 1"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\npipeline_parallel = 3\n', "no KV capacity recorded for opt-13b at tp1 pp3"),
        ('model = "llama-2-70b"\n[[group]]\nrole = "colocated"\ntensor_parallel = 4\n', "give the colocated group's kv_capacity"),
        ('[[group]]\nrole = "colocated"\n', "missing 'model'"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\ncount = 0\n', "needs at least one worker"),
        ('model = "opt-13b"\n[[group]]\nrole = "colocated"\nstep_overhead_ms = -1\n', "an overhead cannot be negative"),
        ('model = "opt-13b"\n[internode]\nspeed = 1\n[[group]]\nrole = "colocated"\n', "[internode] has unknown keys speed"),
        ('model = "opt-13b"\n[host]\nlatency_ms = 1\n[[group]]\nrole = "colocated"\n', "[host] has unknown keys latency_ms"),
        ('model = "opt-13b"\n[host]\nbandwidth_gb_s = 0\n[[group]]\nrole = "colocated"\n', "host bandwidth must be positive"),
        ('model = "opt-13b"\n[link]\nbandwidth_gb_s = 0\n[[group]]\nrole = "colocated"\n', "[link]: a link's bandwidth must be positive"),
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
    assert "1 prefill + 1 decode on 3 GPUs" in result.output
    record = json.loads(out.read_text())
    assert record["cluster_file"].endswith("distserve-opt13b-p2d1.toml") and record["workers"] == {"prefill": 1, "decode": 1} and record["gpus"] == 3
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
