"""The emulated engine: the model engine's interface and bookkeeping, in the latency model's time.

Step times are the model's predictions (hand-computed here from its
coefficients), perturbed by its residual spread when asked, reproducibly by
seed; tokens are reproducible by seed; plans are run or refused exactly as the
model engine runs or refuses them; the clock advances by the step times.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest

from tropical.engine import (
    EmulatedEngine,
    Engine,
    EngineConfig,
    EnginePlan,
    FakeClock,
    InvalidRequest,
    KvExport,
    ModelConfig,
    MonotonicClock,
    PlanRefused,
    ServingEngine,
    Status,
    kv_from_bytes,
    kv_to_bytes,
)
from tropical.latency.model import LatencyModel
from tropical.protocol import FinishReason, SamplingParams

MODEL = LatencyModel(c0=1e-6, c1=1e-3, c2=0.01, d0=0.02, d1=0.002, d2=1e-5, prefill_std=0.2, decode_std=0.1)
FORCED = SamplingParams(ignore_eos=True)
SMALL = ModelConfig.tiny(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_position=512
)


def emulated(capacity: int = 1000, **options: object) -> EmulatedEngine:
    return EmulatedEngine(MODEL, capacity, clock=FakeClock(), **options)  # type: ignore[arg-type]


def run_all(engine: ServingEngine) -> tuple[list[float], dict[str, list[int]]]:
    """Serve everything with the default planner: each step's time, and each request's tokens."""
    times: list[float] = []
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        result = engine.step()
        times.append(result.step_time_s)
        for out in result.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return times, tokens


def add_some(engine: ServingEngine, count: int = 4, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    wanted = {}
    for i in range(count):
        wanted[f"r{i}"] = rng.randint(3, 12)
        engine.add_request(f"r{i}", [rng.randrange(500) for _ in range(rng.randint(5, 200))], FORCED, wanted[f"r{i}"])
    return wanted


# --- time -----------------------------------------------------------------------------------


def test_step_times_are_the_models_predictions() -> None:
    engine = emulated()
    engine.add_request("a", list(range(10)), FORCED, max_tokens=5)
    engine.add_request("b", list(range(20)), FORCED, max_tokens=5)
    engine.add_request("c", list(range(30)), FORCED, max_tokens=5)
    steps = [
        # prompt only: c2 + c0·(10² − 0) + c1·10 + c0·(4² − 0) + c1·4
        (EnginePlan(chunks=(("a", 10), ("b", 4))), 0.01 + 0.0001 + 0.01 + 0.000016 + 0.004),
        # prompt only, while a's decode waits: c2 + c0·(20² − 4²) + c1·16
        (EnginePlan(chunks=(("b", 16),)), 0.01 + 0.000384 + 0.016),
        # decode only, a with 11 tokens and b with 21: d0 + d1·2 + d2·(11 + 21)
        (EnginePlan(decode=("a", "b")), 0.02 + 0.004 + 0.00032),
        # mixed, a with 12 tokens: d0 + d1 + d2·12 + c0·(5² − 0) + c1·5
        (EnginePlan(decode=("a",), chunks=(("c", 5),)), 0.02 + 0.002 + 0.00012 + 0.000025 + 0.005),
        # mixed, b with 22 tokens: d0 + d1 + d2·22 + c0·(30² − 5²) + c1·25
        (EnginePlan(decode=("b",), chunks=(("c", 25),)), 0.02 + 0.002 + 0.00022 + 0.000875 + 0.025),
    ]
    elapsed = 0.0
    for plan, expected in steps:
        result = engine.step(plan)
        assert result.step_time_s == pytest.approx(expected, rel=1e-12)
        elapsed += result.step_time_s
        assert engine.clock.now() == elapsed
    assert engine.step(EnginePlan()).step_time_s == 0.0 and engine.clock.now() == elapsed


def test_noise_is_the_models_residual_drawn_from_the_seed() -> None:
    exact, noisy = emulated(seed=3), emulated(seed=3, noise=True)
    add_some(exact), add_some(noisy)
    rng = random.Random(3)
    factors: list[float] = []
    while exact.has_unfinished():
        plain, perturbed = exact.step(), noisy.step()
        assert perturbed.plan == plain.plan
        factor = MODEL.noise_factor(rng, prefill=plain.num_prefill_tokens > 0)
        assert perturbed.step_time_s == pytest.approx(factor * plain.step_time_s, rel=1e-12)
        factors.append(factor)
    assert not noisy.has_unfinished() and len(set(factors)) == len(factors)


def test_the_noise_factor_follows_the_spread_of_the_step_kind() -> None:
    rng = random.Random(0)
    quiet = LatencyModel(c0=0, c1=0, c2=0, d0=0, d1=0, d2=0, prefill_std=0.3, decode_std=0.0)
    assert quiet.noise_factor(rng, prefill=False) == 1.0 and rng.random() == random.Random(0).random()  # no draw
    prefill = [quiet.noise_factor(rng, prefill=True) for _ in range(4000)]
    mean = sum(prefill) / len(prefill)
    spread = (sum((f - mean) ** 2 for f in prefill) / len(prefill)) ** 0.5
    assert abs(mean - 1.0) < 0.02 and abs(spread - 0.3) < 0.02 and min(prefill) >= 0.05
    wild = replace(quiet, prefill_std=50.0)
    assert min(wild.noise_factor(rng, prefill=True) for _ in range(100)) == 0.05  # never a negative time


def test_the_same_seed_gives_the_same_times_and_tokens_and_another_seed_others() -> None:
    runs = {}
    for name, seed in [("first", 1), ("again", 1), ("other", 2)]:
        engine = emulated(seed=seed, noise=True)
        wanted = add_some(engine)
        runs[name] = run_all(engine)
        assert {rid: len(tokens) for rid, tokens in runs[name][1].items()} == wanted
    assert runs["first"] == runs["again"]
    assert runs["first"][0] != runs["other"][0] and runs["first"][1] != runs["other"][1]


class LateClock(FakeClock):
    """Wakes a millisecond after every deadline, as a busy machine's sleep does."""

    def sleep_until(self, deadline: float) -> None:
        self.time = max(self.time, deadline) + 0.001


def test_a_late_wake_up_does_not_delay_later_steps_but_the_callers_time_counts() -> None:
    clock = LateClock()
    engine = EmulatedEngine(MODEL, 1000, clock=clock)
    add_some(engine)
    total = 0.0
    steps = 0
    while engine.has_unfinished():
        total += engine.step().step_time_s
        steps += 1
        assert clock.now() == pytest.approx(total + 0.001 + (steps - 1) * 0.0005, rel=1e-12)
        clock.time += 0.0005  # the caller's own work between steps
    assert steps > 3


def test_the_real_clock_does_not_sleep_past_a_deadline_that_has_gone() -> None:
    clock = MonotonicClock()
    before = clock.now()
    clock.sleep_until(before - 1.0)
    assert before <= clock.now() < before + 1.0


def test_the_default_planner_serves_every_request_to_its_max_tokens() -> None:
    engine = emulated(capacity=400, max_num_batched_tokens=64, max_num_seqs=3)
    wanted = add_some(engine, count=6, seed=4)
    times, tokens = run_all(engine)
    assert {rid: len(ids) for rid, ids in tokens.items()} == wanted
    assert all(0 <= t < 32_000 for ids in tokens.values() for t in ids)
    assert engine.clock.now() == pytest.approx(sum(times), rel=1e-12)
    assert engine.kv_free_tokens == engine.kv_capacity_tokens == engine.max_model_len == 400
    assert engine.kv_block_size == 1


# --- tokens ---------------------------------------------------------------------------------


def test_stop_tokens_eos_and_max_tokens_act_as_on_the_model_engine() -> None:
    engine = emulated()
    engine.add_request("r", [1, 2, 3], FORCED, max_tokens=8)
    full = run_all(engine)[1]["r"]
    stop = full[3]
    engine.add_request("r", [1, 2, 3], SamplingParams(stop_token_ids=[stop], ignore_eos=True), max_tokens=8)
    assert run_all(engine)[1]["r"] == full[: full.index(stop) + 1]
    with_eos = emulated(eos_token_ids=[stop])
    with_eos.add_request("r", [1, 2, 3], SamplingParams(), max_tokens=8)
    result = []
    while with_eos.has_unfinished():
        for out in with_eos.step().outputs:
            result += out.new_token_ids
            reason = out.finish_reason
    assert result == full[: full.index(stop) + 1] and reason is FinishReason.STOP
    with_eos.add_request("r", [1, 2, 3], FORCED, max_tokens=8)
    assert run_all(with_eos)[1]["r"] == full


def test_a_kv_handoff_continues_the_sequence_through_the_real_export_path() -> None:
    alone = emulated(seed=7)
    alone.add_request("r", list(range(40)), FORCED, max_tokens=9)
    expected = run_all(alone)[1]["r"]
    sender, receiver = emulated(seed=7), emulated(seed=7)
    sender.add_request("r", list(range(40)), FORCED, max_tokens=1, retain_kv=True)
    first = sender.step().outputs[0].new_token_ids
    export = sender.export_kv("r")
    assert export.num_tokens == 40 and export.nbytes == 4 * 40
    data = kv_from_bytes(export.layout, kv_to_bytes(export.data))
    receiver.import_kv(replace(export, data=data, max_tokens=9))
    state = receiver.sequence("r")
    assert state is not None and state.status is Status.DECODING and state.kv_tokens == 40
    assert first + run_all(receiver)[1]["r"] == expected
    assert sender.abort("r") and sender.kv_free_tokens == sender.kv_capacity_tokens


def test_kv_does_not_cross_between_emulated_and_model_engines() -> None:
    model = Engine.load("tiny", EngineConfig(device="cpu", num_kv_blocks=16), tiny=SMALL)
    model.add_request("r", [1, 2, 3], FORCED, max_tokens=1, retain_kv=True)
    model.step()
    with pytest.raises(InvalidRequest, match="does not fit"):
        emulated().import_kv(model.export_kv("r"))
    engine = emulated(vocab_size=512)
    engine.add_request("r", [1, 2, 3], FORCED, max_tokens=1, retain_kv=True)
    engine.step()
    export: KvExport = engine.export_kv("r")
    with pytest.raises(InvalidRequest, match="does not fit"):
        model.import_kv(export, request_id="other")


# --- plans: run or refused exactly as on the model engine ------------------------------------


def wild_plan(rng: random.Random, engine: ServingEngine, ids: list[str]) -> EnginePlan:
    """A random plan, now and then with a mistake in it: a stranger, a wrong count, a request named twice, no room."""
    states = [s for rid in ids if (s := engine.sequence(rid)) is not None and s.status is not Status.FINISHED]
    free = engine.kv_free_tokens if rng.random() < 0.9 else engine.kv_capacity_tokens
    decode: list[str] = []
    chunks: list[tuple[str, int]] = []
    for s in rng.sample(states, len(states)):
        if rng.random() < 0.4 or s.kv_tokens_needed > free:
            continue
        free -= s.kv_tokens_needed
        if s.status is Status.DECODING:
            decode.append(s.request_id)
        else:
            chunks.append((s.request_id, rng.randint(1, s.num_pending)))
    named = set(decode) | {rid for rid, _ in chunks}
    preempt = [s.request_id for s in states if s.holds_kv and s.request_id not in named and rng.random() < 0.05]
    anyone = rng.choice([*(s.request_id for s in states), "stranger"])
    mistake = rng.random()
    if mistake < 0.1:
        decode.append(anyone)
    elif mistake < 0.2:
        chunks.append((anyone, rng.randint(0, 50)))
    elif mistake < 0.25:
        preempt.append(anyone)
    return EnginePlan(tuple(decode), tuple(chunks), tuple(preempt))


def attempt(engine: ServingEngine, plan: EnginePlan, ids: list[str]) -> tuple[object, ...]:
    """What a plan did, in terms both engines share; a refused plan must have changed nothing."""
    before = ([engine.sequence(rid) for rid in ids], engine.kv_free_tokens)
    try:
        result = engine.step(plan)
    except PlanRefused as refusal:
        assert ([engine.sequence(rid) for rid in ids], engine.kv_free_tokens) == before
        return ("refused", str(refusal))
    finished = sorted((out.request_id, out.finish_reason) for out in result.outputs if out.finished)
    return ("ran", [engine.sequence(rid) for rid in ids], engine.kv_free_tokens, finished, result.num_seqs)


def test_plans_are_run_or_refused_exactly_as_on_the_model_engine() -> None:
    capacity = 160
    model = Engine.load("tiny", EngineConfig(device="cpu", block_size=1, num_kv_blocks=capacity), tiny=SMALL)
    twin = emulated(capacity, vocab_size=512)
    rng = random.Random(11)
    ids = [f"r{i}" for i in range(16)]
    arrivals = {
        rid: (rng.randrange(0, 120, 10), [rng.randrange(512) for _ in range(rng.randint(3, 60))], rng.randint(2, 20))
        for rid in ids
    }
    refused: dict[str, int] = {}
    ran = 0
    for step in range(300):
        for rid, (at, prompt, max_tokens) in arrivals.items():
            if at == step:
                model.add_request(rid, prompt, FORCED, max_tokens)
                twin.add_request(rid, prompt, FORCED, max_tokens)
        plan = wild_plan(rng, twin, ids)
        theirs, ours = attempt(model, plan, ids), attempt(twin, plan, ids)
        assert ours == theirs, plan
        if ours[0] == "refused":
            kind = re.sub(r"'[^']*'|\d+", "_", str(ours[1]))
            refused[kind] = refused.get(kind, 0) + 1
        else:
            ran += 1
    assert ran > 100 and len(refused) >= 6, refused
    for engine in (model, twin):
        run_all(engine)
        assert engine.kv_free_tokens == capacity
