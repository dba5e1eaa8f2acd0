"""Prometheus metrics of every Tropical service, named as vLLM names its own (`tropical:...`).

One `Telemetry` per process owns a private registry and every metric family,
so the router, the workers and the gateway of one process (`tropical up`)
share one `/metrics` page without clashing: request-level series carry a
`service` label, a worker's series its `worker` id and `role`. Gauges shared
by services and workers (`num_requests_running`, `num_requests_waiting`) carry
all three labels and leave the ones that do not apply empty, which Prometheus
reads as absent. Services call the small methods below at the moments they
already know about; nothing here blocks or touches the event loop.

SLO attainment follows `tropical.metrics` (a request that did not finish meets
no SLO; one with no first token misses both) over the requests finished in the
last `window_s`, computed when scraped.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tropical import protocol
from tropical.metrics import RequestOutcome, phase_seconds

Outcome = Literal[
    "finished_stop", "finished_length", "cancelled", "error", "refused", "timeout", "unauthorized", "bad_request"
]
Direction = Literal["sent", "received"]

# Outcomes that say nothing about the service's SLOs: the client gave up, or the request was never valid.
_NOT_OFFERED: Final = frozenset({"cancelled", "unauthorized", "bad_request"})
_FINISHED: Final = frozenset({"finished_stop", "finished_length"})
PHASE_LABELS: Final = {"queue_s": "queued", "prefill_s": "prefill", "kv_transfer_s": "kv_transfer", "decode_s": "decode"}

# Bucket edges in seconds, spread like vLLM's: fine where SLOs live, coarse in the tail.
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                       20.0, 80.0)
LATENCY_BUCKETS: Final = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                          120.0, 240.0, 480.0, 960.0, 1920.0)
STEP_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                       2.5, 5.0, 10.0)
DECISION_BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                           0.5, 1.0)
RATIO_BUCKETS: Final = (0.25, 0.5, 0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)

_ERROR_OUTCOMES: Final[dict[protocol.ErrorCode, Outcome]] = {
    protocol.ErrorCode.OVERLOADED: "refused",
    protocol.ErrorCode.TIMEOUT: "timeout",
    protocol.ErrorCode.CANCELLED: "cancelled",
    protocol.ErrorCode.INVALID: "bad_request",
    protocol.ErrorCode.MALFORMED: "bad_request",
    protocol.ErrorCode.TOO_LARGE: "bad_request",
}


def finish_outcome(reason: protocol.FinishReason) -> Outcome:
    """The outcome of a request that ended with `finished`."""
    if reason is protocol.FinishReason.CANCELLED:
        return "cancelled"
    return "finished_stop" if reason is protocol.FinishReason.STOP else "finished_length"


def error_outcome(code: protocol.ErrorCode) -> Outcome:
    """The outcome of a request that ended with an `error` reply."""
    return _ERROR_OUTCOMES.get(code, "error")


DEFAULT_WINDOW_S: Final = 60.0
_MAX_WINDOW_REQUESTS: Final = 100_000  # bounds the memory of the attainment window under any load


@dataclass(frozen=True, slots=True)
class _Attained:
    """One finished request in the attainment window; None where its SLO was not given."""

    at: float
    service: str
    ttft: bool | None
    tpot: bool | None
    joint: bool | None


class _AttainmentCollector(Collector):
    """`tropical:slo_attainment{service,slo}` over the requests recorded in the last `window_s`."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._requests: deque[_Attained] = deque(maxlen=_MAX_WINDOW_REQUESTS)
        self._lock = threading.Lock()

    def add(self, service: str, ttft: bool | None, tpot: bool | None) -> None:
        joint = None if ttft is None or tpot is None else ttft and tpot
        with self._lock:
            self._requests.append(_Attained(self._clock(), service, ttft, tpot, joint))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        met: dict[tuple[str, str], int] = {}
        counted: dict[tuple[str, str], int] = {}
        with self._lock:
            horizon = self._clock() - self._window_s
            while self._requests and self._requests[0].at < horizon:
                self._requests.popleft()
            for request in self._requests:
                for slo, ok in (("joint", request.joint), ("ttft", request.ttft), ("tpot", request.tpot)):
                    if ok is not None:
                        counted[request.service, slo] = counted.get((request.service, slo), 0) + 1
                        met[request.service, slo] = met.get((request.service, slo), 0) + int(ok)
        attainment, requests = self._families()
        for key, count in sorted(counted.items()):
            attainment.add_metric(list(key), met[key] / count)
            requests.add_metric(list(key), count)
        yield attainment
        yield requests

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        window = f"{self._window_s:g} s"
        return (
            GaugeMetricFamily(
                "tropical:slo_attainment",
                f"Fraction of the requests finished in the last {window} that met their SLO (joint: both).",
                labels=["service", "slo"],
            ),
            GaugeMetricFamily(
                "tropical:slo_window_requests",
                f"Requests with that SLO finished in the last {window}: the denominator of slo_attainment.",
                labels=["service", "slo"],
            ),
        )


class Telemetry:
    """Every metric of one process, in its own registry; `render()` is the `/metrics` page."""

    def __init__(self, *, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.registry = CollectorRegistry()
        r = self.registry
        # requests
        self.request_success = Counter("tropical:request_success", "Requests ended, by outcome.",
                                       ["service", "outcome"], registry=r)
        self.prompt_tokens = Counter("tropical:prompt_tokens", "Prompt tokens of ended requests.",
                                     ["service"], registry=r)
        self.generation_tokens = Counter("tropical:generation_tokens", "Output tokens of ended requests.",
                                         ["service"], registry=r)
        self.ttft = Histogram("tropical:time_to_first_token_seconds", "Time to first token.",
                              ["service"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("tropical:time_per_output_token_seconds", "Mean time per output token after the first.",
                              ["service"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tropical:e2e_request_latency_seconds", "Arrival to the last token.",
                             ["service"], buckets=LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("tropical:request_phase_seconds",
                               "Time in each phase: queued, prefill, kv_transfer, decode.",
                               ["service", "phase"], buckets=LATENCY_BUCKETS, registry=r)
        self._attainment = _AttainmentCollector(window_s, clock)
        r.register(self._attainment)
        # load, shared by services and workers (labels that do not apply stay empty)
        self.running = Gauge("tropical:num_requests_running",
                             "Requests in flight: at the gateway, or decodes in a worker's running batch.",
                             ["service", "worker", "role"], registry=r)
        self.waiting = Gauge("tropical:num_requests_waiting",
                             "Requests queued in the router, or decodes resident on a worker outside its batch.",
                             ["service", "worker", "role"], registry=r)
        # router
        self.router_decision = Histogram("tropical:router_decision_seconds",
                                         "Time of one router decision that placed something.",
                                         buckets=DECISION_BUCKETS, registry=r)
        self.router_requests = Counter("tropical:router_requests", "Requests the router placed or refused.",
                                       ["decision"], registry=r)
        # workers
        self.prefills_queued = Gauge("tropical:num_prefills_queued", "Prompts placed on a worker not fully prefilled.",
                                     ["worker", "role"], registry=r)
        self.kv_usage = Gauge("tropical:kv_cache_usage_perc", "Fraction of the worker's KV cache in use (0..1).",
                              ["worker", "role"], registry=r)
        self.kv_bytes = Counter("tropical:kv_transfer_bytes", "KV cache bytes handed between workers.",
                                ["worker", "role", "direction"], registry=r)
        self.kv_seconds = Histogram("tropical:kv_transfer_seconds", "Time of one KV hand-off's export or import.",
                                    ["worker", "role", "direction"], buckets=STEP_BUCKETS, registry=r)
        self.step_seconds = Histogram("tropical:step_seconds", "Time of one engine step.",
                                      ["worker", "role"], buckets=STEP_BUCKETS, registry=r)
        self.step_ratio = Histogram("tropical:step_prediction_ratio",
                                    "A step's actual time over the latency model's prediction of it.",
                                    ["worker", "role"], buckets=RATIO_BUCKETS, registry=r)
        # profiler
        self.profiler_runs = Counter("tropical:profiler_runs", "Profiling runs that published a latency model.",
                                     registry=r)
        self.model_fitted = Gauge("tropical:latency_model_fitted_timestamp_seconds",
                                  "When the latest published latency model was fitted (Unix seconds).",
                                  ["model"], registry=r)

    # --- requests -------------------------------------------------------------

    def request_done(
        self,
        service: str,
        outcome: str,
        *,
        arrival: float,
        first_token: float | None,
        finished: float | None,
        output_tokens: int,
        prompt_tokens: int,
        ttft_slo_s: float | None,
        tpot_slo_s: float | None,
        timings: protocol.Timings | None = None,
    ) -> None:
        """One request ended at `service` (Unix-second times); SLOs are checked only where given."""
        self.request_success.labels(service, outcome).inc()
        self.prompt_tokens.labels(service).inc(max(prompt_tokens, 0))
        self.generation_tokens.labels(service).inc(max(output_tokens, 0))
        if first_token is not None:
            self.ttft.labels(service).observe(max(first_token - arrival, 0.0))
            if finished is not None and output_tokens > 1:
                self.tpot.labels(service).observe(max((finished - first_token) / (output_tokens - 1), 0.0))
        if finished is not None and outcome in _FINISHED:
            self.e2e.labels(service).observe(max(finished - arrival, 0.0))
        if timings is not None:
            for field, seconds in phase_seconds(timings).items():
                if seconds is not None:  # clocks of different hosts may disagree a little: never below 0
                    self.phase.labels(service, PHASE_LABELS[field]).observe(max(seconds, 0.0))
        if outcome in _NOT_OFFERED or (ttft_slo_s is None and tpot_slo_s is None):
            return
        done = RequestOutcome(
            request_id="-", arrival=arrival, first_token=first_token, finish=finished, output_tokens=output_tokens,
            ttft_slo=math.inf if ttft_slo_s is None else ttft_slo_s,
            tpot_slo=math.inf if tpot_slo_s is None else tpot_slo_s,
            dropped=outcome not in _FINISHED,
        )
        self._attainment.add(
            service,
            None if ttft_slo_s is None else done.meets_ttft,
            None if tpot_slo_s is None else done.meets_tpot,
        )

    def request_counted(self, service: str, outcome: str) -> None:
        """A request ended where none of its times are known: its outcome is counted, nothing else."""
        self.request_success.labels(service, outcome).inc()

    def gateway_in_flight(self, delta: int) -> None:
        """The gateway took (+1) or ended (−1) a request."""
        self.running.labels("gateway", "", "").inc(delta)

    # --- router -----------------------------------------------------------------

    def router_queue(self, waiting: int) -> None:
        self.waiting.labels("router", "", "").set(waiting)

    def router_decided(self, seconds: float, *, placed: int, refused: int) -> None:
        """One decision's time (observed only if it placed something) and what it placed or refused."""
        if placed:
            self.router_decision.observe(seconds)
            self.router_requests.labels("placed").inc(placed)
        if refused:
            self.router_requests.labels("refused").inc(refused)

    # --- workers and profiler -----------------------------------------------------

    def worker(self, worker_id: str, role: str) -> WorkerTelemetry:
        return WorkerTelemetry(self, worker_id, str(role))

    def profiler_run(self, model_key: str, fitted_at: float) -> None:
        """A profiling run published a latency model fitted at `fitted_at`."""
        self.profiler_runs.inc()
        self.model_fitted.labels(model_key).set(fitted_at)

    # --- exposition ----------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The `/metrics` body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class WorkerTelemetry:
    """The series of one worker; `close()` removes its gauges when it leaves, so no stale load lingers."""

    def __init__(self, telemetry: Telemetry, worker_id: str, role: str) -> None:
        self.telemetry = telemetry
        self.worker_id = worker_id
        self.role = role

    def step(self, actual_s: float, predicted_s: float | None) -> None:
        t = self.telemetry
        t.step_seconds.labels(self.worker_id, self.role).observe(actual_s)
        if predicted_s is not None and predicted_s > 0:
            t.step_ratio.labels(self.worker_id, self.role).observe(actual_s / predicted_s)

    def kv(self, direction: Direction, nbytes: int, seconds: float) -> None:
        t = self.telemetry
        t.kv_bytes.labels(self.worker_id, self.role, direction).inc(nbytes)
        t.kv_seconds.labels(self.worker_id, self.role, direction).observe(seconds)

    def load(self, running: int, waiting: int, queued: int, kv_used_frac: float) -> None:
        t = self.telemetry
        t.running.labels("worker", self.worker_id, self.role).set(running)
        t.waiting.labels("worker", self.worker_id, self.role).set(waiting)
        t.prefills_queued.labels(self.worker_id, self.role).set(queued)
        t.kv_usage.labels(self.worker_id, self.role).set(min(max(kv_used_frac, 0.0), 1.0))

    def close(self) -> None:
        t = self.telemetry
        for gauge in (t.running, t.waiting):
            with contextlib.suppress(KeyError):
                gauge.remove("worker", self.worker_id, self.role)
        for gauge in (t.prefills_queued, t.kv_usage):
            with contextlib.suppress(KeyError):
                gauge.remove(self.worker_id, self.role)


@contextlib.asynccontextmanager
async def serve_metrics(telemetry: Telemetry, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `GET /metrics` for a service with no HTTP server of its own; yields the base URL (the real port)."""

    async def metrics(_: web.Request) -> web.Response:
        body, content_type = telemetry.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{_url_host(bound_host)}:{bound_port}"
    finally:
        await runner.cleanup()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
