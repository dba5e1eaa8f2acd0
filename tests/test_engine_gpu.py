"""The engine on a CUDA GPU: bf16 and fp16 against the reference in the same precision, decode CUDA graphs against
eager steps, both attention backends, KV over CUDA IPC, and the benchmarks' GPU paths.

Skipped where there is no GPU (and the flash-attn comparison where flash-attn is not installed).
"""

from __future__ import annotations

import multiprocessing
import random
from multiprocessing.queues import Queue
from pathlib import Path

import msgspec
import pytest
import torch
from transformers import PreTrainedModel

from tropical.engine import CudaIpcHandle, Engine, EngineConfig, KvExport, open_cuda, share_cuda
from tropical.engine.attention import flash_attn_available
from tropical.engine.bench_steps import run_step_benchmark
from tropical.engine.paged_decode import paged_decode, paged_decode_reference
from tropical.protocol import SamplingParams
from tests.hf_reference import FAMILIES, build_reference, reference_logits, save_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, PreTrainedModel, Path]:
    model = build_reference(request.param)
    return request.param, model, save_reference(model, tmp_path_factory.mktemp(request.param))


def cuda_engine(path: Path, **config: object) -> Engine:
    settings = EngineConfig(**{"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 256, **config})  # type: ignore[arg-type]
    return Engine.load(path, settings)


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(384) for _ in range(length)]


def decode_one(engine: Engine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step().outputs for t in out.new_token_ids]
    return tokens


def logged_logits(
    engine: Engine, prompts: dict[str, list[int]], max_tokens: int
) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Run the prompts together; each request's full token list and the logits it sampled from."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, GREEDY, max_tokens)
    tokens = {rid: list(ids) for rid, ids in prompts.items()}
    rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step(with_logits=True).outputs:
            tokens[out.request_id] += out.new_token_ids
            rows[out.request_id].append(out.logits)  # type: ignore[arg-type]
    return {rid: (tokens[rid], torch.stack(rows[rid])) for rid in prompts}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_match_the_reference_in_the_same_precision(
    reference: tuple[str, PreTrainedModel, Path], dtype: str
) -> None:
    """Half precision rounds differently in every kernel, so: close to the reference in that precision, and no
    further from fp32 than it. Chunked prompts, mixed steps and graph-replayed decodes all take part."""
    family, fp32, path = reference
    half = build_reference(family).to("cuda", getattr(torch, dtype))
    prompts = {"a": prompt(70, 1), "b": prompt(9, 2), "c": prompt(33, 3)}
    for rid, (tokens, ours) in logged_logits(cuda_engine(path, dtype=dtype, max_num_batched_tokens=40), prompts, 8).items():
        first = len(prompts[rid]) - 1
        positions = slice(first, first + ours.shape[0])
        exact = reference_logits(fp32, tokens)[positions]
        theirs = reference_logits(half, tokens)[positions].cpu()
        assert (ours - theirs).abs().max() < 0.1
        assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 0.02


def test_greedy_tokens_are_the_bf16_references_own(reference: tuple[str, PreTrainedModel, Path]) -> None:
    """Every token we pick is the reference's argmax on the same sequence, unless the reference itself is within
    bf16 rounding of a tie there (its top two logits closer than 0.05)."""
    family, _, path = reference
    bf16 = build_reference(family).to("cuda", torch.bfloat16)
    prompts = {"a": prompt(70, 7), "b": prompt(9, 8), "c": prompt(33, 9)}
    for rid, (tokens, _) in logged_logits(cuda_engine(path, max_num_batched_tokens=40), prompts, 12).items():
        first = len(prompts[rid]) - 1
        theirs = reference_logits(bf16, tokens)[first:-1].cpu()
        top2 = theirs.topk(2, dim=-1).values
        agrees = theirs.argmax(dim=-1) == torch.tensor(tokens[first + 1 :])
        assert bool((agrees | (top2[:, 0] - top2[:, 1] < 0.05)).all()), rid


@pytest.mark.parametrize("block_size", [16, 256])
def test_decode_graphs_generate_as_eager_steps(reference: tuple[str, PreTrainedModel, Path], block_size: int) -> None:
    """Batches of every bucket size, growing and shrinking, replayed from graphs: the tokens of eager steps."""
    _, _, path = reference
    rng = random.Random(block_size)
    prompts = {f"r{i}": prompt(rng.randint(1, 120), 10 + i) for i in range(13)}
    config = dict(dtype="float32", block_size=block_size, max_num_seqs=9, num_kv_blocks=4096 // block_size)
    graphs = cuda_engine(path, **config)
    assert graphs.runner.decode is not None and graphs.runner.decode.graphs
    eager = cuda_engine(path, enforce_eager=True, **config)
    assert eager.runner.decode is None
    replayed = logged_logits(graphs, prompts, 20)
    for rid, (tokens, logits) in logged_logits(eager, prompts, 20).items():
        assert replayed[rid][0] == tokens
        assert (replayed[rid][1] - logits).abs().max() < 1e-3


def test_the_kernel_in_bf16_matches_the_reference() -> None:
    k = torch.randn(8, 600 * 16, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.randperm(600, device="cuda")[:512].view(4, 128).int()
    lengths = torch.tensor([1, 1024, 2000, 2048], dtype=torch.int32, device="cuda")
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    ours = paged_decode(q, k, v, tables, lengths, 128**-0.5, 16)
    exact = paged_decode_reference(q.float(), k.float(), v.float(), tables, lengths, 128**-0.5, 16)
    assert (ours.float() - exact).abs().max() < 2e-2


def test_the_step_benchmark_times_graphs_eager_steps_and_hugging_face() -> None:
    report = run_step_benchmark("tiny", "cuda", batches=(1, 8), context=128, prefill=512, steps=5)
    assert report["decode_graphs"] and report["device"]["type"] == "cuda" and report["bandwidth"]["copy"] > 0
    for row in report["decode"]:
        assert row["ours_ms"] > 0 and row["ours_eager_ms"] > 0 and row["hf_ms"] > 0
    assert report["prefill"]["hf_ms"] > 0


@pytest.mark.skipif(not flash_attn_available(torch.device("cuda")), reason="needs flash-attn")
@pytest.mark.parametrize("block_size", [16, 256])  # gathered and in-place paged reads
def test_flash_attn_and_sdpa_agree(reference: tuple[str, PreTrainedModel, Path], block_size: int) -> None:
    _, _, path = reference
    prompts = {"a": prompt(300, 4), "b": prompt(20, 5)}
    flash = logged_logits(cuda_engine(path, attention="flash_attn", block_size=block_size), prompts, 6)
    sdpa = logged_logits(cuda_engine(path, attention="sdpa", block_size=block_size), prompts, 6)
    for rid in prompts:
        assert flash[rid][0] == sdpa[rid][0]
        assert (flash[rid][1] - sdpa[rid][1]).abs().max() < 0.05


def _receive(
    path: str, handle: bytes, prompt_ids: list[int], outputs: list[int], max_tokens: int, replies: "Queue[object]"
) -> None:
    """The multiplex side, in its own process: map the sender's KV, copy it into fresh blocks, decode."""
    engine = cuda_engine(Path(path), block_size=8)
    data = open_cuda(msgspec.msgpack.decode(handle, type=CudaIpcHandle))
    engine.import_kv(KvExport("r", prompt_ids, outputs, GREEDY, max_tokens, 16, data))
    torch.cuda.synchronize()
    del data
    replies.put("copied")
    replies.put(list(outputs) + decode_one(engine))


def test_kv_handoff_over_cuda_ipc_between_processes(reference: tuple[str, PreTrainedModel, Path]) -> None:
    _, _, path = reference
    ids = prompt(45, 6)
    local = cuda_engine(path)
    local.add_request("r", ids, GREEDY, max_tokens=10)
    expected = decode_one(local)

    sender = cuda_engine(path)
    sender.add_request("r", ids, GREEDY, max_tokens=1, retain_kv=True)
    first = sender.step().outputs[0].new_token_ids
    export = sender.export_kv("r", to_host=False)  # stays on the GPU: leased until the receiver says it copied
    handle = msgspec.msgpack.encode(share_cuda(export.data))
    context = multiprocessing.get_context("spawn")
    replies = context.Queue()
    receiver = context.Process(target=_receive, args=(str(path), handle, ids, first, 10, replies))
    receiver.start()
    try:
        assert replies.get(timeout=300) == "copied"
        sender.abort("r")
        del export
        assert replies.get(timeout=300) == expected
    finally:
        receiver.join(timeout=60)
        if receiver.is_alive():
            receiver.kill()
    assert receiver.exitcode == 0
