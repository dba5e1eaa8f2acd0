"""The simulator against real runs: a validation set read, replayed on its own deployments, and scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.latency.profiles import distserve_kv_capacity, distserve_model
from tropical.policies.records import Role
from tropical.validation import FIGURE_KEYS, Overhead, cluster_for, figures, load_set, replay, validate

TRACE = "arrival_s,prompt_len,output_len\n0.0,120,8\n0.2,300,1\n0.5,64,20\n0.9,900,12\n1.1,50,40\n"


def write_set(folder: Path, *, system: str = "distserve", pipeline: int = 1, real: dict[str, float] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.csv").write_text(TRACE)
    deployment = {"workers": [{"role": "prefill", "count": 1, "tensor_parallel": 2, "pipeline_parallel": pipeline},
                              {"role": "decode", "count": 1, "tensor_parallel": 1, "pipeline_parallel": 1}]}
    runs = [{"name": "small", "system": system, "deployment": "p2d1", "requests": 5, "rate_rps": 4.5, "trace": "run.csv",
             "real": real or dict.fromkeys(FIGURE_KEYS, 50.0), "distserve_simulator": {"joint_attainment_pct": 60.0}}]
    listing = {"model": "OPT-13B fp16", "gpu": "A100-SXM-80GB", "slo": {"ttft_ms": 250, "tpot_ms": 100},
               "deployments": {"p2d1": deployment}, "runs": runs}
    (folder / "runs.json").write_text(json.dumps(listing))
    return folder


def test_the_shipped_set_replays_each_deployment_with_its_own_groups() -> None:
    vset = load_set()
    assert (vset.model, vset.hardware, len(vset.runs)) == ("opt-13b", "a100-80g", 15)
    assert (vset.ttft_slo, vset.tpot_slo) == (0.25, 0.1)
    disaggregated = next(run for run in vset.runs if run.system == "distserve")
    cluster = cluster_for(vset, disaggregated)
    assert cluster.roles == (Role.PREFILL, Role.DECODE) and cluster.gpus == 3
    assert cluster.models == (distserve_model("opt-13b", 2), distserve_model("opt-13b", 1))  # prefill at TP 2, decode at TP 1
    assert cluster.kv_capacities == (distserve_kv_capacity("opt-13b", 2), distserve_kv_capacity("opt-13b", 1))
    colocated = next(run for run in vset.runs if run.system == "vllm")
    assert cluster_for(vset, colocated).models == (distserve_model("opt-13b", 1, engine="vllm"),)  # vLLM's own kernels


def test_a_run_is_scored_against_its_real_figures(tmp_path: Path) -> None:
    vset = load_set(write_set(tmp_path / "set"))
    ours = figures(replay(vset, vset.runs[0]))
    assert set(ours) == set(FIGURE_KEYS) and all(0.0 <= ours[k] <= 100.0 for k in FIGURE_KEYS[:3])
    # the real figures set to ours: no difference at all; shifted by 10 points: 10
    for shift in (0.0, 10.0):
        report = validate(write_set(tmp_path / f"shift{shift}", real={k: v + shift for k, v in ours.items()}))
        (run,) = report["runs"]
        assert run["ours"] == pytest.approx(ours)
        assert report["mean_abs_diff"]["overall"] == pytest.approx({"runs": 1, **dict.fromkeys(FIGURE_KEYS[:3], shift)})
        assert report["mean_abs_diff"]["distserve"]["runs"] == 1
        assert report["distserve_simulator_mean_abs_diff"]["overall"] == {"joint_attainment_pct": abs(60.0 - run["real"]["joint_attainment_pct"])}


def test_every_request_is_served_as_a_real_engine_would(tmp_path: Path) -> None:
    """A prompt too long to prefill within the TTFT SLO misses TTFT, but is still served and may meet TPOT."""
    folder = write_set(tmp_path / "set")
    (folder / "run.csv").write_text("arrival_s,prompt_len,output_len\n0.0,3500,30\n")
    summary = replay(load_set(folder), load_set(folder).runs[0])
    assert (summary.finished, summary.ttft_attainment, summary.tpot_attainment) == (1, 0.0, 1.0)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda f: (f / "runs.json").unlink(), "no runs.json there"),
        (lambda f: (f / "run.csv").unlink(), "no trace file run.csv"),
        (lambda f: (f / "runs.json").write_text("{}"), "missing 'model'"),
        (lambda f: write_set(f, system="orca"), "unknown system 'orca'"),
        (lambda f: write_set(f, system="vllm"), "vllm runs prompts and decodes on every worker (colocated), not on 1 prefill, 1 decode"),
        (lambda f: write_set(f, pipeline=3), "no KV capacity recorded for opt-13b at tp2 pp3"),
    ],
)
def test_a_bad_set_gets_one_clear_line_and_exit_2(tmp_path: Path, change, problem: str) -> None:
    folder = write_set(tmp_path / "set")
    change(folder)
    result = CliRunner().invoke(app, ["validate", str(folder)], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and problem in result.output


def test_a_pipelined_prefill_instance_is_replayed_as_its_stages(tmp_path: Path) -> None:
    vset = load_set(write_set(tmp_path / "set", pipeline=2))
    cluster = cluster_for(vset, vset.runs[0])
    assert cluster.roles == (Role.PREFILL, Role.PREFILL, Role.DECODE) and cluster.gpus == 2 * 2 + 1
    assert replay(vset, vset.runs[0]).finished == len(vset.runs[0].trace.read_text().splitlines()) - 1


def test_validate_command_prints_both_sides_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "out" / "validation.json"
    result = CliRunner().invoke(app, ["validate", str(write_set(tmp_path / "set")), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "small" in result.output and "mean absolute difference" in result.output
    report = json.loads(out.read_text())
    assert [run["name"] for run in report["runs"]] == ["small"] and set(report["runs"][0]["ours"]) == set(FIGURE_KEYS)


def test_an_engine_overhead_slows_every_step_of_every_group(tmp_path: Path) -> None:
    vset = load_set(write_set(tmp_path / "set"))
    plain, slowed = cluster_for(vset, vset.runs[0]), cluster_for(vset, vset.runs[0], Overhead(step_ms=2.0, sequence_ms=0.5))
    for before, after in zip(plain.models, slowed.models, strict=True):
        assert after.decode_time(4, 400) - before.decode_time(4, 400) == pytest.approx(0.002 + 4 * 0.0005)
        assert after.prefill_time(100) - before.prefill_time(100) == pytest.approx(0.002)
    assert figures(replay(vset, vset.runs[0], Overhead(sequence_ms=5.0)))["p50_tpot_ms"] > figures(replay(vset, vset.runs[0]))["p50_tpot_ms"]
    report = validate(tmp_path / "set", Overhead(step_ms=1.0))
    assert report["overhead_ms"] == {"step": 1.0, "sequence": 0.0}
