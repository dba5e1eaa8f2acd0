"""Prometheus metrics: the `Telemetry` families and their rules, a deployment's services moving them, `/metrics` over HTTP."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tropical.engine import EmulatedEngine, Engine, EngineConfig, FakeClock, ModelConfig
from tropical.engine.tokenizer import ByteTokenizer
from tropical.latency import LatencyModel, ProfileGrid
from tropical.live.client import Client, RequestFailed
from tropical.live.deployment import Deployment
from tropical.live.profiler_service import ProfilerService
from tropical.live.run import metrics_served
from tropical.policies import Role
from tropical.protocol import ErrorCode, FinishReason, Slo, Timings
from tropical.settings import Settings
from tropical.store import MemoryStore
from tropical.telemetry import Telemetry, error_outcome, finish_outcome, serve_metrics

WAIT = 60.0  # seconds any one awaited thing may take before the test fails
TINY = ModelConfig.tiny(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, eos_token_ids=(257,))
MODEL = LatencyModel(c0=0.0, c1=0.0005, c2=0.005, d0=0.005, d1=0.0005, d2=0.00001)
SETTINGS = Settings(broker_url="memory://", redis_url="memory://")

Labels = frozenset[tuple[str, str]]


def scrape(body: bytes | str) -> dict[tuple[str, Labels], float]:
    """Every sample of a `/metrics` page by (sample name, labels)."""
    text = body.decode() if isinstance(body, bytes) else body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def done(telemetry: Telemetry, outcome: str = "finished_stop", *, service: str = "gateway", arrival: float = 100.0,
         first_token: float | None = 100.2, finished: float | None = 101.2, output_tokens: int = 11, prompt_tokens: int = 7,
         ttft_slo_s: float | None = 0.5, tpot_slo_s: float | None = 0.2, timings: Timings | None = None) -> None:
    telemetry.request_done(
        service, outcome, arrival=arrival, first_token=first_token, finished=finished, output_tokens=output_tokens,
        prompt_tokens=prompt_tokens, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s, timings=timings,
    )


# --- Telemetry on its own ----------------------------------------------------------------------------


def test_a_finished_request_moves_its_counts_and_latencies() -> None:
    telemetry = Telemetry()
    done(telemetry)
    done(telemetry, "finished_length", output_tokens=5, prompt_tokens=3)
    body, content_type = telemetry.render()
    assert content_type.startswith("text/plain")
    s = scrape(body)
    assert value(s, "tropical:request_success_total", service="gateway", outcome="finished_stop") == 1
    assert value(s, "tropical:request_success_total", service="gateway", outcome="finished_length") == 1
    assert value(s, "tropical:prompt_tokens_total", service="gateway") == 10
    assert value(s, "tropical:generation_tokens_total", service="gateway") == 16
    assert value(s, "tropical:time_to_first_token_seconds_count", service="gateway") == 2
    assert value(s, "tropical:time_to_first_token_seconds_sum", service="gateway") == pytest.approx(0.4)
    assert value(s, "tropical:time_to_first_token_seconds_bucket", service="gateway", le="0.25") == 2
    assert value(s, "tropical:time_to_first_token_seconds_bucket", service="gateway", le="0.1") == 0
    # TPOT = (finished − first token)/(n − 1): 1.0/10 and 1.0/4
    assert value(s, "tropical:time_per_output_token_seconds_sum", service="gateway") == pytest.approx(0.1 + 0.25)
    assert value(s, "tropical:e2e_request_latency_seconds_sum", service="gateway") == pytest.approx(2.4)


def test_a_single_token_has_no_tpot_and_meets_its_tpot_slo() -> None:
    telemetry = Telemetry()
    done(telemetry, output_tokens=1, finished=100.2)
    s = scrape(telemetry.render()[0])
    assert value(s, "tropical:time_to_first_token_seconds_count", service="gateway") == 1
    assert value(s, "tropical:time_per_output_token_seconds_count", service="gateway") is None
    assert value(s, "tropical:slo_attainment", service="gateway", slo="tpot") == 1.0
    assert value(s, "tropical:slo_attainment", service="gateway", slo="joint") == 1.0


def test_a_request_without_a_first_token_misses_both_slos_and_has_no_ttft() -> None:
    telemetry = Telemetry()
    done(telemetry, "timeout", first_token=None, finished=None, output_tokens=0)
    s = scrape(telemetry.render()[0])
    assert value(s, "tropical:request_success_total", service="gateway", outcome="timeout") == 1
    assert value(s, "tropical:time_to_first_token_seconds_count", service="gateway") is None  # never taken as zero
    assert value(s, "tropical:e2e_request_latency_seconds_count", service="gateway") is None
    for slo in ("joint", "ttft", "tpot"):
        assert value(s, "tropical:slo_attainment", service="gateway", slo=slo) == 0.0
        assert value(s, "tropical:slo_window_requests", service="gateway", slo=slo) == 1


def test_slos_are_checked_only_where_given_and_per_slo() -> None:
    telemetry = Telemetry()
    done(telemetry, ttft_slo_s=0.1, tpot_slo_s=None)  # TTFT 0.2 s: missed; no TPOT SLO
    done(telemetry, service="worker", ttft_slo_s=None, tpot_slo_s=None)
    done(telemetry, service="router", ttft_slo_s=1.0, tpot_slo_s=0.05)  # TTFT met, TPOT 0.1 s missed
    s = scrape(telemetry.render()[0])
    assert value(s, "tropical:slo_attainment", service="gateway", slo="ttft") == 0.0
    assert value(s, "tropical:slo_attainment", service="gateway", slo="tpot") is None
    assert value(s, "tropical:slo_attainment", service="gateway", slo="joint") is None
    assert total(s, "tropical:slo_window_requests", service="worker") == 0
    assert value(s, "tropical:slo_attainment", service="router", slo="ttft") == 1.0
    assert value(s, "tropical:slo_attainment", service="router", slo="tpot") == 0.0
    assert value(s, "tropical:slo_attainment", service="router", slo="joint") == 0.0


def test_requests_never_offered_stay_out_of_attainment_and_failed_ones_miss() -> None:
    telemetry = Telemetry()
    done(telemetry, "bad_request", first_token=None, finished=None)
    done(telemetry, "unauthorized", first_token=None, finished=None)
    done(telemetry, "error")  # it had a first token in time, but never finished
    s = scrape(telemetry.render()[0])
    assert value(s, "tropical:slo_window_requests", service="gateway", slo="joint") == 1
    assert value(s, "tropical:slo_attainment", service="gateway", slo="joint") == 0.0
    assert value(s, "tropical:time_to_first_token_seconds_count", service="gateway") == 1
    assert value(s, "tropical:e2e_request_latency_seconds_count", service="gateway") is None


def test_attainment_covers_only_the_window_on_the_injected_clock() -> None:
    clock = Clock(1_000.0)
    telemetry = Telemetry(window_s=60.0, clock=clock)
    done(telemetry)  # met
    clock.now += 30
    done(telemetry, first_token=101.0)  # TTFT 1 s: missed
    clock.now += 10

    def joint() -> float | None:
        return value(scrape(telemetry.render()[0]), "tropical:slo_attainment", service="gateway", slo="joint")

    assert joint() == 0.5
    clock.now += 25  # the first is 65 s old
    assert joint() == 0.0
    clock.now += 40  # both gone: no series, not a stale figure
    assert joint() is None
    done(telemetry)
    assert joint() == 1.0


def test_phases_come_from_the_timings_that_exist() -> None:
    telemetry = Telemetry()
    colocated = Timings(arrival=10.0, dispatched=10.1, prefill_start=10.5, first_token=11.0, finished=13.0)
    handed = Timings(arrival=10.0, prefill_start=10.2, first_token=10.4, kv_transferred=10.7, finished=11.7)
    done(telemetry, service="worker", timings=colocated)
    done(telemetry, service="worker", timings=handed)
    s = scrape(telemetry.render()[0])

    def phase(name: str, stat: str) -> float | None:
        return value(s, f"tropical:request_phase_seconds_{stat}", service="worker", phase=name)

    assert phase("queued", "count") == 2 and phase("queued", "sum") == pytest.approx(0.5 + 0.2)
    assert phase("prefill", "count") == 2 and phase("prefill", "sum") == pytest.approx(0.5 + 0.2)
    assert phase("kv_transfer", "count") == 1 and phase("kv_transfer", "sum") == pytest.approx(0.3)
    assert phase("decode", "count") == 2 and phase("decode", "sum") == pytest.approx(2.0 + 1.0)  # from the KV's arrival


def test_gateway_router_and_profiler_gauges() -> None:
    telemetry = Telemetry()
    telemetry.gateway_in_flight(1)
    telemetry.gateway_in_flight(1)
    telemetry.gateway_in_flight(-1)
    telemetry.router_queue(4)
    telemetry.router_decided(0.002, placed=3, refused=1)
    telemetry.router_decided(0.5, placed=0, refused=2)  # placed nothing: not a timed decision
    telemetry.profiler_run("m@h/tp1", 1_700_000_000.0)
    telemetry.request_counted("router", "error")
    s = scrape(telemetry.render()[0])
    assert value(s, "tropical:request_success_total", service="router", outcome="error") == 1
    assert value(s, "tropical:num_requests_running", service="gateway", worker="", role="") == 1
    assert value(s, "tropical:num_requests_waiting", service="router", worker="", role="") == 4
    assert value(s, "tropical:router_decision_seconds_count") == 1
    assert value(s, "tropical:router_decision_seconds_sum") == pytest.approx(0.002)
    assert value(s, "tropical:router_requests_total", decision="placed") == 3
    assert value(s, "tropical:router_requests_total", decision="refused") == 3
    assert value(s, "tropical:profiler_runs_total") == 1
    assert value(s, "tropical:latency_model_fitted_timestamp_seconds", model="m@h/tp1") == 1_700_000_000.0


def test_a_worker_handle_records_steps_kv_and_load_and_leaves_no_stale_load() -> None:
    telemetry = Telemetry()
    worker = telemetry.worker("w0", "multiplex")
    worker.step(0.03, 0.02)
    worker.step(0.01, None)  # no prediction: the time counts, the ratio does not
    worker.kv("sent", 4096, 0.004)
    worker.kv("received", 1024, 0.002)
    worker.load(running=3, waiting=2, queued=5, kv_used_frac=1.2)
    s = scrape(telemetry.render()[0])
    w = {"worker": "w0", "role": "multiplex"}
    assert value(s, "tropical:step_seconds_count", **w) == 2
    assert value(s, "tropical:step_prediction_ratio_count", **w) == 1
    assert value(s, "tropical:step_prediction_ratio_sum", **w) == pytest.approx(1.5)
    assert value(s, "tropical:kv_transfer_bytes_total", direction="sent", **w) == 4096
    assert value(s, "tropical:kv_transfer_bytes_total", direction="received", **w) == 1024
    assert value(s, "tropical:kv_transfer_seconds_count", direction="sent", **w) == 1
    assert value(s, "tropical:num_requests_running", service="worker", **w) == 3
    assert value(s, "tropical:num_requests_waiting", service="worker", **w) == 2
    assert value(s, "tropical:num_prefills_queued", **w) == 5
    assert value(s, "tropical:kv_cache_usage_perc", **w) == 1.0  # clamped to a fraction
    worker.close()
    s = scrape(telemetry.render()[0])
    for gauge in ("tropical:num_requests_running", "tropical:num_requests_waiting", "tropical:num_prefills_queued", "tropical:kv_cache_usage_perc"):
        assert not any(name == gauge and ("worker", "w0") in labels for name, labels in s)
    assert value(s, "tropical:step_seconds_count", **w) == 2  # counts stay


def test_each_telemetry_has_its_own_registry() -> None:
    first, second = Telemetry(), Telemetry()
    done(first)
    assert value(scrape(first.render()[0]), "tropical:request_success_total", service="gateway", outcome="finished_stop") == 1
    assert value(scrape(second.render()[0]), "tropical:request_success_total", service="gateway", outcome="finished_stop") is None


def test_outcomes_of_finish_reasons_and_error_codes() -> None:
    assert [finish_outcome(r) for r in FinishReason] == ["finished_stop", "finished_length", "cancelled"]
    assert error_outcome(ErrorCode.OVERLOADED) == "refused"
    assert error_outcome(ErrorCode.TIMEOUT) == "timeout"
    assert error_outcome(ErrorCode.INVALID) == "bad_request"
    assert error_outcome(ErrorCode.KV_TRANSFER_FAILED) == "error"
    with pytest.raises(ValueError):
        Telemetry(window_s=0)


# --- the services --------------------------------------------------------------------------------------


def engine() -> Engine:
    return Engine.load("tiny", EngineConfig(num_kv_blocks=512, block_size=4, device="cpu", max_model_len=256), tiny=TINY, weights_seed=3)


async def test_a_deployment_moves_the_router_and_worker_metrics() -> None:
    telemetry = Telemetry()
    served = Deployment("distserve", (Role.PREFILL, Role.DECODE), engine, MODEL, SETTINGS, tokenizer=ByteTokenizer(), telemetry=telemetry)
    prompts = [[(7 * i + j) % 256 for j in range(3 + 5 * i)] for i in range(6)]
    await served.start()
    try:
        async with await served.client() as client:
            outputs = await asyncio.wait_for(
                asyncio.gather(*(client.complete(p, max_tokens=6, slo=Slo(ttft_ms=60_000, tpot_ms=10_000)) for p in prompts)), WAIT
            )
            with pytest.raises(RequestFailed):
                await asyncio.wait_for(client.complete([1] * 250, max_tokens=20), WAIT)  # longer than the context
        await asyncio.wait_for(served.workers[0].publish_status(), WAIT)
        await asyncio.wait_for(served.workers[1].publish_status(), WAIT)
        s = scrape(telemetry.render()[0])
    finally:
        await served.stop()
    finished = total(s, "tropical:request_success_total", service="worker", outcome="finished_stop") + total(
        s, "tropical:request_success_total", service="worker", outcome="finished_length"
    )
    assert finished == len(prompts) == total(s, "tropical:request_success_total", service="worker")
    assert value(s, "tropical:request_success_total", service="router", outcome="bad_request") == 1
    assert value(s, "tropical:prompt_tokens_total", service="worker") == sum(map(len, prompts))
    assert value(s, "tropical:generation_tokens_total", service="worker") == sum(map(len, outputs))
    assert value(s, "tropical:time_to_first_token_seconds_count", service="worker") == len(prompts)
    assert value(s, "tropical:e2e_request_latency_seconds_count", service="worker") == len(prompts)
    assert value(s, "tropical:request_phase_seconds_count", service="worker", phase="kv_transfer") == len(prompts)
    assert value(s, "tropical:slo_attainment", service="worker", slo="joint") == 1.0
    assert value(s, "tropical:router_requests_total", decision="placed") == len(prompts)
    assert (value(s, "tropical:router_decision_seconds_count") or 0) >= 1
    assert value(s, "tropical:num_requests_waiting", service="router", worker="", role="") == 0
    prefill, decode = ({"worker": "worker-0", "role": "prefill"}, {"worker": "worker-1", "role": "decode"})
    assert (value(s, "tropical:kv_transfer_bytes_total", direction="sent", **prefill) or 0) > 0
    assert value(s, "tropical:kv_transfer_bytes_total", direction="received", **decode) == value(
        s, "tropical:kv_transfer_bytes_total", direction="sent", **prefill
    )
    assert value(s, "tropical:kv_transfer_seconds_count", direction="sent", **prefill) == len(prompts)
    assert value(s, "tropical:kv_transfer_seconds_count", direction="received", **decode) == len(prompts)
    for worker in (prefill, decode):
        assert (value(s, "tropical:step_seconds_count", **worker) or 0) >= 1
        assert value(s, "tropical:step_prediction_ratio_count", **worker) == value(s, "tropical:step_seconds_count", **worker)
        usage = value(s, "tropical:kv_cache_usage_perc", **worker)
        assert usage is not None and 0.0 <= usage <= 1.0
        assert value(s, "tropical:num_requests_running", service="worker", **worker) == 0  # all done
    after = scrape(telemetry.render()[0])  # the workers have left: their load is gone, their counts stay
    assert not any(name == "tropical:kv_cache_usage_perc" for name, _ in after)
    assert value(after, "tropical:step_seconds_count", **decode) == value(s, "tropical:step_seconds_count", **decode)


async def test_the_profiler_counts_its_published_models() -> None:
    telemetry = Telemetry()
    store = MemoryStore()
    grid = ProfileGrid.cross((16, 64), (1, 4), (32,), [(2, 32, 64)], warmup=1, repeats=1)
    emulated = EmulatedEngine(MODEL, 1 << 16, max_model_len=4096, clock=FakeClock())
    service = ProfilerService(emulated, store, model="emulated", hardware="a100", grid=grid, once=True, clock=lambda: 1_700_000_000.0,
                              telemetry=telemetry)
    await asyncio.wait_for(service.run(), WAIT)
    await store.close()
    s = scrape(telemetry.render()[0])
    assert value(s, "tropical:profiler_runs_total") == 1
    assert value(s, "tropical:latency_model_fitted_timestamp_seconds", model="emulated@a100/tp1") == 1_700_000_000.0


# --- over HTTP ---------------------------------------------------------------------------------------------


async def test_metrics_are_served_over_http() -> None:
    telemetry = Telemetry()
    done(telemetry)
    async with serve_metrics(telemetry, "127.0.0.1", 0) as url, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        async with http.get(f"{url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            s = scrape(await response.text())
        assert value(s, "tropical:request_success_total", service="gateway", outcome="finished_stop") == 1
        done(telemetry, "refused", first_token=None, finished=None)
        async with http.get(f"{url}/metrics") as response:
            assert value(scrape(await response.text()), "tropical:request_success_total", service="gateway", outcome="refused") == 1
        async with http.get(f"{url}/other") as response:
            assert response.status == 404


async def test_a_service_serves_metrics_only_when_given_a_port() -> None:
    telemetry = Telemetry()
    async with metrics_served(SETTINGS, telemetry) as url:
        assert url is None
    async with metrics_served(SETTINGS.with_overrides(metrics_port=0), telemetry, "127.0.0.1") as url:
        assert url is not None and url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http, http.get(f"{url}/metrics") as response:
            assert response.status == 200 and "tropical:request_success" in await response.text()
