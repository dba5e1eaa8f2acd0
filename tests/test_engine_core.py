"""Engine mechanics on a small random model: blocks, scheduling, preemption, sampling, refusals, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tropical.engine import Engine, EngineConfig, InvalidRequest, KvExport, ModelConfig, share_cuda
from tropical.engine.block_manager import BlockManager, OutOfBlocks
from tropical.engine.loader import load_model, random_model, save_hf
from tropical.engine.sampler import Sampler
from tropical.engine.tokenizer import ByteTokenizer, HfTokenizer
from tropical.protocol import FinishReason, SamplingParams

SMALL = ModelConfig.tiny(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_position=512
)
GREEDY = SamplingParams(ignore_eos=True)


def small_engine(**config: object) -> Engine:
    return Engine.load("tiny", EngineConfig(device="cpu", **config), tiny=SMALL)  # type: ignore[arg-type]


def run_all(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


# --- blocks -----------------------------------------------------------------------------


def test_block_manager_grows_releases_and_reuses_in_order() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    a: list[int] = []
    b: list[int] = []
    blocks.grow(a, 5)  # two blocks for five tokens
    assert a == [0, 1] and blocks.num_free_blocks == 2
    assert blocks.room(a, 5) == 11 and blocks.can_grow(a, 16) and not blocks.can_grow(a, 17)
    blocks.grow(b, 8)
    assert b == [2, 3] and not blocks.can_grow(a, 9)
    with pytest.raises(OutOfBlocks):
        blocks.grow(a, 9)
    blocks.release(a)
    assert a == [] and blocks.num_free_blocks == 2
    blocks.grow(a, 8)
    assert a == [0, 1]  # freed blocks come back in the order they were freed: still adjacent


# --- scheduling -------------------------------------------------------------------------


def test_token_budget_chunks_prompts_and_keeps_decodes_going() -> None:
    engine = small_engine(max_num_batched_tokens=16)
    engine.add_request("long", list(range(40)), GREEDY, max_tokens=4)
    engine.add_request("short", [1, 2, 3], GREEDY, max_tokens=8)
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
    assert all(s.num_prefill_tokens + s.num_decode_tokens <= 16 for s in steps)
    assert steps[0].num_prefill_tokens == 16 and steps[0].outputs == []  # 16 of the 40, nothing to sample yet
    assert steps[2].num_prefill_tokens == 11 and {o.request_id for o in steps[2].outputs} == {"long", "short"}
    decoding = [s for s in steps if s.num_decode_tokens]
    assert decoding and all(s.step_time_s > 0 for s in steps)


def test_preemption_recomputes_the_youngest_and_changes_nothing() -> None:
    prompts = {f"r{i}": [10 * i + j for j in range(7)] for i in range(3)}
    alone = {}
    for rid, ids in prompts.items():
        engine = small_engine()
        engine.add_request(rid, ids, GREEDY, max_tokens=10)
        alone.update(run_all(engine))
    tight = small_engine(block_size=4, num_kv_blocks=10)  # 40 tokens for three sequences of 16
    for rid, ids in prompts.items():
        tight.add_request(rid, ids, GREEDY, max_tokens=10)
    preempted, tokens = [], {}
    while tight.has_unfinished():
        result = tight.step()
        preempted += result.preempted
        for out in result.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert preempted and preempted[0] == "r2"
    assert tokens == alone
    assert tight.kv_free_tokens == tight.kv_capacity_tokens


def test_max_num_seqs_limits_running_sequences() -> None:
    engine = small_engine(max_num_seqs=2)
    for i in range(4):
        engine.add_request(f"r{i}", [i + 1] * 5, GREEDY, max_tokens=3)
    first = engine.step()
    assert first.num_seqs == 2 and len(engine.book.queued) == 2


# --- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "sampling", "message"),
    [
        ([], 4, GREEDY, "the prompt is empty"),
        ([1, 512], 4, GREEDY, "token id 512 is outside the vocabulary"),
        ([1, -1], 4, GREEDY, "token id -1 is outside the vocabulary"),
        ([1, 2], 0, GREEDY, "max_tokens must be an integer of at least 1"),
        ([1, 2], 4, SamplingParams(temperature=-1.0), "invalid sampling parameters"),
        ([1, 2], 4, SamplingParams(top_p=0.0), "invalid sampling parameters"),
        ([1] * 500, 20, GREEDY, "exceeds the model's context of 512"),
        ([1] * 60, 10, GREEDY, "can never fit in this engine's KV cache of 64 tokens"),
    ],
)
def test_bad_requests_are_refused_clearly(
    prompt: list[int], max_tokens: int, sampling: SamplingParams, message: str
) -> None:
    engine = small_engine(block_size=16, num_kv_blocks=4)
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request("r", prompt, sampling, max_tokens)
    assert not engine.has_unfinished()


def test_a_request_that_exactly_fits_is_served() -> None:
    engine = small_engine(block_size=16, num_kv_blocks=4)
    engine.add_request("r", [1] * 60, GREEDY, max_tokens=5)  # 64 tokens, the last one never cached
    assert len(run_all(engine)["r"]) == 5


def test_duplicate_request_id_is_refused() -> None:
    engine = small_engine()
    engine.add_request("r", [1, 2], GREEDY, 4)
    with pytest.raises(InvalidRequest, match="already in this engine"):
        engine.add_request("r", [3], GREEDY, 4)


def test_stop_tokens_eos_and_max_tokens() -> None:
    engine = small_engine()
    first = engine.generate([[5, 6, 7]], GREEDY, max_tokens=6)[0]
    assert first.finish_reason is FinishReason.LENGTH and len(first.token_ids) == 6
    stop_at = first.token_ids[2]
    stop_index = first.token_ids.index(stop_at)
    stopped = engine.generate([[5, 6, 7]], SamplingParams(stop_token_ids=[stop_at], ignore_eos=True), 6)[0]
    assert stopped.finish_reason is FinishReason.STOP and stopped.token_ids == first.token_ids[: stop_index + 1]
    eos_engine = Engine.load(
        "tiny", EngineConfig(device="cpu"), tiny=ModelConfig(**{**SMALL.__dict__, "eos_token_ids": (stop_at,)})
    )
    assert eos_engine.generate([[5, 6, 7]], SamplingParams(), 6)[0].finish_reason is FinishReason.STOP
    assert eos_engine.generate([[5, 6, 7]], SamplingParams(ignore_eos=True), 6)[0].token_ids == first.token_ids


def test_abort_frees_blocks() -> None:
    engine = small_engine()
    engine.add_request("r", list(range(50)), GREEDY, max_tokens=100)
    engine.step()
    assert engine.kv_free_tokens < engine.kv_capacity_tokens
    assert engine.abort("r") and not engine.abort("r")
    assert engine.kv_free_tokens == engine.kv_capacity_tokens and not engine.has_unfinished()


def test_retained_kv_stays_until_abort() -> None:
    engine = small_engine()
    engine.add_request("r", list(range(20)), GREEDY, max_tokens=1, retain_kv=True)
    assert engine.step().finished
    assert engine.kv_free_tokens < engine.kv_capacity_tokens and not engine.has_unfinished()
    export = engine.export_kv("r")
    assert export.num_tokens == 20 and len(export.output_token_ids) == 1 and export.layout.dtype == "float32"
    engine.abort("r")
    assert engine.kv_free_tokens == engine.kv_capacity_tokens
    with pytest.raises(KeyError):
        engine.export_kv("r")


def test_seeded_sampling_continues_identically_after_a_handoff() -> None:
    sampling = SamplingParams(temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    local = small_engine()
    local.add_request("r", [3, 1, 4, 1, 5], sampling, max_tokens=12)
    expected = run_all(local)["r"]
    sender, receiver = small_engine(), small_engine(block_size=4, seed=99)
    sender.add_request("r", [3, 1, 4, 1, 5], sampling, max_tokens=1, retain_kv=True)
    first = sender.step().outputs[0].new_token_ids
    export = sender.export_kv("r")
    receiver.import_kv(KvExport(**{**export.__dict__, "max_tokens": 12}))
    assert first + run_all(receiver)["r"] == expected


def test_import_refuses_a_foreign_layout() -> None:
    sender = small_engine()
    sender.add_request("r", [1, 2, 3], GREEDY, max_tokens=1, retain_kv=True)
    sender.step()
    export = sender.export_kv("r")
    other = Engine.load("tiny", EngineConfig(device="cpu"), tiny=ModelConfig(**{**SMALL.__dict__, "num_layers": 3}))
    with pytest.raises(InvalidRequest, match="does not fit"):
        other.import_kv(export)


def test_cuda_ipc_needs_a_cuda_tensor() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        share_cuda(torch.zeros(2))


# --- sampling ---------------------------------------------------------------------------


def sample(params: SamplingParams, logits: list[float], n: int, seed: int = 0) -> list[int]:
    sampler = Sampler(seed, torch.device("cpu"))
    rows = torch.tensor([logits] * n)
    return sampler(rows, [params] * n, list(range(n)))


def test_greedy_and_degenerate_cuts_pick_the_argmax() -> None:
    logits = [0.1, 2.0, 1.9, -1.0]
    assert sample(SamplingParams(), logits, 5) == [1] * 5
    assert sample(SamplingParams(temperature=2.0, top_k=1), logits, 50) == [1] * 50
    assert sample(SamplingParams(temperature=2.0, top_p=0.01), logits, 50) == [1] * 50


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = [0.0, 1.0, 2.0, -9.0]
    draws = sample(SamplingParams(temperature=1.0), logits, 6000)
    expected = torch.tensor(logits).softmax(0)
    observed = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert (observed - expected).abs().max() < 0.03


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert set(sample(SamplingParams(temperature=1.0, top_k=2), logits, 500)) == {0, 1}
    assert set(sample(SamplingParams(temperature=1.0, top_p=0.7), logits, 500)) == {0, 1}
    assert set(sample(SamplingParams(temperature=1.0, top_p=0.85), logits, 800)) == {0, 1, 2}


def test_a_seed_fixes_each_token_whatever_else_is_in_the_batch() -> None:
    seeded = SamplingParams(temperature=1.0, seed=3)
    logits = torch.zeros(3, 100)
    a = Sampler(0, torch.device("cpu"))(logits, [seeded, SamplingParams(temperature=1.0), seeded], [0, 0, 1])
    b = Sampler(1, torch.device("cpu"))(logits[:2], [seeded, seeded], [0, 1])
    assert [a[0], a[2]] == b and a[0] != a[2]


# --- models, weights, tokenizers ----------------------------------------------------------


def test_tiny_preset_is_about_25m_parameters() -> None:
    engine = Engine.load("tiny", EngineConfig(device="cpu", num_kv_blocks=8))
    count = sum(p.numel() for p in engine.runner.model.parameters())
    assert count == ModelConfig.tiny().num_parameters and 20e6 < count < 30e6
    assert engine.tokenizer.decode(engine.tokenizer.encode("héllo")) == "héllo"


def test_tiny_weights_round_trip_through_a_checkpoint_transformers_reads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = random_model(SMALL, 512, torch.float32, torch.device("cpu"), seed=5)
    save_hf(ours, tmp_path)
    loaded = load_model(tmp_path, 512, torch.float32, torch.device("cpu"))
    for (name, a), (_, b) in zip(ours.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    engine = Engine(loaded, ByteTokenizer(), EngineConfig(device="cpu", num_kv_blocks=8))
    engine.add_request("r", list(range(30)), GREEDY, max_tokens=1)
    logits = engine.step(with_logits=True).outputs[0].logits
    with torch.no_grad():
        reference = theirs(torch.arange(30)[None]).logits[0, -1]
    assert logits is not None and (logits - reference).abs().max() < 1e-4


def test_loading_refuses_incomplete_or_unknown_checkpoints(tmp_path: Path) -> None:
    save_hf(random_model(SMALL, 512, torch.float32, torch.device("cpu"), seed=1), tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks weights for: layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(tmp_path, 512, torch.float32, torch.device("cpu"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path, 512, torch.float32, torch.device("cpu"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        load_model(tmp_path, 512, torch.float32, torch.device("cpu"))


def test_a_model_directory_brings_its_own_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    save_hf(random_model(SMALL, 512, torch.float32, torch.device("cpu"), seed=1), tmp_path)
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    engine = Engine.load(tmp_path, EngineConfig(device="cpu", num_kv_blocks=8))
    assert isinstance(engine.tokenizer, HfTokenizer) and 1 in engine.eos_token_ids
    assert engine.tokenizer.encode("hello world") == [2, 3]
    generation = engine.generate(["hello world hello"], GREEDY, max_tokens=3)[0]
    assert generation.prompt_token_ids == [2, 3, 2] and len(generation.token_ids) == 3
