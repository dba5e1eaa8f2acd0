"""`Engine.step(plan)` runs exactly the plan it is given.

Random plans (chunk splits anywhere, prompt-only steps, decodes kept waiting,
preemption and recompute, an imported KV admitted late) give the greedy tokens
of Hugging Face `generate`, token for token; each step touches only the
sequences its plan names. A plan the engine cannot run is refused and changes
nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from tests.hf_reference import build_reference, save_reference
from transformers import PreTrainedModel

from tropical.engine import Engine, EngineConfig, EnginePlan, PlanRefused, SequenceState, Status
from tropical.protocol import SamplingParams

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
BLOCK_SIZE = 4
NUM_BLOCKS = 40  # 160 tokens for six requests of up to ~40: plans must fit, some preempt
RANDOM_RUNS = 12  # per family
BIG = [(7 * i) % 384 for i in range(104)]  # 26 blocks: more than a busy engine has free


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, Path]:
    model = build_reference(request.param)
    return model, save_reference(model, tmp_path_factory.mktemp(request.param))


def engine_for(path: Path, **config: object) -> Engine:
    settings = {"device": "cpu", "dtype": "float32", "block_size": BLOCK_SIZE, "num_kv_blocks": NUM_BLOCKS, **config}
    return Engine.load(path, EngineConfig(**settings))  # type: ignore[arg-type]


def hf_greedy(model: PreTrainedModel, ids: list[int], max_tokens: int) -> list[int]:
    input_ids = torch.tensor([ids])
    with torch.no_grad():  # the mask says every token counts, token 0 (the pad id) included
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrives: int  # the step before which it is added (or imported)


def make_requests(rng: random.Random, count: int) -> list[Request]:
    return [
        Request(f"r{i}", [rng.randrange(384) for _ in range(rng.randint(1, 30))], rng.randint(2, 9), rng.choice([0, 0, 3, 8]))
        for i in range(count)
    ]


def kv_of(tokens: int) -> int:
    """KV tokens held by a sequence reserving `tokens` tokens: whole blocks."""
    return -(-tokens // BLOCK_SIZE) * BLOCK_SIZE


# --- a random planner ---------------------------------------------------------------------


def random_plan(engine: Engine, rng: random.Random, ids: list[str]) -> EnginePlan:
    """Any plan the engine can run: random subsets, random chunk sizes, now and then a preemption."""
    states = [s for rid in ids if (s := engine.sequence(rid)) is not None and s.status is not Status.FINISHED]
    preempt = [s for s in states if s.holds_kv and rng.random() < 0.06]
    free = engine.kv_free_tokens + sum(s.kv_tokens for s in preempt)
    decode: list[str] = []
    chunks: list[tuple[str, int]] = []
    for s in rng.sample(states, len(states)):
        if s in preempt or rng.random() < 0.3 or s.kv_tokens_needed > free:  # kept waiting
            continue
        free -= s.kv_tokens_needed
        if s.status is Status.DECODING:
            decode.append(s.request_id)
        else:
            chunks.append((s.request_id, rng.randint(1, s.num_pending)))
    stuck = not any(s.kv_tokens_needed <= engine.kv_free_tokens for s in states)
    if states and stuck and not (decode or chunks or preempt):  # nothing fits: make room
        preempt = [max((s for s in states if s.holds_kv), key=lambda s: s.kv_tokens)]
    return EnginePlan(tuple(decode), tuple(chunks), tuple(s.request_id for s in preempt))


def run_plan(engine: Engine, plan: EnginePlan, ids: list[str], tokens: dict[str, list[int]]) -> None:
    """One step of `plan`, checking that it did exactly that and left every other sequence alone."""
    before = {rid: engine.sequence(rid) for rid in ids}
    result = engine.step(plan)
    assert result.plan == plan and result.preempted == list(plan.preempt)
    assert result.num_decode_tokens == len(plan.decode) and result.num_prefill_tokens == plan.num_prefill_tokens
    assert result.num_seqs == len(plan.decode) + len(plan.chunks)
    named = set(plan.decode) | {rid for rid, _ in plan.chunks} | set(plan.preempt)
    for rid in ids:
        if rid not in named:
            assert engine.sequence(rid) == before[rid], f"{rid} changed without being in the plan"
    sampled = {out.request_id for out in result.outputs}
    assert set(plan.decode) <= sampled
    for rid, count in plan.chunks:
        state = before[rid]
        assert state is not None
        assert (rid in sampled) == (count == state.num_pending)
        after = engine.sequence(rid)
        if after is not None and after.status is Status.PREFILLING:  # the whole prompt's KV, reserved at once
            assert after.kv_tokens == kv_of(after.num_prompt_tokens + after.num_output_tokens)
    for rid in plan.preempt:
        after = engine.sequence(rid)
        assert after is not None and after.status is Status.QUEUED and not after.holds_kv
    for out in result.outputs:
        tokens[out.request_id] += out.new_token_ids


@dataclass
class Seen:
    """What the random plans exercised, so the proof cannot pass on plans that avoid the hard cases."""

    prompt_only: int = 0  # steps of chunks only while a decode held its KV
    decodes_kept_waiting: int = 0
    preemptions: int = 0
    import_waited: int = 0  # steps an imported KV waited, admitted later


def tally(seen: Seen, engine: Engine, plan: EnginePlan, ids: list[str]) -> None:
    decoding = {rid for rid in ids if (s := engine.sequence(rid)) is not None and s.status is Status.DECODING}
    seen.prompt_only += bool(plan.chunks and not plan.decode and decoding)
    seen.decodes_kept_waiting += len(decoding - set(plan.decode) - set(plan.preempt))
    seen.preemptions += len(plan.preempt)
    seen.import_waited += "imported" in decoding - set(plan.decode)


def random_run(model: PreTrainedModel, path: Path, seed: int, seen: Seen) -> None:
    """Requests arriving over time and an imported KV, all served by random plans; the tokens are HF's."""
    rng = random.Random(seed)
    requests = make_requests(rng, 5)
    imported = Request("imported", [rng.randrange(384) for _ in range(rng.randint(5, 25))], rng.randint(3, 8), rng.randint(1, 10))
    expected = {r.request_id: hf_greedy(model, r.prompt, r.max_tokens) for r in [*requests, imported]}

    sender = engine_for(path)  # prefills the imported request, as a prefill worker would
    sender.add_request(imported.request_id, imported.prompt, GREEDY, max_tokens=1, retain_kv=True)
    first = sender.step().outputs[0].new_token_ids
    export = replace(sender.export_kv(imported.request_id), max_tokens=imported.max_tokens)

    engine = engine_for(path)
    ids = [r.request_id for r in requests] + [imported.request_id]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    tokens[imported.request_id] = list(first)
    for step in range(400):
        for r in requests:
            if r.arrives == step:
                engine.add_request(r.request_id, r.prompt, GREEDY, r.max_tokens)
        if step == imported.arrives:
            engine.import_kv(export)
            state = engine.sequence(imported.request_id)
            assert state is not None and state.status is Status.DECODING and state.num_pending == 1
        if step > imported.arrives and step > max(r.arrives for r in requests) and not engine.has_unfinished():
            break
        plan = random_plan(engine, rng, ids)
        tally(seen, engine, plan, ids)
        run_plan(engine, plan, ids, tokens)
    assert tokens == expected, f"seed {seed}"
    assert engine.kv_free_tokens == engine.kv_capacity_tokens


def test_random_plans_give_the_reference_tokens(reference: tuple[PreTrainedModel, Path]) -> None:
    model, path = reference
    seen = Seen()
    for seed in range(RANDOM_RUNS):
        random_run(model, path, seed, seen)
    assert seen.prompt_only and seen.decodes_kept_waiting and seen.preemptions and seen.import_waited, seen


def test_a_first_chunk_reserves_the_whole_prompt_and_a_recompute_its_outputs_too(
    reference: tuple[PreTrainedModel, Path],
) -> None:
    model, path = reference
    engine = engine_for(path)
    assert engine.kv_block_size == BLOCK_SIZE and engine.max_model_len == 512
    prompt = list(range(30))
    engine.add_request("a", prompt, GREEDY, max_tokens=6)
    tokens: dict[str, list[int]] = {"a": []}
    run_plan(engine, EnginePlan(chunks=(("a", 3),)), ["a"], tokens)
    assert engine.sequence("a") == SequenceState("a", Status.PREFILLING, 30, 0, 3, 27, kv_tokens=32, kv_tokens_needed=0)
    run_plan(engine, EnginePlan(chunks=(("a", 27),)), ["a"], tokens)
    run_plan(engine, EnginePlan(decode=("a",)), ["a"], tokens)
    run_plan(engine, EnginePlan(decode=("a",)), ["a"], tokens)
    state = engine.sequence("a")
    assert state is not None and state.status is Status.DECODING and state.num_output_tokens == 3
    assert state.kv_tokens == 32 and state.kv_tokens_needed == 4  # its next token opens a block
    run_plan(engine, EnginePlan(preempt=("a",)), ["a"], tokens)
    assert engine.sequence("a") == SequenceState("a", Status.QUEUED, 30, 3, 0, 33, kv_tokens=0, kv_tokens_needed=36)
    assert engine.kv_free_tokens == engine.kv_capacity_tokens
    run_plan(engine, EnginePlan(chunks=(("a", 1),)), ["a"], tokens)  # prompt and outputs, reserved at once
    assert engine.sequence("a") == SequenceState("a", Status.PREFILLING, 30, 3, 1, 32, kv_tokens=36, kv_tokens_needed=0)
    run_plan(engine, EnginePlan(chunks=(("a", 32),)), ["a"], tokens)  # the recompute samples the fourth output
    while engine.has_unfinished():
        run_plan(engine, EnginePlan(decode=("a",)), ["a"], tokens)
    assert tokens["a"] == hf_greedy(model, prompt, 6)
    assert engine.kv_free_tokens == engine.kv_capacity_tokens


# --- refusals -----------------------------------------------------------------------------


def snapshot(engine: Engine) -> tuple[object, ...]:
    """Everything a step could change: each sequence's tokens, KV and status, the queue, the free blocks."""
    book = engine.book
    sequences = sorted(
        (s.request_id, s.status, s.num_computed, tuple(s.token_ids), tuple(s.block_table))
        for s in book._sequences.values()
    )
    return (sequences, [s.request_id for s in book.queued], sorted(book.running), book.blocks._free.tobytes(), book.blocks.num_free_blocks)


def busy_engine(path: Path) -> tuple[Engine, dict[str, list[int]]]:
    """An engine with a request of every kind: queued, mid-prompt, decoding, an imported KV waiting."""
    engine = engine_for(path)
    prompts = {"queued": list(range(100, 120)), "mid": list(range(50, 80)), "decoding": list(range(7, 19))}
    engine.add_request("decoding", prompts["decoding"], GREEDY, max_tokens=5)
    engine.add_request("mid", prompts["mid"], GREEDY, max_tokens=5)
    engine.add_request("queued", prompts["queued"], GREEDY, max_tokens=5)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    run_plan(engine, EnginePlan(chunks=(("decoding", 12), ("mid", 10))), list(prompts), tokens)
    sender = engine_for(path)
    prompts["imported"] = list(range(200, 209))
    sender.add_request("imported", prompts["imported"], GREEDY, max_tokens=1, retain_kv=True)
    tokens["imported"] = sender.step().outputs[0].new_token_ids
    engine.import_kv(replace(sender.export_kv("imported"), max_tokens=4))
    return engine, tokens | {f"prompt:{rid}": ids for rid, ids in prompts.items()}


REFUSED = [
    (EnginePlan(decode=("nobody",)), "no request 'nobody' in this engine"),
    (EnginePlan(chunks=(("nobody", 1),)), "no request 'nobody'"),
    (EnginePlan(decode=("mid",)), r"request 'mid' cannot decode: it is prefilling \(10 of 30 tokens computed\)"),
    (EnginePlan(decode=("queued",)), "request 'queued' cannot decode: it is queued"),
    (EnginePlan(chunks=(("mid", 21),)), "a chunk of 21 tokens for request 'mid', which has 20 left to compute"),
    (EnginePlan(chunks=(("queued", 0),)), "a chunk of 0 tokens"),
    (EnginePlan(chunks=(("decoding", 1),)), "request 'decoding' has no prompt to compute: it is decoding"),
    (EnginePlan(decode=("decoding",), chunks=(("decoding", 1),)), "request 'decoding' is named twice"),
    (EnginePlan(decode=("imported", "imported")), "request 'imported' is named twice"),
    (EnginePlan(preempt=("queued",)), "cannot preempt request 'queued': it is queued and holds no KV"),
    # a valid preemption first: refused all the same, and not half done
    (EnginePlan(preempt=("mid",), decode=("decoding",), chunks=(("queued", 200),)), "a chunk of 200 tokens"),
]


@pytest.mark.parametrize(("plan", "message"), REFUSED)
def test_a_refused_plan_changes_nothing(reference: tuple[PreTrainedModel, Path], plan: EnginePlan, message: str) -> None:
    _, path = reference
    engine, _ = busy_engine(path)
    before = snapshot(engine)
    with pytest.raises(PlanRefused, match=message):
        engine.step(plan)
    assert snapshot(engine) == before


def test_no_kv_room_is_refused_then_a_valid_plan_gives_the_reference_tokens(
    reference: tuple[PreTrainedModel, Path],
) -> None:
    model, path = reference
    engine, tokens = busy_engine(path)
    engine.add_request("big", BIG, GREEDY, max_tokens=3)
    before = snapshot(engine)
    with pytest.raises(PlanRefused, match="no KV room: the step needs 108 more KV tokens, 104 are free"):
        engine.step(EnginePlan(decode=("decoding", "imported"), chunks=(("big", 1),)))
    assert snapshot(engine) == before
    ids = ["decoding", "mid", "queued", "imported", "big"]
    tokens["big"] = []
    run_plan(engine, EnginePlan(decode=("decoding",), preempt=("mid",), chunks=(("big", 104),)), ids, tokens)
    while engine.has_unfinished():  # then whatever the default planner does
        for out in engine.step().outputs:
            tokens[out.request_id] += out.new_token_ids
    for rid, max_tokens in [("decoding", 5), ("mid", 5), ("queued", 5), ("imported", 4), ("big", 3)]:
        prompt = tokens.get(f"prompt:{rid}", BIG)
        assert tokens[rid] == hf_greedy(model, prompt, max_tokens), rid
    assert engine.kv_free_tokens == engine.kv_capacity_tokens


def test_an_imported_kv_waits_holding_its_blocks_until_a_plan_decodes_it(reference: tuple[PreTrainedModel, Path]) -> None:
    _, path = reference
    engine, tokens = busy_engine(path)
    held = engine.sequence("imported")
    assert held is not None and held.holds_kv
    for _ in range(3):
        run_plan(engine, EnginePlan(decode=("decoding",), chunks=(("mid", 5),)), ["decoding", "mid", "imported"], tokens)
    assert engine.sequence("imported") == held and engine.has_unfinished()
    run_plan(engine, EnginePlan(decode=("imported",)), ["imported"], tokens)
    assert len(tokens["imported"]) == 2
