"""The KV handoff benchmark: a receiver process fetches through the transport, and the report says what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from tropical.cli import app
from tropical.kv.bench import HEAD_DIM, KV_HEADS, LAYERS, run_kv_benchmark


def test_a_receiver_process_fetches_every_size_through_the_host_transport() -> None:
    report = run_kv_benchmark("host", tokens=(4, 32), repeats=2)
    assert report["transport"] == "host" and report["device"] == "cpu" and report["dtype"] == "float16"
    assert [row["tokens"] for row in report["sizes"]] == [4, 32]
    for row in report["sizes"]:
        assert row["nbytes"] == 2 * LAYERS * row["tokens"] * KV_HEADS * HEAD_DIM * 2
        assert 0 < row["fetch_median_bytes_per_s"] <= row["fetch_bytes_per_s"]
        assert row["fetch_over_copy"] == row["fetch_bytes_per_s"] / row["copy_bytes_per_s"]


def test_the_command_writes_its_report_and_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    result = CliRunner().invoke(app, ["bench-kv", "--transport", "host", "--tokens", "2", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "host      2 tokens" in result.output and json.loads(out.read_text())["sizes"][0]["tokens"] == 2
    unknown = CliRunner().invoke(app, ["bench-kv", "--transport", "carrier-pigeon"])
    assert unknown.exit_code == 2 and "--transport" in unknown.output
    if not torch.cuda.is_available():
        missing = CliRunner().invoke(app, ["bench-kv", "--transport", "cuda_ipc"])
        assert missing.exit_code == 2 and "needs a CUDA device" in missing.output
