"""`tropical bench` in `vllm bench serve`'s dialect: its flags, its metric rules, its console block, and any OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from typer.testing import CliRunner

from tropical.cli import _bench_lines, app
from tropical.live.bench import (
    INF,
    BenchRequest,
    BenchResult,
    Load,
    Measured,
    Seen,
    arrival_process,
    bench_report,
    measured,
    parse_goodput,
    parse_percentile_metrics,
    parse_percentiles,
    parse_rates,
    replay,
    replay_all,
)
from tropical.protocol import Timings

MEMORY = ["--broker-url", "memory://", "--redis-url", "memory://"]
TINY_RUN = ["--embedded", "--engine", "tiny", "--policy", "vllm", "--workers", "1", "--random-input-len", "8", "--random-output-len", "4"]


def bench(tmp_path: Path, *args: str) -> tuple[int, str, Any]:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [*MEMORY, "bench", *args, "--json", str(out)], env={"COLUMNS": "300"})
    return result.exit_code, result.output, json.loads(out.read_text()) if out.exists() else None


# --- the dialect's values ------------------------------------------------------------------------


def test_request_rate_takes_a_list_and_inf() -> None:
    assert parse_rates("4") == [4.0]
    assert parse_rates("4, 8,inf") == [4.0, 8.0, INF]
    for bad in ("0", "-1", "nan", "four", "4,4", ""):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_goodput_takes_vllm_pairs_space_or_comma_separated() -> None:
    assert parse_goodput(["ttft:200", "tpot:50"]) == {"ttft": 200.0, "tpot": 50.0}
    assert parse_goodput(["ttft:200,e2el:3000"]) == {"ttft": 200.0, "e2el": 3000.0}
    for bad in (["ttft200"], ["itl:5"], ["ttft:fast"], ["ttft:0"], ["ttft:1", "ttft:2"], []):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_percentiles_and_their_metrics() -> None:
    assert parse_percentiles("50,90,99,99.9") == (50.0, 90.0, 99.0, 99.9)
    assert parse_percentile_metrics("ttft,e2el") == ("ttft", "e2el")
    for bad in ("0", "101", "p99"):
        with pytest.raises(ValueError):
            parse_percentiles(bad)
    with pytest.raises(ValueError):
        parse_percentile_metrics("ttft,latency")


def test_burstiness_is_vllms_word_for_gamma_arrivals_of_cv_one_over_its_root() -> None:
    assert arrival_process(1.0) == ("poisson", 1.0) and arrival_process(4.0) == ("gamma", 0.5)
    bursty = Load(arrival="gamma", cv=arrival_process(0.25)[1], count=4000, seed=3).at(10.0)
    gaps = np.diff([r.arrival for r in bursty])
    assert gaps.mean() == pytest.approx(0.1, rel=0.1) and gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)
    assert {r.arrival for r in Load(count=5).at(INF)} == {0.0}


# --- the metric rules ----------------------------------------------------------------------------


REQUEST = BenchRequest(0.2, (7,) * 5, 4, 1.0, 0.1)


def test_itl_leaves_the_ttft_out_and_tpot_counts_the_servers_tokens() -> None:
    seen = Seen()
    seen.openai_chunk(0.5, {"choices": [{"text": "a", "token_ids": [11]}]})
    seen.openai_chunk(0.55, {"choices": [{"delta": {"role": "assistant", "content": ""}}]})  # no content: not a chunk of output
    seen.openai_chunk(0.6, {"choices": [{"text": "b", "token_ids": [12]}]})
    seen.openai_chunk(0.8, {"choices": [{"text": "cd", "token_ids": [13, 14]}]})
    assert seen.output_tokens == 4  # Σ token_ids
    seen.openai_chunk(0.81, {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
    assert seen.output_tokens == 7  # usage wins
    m = measured("r", REQUEST, 0.2, 0.2, seen)
    assert m.outcome.finished and m.cause is None
    assert math.isclose(m.outcome.ttft or 0, 0.3) and m.chunk_gaps == pytest.approx((0.1, 0.2))
    assert math.isclose(m.outcome.tpot or 0, 0.3 / 6)
    assert m.outcome.queue_s is None and m.hops is None  # a server that sends no milestones: nothing to break down


def test_output_tokens_fall_back_to_content_chunks() -> None:
    seen = Seen()
    for at in (1.0, 1.5, 2.0):
        seen.openai_chunk(at, {"choices": [{"delta": {"content": "word"}}]})
    assert seen.output_tokens == 3


def test_a_request_whose_first_token_never_came_fails_and_has_no_ttft() -> None:
    nothing = measured("quiet", REQUEST, 0.2, 0.2, Seen())
    errored = Seen()
    errored.openai_chunk(0.4, {"choices": [{"text": "a"}]})
    errored.openai_chunk(0.5, {"error": {"message": "boom", "type": "internal_error", "code": 500}})
    broken = measured("broken", REQUEST, 0.2, 0.2, errored)
    fine = Seen()
    fine.openai_chunk(0.3, {"choices": [{"text": "a"}]})
    fine.openai_chunk(0.35, {"choices": [{"text": "b"}]})
    result = BenchResult(3, (nothing, broken, measured("ok", REQUEST, 0.2, 0.2, fine)))
    assert (nothing.cause, broken.cause) == ("no_first_token", "stream_500")
    report = bench_report(result)
    assert (report["completed"], report["failed"]) == (1, 2)
    assert report["ttfts"] == [None, None, pytest.approx(0.1)]  # never 0 for a request that has none
    assert report["errors"] == ["no_first_token", "stream_500", ""]
    assert report["mean_ttft_ms"] == pytest.approx(100.0) and report["p99_itl_ms"] == pytest.approx(50.0)
    assert report["mean_queue_ms"] is None and report["p50_control_total_ms"] is None  # not measured: null, not 0
    assert report["failures"] == {"no_first_token": 1, "stream_500": 1}


def test_gateway_milestones_give_the_phases() -> None:
    seen = Seen()
    seen.openai_chunk(0.5, {"choices": [{"text": "a", "token_ids": [1]}]})
    timings = {"arrival": 100.0, "routed": 100.01, "dispatched": 100.02, "taken": 100.03, "prefill_start": 100.1,
               "first_token": 100.3, "kv_transferred": None, "finished": 100.9}
    seen.openai_chunk(0.9, {"choices": [{"text": "b", "token_ids": [2], "finish_reason": "length"}], "timings": timings})
    m = measured("r", REQUEST, 0.2, 0.2, seen)
    assert seen.timings == Timings(**timings)
    assert m.outcome.queue_s == pytest.approx(0.1) and m.outcome.prefill_s == pytest.approx(0.2)
    assert m.outcome.kv_transfer_s is None and m.outcome.decode_s == pytest.approx(0.6)
    assert m.hops is not None and m.hops.to_router == pytest.approx(0.01)


def test_goodput_counts_against_the_limits_given() -> None:
    def done(ttft: float, tokens: int = 3) -> Any:
        seen = Seen()
        for i in range(tokens):
            seen.openai_chunk(0.2 + ttft + 0.05 * i, {"choices": [{"text": "x"}]})
        return measured("r", REQUEST, 0.2, 0.2, seen)

    result = BenchResult(3, (done(0.1), done(0.3), done(0.1, tokens=30)))
    own = bench_report(result)
    assert own["slo_attainment"] == 1.0 and own["goodput_slo_ms"] is None
    strict = bench_report(result, goodput={"ttft": 200.0, "e2el": 1000.0})
    assert strict["request_goodput"] == pytest.approx(own["request_goodput"] / 3)  # only the first is within both
    assert strict["goodput_slo_ms"] == {"ttft": 200.0, "e2el": 1000.0}


class Gate:
    """A target that holds every request until the test lets one go, counting those in flight."""

    backend = "gate"
    model_id = None

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.changed = asyncio.Condition()
        self.release = asyncio.Semaphore(0)

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured:
        async with self.changed:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.changed.notify_all()
        await self.release.acquire()
        async with self.changed:
            self.in_flight -= 1
            self.changed.notify_all()
        seen = Seen()
        seen.content(now(), [1])
        return measured(f"r{index}", request, arrival, now(), seen)


async def test_max_concurrency_caps_requests_in_flight_and_a_held_request_arrives_when_it_gets_a_slot() -> None:
    gate = Gate()
    requests = [BenchRequest(0.0, (1,), 1, 1.0, 0.1)] * 5
    task = asyncio.create_task(replay(gate, requests, start=asyncio.get_running_loop().time(), timeout_s=30, max_concurrency=2))
    for released in range(5):
        async with gate.changed:
            await asyncio.wait_for(gate.changed.wait_for(lambda: gate.in_flight == min(2, 5 - released)), timeout=10)
        gate.release.release()
    result = await asyncio.wait_for(task, timeout=10)
    assert gate.peak == 2
    assert [m.outcome.arrival > 0.0 for m in result.measured] == [False, False, True, True, True]  # the cap's wait is the client's


async def test_progress_bar_counts_completed_requests_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    gate = Gate()
    gate.release = asyncio.Semaphore(3)
    await asyncio.wait_for(replay_all(gate, [[BenchRequest(0.0, (1,), 1, 1.0, 0.1)] * 3], timeout_s=30, progress=True), timeout=10)
    captured = capsys.readouterr()
    assert "3/3" in captured.err and captured.out == ""


# --- the console block ---------------------------------------------------------------------------


def test_console_block_has_vllms_lines_in_vllms_order(tmp_path: Path) -> None:
    code, output, report = bench(
        tmp_path, *TINY_RUN, "--request-rate", "50", "--num-prompts", "6", "--max-concurrency", "3",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--goodput", "ttft:5000", "tpot:1000",
    )
    assert code == 0, output
    lines = output.splitlines()
    expected = [
        "============ Serving Benchmark Result ============",
        "Successful requests:", "Failed requests:", "Maximum request concurrency:", "Request rate configured (RPS):",
        "Benchmark duration (s):", "Total input tokens:", "Total generated tokens:", "Request throughput (req/s):",
        "Request goodput (req/s):", "Output token throughput (tok/s):", "Total Token throughput (tok/s):",
        "---------------Time to First Token----------------", "Mean TTFT (ms):", "Median TTFT (ms):", "P50 TTFT (ms):", "P90 TTFT (ms):", "P99 TTFT (ms):",
        "-----Time per Output Token (excl. 1st token)------", "Mean TPOT (ms):", "Median TPOT (ms):", "P50 TPOT (ms):", "P90 TPOT (ms):", "P99 TPOT (ms):",
        "---------------Inter-token Latency----------------", "Mean ITL (ms):", "Median ITL (ms):", "P50 ITL (ms):", "P90 ITL (ms):", "P99 ITL (ms):",
        "----------------End-to-end Latency----------------", "Mean E2EL (ms):", "Median E2EL (ms):", "P50 E2EL (ms):", "P90 E2EL (ms):", "P99 E2EL (ms):",
    ]
    for line, start in zip(lines, expected, strict=False):
        assert line.startswith(start), (line, start)
    assert lines[1] == f"{'Successful requests:':<40} {6:<10}"  # vLLM's columns: label in 40, value in 10
    assert lines[-1] == "=" * 50 and "SLO attainment (both / TTFT / TPOT):" in output and "Failed requests by cause:" in output
    assert report["max_concurrency"] == 3 and report["goodput_slo_ms"] == {"ttft": 5000.0, "tpot": 1000.0}
    assert all(f"p{q}_{m}_ms" in report for q in (50, 90, 99) for m in ("ttft", "tpot", "itl", "e2el"))
    assert report["completed"] == 6 and len(report["itls"]) == 6
    assert all(1 <= len(gaps) <= 3 for gaps in report["itls"])  # 4 tokens: the first token's chunk opens no gap; later ones may share a chunk


def test_block_prints_na_for_what_a_server_does_not_report() -> None:
    result = BenchResult(1, (measured("r", REQUEST, 0.2, 0.2, Seen()),))
    record = {
        **bench_report(result), "max_concurrency": None, "request_rate": "inf", "rate": "inf", "dataset": "random", "burstiness": 1.0,
        "workers": None, "base_url": "http://h:1", "endpoint": "/v1/completions", "model_id": "m", "namespace": None, "sim": None,
    }
    lines = _bench_lines(record, ("ttft",), (99.0,))
    assert f"{'Mean TTFT (ms):':<40} {'n/a':<10}" in lines and not any(line.startswith("Request rate configured") for line in lines)
    assert any(line.startswith("Queue / prefill / KV / decode (ms):") and line.endswith("n/a / n/a / n/a / n/a") for line in lines)


# --- any OpenAI-compatible server ----------------------------------------------------------------


@contextmanager
def served_in_thread(serve: Callable[[], AbstractAsyncContextManager[str]]) -> Iterator[str]:
    """Run an async server on a loop of its own thread (the CLI runs its own loop), yield its URL, stop it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context = serve()
    try:
        url = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(timeout=60)
        try:
            yield url
        finally:
            asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


class FakeOpenAI:
    """An OpenAI-compatible server with none of Tropical's extensions (no `token_ids`, no `timings`).

    Prompts of token 2 are refused (429); those of token 3 get an empty stream; the others get one chunk per token.
    """

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.seen: list[tuple[dict[str, str], dict[str, Any]]] = []

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "org/fake-7b", "object": "model"}, {"id": "other", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "no key", "type": "auth", "param": None, "code": 401}}, status=401)
        body = await request.json()
        self.seen.append((dict(request.headers), body))
        if body["prompt"][0] == 2:
            return web.json_response({"error": {"message": "busy", "type": "overloaded", "param": None, "code": 429}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if body["prompt"][0] != 3:
            for i in range(body["max_tokens"]):
                finish = "length" if i == body["max_tokens"] - 1 else None
                await response.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": f" w{i}", "finish_reason": finish}]}).encode() + b"\n\n")
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"], "total_tokens": 0}
            await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def test_base_url_drives_any_openai_server_and_leaves_unmeasured_phases_null(tmp_path: Path) -> None:
    server = FakeOpenAI("sk-test")
    with served_in_thread(server.serve) as url:
        code, output, report = bench(
            tmp_path, "--base-url", url, "--api-key", "sk-test", "--num-prompts", "4", "--random-input-len", "6", "--random-output-len", "5",
            "--ttft-slo-ms", "900", "--tpot-slo-ms", "90", "--save-result", "--result-dir", str(tmp_path / "results"),
        )
    assert code == 0, output
    assert (report["mode"], report["backend"], report["model_id"], report["request_rate"]) == ("http", "openai", "org/fake-7b", "inf")
    assert (report["completed"], report["failed"]) == (2, 2)
    assert report["failures"] == {"http_429": 1, "no_first_token": 1} and report["errors"] == ["", "http_429", "no_first_token", ""]
    assert report["ttfts"][1:3] == [None, None] and all(t > 0 for t in (report["ttfts"][0], report["ttfts"][3]))
    assert report["total_output_tokens"] == 10 and report["output_lens"] == [5, 0, 0, 5]
    for key in ("mean_queue_ms", "mean_prefill_ms", "mean_kv_transfer_ms", "mean_decode_ms", "p50_control_total_ms", "workers", "policy"):
        assert report[key] is None, key
    headers, body = server.seen[0]
    assert (headers["x-slo-ttft-ms"], headers["x-slo-tpot-ms"]) == ("900", "90")
    assert body == {
        "model": "org/fake-7b", "prompt": [1] * 6, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    saved = list((tmp_path / "results").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("openai-infqps-fake-7b-") and json.loads(saved[0].read_text())["completed"] == 2


def test_a_server_that_is_not_there_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, output, report = bench(tmp_path, "--base-url", "http://127.0.0.1:9", "--num-prompts", "1")
    assert code == 2 and report is None
    assert len(output.strip().splitlines()) == 1 and output.startswith("error:") and "/v1/models" in output


# --- sweeps --------------------------------------------------------------------------------------


def test_a_sweep_of_two_rates_writes_each_result_and_the_curves(tmp_path: Path) -> None:
    results = tmp_path / "results"
    code, output, report = bench(
        tmp_path, *TINY_RUN, "--request-rate", "40,inf", "--num-prompts", "4", "--save-result", "--result-dir", str(results)
    )
    assert code == 0, output
    assert output.count("Serving Benchmark Result") == 2
    assert [run["request_rate"] for run in report["runs"]] == [40.0, "inf"] and all(run["completed"] == 4 for run in report["runs"])
    figure = Path(report["figure"])
    assert figure.parent == results and figure.read_bytes().startswith(b"\x89PNG")
    names = sorted(p.name for p in results.glob("*.json"))
    assert len(names) == 2 and names[0].startswith("tropical-40qps-tiny-") and names[1].startswith("tropical-infqps-tiny-")


# --- bad flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--embedded", "--request-rate", "4,fast"], "--request-rate"),
        (["--embedded", "--request-rate", "0"], "--request-rate"),
        (["--embedded", "--goodput", "ttft200"], "--goodput"),
        (["--embedded", "--goodput", "ttft:200", "itl:5"], "--goodput"),
        (["--embedded", "stray"], "--goodput"),
        (["--embedded", "--metric-percentiles", "0,99"], "--metric-percentiles"),
        (["--embedded", "--percentile-metrics", "ttft,latency"], "--percentile-metrics"),
        (["--embedded", "--dataset-name", "nope"], "--dataset-name"),
        (["--embedded", "--dataset-name", "random", "--dataset-path", "x.csv"], "--dataset-path"),
        (["--embedded", "--burstiness", "0"], "--burstiness"),
        (["--embedded", "--burstiness", "2", "--arrival", "gamma", "--cv", "0.7"], "--burstiness"),
        (["--embedded", "--max-concurrency", "0"], "--max-concurrency"),
        (["--embedded", "--num-prompts", "0"], "--num-prompts"),
        (["--embedded", "--base-url", "http://127.0.0.1:9"], "--base-url"),
        (["--base-url", "ftp://example"], "--base-url"),
        (["--base-url", "http://127.0.0.1:9", "--endpoint", "/v1/embeddings"], "--endpoint"),
        (["--base-url", "http://127.0.0.1:9", "--compare-sim"], "--compare-sim"),
        (["--embedded", "--dataset-name", "sharegpt"], "rate"),  # a length table has no pace of its own
        (["--embedded", "--dataset-path", "no/such/trace.csv", "--request-rate", "2"], "no such file"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], flag: str) -> None:
    code, output, report = bench(tmp_path, *args)
    lines = output.strip().splitlines()
    assert code == 2 and report is None
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], output


# --- the same summary through Tropical's gateway ---------------------------------------------------


@asynccontextmanager
async def gateway_on_embedded_deployment() -> AsyncIterator[str]:
    """`tropical up`'s shape in a test: tiny workers and their router in this loop, the gateway in front of them."""
    from tropical.gateway.server import Gateway, running_gateway
    from tropical.live.engines import EngineChoice
    from tropical.live.run import deployment
    from tropical.settings import Settings

    settings = Settings(broker_url="memory://", redis_url="memory://")
    choice = EngineChoice("tiny")
    served = deployment(settings, "vllm", 1, choice)
    await served.start()
    try:
        bus, store = await served.connections()
        gateway = Gateway(bus, store, settings, model_name="tiny", tokenizer=choice.tokenizer(), telemetry=served.telemetry)
        async with running_gateway(gateway, "127.0.0.1", 0) as url:
            yield url
    finally:
        await served.stop()


def test_base_url_on_the_gateway_reports_what_embedded_does_in_the_same_keys(tmp_path: Path) -> None:
    load = ["--request-rate", "50", "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "4", "--percentile-metrics", "ttft,e2el"]
    code, output, embedded = bench(tmp_path, *TINY_RUN, *load)
    assert code == 0, output
    with served_in_thread(gateway_on_embedded_deployment) as url:
        code, output, http = bench(tmp_path, "--base-url", url, *load)
    assert code == 0, output
    assert list(http) == list(embedded)  # the same keys, in the same order
    assert (http["mode"], http["backend"], http["model_id"], http["completed"]) == ("http", "openai", "tiny", 4)
    assert http["total_output_tokens"] == embedded["total_output_tokens"] == 16
    for key in ("mean_queue_ms", "mean_prefill_ms", "mean_decode_ms"):  # the gateway sends the workers' milestones
        assert http[key] is not None and http[key] >= 0, key
    assert http["control_plane_requests"] == 4 and http["p50_control_total_ms"] > 0
    assert (http["workers"], http["policy"], embedded["base_url"]) == (None, None, None)
