"""Settings presets and the goodput search: what `tropical sim` and `tropical goodput` run.

A setting fixes the hardware (model, GPU, TP degree, worker count, KV capacity,
KV link) and the SLO rule; the trace and the policies vary. Every policy in a
setting runs on the same GPUs: colocated policies use every worker the same
way, disaggregated ones split them into prefill and decoding workers. With
more than two workers the split is searched per policy and each policy is
reported at its best split, as DistServe reports its placements; likewise
each baseline at its best faithful tuning (`tropical.policies.tuning`).

Goodput is the highest request rate at which at least 90 % of requests meet
both SLOs, found by bisection over the rate at which the first `requests`
requests of the trace (or those in a time window) are replayed: the trace's
own arrival pattern, rescaled; Poisson or Gamma arrivals for length tables.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from tropical.capacity import capacity_bound  # the bound on any policy's goodput, next to the searches
from tropical.data import data_dir, data_file
from tropical.latency.model import LatencyModel
from tropical.metrics import (
    SloScaleSweep,
    Summary,
    find_goodput,
    slo_scale_sweep,
    summarize,
)
from tropical.policies import POLICY_NAMES, AdmissionRule, ServingPolicy, make_policy, under_admission
from tropical.policies.tuning import Tuning, tunings
from tropical.simulator import ClusterSpec, SimRequest, SimulationResult, simulate
from tropical.simulator.cluster import A100_NVLINK_BYTES_PER_S
from tropical.simulator.deployment import PRESETS, load_pool, profile_model
from tropical.traces import TraceRequest, load_trace

M = TypeVar("M")  # what one policy's measurement yields

DATA = data_dir()  # the traces shipped with the package, unless TROPICAL_DATA_DIR points elsewhere


@dataclass(frozen=True)
class SloRule:
    """TTFT = max(floor, scale × the request's isolated prefill time) or a fixed value; TPOT fixed."""

    ttft_scale: float | None = 5.0
    ttft_floor: float = 0.0
    ttft_fixed: float | None = None
    tpot: float = 0.1

    def ttft(self, model: LatencyModel, prompt_tokens: int) -> float:
        if self.ttft_fixed is not None:
            return self.ttft_fixed
        return max(self.ttft_floor, (self.ttft_scale or 1.0) * model.prefill_time(prompt_tokens))

    def scaled(self, factor: float) -> SloRule:
        """Both SLOs times `factor` (DistServe's SLO scale)."""
        return SloRule(
            ttft_scale=None if self.ttft_scale is None else self.ttft_scale * factor,
            ttft_floor=self.ttft_floor * factor,
            ttft_fixed=None if self.ttft_fixed is None else self.ttft_fixed * factor,
            tpot=self.tpot * factor,
        )

    def describe(self) -> str:
        if self.ttft_fixed is not None:
            ttft = f"{self.ttft_fixed * 1000:g} ms"
        else:
            ttft = f"{self.ttft_scale:g}x isolated prefill"
            if self.ttft_floor > 0:
                ttft = f"max({self.ttft_floor * 1000:g} ms, {ttft})"
        return f"TTFT {ttft}, TPOT {self.tpot * 1000:g} ms"


@dataclass(frozen=True)
class Setting:
    name: str
    model: str  # a model the published profiles cover
    tensor_parallel: int
    workers: int
    kv_capacity: int  # KV tokens per worker
    kv_bytes_per_token: int
    slo: SloRule
    trace: Path  # the default trace
    rate_bounds: tuple[float, float]  # cluster req/s bracketing every policy's goodput (the search widens it if not)
    requests: int = 2000  # requests replayed per evaluated rate
    hardware: str = "a100-80g"
    note: str = ""
    profile: str | None = None  # which published profile (None: the preferred one for the model, hardware and TP)

    @property
    def gpus(self) -> int:
        return self.workers * self.tensor_parallel

    def latency_model(self) -> LatencyModel:
        return _latency_model(self.model, self.hardware, self.tensor_parallel, self.profile)

    def cluster(self, policy: ServingPolicy, prefill_workers: int | None = None) -> ClusterSpec:
        return ClusterSpec(
            roles=policy.roles(self.workers, prefill_workers),
            model=self.latency_model(),
            kv_capacity=self.kv_capacity,
            kv_bytes_per_token=self.kv_bytes_per_token,
            link_bandwidth=A100_NVLINK_BYTES_PER_S * self.tensor_parallel,
            tensor_parallel=self.tensor_parallel,
        )

    def splits(self, policy: ServingPolicy) -> list[int | None]:
        """Prefill-worker counts to try: all of them with more than two workers, else the only one."""
        if not policy.disaggregated:
            return [None]
        low = policy.min_prefill_workers
        if self.workers <= 2:
            return list(range(low, 2))
        return list(range(low, self.workers))


@lru_cache(maxsize=16)
def _latency_model(model: str, hardware: str, tensor_parallel: int, profile: str | None = None) -> LatencyModel:
    return profile_model(model, hardware, tensor_parallel, profile)


def preset(name: str, **workload: Any) -> Setting:
    """A preset: its hardware from its deployment file (`tropical/simulator/presets/<name>.toml`), its workload here."""
    pool = load_pool(PRESETS / f"{name}.toml")
    return Setting(
        name=name,
        model=pool.model,
        tensor_parallel=pool.tensor_parallel,
        workers=pool.workers,
        kv_capacity=pool.kv_capacity,
        kv_bytes_per_token=pool.kv_bytes_per_token,
        hardware=pool.hardware,
        profile=pool.profile,
        **workload,
    )


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        preset(
            "longbench-70b",
            slo=SloRule(ttft_scale=5.0, tpot=0.1),
            trace=data_file("lengths/arxiv_summarization_llama2_tokenizer.csv", DATA),
            rate_bounds=(0.2, 3.0),
            note="Tropical's own setting (its README table): Llama-2-70B, A100-80GB, 2 workers of TP4",
        ),
        preset(
            "long-66b",
            slo=SloRule(ttft_scale=5.0, tpot=0.1),
            trace=data_file("traces/mooncake_conversation_fast25.jsonl", DATA),
            rate_bounds=(0.02, 0.5),
            requests=1000,
            note="long-context traces on OPT-66B with DistServe's A100 coefficients, 2 workers of TP4",
        ),
        preset(
            "chat-13b",
            slo=SloRule(ttft_scale=3.0, ttft_floor=0.25, tpot=0.1),
            trace=data_file("traces/azure_conv_2023.csv", DATA),
            rate_bounds=(2.0, 24.0),
            note="chat on OPT-13B with DistServe's A100 coefficients, 8 single-GPU workers",
        ),
    )
}


def setting_named(name: str, *, ttft_slo_ms: float | None = None, ttft_slo_scale: float | None = None, tpot_slo_ms: float | None = None) -> Setting:
    """A preset, with any SLO flag overriding the preset's rule."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    setting = SETTINGS[name]
    slo = setting.slo
    if ttft_slo_ms is not None and ttft_slo_scale is not None:
        raise ValueError("give --ttft-slo-ms or --ttft-slo-scale, not both")
    if ttft_slo_ms is not None:
        slo = replace(slo, ttft_fixed=ttft_slo_ms / 1000.0, ttft_scale=None, ttft_floor=0.0)
    if ttft_slo_scale is not None:
        slo = replace(slo, ttft_scale=ttft_slo_scale, ttft_fixed=None)
    if tpot_slo_ms is not None:
        slo = replace(slo, tpot=tpot_slo_ms / 1000.0)
    return replace(setting, slo=slo)


# --- one run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """Which requests of a trace are replayed, and how a length table's arrivals are drawn (see `load_trace`).

    Without a window, the first `requests` (default: the setting's count).
    With one, every request arriving in it (for a length table: after its
    arrivals are drawn at the rate), capped by `requests` only when given.
    """

    requests: int | None = None
    start_s: float | None = None
    duration_s: float | None = None
    arrival: str = "poisson"
    cv: float = 1.0

    @property
    def windowed(self) -> bool:
        return self.start_s is not None or self.duration_s is not None

    def count(self, setting: Setting) -> int | None:
        """How many requests to keep at most (None: all in the window)."""
        if self.requests is not None:
            return self.requests
        return None if self.windowed else setting.requests

    def describe(self, setting: Setting) -> dict[str, Any]:
        return {
            "requests": self.count(setting),
            "start_s": self.start_s,
            "duration_s": self.duration_s,
            "arrival": self.arrival,
            "cv": self.cv,
        }


@dataclass(frozen=True)
class Workload:
    """The trace requests to replay, with their SLOs, at one rate."""

    trace: Path
    rate: float | None  # None: a timed trace at its own rate
    requests: tuple[SimRequest, ...]


def workload(
    setting: Setting, trace: Path, rate: float | None, *, replay: Replay = Replay(), seed: int = 0, slo: SloRule | None = None,
    model: LatencyModel | None = None,
) -> Workload:
    """The requests to replay with their SLOs; a TTFT relative to the isolated prefill is taken on `model` (default: the
    setting's), as on the cluster that serves them."""
    rows = _trace_rows(str(trace), rate, replay, replay.count(setting), seed)
    if not rows:
        raise ValueError(f"no request of {trace} is left to replay: the window {_window(replay)} holds none")
    model = model or setting.latency_model()
    rule = slo or setting.slo
    return Workload(trace, rate, tuple(_with_slo(r, rule, model) for r in rows))


def _window(replay: Replay) -> str:
    start = replay.start_s or 0.0
    end = "the end" if replay.duration_s is None else f"{start + replay.duration_s:g} s"
    return f"from {start:g} s to {end}"


@lru_cache(maxsize=64)
def _trace_rows(trace: str, rate: float | None, replay: Replay, count: int | None, seed: int) -> tuple[TraceRequest, ...]:
    return tuple(
        load_trace(
            trace,
            rate=rate,
            arrival=replay.arrival,
            cv=replay.cv,
            seed=seed,
            num_requests=count,
            start_s=replay.start_s,
            duration_s=replay.duration_s,
        )
    )


def _with_slo(r: TraceRequest, rule: SloRule, model: LatencyModel) -> SimRequest:
    return SimRequest(r.arrival, r.prompt_tokens, r.output_tokens, rule.ttft(model, r.prompt_tokens), rule.tpot)


def run_policy(
    setting: Setting,
    policy_name: str,
    load: Workload,
    *,
    prefill_workers: int | None = None,
    seed: int = 0,
    noise: bool = False,
    options: dict[str, Any] | None = None,
    admission: AdmissionRule = AdmissionRule.OWN,
    record_steps: bool = False,
    cluster: ClusterSpec | None = None,
) -> SimulationResult:
    """One simulated run on the setting's cluster, or on `cluster` (a deployment file's), whose first group's
    profile the policy then predicts with."""
    model = setting.latency_model() if cluster is None else cluster.model
    policy = under_admission(make_policy(policy_name, model, **tuned(setting, policy_name, options)), admission)
    if cluster is None:
        cluster = setting.cluster(policy, prefill_workers)
    else:
        policy.check_roles(cluster.roles)
    result = simulate(load.requests, cluster, policy, seed=seed, noise=noise, record_steps=record_steps)
    if result.unfinished:
        raise RuntimeError(f"{policy_name} left {result.unfinished} requests unfinished on {setting.name} at {load.rate} req/s")
    return result


def tuned(setting: Setting, policy: str, options: Mapping[str, Any] | None = None, label: str | None = None) -> dict[str, Any]:
    """`options` over the policy's tuning of that label on this setting, as `policy_goodput` names it with the same
    `options` (`tropical.policies.tuning`; no label: the default)."""
    choices = tunings(policy, setting.latency_model(), setting.slo.tpot, fixed=options or {})
    chosen = next((choice for choice in choices if choice.label == label), None) if label is not None else choices[0]
    if chosen is None:
        raise ValueError(f"{policy} has no tuning {label!r} on {setting.name}; known: {', '.join(c.label for c in choices)}")
    return {**chosen.options, **(options or {})}


# --- goodput -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyGoodput:
    policy: str
    goodput_rps: float
    per_gpu: float
    prefill_workers: int | None  # the split it was measured at (None: colocated)
    converged: bool
    attainment_at: dict[float, float]  # every evaluated rate at the chosen split and tuning
    splits: dict[int, float] = field(default_factory=dict)  # highest rate each split passed: its goodput for the best, a lower bound for splits dropped early
    infeasible: int = 0  # requests refused as unservable within SLO even on an idle cluster (at the goodput rate)
    seconds: float = 0.0
    tuning: str = "as built"  # the policy's configuration it was measured at (tropical.policies.tuning)
    by_tuning: dict[str, float] = field(default_factory=dict)  # highest rate each tuning passed, as `splits`

    def as_json(self) -> dict[str, Any]:
        return {
            "goodput_rps": self.goodput_rps,
            "goodput_per_gpu": self.per_gpu,
            "prefill_workers": self.prefill_workers,
            "tuning": self.tuning,
            "converged": self.converged,
            "attainment_at": {f"{rate:.4f}": att for rate, att in sorted(self.attainment_at.items())},
            "goodput_by_prefill_workers": {str(k): v for k, v in sorted(self.splits.items())},
            "goodput_by_tuning": dict(self.by_tuning),
            "infeasible_requests": self.infeasible,
            "search_seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class SearchSettings:
    replay: Replay = Replay()  # the requests replayed at each evaluated rate
    rel_tolerance: float = 0.02
    target: float = 0.9
    seed: int = 0
    noise: bool = False
    max_evaluations: int = 30
    admission: AdmissionRule = AdmissionRule.OWN  # which refusals every policy makes (tropical.policies.admission_rule)
    tune: bool = True  # search every faithful tuning of a baseline; False: its default only


def attainment(setting: Setting, trace: Path, policy: str, rate: float, split: int | None, search: SearchSettings, options: dict[str, Any] | None = None) -> tuple[float, Summary]:
    load = workload(setting, trace, rate, replay=search.replay, seed=search.seed)
    result = run_policy(setting, policy, load, prefill_workers=split, seed=search.seed, noise=search.noise, options=options,
                        admission=search.admission)
    summary = summarize(result.outcomes())
    return summary.attainment, summary


Candidate = tuple[int, "int | None"]  # (index of a tuning, prefill workers)


def policy_goodput(
    setting: Setting,
    trace: Path,
    policy: str,
    search: SearchSettings = SearchSettings(),
    *,
    options: dict[str, Any] | None = None,
    splits: Sequence[int | None] | None = None,
    evaluated: Callable[[str, int | None, float, float, str], None] | None = None,
) -> PolicyGoodput:
    """Goodput of one policy, at its best tuning and prefill:decode split when the setting has a choice.

    With several candidates (tunings × splits), one bisection runs over the
    rate with, at each rate, the best attainment over the candidates still in
    contention (a candidate passes a rate if any evaluation there reaches the
    target): the highest rate some candidate sustains is the best one's
    goodput. Candidates that fail a rate that another passes are dropped from
    later evaluations at higher rates. `options` apply over every tuning.
    """
    started = time.perf_counter()
    model = setting.latency_model()
    choices: tuple[Tuning, ...] = tunings(policy, model, setting.slo.tpot, fixed=options or {})
    if not search.tune:
        choices = choices[:1]
    variants = [{**choice.options, **(options or {})} for choice in choices]
    candidates: list[Candidate] = [
        (t, split)
        for t, variant in enumerate(variants)
        for split in (list(splits) if splits is not None else setting.splits(make_policy(policy, model, **variant)))
    ]
    points: dict[Candidate, dict[float, float]] = {c: {} for c in candidates}
    alive = list(candidates)
    summaries: dict[tuple[Candidate, float], Summary] = {}

    def best_at(rate: float) -> float:
        nonlocal alive
        best = -1.0
        passing = []
        for candidate in alive:
            t, split = candidate
            value, summary = attainment(setting, trace, policy, rate, split, search, variants[t])
            points[candidate][rate] = value
            summaries[(candidate, rate)] = summary
            if evaluated:
                evaluated(policy, split, rate, value, choices[t].label)  # a search takes minutes: each point as it comes
            best = max(best, value)
            if value >= search.target:
                passing.append(candidate)
        if passing:
            alive = passing  # a candidate failing where another passes cannot have the higher goodput
        return best

    low, high = setting.rate_bounds
    result = find_goodput(best_at, target=search.target, low=low, high=high, rel_tolerance=search.rel_tolerance, max_evaluations=search.max_evaluations)
    passed = {c: _split_goodput(points[c], search.target) for c in candidates}
    best = max(candidates, key=lambda c: (passed[c], -c[0], -_none_last(c[1])))
    by_split: dict[int, float] = {}
    by_tuning: dict[str, float] = {}
    for (t, split), rate in passed.items():
        if split is not None:
            by_split[split] = max(by_split.get(split, 0.0), rate)
        by_tuning[choices[t].label] = max(by_tuning.get(choices[t].label, 0.0), rate)
    summary = summaries.get((best, result.rate))
    return PolicyGoodput(
        policy=policy,
        goodput_rps=result.rate,
        per_gpu=result.rate / setting.gpus,
        prefill_workers=best[1],
        converged=result.converged,
        attainment_at=dict(points[best]),
        splits=by_split,
        infeasible=summary.infeasible if summary else 0,
        seconds=time.perf_counter() - started,
        tuning=choices[best[0]].label,
        by_tuning=by_tuning if len(choices) > 1 else {},
    )


def _split_goodput(points: dict[float, float], target: float) -> float:
    """Highest evaluated rate this split passed (0 if none)."""
    passed = [rate for rate, value in points.items() if value >= target]
    return max(passed, default=0.0)


def _none_last(split: int | None) -> int:
    return 0 if split is None else split


def _each_policy(policies: Sequence[str], measure: Callable[[str], M], progress: Callable[[M], None] | None) -> dict[str, M]:
    """Measure each named policy in turn, telling `progress` as each is done; every name is checked before any work."""
    unknown = [name for name in policies if name not in POLICY_NAMES]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICY_NAMES)}")
    results = {}
    for name in policies:
        results[name] = found = measure(name)
        if progress:
            progress(found)
    return results


def goodput_report(
    setting: Setting,
    trace: Path,
    policies: Sequence[str],
    search: SearchSettings = SearchSettings(),
    *,
    progress: Callable[[PolicyGoodput], None] | None = None,
    evaluated: Callable[[str, int | None, float, float, str], None] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `tropical goodput` JSON: every policy's goodput on one setting and trace (`evaluated`: each point searched;
    `options`: applied to every policy, over each of its tunings)."""
    started = time.perf_counter()
    results = _each_policy(policies, lambda name: policy_goodput(setting, trace, name, search, evaluated=evaluated, options=options), progress)
    blind, seeing = (
        capacity_bound(setting, trace, attainment=search.target, clairvoyant=clairvoyant, seed=search.seed, replay=search.replay).rate
        for clairvoyant in (False, True)
    )
    return {
        "setting": setting.name,
        "trace": str(trace),
        "description": setting.note,
        "model": setting.model,
        "tensor_parallel": setting.tensor_parallel,
        "workers": setting.workers,
        "gpus": setting.gpus,
        "slo": setting.slo.describe(),
        "requests_per_rate": search.replay.count(setting),
        "replay": search.replay.describe(setting),
        "rel_tolerance": search.rel_tolerance,
        "target_attainment": search.target,
        "seed": search.seed,
        "admission": search.admission.value,
        "tuned": search.tune,
        "options": options_as_json(options or {}),
        "search_seconds": round(time.perf_counter() - started, 2),
        "capacity_bound_rps": {"non_clairvoyant": _finite(blind), "clairvoyant": _finite(seeing)},  # tropical.capacity
        "policies": {
            name: {**found.as_json(), "share_of_bound": found.goodput_rps / blind if math.isfinite(blind) and blind > 0 else None}
            for name, found in results.items()
        },
    }


def options_as_json(options: Mapping[str, Any]) -> dict[str, Any]:
    """Policy options as a report records them: an enum by its value, as `--option` takes it."""
    return {key: value.value if isinstance(value, enum.Enum) else value for key, value in options.items()}


def _finite(value: float) -> float | None:
    """A rate as JSON holds it: None for no bound at all (a trace too small to load the cluster)."""
    return value if math.isfinite(value) else None


def rate_sweep(
    setting: Setting,
    trace: Path,
    policy: str,
    rates: Sequence[float],
    *,
    prefill_workers: int | None = None,
    tuning: str | None = None,
    search: SearchSettings = SearchSettings(),
    options: dict[str, Any] | None = None,
) -> list[tuple[float, Summary]]:
    """Summaries of one policy at each rate (for the attainment and latency curves), at the tuning of that label
    (as `policy_goodput` names it with the same `options`)."""
    chosen = tuned(setting, policy, options, tuning)
    return [(rate, attainment(setting, trace, policy, rate, prefill_workers, search, chosen)[1]) for rate in rates]


# --- SLO scale --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySloSweep:
    policy: str
    sweep: SloScaleSweep
    splits: dict[float, int | None]  # the split that attained most at each scale (None: colocated)

    def as_json(self) -> dict[str, Any]:
        return {
            "attainment_at_scale": {f"{scale:g}": value for scale, value in self.sweep.points},
            "prefill_workers_at_scale": {f"{scale:g}": split for scale, split in self.splits.items()},
            "min_scale": self.sweep.min_scale,
        }


def policy_slo_sweep(
    setting: Setting, trace: Path, policy: str, rate: float, scales: Sequence[float], search: SearchSettings = SearchSettings()
) -> PolicySloSweep:
    """Joint attainment at one rate with both SLOs multiplied by each scale (DistServe's SLO-scale curves).

    How tight an SLO a policy sustains at a given load is the other half of
    goodput; each scale takes the policy's best tuning and split there, as the
    goodput search does (Sarathi's budget follows the scaled TPOT).
    """
    splits = setting.splits(make_policy(policy, setting.latency_model()))
    chosen: dict[float, int | None] = {}

    def attainment_at(scale: float) -> float:
        scaled = replace(setting, slo=setting.slo.scaled(scale))
        choices = tunings(policy, scaled.latency_model(), scaled.slo.tpot)[: None if search.tune else 1]
        value, split = max(
            ((attainment(scaled, trace, policy, rate, split, search, dict(choice.options))[0], split) for choice in choices for split in splits),
            key=lambda pair: pair[0],
        )
        chosen[scale] = split
        return value

    sweep = slo_scale_sweep(attainment_at, scales, target=search.target)
    return PolicySloSweep(policy, sweep, dict(sorted(chosen.items())))


def slo_sweep_report(
    setting: Setting,
    trace: Path,
    policies: Sequence[str],
    rate: float,
    scales: Sequence[float],
    search: SearchSettings = SearchSettings(),
    *,
    progress: Callable[[PolicySloSweep], None] | None = None,
) -> dict[str, Any]:
    """The `tropical slo-sweep` JSON: every policy's attainment against the SLO scale at one rate."""
    started = time.perf_counter()
    results = _each_policy(policies, lambda name: policy_slo_sweep(setting, trace, name, rate, scales, search), progress)
    return {
        "setting": setting.name,
        "trace": str(trace),
        "rate": rate,
        "slo_at_scale_1": setting.slo.describe(),
        "scales": sorted(set(scales)),
        "target_attainment": search.target,
        "replay": search.replay.describe(setting),
        "seed": search.seed,
        "admission": search.admission.value,
        "seconds": round(time.perf_counter() - started, 2),
        "policies": {name: found.as_json() for name, found in results.items()},
    }


# --- ablations of `unified` ------------------------------------------------------------------


def unified_ablations(model: LatencyModel) -> dict[str, dict[str, Any]]:
    """`unified` with one idea taken out (or, for the last ones, one more put in): option sets for make_policy."""
    from tropical.policies import AllowedStep, MultiplexingToggle, PrefillOrder

    return {
        "unified (all ideas)": {},
        "- refusing predicted TTFT misses (they wait for spare capacity)": {"drop_hopeless": False},
        "- every refusal (serve all, late ones on spare capacity)": {
            "drop_hopeless": False, "reject_unattainable": False, "prefill.abandon_hopeless": False, "batcher.abandon_hopeless": False,
            "abandon_after": None,
        },
        "- abandoning queued prompts that can no longer meet their TTFT": {"prefill.abandon_hopeless": False, "batcher.abandon_hopeless": False},
        "- banked slack (per-step TPOT instead)": {"allowed_step": AllowedStep.TPOT},
        "- ignoring decodes that missed TTFT": {"protect_late": True},
        "- abandoning starved decodes (they wait until the batch drains)": {"abandon_after": None},
        "- SLO-sized chunks (fixed 512-token budget)": {"slo_chunks": False, "token_budget": 512},
        "- urgency order (FCFS router queue)": {"router.order": PrefillOrder.FCFS},  # the router's queue only, not the prefill workers'
        "- predicted placement (Tropical's toggle, urgency order)": {"router": MultiplexingToggle(model, order=PrefillOrder.URGENCY), "min_prefill_workers": 1},
        "- keeping prompts off workers whose waiting decodes are behind": {"protect_waiting": False},
        "- multiplexing (prefill workers only)": {"multiplexing": False, "min_prefill_workers": 1},
        "- all-multiplexing layout (>= 1 prefill worker)": {"min_prefill_workers": 1},
    }


def ablation_report(setting: Setting, trace: Path, search: SearchSettings = SearchSettings(), *, progress: Callable[[str, PolicyGoodput], None] | None = None) -> dict[str, Any]:
    """Goodput of `unified` and of each ablation, every one at its own best split."""
    model = setting.latency_model()
    rows = {}
    for label, options in unified_ablations(model).items():
        found = policy_goodput(setting, trace, "unified", search, options=options)
        rows[label] = found
        if progress:
            progress(label, found)
    base = rows["unified (all ideas)"].goodput_rps
    return {
        "setting": setting.name,
        "trace": str(trace),
        "requests_per_rate": search.replay.count(setting),
        "replay": search.replay.describe(setting),
        "rel_tolerance": search.rel_tolerance,
        "admission": search.admission.value,
        "variants": {
            label: {"goodput_rps": found.goodput_rps, "vs_unified": found.goodput_rps / base if base else None, "prefill_workers": found.prefill_workers}
            for label, found in rows.items()
        },
    }
