"""Profiling an engine into a latency model: exact recovery, grid bounds, progress, the real engine, the shipped default, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from tropical.cli import app
from tropical.engine import EmulatedEngine, Engine, EngineConfig, EnginePlan, FakeClock, StepResult
from tropical.latency import (
    EngineLimits,
    GridPoint,
    LatencyModel,
    ProfileGrid,
    default_grid,
    default_latency_model,
    default_latency_spec,
    profile_engine,
)
from tropical.latency.profiling import read_profile_spec
from tropical.policies import POLICY_NAMES, make_policy
from tropical.protocol import LatencyModelSpec

KNOWN = LatencyModel(c0=3e-9, c1=4e-5, c2=2e-3, d0=6e-3, d1=3e-4, d2=2e-7)
SMALL_GRID = ProfileGrid.cross((16, 64, 256), (1, 4), (32, 128), [(2, 32, 64)], warmup=1, repeats=2)


class RecordingEngine(EmulatedEngine):
    """An emulated engine on a fake clock (steps take exactly the model's time, and no wall time) that keeps its plans."""

    def __init__(self, model: LatencyModel, *, kv_capacity_tokens: int = 1 << 16, max_model_len: int = 4096) -> None:
        super().__init__(model, kv_capacity_tokens, max_model_len=max_model_len, clock=FakeClock())
        self.plans: list[EnginePlan] = []
        self.peak_kv = 0

    def step(self, plan: EnginePlan | None = None, *, with_logits: bool = False) -> StepResult:
        result = super().step(plan, with_logits=with_logits)
        self.plans.append(result.plan)
        self.peak_kv = max(self.peak_kv, self.kv_capacity_tokens - self.kv_free_tokens)
        return result

    def holds_nothing(self) -> bool:
        return not self.has_unfinished() and self.kv_free_tokens == self.kv_capacity_tokens


def _coefficients(model: LatencyModel) -> tuple[float, ...]:
    return (model.c0, model.c1, model.c2, model.d0, model.d1, model.d2)


@pytest.mark.parametrize("reduce", ["median", "min", "all"])
def test_profiling_an_exact_engine_recovers_its_coefficients(reduce: str) -> None:
    engine = RecordingEngine(KNOWN)
    found = profile_engine(engine, SMALL_GRID, reduce=reduce, name="exact")
    assert _coefficients(found.model) == pytest.approx(_coefficients(KNOWN), rel=1e-6)
    assert found.model.prefill_std == pytest.approx(0.0, abs=1e-9)
    assert found.model.decode_std == pytest.approx(0.0, abs=1e-9)
    assert found.mixed is not None and found.mixed.max_rel_error == pytest.approx(0.0, abs=1e-9)
    assert found.model.name == "exact"
    assert engine.holds_nothing(), "the profile leaves no request in the engine"


def test_samples_are_every_timed_step_and_warmups_are_dropped() -> None:
    engine = RecordingEngine(KNOWN)
    found = profile_engine(engine, SMALL_GRID)
    points = SMALL_GRID.points
    assert len(found.samples) == len(points) * SMALL_GRID.repeats
    assert {s.point for s in found.samples} == set(points)
    assert found.prefill.samples == len(SMALL_GRID.of_kind("prefill"))  # medians: one per point
    assert found.decode.samples == len(SMALL_GRID.of_kind("decode"))
    timed_plans = len(engine.plans) - len(points) * SMALL_GRID.warmup
    setup = sum(max(p.batch for p in points if p.batch and p.context == c) for c in (32, 128))
    assert timed_plans - setup == len(found.samples)
    for sample in found.samples:
        assert sample.batch == sample.point.batch and sample.prompt_tokens == sample.point.prompt
        if sample.batch:  # each decode attends over its context, its first output and the steps before
            assert sample.context_tokens >= sample.batch * (sample.point.context + 1)


def test_grid_stays_within_kv_capacity_and_max_length() -> None:
    limits = EngineLimits(max_model_len=300, kv_capacity_tokens=1024, block_size=16, max_batch=8)
    grid = ProfileGrid.cross((16, 128, 299, 300, 1000), (1, 4, 8, 16), (32, 128, 290), [(4, 32, 200), (8, 128, 512)])
    bounded = grid.bounded(limits)
    assert [p.prompt for p in bounded.of_kind("prefill")] == [16, 128, 299]
    for point in bounded.of_kind("decode") + bounded.of_kind("mixed"):
        length = point.context + bounded.decode_steps(point.context) + 2
        assert point.batch <= 8 and length <= 300
        assert point.batch * -(-length // 16) * 16 <= 1024
    assert GridPoint(batch=16, context=32) not in bounded.points  # over the batch limit
    assert GridPoint(batch=8, context=128) not in bounded.points  # 8 × 160 tokens of KV > 1024
    assert GridPoint(batch=1, context=290) not in bounded.points  # context + decode steps > 300
    assert GridPoint(batch=4, context=32, prompt=200) in bounded.points

    engine = RecordingEngine(KNOWN, max_model_len=300, kv_capacity_tokens=1024)
    found = profile_engine(engine, grid, limits=limits)  # the engine refuses any request or plan past its limits
    assert found.grid == bounded and engine.peak_kv <= 1024 and engine.holds_nothing()


def test_default_grid_fits_the_engine_it_is_made_for() -> None:
    for limits in (EngineLimits(4096, 65536, 16, 64), EngineLimits(512, 4096, 16, 8), EngineLimits(131072, 1 << 20, 16, 256)):
        for quick in (False, True):
            grid = default_grid(limits, quick=quick)
            assert grid.complete and grid == grid.bounded(limits)
            assert max(p.prompt for p in grid.of_kind("prefill")) == min(limits.max_model_len - 1, 1024 if quick else 16384)


def test_the_default_grid_runs_on_a_small_engine_and_recovers_its_model() -> None:
    engine = RecordingEngine(KNOWN, kv_capacity_tokens=4096, max_model_len=600)
    found = profile_engine(engine)
    assert found.grid == default_grid(EngineLimits.of(engine)) and found.grid.of_kind("mixed")
    assert _coefficients(found.model) == pytest.approx(_coefficients(KNOWN), rel=1e-6)
    assert engine.peak_kv <= 4096 and engine.holds_nothing()


def test_progress_callback_sees_every_grid_point() -> None:
    seen: list[tuple[int, int, GridPoint]] = []
    profile_engine(RecordingEngine(KNOWN), SMALL_GRID, progress=lambda *args: seen.append(args))
    assert [done for done, _, _ in seen] == list(range(1, len(SMALL_GRID.points) + 1))
    assert {total for _, total, _ in seen} == {len(SMALL_GRID.points)}
    assert sorted(point for _, _, point in seen) == list(SMALL_GRID.points)


def test_a_grid_with_nothing_to_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="no prefill or no decode point"):
        profile_engine(RecordingEngine(KNOWN, max_model_len=40), SMALL_GRID)
    with pytest.raises(ValueError, match="reduce must be one of"):
        profile_engine(RecordingEngine(KNOWN), SMALL_GRID, reduce="mean")
    with pytest.raises(ValueError, match="a prompt, a decode batch"):
        GridPoint()
    with pytest.raises(ValueError, match="repeats"):
        ProfileGrid((GridPoint(prompt=8),), repeats=0)


def test_the_tiny_engine_profiles_end_to_end() -> None:
    engine = Engine.load("tiny", EngineConfig(device="cpu", num_kv_blocks=64))
    grid = ProfileGrid.cross((8, 32), (1, 2), (8, 24), [(2, 8, 16)], warmup=1, repeats=1)
    found = profile_engine(engine, grid, name="tiny")
    assert all(math.isfinite(c) and c >= 0.0 for c in _coefficients(found.model))
    assert found.model.prefill_time(32) > 0.0 and found.model.decode_time(2, 64) > 0.0
    assert len(found.samples) == len(grid.points)
    assert found.mixed is not None and found.mixed.samples == 1
    assert not engine.has_unfinished() and engine.kv_free_tokens == engine.kv_capacity_tokens
    report = found.report()
    assert len(report["samples"]) == len(found.samples) and report["grid"]["mixed_points"] == [[2, 8, 16]]


def test_the_shipped_default_loads_round_trips_and_builds_every_policy() -> None:
    spec = default_latency_spec("tiny")
    model = default_latency_model("tiny")
    assert model == LatencyModel.from_spec(spec)
    assert all(math.isfinite(c) and c >= 0.0 for c in _coefficients(model))
    assert model.prefill_time(1024) > model.prefill_time(16) > 0.0 and model.decode_time(8, 8 * 512) > 0.0
    again = LatencyModel.from_spec(msgspec.msgpack.decode(msgspec.msgpack.encode(model.to_spec(
        model=spec.model, hardware=spec.hardware, tensor_parallel=1, samples=spec.samples, fitted_at=spec.fitted_at
    )), type=LatencyModelSpec))
    assert again == model
    for name in POLICY_NAMES:
        assert make_policy(name, model).name == name
    with pytest.raises(ValueError, match="shipped: tiny"):
        default_latency_model("llama-70b")


def test_cli_profile_writes_the_spec_and_a_report(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    args = ["profile", "--quick", "--max-len", "128", "--repeats", "1", "--device", "cpu", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tiny@cpu/tp1" in result.output
    record = json.loads(out.read_text())
    spec = read_profile_spec(out)
    assert spec.model == "tiny" and spec.hardware == "cpu" and spec.samples == len(record["report"]["samples"])
    assert record["report"]["grid"]["prompt_lengths"] == [16, 64, 127]
    assert {"machine", "date", "prefill_fit", "decode_fit"} <= set(record["report"])


@pytest.mark.parametrize(
    "args",
    [
        ["--engine", "/no/such/model"],
        ["--repeats", "0"],
        ["--device", "tpu"],
        ["--max-len", "8"],
        ["--reduce", "mean"],
        ["--engine", "{empty directory}"],
    ],
)
def test_cli_profile_rejects_bad_input(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    args = [str(tmp_path / "empty") if arg == "{empty directory}" else arg for arg in args]
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["profile", "--quick", *args, "--json", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert not out.exists()
