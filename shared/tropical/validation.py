"""The simulator held against real GPU runs: each run of a validation set replayed on its own deployment.

A validation set is a folder in the format of the shipped
`validation/distserve_opt13b/` (see the data README): `runs.json` names the
model and GPU, the SLOs, the deployments as worker groups (role, count, tensor
and pipeline parallel degree) and the runs (system, deployment, trace, rate,
and the real outcomes under `real`); each run's trace holds its exact
workload, replayed at its own times.

What the simulator is given is only what a user could know before running:
the published latency profiles of the model on that GPU at each group's TP
degree (the system's own engine where its profile exists: vLLM's kernels for
vLLM runs), the KV capacity those profiles were taken with, and the
deployment's flags (`SYSTEMS`). No run's outcome enters any of it. Every
request is served, as a real engine serves it (none is refused as hopeless),
and judged as the set's SLO rule says.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tropical.data import data_file
from tropical.latency.profiles import canonical_hardware, canonical_model
from tropical.metrics import Summary, summarize
from tropical.policies import make_policy
from tropical.policies.admission_rule import AdmissionRule, under_admission
from tropical.policies.records import Role
from tropical.simulator import ClusterSpec, SimRequest, simulate
from tropical.simulator.deployment import cluster_of
from tropical.traces import load_trace

SHIPPED_SET = "validation/distserve_opt13b"
ATTAINMENT_KEYS = ("joint_attainment_pct", "ttft_attainment_pct", "tpot_attainment_pct")
LATENCY_KEYS = ("p50_ttft_ms", "p90_ttft_ms", "p50_tpot_ms", "p90_tpot_ms")
FIGURE_KEYS = ATTAINMENT_KEYS + LATENCY_KEYS
OVERLOAD_JOINT_PCT = 40.0  # a run whose real joint attainment is below this is an overload run


@dataclass(frozen=True)
class System:
    """How a serving system of the set is simulated: our policy of that name, its engine's profiles, its flags."""

    policy: str
    engine: str  # whose kernels the step times come from: DistServe publishes profiles of its own engine and of vLLM
    options: Mapping[str, Any] = field(default_factory=dict)


SYSTEMS: dict[str, System] = {
    # vLLM of April 2024: max-num-batched-tokens 16384, max-num-seqs 1024 (the set's deployment flags)
    "vllm": System("vllm", "vllm", {"batcher.token_budget": 16384, "batcher.max_seqs": 1024, "batcher.max_paddings": 256}),
    # DistServe: prefill FCFS, at most 128 prompts / 32,768 tokens a batch; decode FCFS, at most 1,024 sequences
    "distserve": System("distserve", "distserve", {"prefill.batch_tokens": 32768, "prefill.max_batch": 128, "batcher.max_seqs": 1024}),
}


@dataclass(frozen=True)
class Overhead:
    """An engine's own work per step beyond the profiled forward pass (`LatencyModel.with_overhead`), in ms; none by
    default: a value read off these runs' outcomes would be a fit to them."""

    step_ms: float = 0.0
    sequence_ms: float = 0.0


class ValidationError(ValueError):
    """A validation set that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Group:
    role: Role
    count: int
    tensor_parallel: int
    pipeline_parallel: int


@dataclass(frozen=True)
class Run:
    name: str
    system: str
    deployment: str
    trace: Path
    rate_rps: float
    requests: int
    real: dict[str, float]
    reference: dict[str, float]  # another simulator's figures for the same run, where the set gives them


@dataclass(frozen=True)
class ValidationSet:
    folder: Path
    model: str
    hardware: str
    ttft_slo: float  # s
    tpot_slo: float  # s
    deployments: dict[str, tuple[Group, ...]]
    runs: tuple[Run, ...]
    reference_name: str = "distserve_simulator"


def locate_set(folder: str | Path | None) -> Path:
    """The folder named, or the shipped set (`validation/distserve_opt13b`) when none is."""
    if folder is None:
        return data_file(SHIPPED_SET)
    path = Path(folder)
    return path if path.exists() else data_file(str(folder))


def load_set(folder: str | Path | None = None) -> ValidationSet:
    root = locate_set(folder)
    listing = root / "runs.json"
    if not listing.is_file():
        raise ValidationError(f"{root}: no runs.json there: not a validation set")
    try:
        raw = json.loads(listing.read_text())
        model = canonical_model(str(raw["model"]).split()[0])
        hardware = canonical_hardware(str(raw["gpu"])).replace("-sxm", "")
        slo = raw["slo"]
        deployments = {
            name: tuple(Group(Role(g["role"]), int(g["count"]), int(g["tensor_parallel"]), int(g.get("pipeline_parallel", 1))) for g in d["workers"])
            for name, d in raw["deployments"].items()
        }
        runs = tuple(
            Run(
                name=str(r["name"]),
                system=str(r["system"]),
                deployment=str(r["deployment"]),
                trace=root / str(r["trace"]),
                rate_rps=float(r["rate_rps"]),
                requests=int(r["requests"]),
                real={key: float(r["real"][key]) for key in FIGURE_KEYS},
                reference={key: float(v) for key, v in r.get("distserve_simulator", {}).items()},
            )
            for r in raw["runs"]
        )
        ttft, tpot = float(slo["ttft_ms"]) / 1000.0, float(slo["tpot_ms"]) / 1000.0
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValidationError(f"{listing}: {problem}") from None
    for run in runs:
        if run.system not in SYSTEMS:
            raise ValidationError(f"{listing}: run {run.name}: unknown system {run.system!r}; known: {', '.join(SYSTEMS)}")
        if run.deployment not in deployments:
            raise ValidationError(f"{listing}: run {run.name}: no deployment {run.deployment!r}")
        if not run.trace.is_file():
            raise ValidationError(f"{listing}: run {run.name}: no trace file {run.trace.name}")
    if not (ttft > 0 and tpot > 0 and math.isfinite(ttft + tpot)):
        raise ValidationError(f"{listing}: SLOs must be positive")
    return ValidationSet(root, model, hardware, ttft, tpot, deployments, runs)


def cluster_for(vset: ValidationSet, run: Run, overhead: Overhead = Overhead()) -> ClusterSpec:
    """The run's deployment as simulated worker groups, each with its own profile and KV capacity."""
    profile = "distserve" if SYSTEMS[run.system].engine == "distserve" else f"distserve-{SYSTEMS[run.system].engine}"
    groups = [
        {"role": g.role.value, "count": g.count, "tensor_parallel": g.tensor_parallel, "pipeline_parallel": g.pipeline_parallel, "profile": profile,
         "step_overhead_ms": overhead.step_ms, "sequence_overhead_ms": overhead.sequence_ms}
        for g in vset.deployments[run.deployment]
    ]
    try:
        return cluster_of({"model": vset.model, "hardware": vset.hardware, "group": groups})
    except ValueError as exc:
        raise ValidationError(f"run {run.name}: {exc}") from None


def replay(vset: ValidationSet, run: Run, overhead: Overhead = Overhead()) -> Summary:
    """Our figures for one run: its workload at its own times on its deployment, every request served."""
    cluster = cluster_for(vset, run, overhead)
    system = SYSTEMS[run.system]
    policy = under_admission(make_policy(system.policy, cluster.model, **system.options), AdmissionRule.NONE)
    try:
        policy.check_roles(cluster.roles)
    except ValueError as exc:
        raise ValidationError(f"run {run.name}, deployment {run.deployment}: {exc}") from None
    requests = [SimRequest(r.arrival, r.prompt_tokens, r.output_tokens, vset.ttft_slo, vset.tpot_slo) for r in load_trace(run.trace)]
    result = simulate(requests, cluster, policy, refuse_infeasible=False)
    return summarize(result.outcomes())


def figures(summary: Summary) -> dict[str, float]:
    """A summary under the set's keys: attainment in %, latencies in ms."""
    return {
        "joint_attainment_pct": 100.0 * summary.attainment,
        "ttft_attainment_pct": 100.0 * summary.ttft_attainment,
        "tpot_attainment_pct": 100.0 * summary.tpot_attainment,
        "p50_ttft_ms": summary.p50_ttft_ms,
        "p90_ttft_ms": summary.p90_ttft_ms,
        "p50_tpot_ms": summary.p50_tpot_ms,
        "p90_tpot_ms": summary.p90_tpot_ms,
    }


def mean_abs_diff(pairs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]]) -> dict[str, float]:
    """Mean |ours − real| per attainment key over (ours, real) pairs, in points; keys missing from a pair are skipped."""
    out = {}
    for key in ATTAINMENT_KEYS:
        diffs = [abs(ours[key] - real[key]) for ours, real in pairs if key in ours and key in real]
        if diffs:
            out[key] = sum(diffs) / len(diffs)
    return out


def validate(folder: str | Path | None = None, overhead: Overhead = Overhead()) -> dict[str, Any]:
    """Every run replayed; per run our figures beside the real ones, and the mean absolute differences per system and
    overall (ours, and the set's reference simulator's where it gives figures)."""
    vset = load_set(folder)
    runs = []
    for run in vset.runs:
        ours = figures(replay(vset, run, overhead))
        runs.append({"name": run.name, "system": run.system, "deployment": run.deployment, "rate_rps": run.rate_rps,
                     "real": run.real, "ours": ours, vset.reference_name: run.reference})
    subsets: dict[str, list[dict[str, Any]]] = {"overall": runs}
    for run in runs:
        subsets.setdefault(run["system"], []).append(run)
    overload = [r for r in runs if r["real"]["joint_attainment_pct"] < OVERLOAD_JOINT_PCT]
    return {
        "set": SHIPPED_SET if folder is None else str(folder),
        "model": vset.model,
        "hardware": vset.hardware,
        "slo_ms": {"ttft": vset.ttft_slo * 1000.0, "tpot": vset.tpot_slo * 1000.0},
        "overhead_ms": {"step": overhead.step_ms, "sequence": overhead.sequence_ms},
        "runs": runs,
        "mean_abs_diff": {name: {"runs": len(group), **mean_abs_diff([(r["ours"], r["real"]) for r in group])} for name, group in subsets.items()},
        f"{vset.reference_name}_mean_abs_diff": {
            name: mean_abs_diff([(r[vset.reference_name], r["real"]) for r in group]) for name, group in subsets.items()
        },
        "overload_p90_ttft_ratio": {r["name"]: r["ours"]["p90_ttft_ms"] / r["real"]["p90_ttft_ms"] for r in overload},
    }
