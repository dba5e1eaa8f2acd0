"""The engine benchmarks: both sides serve the same requests (or run the same steps) and the report says what was measured."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tropical.cli import app
from tropical.engine import Engine, EngineConfig, ModelConfig
from tropical.engine.bench import hf_twin, make_requests, run_engine_benchmark
from tropical.engine.bench_steps import LLAMA3_8B, random_model_on, run_step_benchmark
from tropical.engine.models import CausalLM
from tropical.engine.roofline import decode_bytes, kv_bytes_per_token, prefill_flops, spec_bandwidth, weight_bytes
from tropical.engine.tokenizer import ByteTokenizer
from tropical.protocol import SamplingParams

SMALL = ModelConfig.tiny(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def test_requests_are_fixed_by_the_seed_and_within_their_ranges() -> None:
    first = make_requests(20, 7, (5, 9), (2, 4), vocab=300)
    assert first == make_requests(20, 7, (5, 9), (2, 4), vocab=300)
    assert first != make_requests(20, 8, (5, 9), (2, 4), vocab=300)
    assert all(5 <= len(r.prompt_token_ids) <= 9 and 2 <= r.max_tokens <= 4 for r in first)
    assert all(0 <= t < 256 for r in first for t in r.prompt_token_ids)


def test_report_compares_both_sides_on_the_same_tokens() -> None:
    report = run_engine_benchmark(
        6, 3, batch_size=4, prompt_range=(8, 40), output_range=(2, 6), max_num_batched_tokens=32, tiny=SMALL, repeats=2
    )
    requests = make_requests(6, 3, (8, 40), (2, 6), SMALL.vocab_size)
    assert report["output_tokens"] == sum(r.max_tokens for r in requests)
    assert report["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
    assert report["ours_s"] == min(report["all_runs_s"]["ours"]) and len(report["all_runs_s"]["hf"]) == 2
    assert report["ours_tok_s"] == report["output_tokens"] / report["ours_s"]
    assert report["hf_tok_s"] == report["output_tokens"] / report["hf_s"]
    assert report["speedup"] == report["ours_tok_s"] / report["hf_tok_s"]
    # one step samples at most one token per request
    assert report["ours_steps"] >= max(r.max_tokens for r in requests)


def test_command_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    result = CliRunner().invoke(app, ["bench-engine", "--num-requests", "1", "--repeats", "1", "--no-hf", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert "ours: " in result.output and "speedup" not in report
    assert report["num_requests"] == 1 and report["batch_size"] == 32 and report["model_parameters"] > 20_000_000


# --- step times against the roofline ------------------------------------------------------


def test_the_llama3_8b_shape_reads_what_its_checkpoint_holds() -> None:
    """8,030,261,248 parameters (Meta's count); a step reads all but the 128256 x 4096 input table; 128 KiB of KV a token."""
    with torch.device("meta"):
        model = CausalLM(LLAMA3_8B, 16).to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert weight_bytes(model) == 2 * (8_030_261_248 - 128256 * 4096)
    assert kv_bytes_per_token(LLAMA3_8B, 2) == 128 * 1024
    assert decode_bytes(model, LLAMA3_8B, 2, 64, 512) == weight_bytes(model) + 64 * 512 * 128 * 1024


def test_a_tied_lm_head_reads_the_whole_embedding_table() -> None:
    with torch.device("meta"):
        model = CausalLM(SMALL, 16)
    assert SMALL.tie_word_embeddings
    assert weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "bandwidth"), [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", 3.9e12), ("NVIDIA H200", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 2.039e12), ("NVIDIA A100-SXM4-40GB", 1.555e12), ("NVIDIA L4", 0.3e12), ("Some Accelerator", None),
])  # fmt: skip
def test_the_vendor_bandwidth_is_found_by_device_name(name: str, bandwidth: float | None) -> None:
    assert spec_bandwidth(name) == bandwidth


def test_prefill_flops_count_the_matmuls_and_the_causal_attention() -> None:
    config = LLAMA3_8B
    matmuls = 2 * config.num_layers * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336)
    assert prefill_flops(config, 1) == matmuls + 2 * 32 * 32 * 128 + 2 * 4096 * 128256
    assert prefill_flops(config, 8192) - prefill_flops(config, 4096) == pytest.approx(
        matmuls * 4096 + 2 * 32 * 32 * 128 * (8192**2 - 4096**2)
    )


def test_the_twin_is_the_same_network() -> None:
    model = random_model_on(SMALL, 64, torch.float32, torch.device("cpu"), seed=1)
    twin = hf_twin(model, torch.float32)
    engine = Engine(model, ByteTokenizer(), EngineConfig(device="cpu"))
    prompt = list(range(3, 40))
    engine.add_request("r", prompt, SamplingParams(ignore_eos=True), max_tokens=1)
    (out,) = engine.step(with_logits=True).outputs
    with torch.inference_mode():
        theirs = twin(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert (out.logits - theirs).abs().max().item() < 1e-4  # type: ignore[operator]


def test_the_step_report_times_both_sides_against_the_roofline() -> None:
    small = dataclasses.replace(SMALL, max_position=48)  # a prompt as long as the model's context still gets its token
    report = run_step_benchmark("tiny", "cpu", batches=(1, 3), context=20, prefill=48, steps=3, model_config=small)
    assert [row["batch"] for row in report["decode"]] == [1, 3]
    bandwidth = report["bandwidth"]
    assert bandwidth["source"] == "copy" and bandwidth["used"] == bandwidth["copy"] > 0 and bandwidth["spec"] is None
    for row in report["decode"]:
        assert row["roofline_ms"] > 0 and row["ours_ms"] > 0 and row["hf_ms"] > 0
        assert row["ours_of_roofline"] == row["roofline_ms"] / row["ours_ms"]
        assert "ours_eager_ms" not in row  # no graphs on the CPU, so nothing to compare them with
    assert report["decode"][1]["roofline_ms"] > report["decode"][0]["roofline_ms"]  # more KV to read
    assert report["prefill"]["ours_over_hf"] == report["prefill"]["ours_ms"] / report["prefill"]["hf_ms"]
    assert report["model"]["shape"] == "custom" and not report["decode_graphs"] and report["device"]["type"] == "cpu"


def test_the_step_command_writes_its_report_and_refuses_a_missing_device(tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    arguments = ["bench-engine", "--steps", "--shape", "tiny", "--batches", "2", "--context", "16", "--prefill", "32",
                 "--timed-steps", "2", "--no-hf", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["decode"]] == [2] and "hf_ms" not in report["prefill"]
    assert "decode batch   2 context 16" in result.output
    refused = CliRunner().invoke(app, ["bench-engine", "--steps", "--shape", "huge"])
    assert refused.exit_code == 2 and "--shape" in refused.output
    if not torch.cuda.is_available():
        missing = CliRunner().invoke(app, ["bench-engine", "--device", "cuda"])
        assert missing.exit_code == 2 and "no CUDA device" in missing.output
