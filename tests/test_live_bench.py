"""`tropical bench`: a replayed load on a live deployment, measured as `vllm bench serve` measures it."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.servers import RABBITMQ_URL, REDIS_URL
from tropical.bus import MemoryBroker, QueueNotFound, connect_bus, dead_letter_queue
from tropical.cli import app
from tropical.engine import Engine, EngineConfig, ModelConfig
from tropical.experiments import SETTINGS, Replay, run_policy, workload
from tropical.latency.model import LatencyModel
from tropical.live.bench import BenchRequest, bench_embedded, bench_report, bench_requests, fixed_length_load, replay
from tropical.live.client import Client
from tropical.live.deployment import Deployment
from tropical.metrics import summarize
from tropical.policies import Role
from tropical.settings import Settings

MEMORY = ["--broker-url", "memory://", "--redis-url", "memory://"]
SETTINGS_MEMORY = Settings(broker_url="memory://", redis_url="memory://")
REPORT_KEYS = (
    "completed", "failed", "request_throughput", "request_goodput", "slo_attainment", "mean_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "p99_tpot_ms", "mean_queue_ms", "mean_prefill_ms", "mean_kv_transfer_ms", "mean_decode_ms",
)


def bench(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, object] | None]:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [*MEMORY, "bench", *args, "--json", str(out)], env={"COLUMNS": "300"})
    return result.exit_code, result.output, json.loads(out.read_text()) if out.exists() else None


def test_embedded_tiny_engines_serve_every_request_and_report_every_key(tmp_path: Path) -> None:
    code, output, report = bench(
        tmp_path, "--embedded", "--engine", "tiny", "--policy", "vllm", "--workers", "2",
        "--request-rate", "20", "--num-prompts", "12", "--input-len", "24", "--output-len", "8",
    )
    assert code == 0, output
    assert "Request goodput (req/s):" in output and "SLO attainment" in output
    assert report is not None and all(key in report for key in REPORT_KEYS)
    assert (report["completed"], report["failed"], report["num_prompts"]) == (12, 0, 12)
    assert report["total_output_tokens"] == 12 * 8 and report["total_input_tokens"] == 12 * 24  # ignore_eos forces every length
    assert 0.0 <= report["slo_attainment"] <= 1.0
    assert report["request_throughput"] > 0 and report["request_goodput"] <= report["request_throughput"]
    for metric in ("ttft", "tpot"):
        assert 0 < report[f"mean_{metric}_ms"] <= report[f"p99_{metric}_ms"]
    assert report["mean_queue_ms"] >= 0 and report["mean_prefill_ms"] > 0 and report["mean_decode_ms"] > 0
    assert report["workers"] == {"colocated": 2}
    assert report["control_plane_requests"] == 12  # every request's hops between the services were measured
    for hop in ("to_router", "to_worker", "to_client"):
        assert 0 <= report[f"p50_control_{hop}_ms"] <= report[f"p99_control_{hop}_ms"] <= report["p99_ttft_ms"]
    assert report["p50_control_total_ms"] >= report["p50_control_to_router_ms"]


def test_emulated_chat_13b_attains_what_the_simulator_does_on_the_same_window(tmp_path: Path) -> None:
    code, output, report = bench(
        tmp_path, "--embedded", "--engine", "emulated", "--setting", "chat-13b", "--policy", "unified", "--workers", "2",
        "--request-rate", "4", "--num-prompts", "40", "--compare-sim",
    )
    assert code == 0, output
    assert report is not None and report["completed"] == 40 and report["workers"] == {"multiplex": 2}
    setting = SETTINGS["chat-13b"]
    load = workload(setting, setting.trace, 4.0, replay=Replay(requests=40), seed=0)
    sim = summarize(run_policy(replace(setting, workers=2), "unified", load, prefill_workers=0).outcomes())  # `tropical sim --prefill-workers 0`
    assert report["sim"]["slo_attainment"] == sim.attainment
    assert report["total_input_tokens"] == sum(r.prompt_tokens for r in load.requests)
    assert abs(report["slo_attainment"] - sim.attainment) <= 0.15
    assert math.isclose(report["live_minus_sim_attainment"], report["slo_attainment"] - sim.attainment)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--embedded", "--policy", "nope", "--request-rate", "5"], "unknown policy"),
        (["--embedded", "--request-rate", "0"], "--request-rate"),
        (["--embedded", "--request-rate", "-2"], "--request-rate"),
        (["--embedded", "--policy", "tropical", "--workers", "1", "--request-rate", "5"], "needs at least 1 prefill and one decoding worker"),
        (["--embedded", "--setting", "longbench-70b"], "give a rate"),  # a length table has no pace of its own
        (["--request-rate", "5"], "--embedded"),
        (["--embedded", "--compare-sim", "--request-rate", "5"], "emulated"),
    ],
)
def test_bad_input_exits_2_before_serving(tmp_path: Path, args: list[str], message: str) -> None:
    code, output, report = bench(tmp_path, *args, "--num-prompts", "2")
    assert code == 2 and message in output and report is None


def test_fixed_length_load_has_the_asked_shape() -> None:
    load = fixed_length_load(50, rate=10.0, input_len=7, output_len=3, ttft_slo=0.5, tpot_slo=0.05, seed=1)
    requests = bench_requests(load)
    assert requests[0].arrival == 0.0 and all(a.arrival <= b.arrival for a, b in zip(requests, requests[1:]))
    assert 2.0 < requests[-1].arrival < 10.0  # 49 gaps of mean 0.1 s
    assert {r.prompt_token_ids for r in requests[:3]} == {(1,) * 7, (2,) * 7, (3,) * 7}
    assert {(r.output_tokens, r.slo.ttft_ms, r.slo.tpot_ms) for r in requests} == {(3, 500.0, 50.0)}


async def test_error_replies_fail_a_request_and_leave_the_others_measured() -> None:
    tiny = ModelConfig.tiny(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    model = LatencyModel(c0=0.0, c1=0.0005, c2=0.005, d0=0.005, d1=0.0005, d2=0.00001)

    def engine() -> Engine:
        return Engine.load("tiny", EngineConfig(num_kv_blocks=256, block_size=4, device="cpu", max_model_len=128), tiny=tiny)

    requests = [BenchRequest(0.01 * i, (i + 1,) * n, 4, 60.0, 10.0) for i, n in enumerate((10, 200, 12))]  # 200 + 4 > 128
    served = Deployment("vllm", (Role.COLOCATED,), engine, model, SETTINGS_MEMORY)
    report = bench_report(await asyncio.wait_for(bench_embedded(served, requests, timeout_s=60), timeout=90))
    assert (report["completed"], report["failed"], report["error_replies"], report["timeouts"]) == (2, 1, 1, 0)
    assert report["error_codes"] == {"invalid": 1} and report["dropped"] == 1 and math.isclose(report["slo_attainment"], 2 / 3)


async def test_requests_nobody_serves_time_out_at_their_deadline() -> None:
    requests = [BenchRequest(0.0, (5,) * 4, 2, 1.0, 0.1), BenchRequest(0.05, (6,) * 4, 2, 1.0, 0.1)]
    async with Client(MemoryBroker().connect(), SETTINGS_MEMORY) as client:
        start = asyncio.get_running_loop().time()
        result = await asyncio.wait_for(replay(client, requests, start=start, timeout_s=0.2), timeout=30)
    report = bench_report(result)
    assert (report["completed"], report["failed"], report["timeouts"], report["error_replies"]) == (0, 2, 2, 0)
    assert report["slo_attainment"] == 0.0 and report["request_goodput"] == 0.0


@pytest.mark.integration
def test_spawned_deployment_serves_as_separate_processes_on_rabbitmq_and_redis(tmp_path: Path) -> None:
    """`--spawn`: router and workers as `tropical serve` processes on the real servers, stopped (drained) afterwards."""
    out = tmp_path / "bench.json"
    namespace = f"test-spawn-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(
        app,
        [
            "--broker-url", RABBITMQ_URL, "--redis-url", REDIS_URL, "--namespace", namespace,
            "bench", "--spawn", "--engine", "emulated", "--setting", "chat-13b", "--policy", "distserve", "--workers", "2",
            "--request-rate", "4", "--num-prompts", "16", "--compare-sim", "--json", str(out),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["mode"] == "spawned" and report["workers"] == {"prefill": 1, "decode": 1}
    assert (report["completed"], report["failed"]) == (16, 0)
    assert report["mean_kv_transfer_ms"] >= 0 and "sim" in report
    assert abs(report["live_minus_sim_attainment"]) <= 0.25
    assert str(report["namespace"]).startswith(f"{namespace}.bench-")
    asyncio.run(assert_no_queues(Settings(broker_url=RABBITMQ_URL, namespace=str(report["namespace"])), ["requests", "worker.w0", "worker.w1"]))


async def assert_no_queues(settings: Settings, names: list[str]) -> None:
    """None of the namespace's queues, nor their dead letters, is left on the broker."""
    bus = await connect_bus(settings)
    try:
        for name in names:
            for queue in (settings.queue(name), dead_letter_queue(settings.queue(name))):
                with pytest.raises(QueueNotFound):
                    await asyncio.wait_for(bus.queue_depth(queue), timeout=10.0)
    finally:
        await bus.close()


def test_spawn_needs_a_real_broker(tmp_path: Path) -> None:
    code, output, report = bench(tmp_path, "--spawn", "--request-rate", "5", "--num-prompts", "2")
    assert code == 2 and "--spawn needs a real broker" in output and report is None


@pytest.mark.integration
@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (RABBITMQ_URL.replace("guest:guest@", "guest:not-the-password@"), "refused the login: check the user and password"),
        ("amqp://guest:guest@127.0.0.1:1/", "cannot reach the broker at amqp://guest:***@127.0.0.1:1/"),
    ],
)
def test_a_wrong_broker_password_or_address_is_one_line_and_exit_2(url: str, problem: str) -> None:
    result = CliRunner().invoke(app, ["--broker-url", url, "bench", "--num-prompts", "2"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and problem in errors[0] and "Traceback" not in result.output
    assert "not-the-password" not in result.output  # the password is masked
