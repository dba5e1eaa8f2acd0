"""The engine computes what the Hugging Face reference computes, for every family and every way of batching.

Each family's reference model has seeded random weights (biases and norm
scales included) and is saved with save_pretrained; the engine loads it from
that directory. fp32 on the CPU: logits agree to 1e-4.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tests.hf_reference import FAMILIES, build_reference, reference_logits, save_reference
from transformers import PreTrainedModel

from tropical.engine import Engine, EngineConfig, KvExport, kv_from_bytes, kv_to_bytes
from tropical.engine.scheduler import ScheduledChunk
from tropical.protocol import SamplingParams

TOLERANCE = 1e-4
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, Path]:
    family = request.param
    model = build_reference(family)
    path = save_reference(model, tmp_path_factory.mktemp(family), sharded=family == "llama")
    return model, path


def engine_for(path: Path, **config: object) -> Engine:
    return Engine.load(path, EngineConfig(device="cpu", dtype="float32", **config))  # type: ignore[arg-type]


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(384) for _ in range(length)]


def run_chunks(engine: Engine, token_ids: list[int], cuts: list[int], *, scattered: bool = False) -> torch.Tensor:
    """Prefill `token_ids` through the runner in chunks ending at `cuts`; logits of every position.

    `scattered` reverses the block table, so attention must gather the context instead of slicing it.
    """
    table: list[int] = []
    engine.book.blocks.grow(table, len(token_ids))
    if scattered:
        table.reverse()
    logits = []
    start = 0
    for end in [*cuts, len(token_ids)]:
        chunk = ScheduledChunk(0, tuple(token_ids[start:end]), start, tuple(table), end == len(token_ids), False)
        logits.append(engine.runner.run([chunk], all_logits=True))
        start = end
    return torch.cat(logits)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= TOLERANCE, f"max abs logit difference {diff:.2e} > {TOLERANCE}"


def check_against_reference(model: PreTrainedModel, prompts: dict[str, list[int]], engine: Engine, steps: list) -> None:
    """Every logged (request, logits) of a step equals the reference's logits at that position."""
    tokens = {rid: list(ids) for rid, ids in prompts.items()}
    logged: dict[str, list[torch.Tensor]] = {rid: [] for rid in prompts}
    for result in steps:
        for out in result.outputs:
            logged[out.request_id].append(out.logits)
            tokens[out.request_id].extend(out.new_token_ids)
    for rid, rows in logged.items():
        assert rows, f"{rid} sampled nothing"
        ref = reference_logits(model, tokens[rid])
        first = len(prompts[rid]) - 1
        assert_close(torch.stack(rows), ref[first : first + len(rows)])


def test_plain_prefill(reference: tuple[PreTrainedModel, Path]) -> None:
    model, path = reference
    ids = prompt(45, seed=1)
    assert_close(run_chunks(engine_for(path), ids, []), reference_logits(model, ids))


@pytest.mark.parametrize(("seed", "scattered"), [(0, False), (1, True)])
def test_prefill_in_random_chunks(reference: tuple[PreTrainedModel, Path], seed: int, scattered: bool) -> None:
    model, path = reference
    ids = prompt(70, seed=seed)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(ids)), 4))  # chunk boundaries anywhere, blocks of 16 notwithstanding
    assert_close(run_chunks(engine_for(path), ids, cuts, scattered=scattered), reference_logits(model, ids))


def test_decode_after_prefill(reference: tuple[PreTrainedModel, Path]) -> None:
    model, path = reference
    engine = engine_for(path)
    prompts = {"a": prompt(33, seed=2)}
    engine.add_request("a", prompts["a"], GREEDY, max_tokens=20)
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step(with_logits=True))
    assert len(steps) == 20 and steps[0].num_prefill_tokens == 33 and steps[-1].num_decode_tokens == 1
    check_against_reference(model, prompts, engine, steps)


def test_mixed_batch(reference: tuple[PreTrainedModel, Path]) -> None:
    """Requests arrive while others decode; a small token budget splits prompts across steps beside decodes."""
    model, path = reference
    engine = engine_for(path, max_num_batched_tokens=24, block_size=8)
    prompts = {f"r{i}": prompt(length, seed=10 + i) for i, length in enumerate([5, 40, 17, 61])}
    sampling = {"r0": GREEDY, "r1": SamplingParams(temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)}
    arrivals = {0: ["r0", "r1"], 3: ["r2"], 6: ["r3"]}
    steps = []
    for step in range(200):
        for rid in arrivals.get(step, []):
            engine.add_request(rid, prompts[rid], sampling.get(rid, GREEDY), max_tokens=9)
        if step > max(arrivals) and not engine.has_unfinished():
            break
        steps.append(engine.step(with_logits=True))
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps), "no step mixed prefill and decode"
    assert any(s.num_seqs >= 3 for s in steps)
    check_against_reference(model, prompts, engine, steps)


@pytest.mark.parametrize("via_bytes", [False, True])
def test_kv_export_import(reference: tuple[PreTrainedModel, Path], via_bytes: bool) -> None:
    """Prefill on one engine, decode on another with another block size: same logits as one engine."""
    model, path = reference
    sender = engine_for(path, block_size=16)
    receiver = engine_for(path, block_size=8)
    receiver.add_request("other", prompt(20, seed=4), GREEDY, max_tokens=30)  # the receiver is busy already
    receiver.step()
    ids = prompt(37, seed=3)
    sender.add_request("a", ids, GREEDY, max_tokens=1, retain_kv=True)
    first = sender.step(with_logits=True)
    assert first.finished and first.outputs[0].new_token_ids
    export = sender.export_kv("a")
    if via_bytes:
        data = kv_from_bytes(export.layout, kv_to_bytes(export.data))
        export = KvExport(**{**export.__dict__, "data": data})
    free_before = sender.kv_free_tokens
    assert sender.abort("a") and sender.kv_free_tokens > free_before  # the lease ends: blocks come back
    receiver.import_kv(KvExport(**{**export.__dict__, "max_tokens": 12}))
    steps = [first]
    while receiver.has_unfinished():
        result = receiver.step(with_logits=True)
        result.outputs[:] = [out for out in result.outputs if out.request_id == "a"]
        steps.append(result)
    check_against_reference(model, {"a": ids}, receiver, steps)
    assert sum(len(out.new_token_ids) for s in steps for out in s.outputs) == 12


def test_greedy_generation_matches_transformers(reference: tuple[PreTrainedModel, Path]) -> None:
    model, path = reference
    prompts = [prompt(n, seed=20 + n) for n in (3, 29, 50)]
    ours = engine_for(path, max_num_batched_tokens=32).generate(prompts, GREEDY, max_tokens=16)
    for ids, generation in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = model.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert generation.token_ids == theirs[0, len(ids) :].tolist()
