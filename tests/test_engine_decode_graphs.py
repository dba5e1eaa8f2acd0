"""The paged decode kernel, and the two paths that use it: the fixed-shape decode step (what a GPU captures as CUDA
graphs) and the SDPA backend's one call for every one-token query of a step.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py) and
the static step runs eagerly: what differs on a GPU is only the capture.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tropical.engine import Engine, EngineConfig
from tropical.engine.attention import SdpaAttention, Span
from tropical.engine.config import ModelConfig
from tropical.engine.decode_graphs import DecodeGraphs, PagedDecodeStep, bucket_sizes
from tropical.engine.kv_cache import KvCache
from tropical.engine.paged_decode import MAX_PARTITIONS, PARTITION, paged_decode, paged_decode_reference
from tropical.protocol import SamplingParams
from tests.hf_reference import FAMILIES, build_reference, save_reference

GREEDY = SamplingParams(ignore_eos=True)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- buckets --------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 2, 3, 7, 8, 9, 64, 100])
def test_every_batch_size_has_a_bucket_at_most_seven_rows_larger(max_batch: int) -> None:
    sizes = bucket_sizes(max_batch)
    assert list(sizes) == sorted(set(sizes)) and sizes[-1] == max_batch
    for n in range(1, max_batch + 1):
        assert 0 <= next(size for size in sizes if size >= n) - n <= 7


# --- the kernel -----------------------------------------------------------------------


def scattered_cache(
    kv_heads: int, dim: int, block_size: int, lengths: list[int], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random keys and values; each sequence on random, non-adjacent blocks of one pool."""
    generator = torch.Generator().manual_seed(seed)
    width = max(-(-length // block_size) for length in lengths) + 1  # one column more than any sequence uses
    num_blocks = width * len(lengths) + 3
    k = torch.randn(kv_heads, num_blocks * block_size, dim, generator=generator).to(DEVICE, dtype)
    v = torch.randn(kv_heads, num_blocks * block_size, dim, generator=generator).to(DEVICE, dtype)
    order = torch.randperm(num_blocks, generator=generator)[: width * len(lengths)]
    tables = order.view(len(lengths), width).to(DEVICE, torch.int32)
    return k, v, tables, torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                    block_size: int) -> torch.Tensor:
    """Each row on its own, its context copied out block by block, in fp64: the oracle of both implementations."""
    rows = []
    for row, length in enumerate(lengths.tolist()):
        slots = [int(tables[row, p // block_size]) * block_size + p % block_size for p in range(length)]
        keys, values = k[:, slots].double(), v[:, slots].double()
        rows.append(F.scaled_dot_product_attention(q[row, :, None].double(), keys, values, enable_gqa=True,
                                                   scale=q.shape[-1] ** -0.5)[:, 0])
    return torch.stack(rows)


KERNEL_CASES = [  # heads, kv_heads, head_dim, block_size, context lengths
    (4, 2, 16, 16, [1, 300, 77]),  # grouped queries; a context of one token
    (8, 8, 64, 4, [256, 257]),  # no grouping; exactly one partition and one token past it
    (6, 2, 24, 8, [40, 3]),  # head_dim and group not powers of two
    (4, 1, 32, 16, [PARTITION * MAX_PARTITIONS + 123, 5000]),  # partitions longer than PARTITION
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size", "lengths"), KERNEL_CASES)
def test_the_kernel_and_the_reference_match_attention_over_the_gathered_context(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block_size: int, lengths: list[int]
) -> None:
    k, v, tables, lens = scattered_cache(kv_heads, dim, block_size, lengths, dtype, seed=len(lengths) + dim)
    q = torch.randn(len(lengths), heads, dim, generator=torch.Generator().manual_seed(dim)).to(DEVICE, dtype)
    exact = dense_attention(q, k, v, tables, lens, block_size)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for implementation in (paged_decode, paged_decode_reference):
        out = implementation(q, k, v, tables, lens, dim**-0.5, block_size)
        assert out.shape == q.shape and out.dtype == dtype
        assert (out.double() - exact).abs().max().item() < tolerance, implementation.__name__


def test_the_kernel_reads_either_cache_layout_in_place() -> None:
    """The token-major pool, seen as [kv_heads, slots, dim] through strides, gives the same answer as a copy."""
    k, v, tables, lens = scattered_cache(2, 16, 8, [50, 9], torch.float32, seed=3)
    token_major_k, token_major_v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    q = torch.randn(2, 4, 16, device=DEVICE)
    strided = paged_decode(q, token_major_k.transpose(0, 1), token_major_v.transpose(0, 1), tables, lens, 0.25, 8)
    assert torch.allclose(strided, paged_decode(q, k, v, tables, lens, 0.25, 8), atol=1e-6)


# --- the static step --------------------------------------------------------------------


@pytest.mark.parametrize("head_major", [True, False])
def test_the_static_step_writes_and_attends_in_either_layout(head_major: bool) -> None:
    config = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    kv = KvCache(config, 8, 4, torch.float32, DEVICE, head_major=head_major)
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(2, 1, 9, 2, 8, generator=generator).to(DEVICE)  # token-major: 9 tokens already cached
    kv.write([5, 1, 7], context)
    new_k, new_v = (torch.randn(1, 2, 8, generator=generator).to(DEVICE) for _ in range(2))
    slots = torch.tensor([7 * 4 + 1], device=DEVICE)  # token 9 is slot 1 of the sequence's third block
    tables = torch.tensor([[5, 1, 7]], dtype=torch.int32, device=DEVICE)
    step = PagedDecodeStep(slots, tables, torch.tensor([10], dtype=torch.int32, device=DEVICE), 0.5, 4, head_major,
                           paged_decode_reference)
    step.write(new_k, new_v, kv.layers[0])
    stored = kv.read([5, 1, 7], 10)
    assert torch.equal(stored[:, :, :9], context) and torch.equal(stored[0, 0, 9], new_k[0])
    q = torch.randn(1, 4, 8, generator=generator).to(DEVICE)
    keys, values = stored[0, 0].transpose(0, 1), stored[1, 0].transpose(0, 1)  # [kv_heads, 10, dim]
    expected = F.scaled_dot_product_attention(q[:, :, None], keys[None], values[None], scale=0.5, enable_gqa=True)[:, :, 0]
    assert torch.allclose(step.attend(q, kv.layers[0]), expected, atol=1e-6)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model: PreTrainedModel = build_reference(request.param)
    return save_reference(model, tmp_path_factory.mktemp(request.param))


def traced(engine: Engine, prompts: dict[str, list[int]], max_tokens: dict[str, int]) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    """Every request's tokens, and the logits of every step in order."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, GREEDY, max_tokens[rid])
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    logits = []
    while engine.has_unfinished():
        result = engine.step(with_logits=True)
        for out in result.outputs:
            tokens[out.request_id] += out.new_token_ids
            logits.append(out.logits)
    return tokens, logits


def static_engine(path: Path, attention: object = None, **config: object) -> Engine:
    engine = Engine.load(path, EngineConfig(device=str(DEVICE), dtype="float32", enforce_eager=True, **config))  # type: ignore[arg-type]
    runner = engine.runner
    kwargs = {} if attention is None else {"attention": attention}
    runner.decode = DecodeGraphs(runner.model, runner.kv, max_batch=engine.config.max_num_seqs,
                                 max_context=runner.model.rope.cos.shape[0], capture=False, **kwargs)  # type: ignore[arg-type]
    return engine


def workload(seed: int, count: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    rng = random.Random(seed)
    prompts = {f"r{i}": [rng.randrange(384) for _ in range(rng.randint(1, 90))] for i in range(count)}
    return prompts, {rid: rng.randint(1, 30) for rid in prompts}


@pytest.mark.parametrize("config", [
    dict(block_size=4, max_num_seqs=5, max_num_batched_tokens=64),  # buckets 1, 2, 4, 5; prompts chunked, mixed steps
    dict(block_size=16, max_num_seqs=16, num_kv_blocks=12),  # too few blocks: sequences are preempted and recomputed
])  # fmt: skip
def test_an_engine_with_the_static_decode_step_generates_as_the_eager_one(checkpoint: Path, config: dict) -> None:
    prompts, max_tokens = workload(seed=len(config), count=11)
    eager = Engine.load(checkpoint, EngineConfig(device=str(DEVICE), dtype="float32", enforce_eager=True, **config))
    expected_tokens, expected_logits = traced(eager, prompts, max_tokens)
    tokens, logits = traced(static_engine(checkpoint, **config), prompts, max_tokens)
    assert tokens == expected_tokens
    assert len(logits) == len(expected_logits)
    assert max((a - b).abs().max().item() for a, b in zip(logits, expected_logits, strict=True)) < 1e-4


def test_the_static_decode_step_serves_through_the_kernel(checkpoint: Path) -> None:
    prompts, max_tokens = workload(seed=5, count=3)
    eager = Engine.load(checkpoint, EngineConfig(device=str(DEVICE), dtype="float32", enforce_eager=True, block_size=8))
    expected, _ = traced(eager, prompts, max_tokens)
    ours, _ = traced(static_engine(checkpoint, attention=paged_decode, block_size=8), prompts, max_tokens)
    assert ours == expected


def test_the_static_step_takes_only_decodes_that_fit() -> None:
    engine = Engine.load("tiny", EngineConfig(device="cpu", enforce_eager=True, max_num_seqs=4, max_model_len=64),
                         tiny=ModelConfig.tiny(num_layers=1, max_position=64))
    runner = engine.runner
    assert runner.decode is None  # eager where asked, and always on the CPU
    graphs = DecodeGraphs(runner.model, runner.kv, max_batch=4, max_context=64, capture=False)
    engine.add_request("a", list(range(10)), GREEDY, 3)
    (prefill,) = engine.book.prepare(None).chunks
    assert not graphs.takes([prefill])
    assert not graphs.takes([])
    decode = type(prefill)(prefill.seq_id, (1,), 10, prefill.block_table, True, True)
    assert graphs.takes([decode] * 4) and not graphs.takes([decode] * 5)
    assert not graphs.takes([type(prefill)(prefill.seq_id, (1,), 64, prefill.block_table, True, True)])


# --- one-token queries of any step, together ---------------------------------------------


def test_the_sdpa_backend_attends_one_token_queries_together_as_one_by_one() -> None:
    """A mixed step: decodes, a fresh prompt, a later chunk; all rows, then narrowed to some."""
    generator = torch.Generator().manual_seed(4)
    block_size, kv_heads, dim = 4, 2, 16
    cache = tuple(torch.randn(kv_heads, 64 * block_size, dim, generator=generator) for _ in range(2))
    spans = [Span(9, 1, [7, 3, 12]), Span(0, 6, [20, 21]), Span(1, 1, [5]), Span(5, 3, [30, 31]), Span(15, 1, [40, 2, 41, 9])]
    tokens = sum(span.num_tokens for span in spans)
    k, v = (torch.randn(tokens, kv_heads, dim, generator=generator) for _ in range(2))
    q = torch.randn(tokens, 4, dim, generator=generator)
    one_by_one = SdpaAttention(block_size, 0.25, torch.device("cpu"))
    together = SdpaAttention(block_size, 0.25, torch.device("cpu"), decode_kernel=paged_decode_reference)
    outputs = []
    for backend in (one_by_one, together):
        layer = tuple(c.clone() for c in cache)
        step, last = backend.prepare(spans, rows=[0, 6, 9, 10])
        step.write(k, v, layer)
        assert last is not None and last.rows is not None
        outputs.append((step.attend(q, layer), last.attend(q[last.rows], layer)))
    assert together.prepare(spans)[0].group is not None and one_by_one.prepare(spans)[0].group is None  # type: ignore[attr-defined]
    for a, b in zip(*outputs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_engine_with_grouped_decodes_serves_through_the_kernel(checkpoint: Path) -> None:
    prompts, max_tokens = workload(seed=9, count=4)
    config = EngineConfig(device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=48)
    expected, _ = traced(Engine.load(checkpoint, config), prompts, max_tokens)
    grouped = Engine.load(checkpoint, config)
    runner = grouped.runner
    runner.attention = SdpaAttention(8, runner.model.config.head_dim**-0.5, torch.device("cpu"), decode_kernel=paged_decode)
    ours, _ = traced(grouped, prompts, max_tokens)
    assert ours == expected


def test_the_static_step_traces_whole() -> None:
    """What a CUDA graph captures must not stop for the host (`.item()`, `.tolist()`, Python branching on values):
    the static step compiles as one graph, with no break."""
    config = ModelConfig.tiny(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              max_position=64)
    engine = Engine.load("tiny", EngineConfig(device="cpu", max_num_seqs=4, max_model_len=64), tiny=config)
    graphs = DecodeGraphs(engine.runner.model, engine.runner.kv, max_batch=4, max_context=64, capture=False)
    with torch.inference_mode():
        traced_logits = torch.compile(graphs._forward, fullgraph=True, backend="eager")(4)
        assert torch.equal(traced_logits, graphs._forward(4))


def test_a_worker_can_be_told_to_decode_eagerly() -> None:
    from tropical.live.engines import EngineChoice

    engine = EngineChoice("tiny", enforce_eager=True).engine()
    assert isinstance(engine, Engine) and engine.config.enforce_eager and engine.runner.decode is None
    assert not EngineChoice("tiny").enforce_eager


def test_slots_never_written_do_not_leak_into_either_implementation() -> None:
    """The cache is allocated empty: past a context, any bits may sit there, NaN and infinity included."""
    k, v, tables, lens = scattered_cache(2, 16, 4, [5, 9], torch.float32, seed=8)
    q = torch.randn(2, 4, 16, device=DEVICE)
    clean = paged_decode_reference(q, k, v, tables, lens, 0.25, 4)
    for row, length in enumerate(lens.tolist()):
        for position in range(length, tables.shape[1] * 4):
            slot = int(tables[row, position // 4]) * 4 + position % 4
            k[:, slot], v[:, slot] = float("nan"), float("inf")
    for implementation in (paged_decode_reference, paged_decode):
        assert torch.allclose(implementation(q, k, v, tables, lens, 0.25, 4), clean, atol=1e-6), implementation.__name__
