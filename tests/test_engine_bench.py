"""The engine benchmark: both sides serve the same requests and the report says what was measured."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tropical.cli import app
from tropical.engine import ModelConfig
from tropical.engine.bench import make_requests, run_engine_benchmark

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
