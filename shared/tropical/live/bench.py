"""Replay a workload onto a serving system and measure it as `vllm bench serve` does.

Two ways in: Tropical's bus (a deployment in this process, spawned processes,
or a running deployment's `requests` queue), or the HTTP API of any
OpenAI-compatible server (Tropical's gateway, vLLM, ...). Both are timed the
same way, on the client:

- each request is sent at its scheduled arrival (a timer from the start); a
  send that comes late counts against the system that kept the loop busy, not
  for it. Under a concurrency cap, a request held back for a free slot
  arrives when it gets one: the cap is the client's, not the server's;
- TTFT is the first content chunk's arrival minus the request's arrival; a
  request whose first token never came fails, its TTFT is never taken as 0;
- ITL is the gap between successive content chunks after the first, so it
  never includes the TTFT; TPOT is (last chunk − first chunk) / (n − 1), with
  n from the server's `usage.completion_tokens`, else the token ids the
  chunks carry, else the number of content chunks.

The outcomes go through the simulator's own `summarize`, so a live run and
`tropical sim` on the same requests report the same numbers in the same keys.
The per-phase breakdown comes from the milestones the workers stamp
(`RequestFinished.timings` on the bus, the final chunk's `timings` from
Tropical's gateway); a server that sends none gets nulls there, not zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import msgspec
import numpy as np
from tqdm import tqdm

from tropical.bus import connect_bus
from tropical.data import data_file
from tropical.live.client import Client, RequestFailed
from tropical.metrics import RequestOutcome, Summary, summarize
from tropical.protocol import SamplingParams, Slo, Timings
from tropical.settings import Settings
from tropical.simulator import SimRequest, simulate
from tropical.traces import load_trace, synthetic_arrivals

if TYPE_CHECKING:
    from tropical.experiments import Setting
    from tropical.live.deployment import Deployment
    from tropical.live.engines import EngineChoice
    from tropical.policies.records import Role

PROMPT_TOKEN_KINDS = 250  # request i's prompt repeats token (i % 250) + 1: inside every engine's vocabulary
FORCED_LENGTH = SamplingParams(ignore_eos=True)
CHAT_WORDS = ("sun", "sea", "sky", "oak", "elm", "fox", "owl", "bee", "ant", "cow", "hen", "dog", "cat", "yak", "elk", "emu")
INF = math.inf

METRICS = ("ttft", "tpot", "itl", "e2el")  # vLLM's names, in its order
METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
DEFAULT_PERCENTILES = (99.0,)
ALWAYS_PERCENTILES = (90.0, 99.0)  # in the JSON whatever --metric-percentiles says: the keys earlier reports had
GOODPUT_METRICS = ("ttft", "tpot", "e2el")

# --dataset-name: the shipped traces and length tables (see tropical/data/README.md), beside vLLM's `random`.
RANDOM_DATASET = "random"
DATASETS = {
    "azure-conv": "traces/azure_conv_2023.csv",
    "mooncake": "traces/mooncake_conversation_fast25.jsonl",
    "distserve-sharegpt": "traces/distserve_sharegpt_opt13b.csv",
    "arxiv": "lengths/arxiv_summarization_llama2_tokenizer.csv",
    "sharegpt": "lengths/sharegpt_8k_llama2_tokenizer.csv",
}


# --- the dialect's flag values ---------------------------------------------------------------


def parse_rates(text: str) -> list[float]:
    """`--request-rate`: one rate or a comma-separated sweep (req/s); `inf` sends every request at once."""
    rates = []
    for word in (part.strip() for part in text.split(",")):
        try:
            rate = float(word)
        except ValueError:
            raise ValueError(f"{word!r} is not a rate (req/s, or inf)") from None
        if math.isnan(rate) or rate <= 0.0:
            raise ValueError(f"rates must be positive (or inf), got {word!r}")
        if rate in rates:
            raise ValueError(f"{word!r} is listed twice")
        rates.append(rate)
    return rates


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """`--goodput ttft:MS tpot:MS e2el:MS` (any of them, space- or comma-separated): the limits in ms."""
    limits: dict[str, float] = {}
    for item in (part for raw in items for part in raw.replace(",", " ").split()):
        name, colon, value = item.partition(":")
        if not colon or name not in GOODPUT_METRICS:
            raise ValueError(f"{item!r} is not NAME:MS with NAME one of {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a number of milliseconds") from None
        if not (math.isfinite(ms) and ms > 0.0):
            raise ValueError(f"{item!r}: the limit must be a positive number of milliseconds")
        if name in limits:
            raise ValueError(f"{name} is given twice")
        limits[name] = ms
    if not limits:
        raise ValueError(f"give one or more of {', '.join(f'{m}:MS' for m in GOODPUT_METRICS)}")
    return limits


def parse_percentile_metrics(text: str) -> tuple[str, ...]:
    """`--percentile-metrics ttft,tpot,itl,e2el`: the sections the console block prints."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"{text!r}: choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def parse_percentiles(text: str) -> tuple[float, ...]:
    """`--metric-percentiles 50,90,99`: each in (0, 100]."""
    values = []
    for word in (part.strip() for part in text.split(",")):
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"{word!r} is not a percentile") from None
        if not 0.0 < value <= 100.0:
            raise ValueError(f"percentiles lie in (0, 100], got {word!r}")
        values.append(value)
    return tuple(dict.fromkeys(values))


def percentile_word(q: float) -> str:
    """99 → '99', 99.9 → '99.9': how vLLM names a percentile in its keys and lines."""
    return f"{q:g}"


def dataset_trace(name: str) -> Path:
    """The shipped file a --dataset-name stands for (ValueError for an unknown name)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {RANDOM_DATASET}, {', '.join(DATASETS)}")
    return data_file(DATASETS[name])


def arrival_process(burstiness: float) -> tuple[str, float]:
    """vLLM's burstiness as `synthetic_arrivals`' process: Gamma gaps of shape b have a cv of 1/√b; 1 is Poisson."""
    return ("poisson", 1.0) if burstiness == 1.0 else ("gamma", 1.0 / math.sqrt(burstiness))


# --- the requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    """One request to replay: its arrival (seconds after the start), prompt, forced output length and SLOs."""

    arrival: float
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    ttft_slo: float  # seconds
    tpot_slo: float  # seconds

    @property
    def slo(self) -> Slo:
        return Slo(ttft_ms=self.ttft_slo * 1000.0, tpot_ms=self.tpot_slo * 1000.0)

    @property
    def chat_text(self) -> str:
        """The prompt for a chat endpoint: one short word per prompt token."""
        return " ".join(CHAT_WORDS[token % len(CHAT_WORDS)] for token in self.prompt_token_ids)


def bench_requests(load: Sequence[SimRequest]) -> list[BenchRequest]:
    """The simulator's requests with synthetic prompts of their lengths, first arrival at 0."""
    first = min((r.arrival for r in load), default=0.0)
    return [
        BenchRequest(r.arrival - first, synthetic_prompt(i, r.prompt_tokens), r.output_tokens, r.ttft_slo, r.tpot_slo)
        for i, r in enumerate(load)
    ]


def synthetic_prompt(index: int, length: int) -> tuple[int, ...]:
    return ((index % PROMPT_TOKEN_KINDS) + 1,) * length


def fixed_length_load(
    count: int, *, rate: float, input_len: int, output_len: int, ttft_slo: float, tpot_slo: float, seed: int = 0,
    arrival: str = "poisson", cv: float = 1.0,
) -> tuple[SimRequest, ...]:
    """Fixed-length requests (vLLM's `random` dataset) with Poisson, Gamma (`cv`) or, at rate inf, simultaneous arrivals."""
    arrivals = np.zeros(count) if rate == INF else synthetic_arrivals(count, rate=rate, arrival=arrival, cv=cv, seed=seed)
    return tuple(SimRequest(float(t), input_len, output_len, ttft_slo, tpot_slo) for t in arrivals)


@dataclass(frozen=True)
class Load:
    """What is offered at each rate: a setting's trace with its SLO rule, a trace or length table with fixed SLOs, or fixed lengths.

    `count` None: the setting's count, all of a window, or 100 requests.
    """

    setting: Setting | None = None
    trace: Path | None = None  # None with no setting: vLLM's `random` dataset, fixed lengths
    count: int | None = None
    start_s: float | None = None
    duration_s: float | None = None
    arrival: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    input_len: int = 128
    output_len: int = 64
    ttft_slo: float = 1.0  # seconds, for every request when there is no setting
    tpot_slo: float = 0.1
    name: str | None = None  # the --dataset-name it was picked by

    @property
    def windowed(self) -> bool:
        return self.start_s is not None or self.duration_s is not None

    @property
    def trace_file(self) -> Path | None:
        return self.trace or (None if self.setting is None else self.setting.trace)

    def at(self, rate: float | None) -> tuple[SimRequest, ...]:
        """The requests at `rate` req/s (inf: all at once).

        Rate None keeps a timed trace's own pace and sends fixed-length
        requests at once; a length table, which has no pace, needs a rate.
        ValueError (one line) for a trace that cannot be read, or a window
        that holds nothing.
        """
        if self.setting is not None:
            from tropical.experiments import Replay, workload

            setting, trace = self.setting, self.trace or self.setting.trace
            replay = Replay(requests=self.count, start_s=self.start_s, duration_s=self.duration_s, arrival=self.arrival, cv=self.cv)
            return tuple(at_once(lambda at: workload(setting, trace, at, replay=replay, seed=self.seed).requests, rate))
        if self.trace is None:
            if self.windowed:
                raise ValueError("--start-s and --duration-s cut a trace's window: fixed-length requests have none")
            return fixed_length_load(
                self.count or 100, rate=INF if rate is None else rate, input_len=self.input_len, output_len=self.output_len,
                ttft_slo=self.ttft_slo, tpot_slo=self.tpot_slo, seed=self.seed, arrival=self.arrival, cv=self.cv,
            )
        trace, count = self.trace, self.count or (None if self.windowed else 100)

        def rows(at: float | None) -> list[Any]:
            return load_trace(
                trace, rate=at, arrival=self.arrival, cv=self.cv, seed=self.seed, num_requests=count, start_s=self.start_s, duration_s=self.duration_s
            )

        found = at_once(rows, rate)
        if not found:
            raise ValueError(f"no request of {trace} is left to replay in the window asked for")
        return tuple(SimRequest(r.arrival, r.prompt_tokens, r.output_tokens, self.ttft_slo, self.tpot_slo) for r in found)

    def describe(self) -> str:
        if self.trace_file is None:
            return RANDOM_DATASET
        file = self.trace_file.name.removesuffix(".gz")
        label = self.name if self.setting is None else self.setting.name
        return file if label is None else f"{label} ({file})"


def at_once(load: Callable[[float | None], Sequence[Any]], rate: float | None) -> list[Any]:
    """`load(rate)`, where rate inf means every request at 0: a timed trace's own window, a length table drawn at any rate."""
    if rate != INF:
        return list(load(rate))
    try:
        found = load(None)
    except ValueError:  # a length table: it has no times of its own
        found = load(1.0)
    return [replace(r, arrival=0.0) for r in found]


# --- one request, measured --------------------------------------------------------------------


@dataclass(frozen=True)
class ControlHops:
    """What the control plane added to one request (seconds): the time its messages spent between the services.

    `to_router`: published → the router took it off the queue; `to_worker`: the
    router dispatched it → its worker took it; `to_client`: its first token
    left the worker → the client had it. Queueing by the policy and engine time
    are not in it: they are the serving itself, which the simulator also has.
    """

    to_router: float
    to_worker: float
    to_client: float

    @property
    def total(self) -> float:
        return self.to_router + self.to_worker + self.to_client


@dataclass(frozen=True)
class Measured:
    """One request seen from the client: its outcome, how late it was sent, its gaps between content chunks."""

    outcome: RequestOutcome
    send_lag: float
    chunk_gaps: tuple[float, ...] = ()
    error: str | None = None  # the error reply's code (bus), `http_<status>`, `stream_<code>`, `connection_error`, ...
    timed_out: bool = False
    hops: ControlHops | None = None
    tokens_seen: int = 0

    @property
    def cause(self) -> str | None:
        """Why the request failed (None: it finished)."""
        if self.outcome.finished:
            return None
        if self.timed_out:
            return "timeout"
        return self.error or "no_first_token"


@dataclass
class Seen:
    """What the client saw of one stream: when each content chunk came, and what the server told at the end."""

    times: list[float] = field(default_factory=list)  # content chunks' arrivals, on the replay's clock
    listed_tokens: int | None = None  # Σ len(token_ids), where the chunks carry them
    usage_tokens: int | None = None  # the server's `usage.completion_tokens`
    timings: Timings | None = None
    first_emitted: float | None = None  # Unix time the first token left its worker, where the chunk says
    first_received: float | None = None  # Unix time the client had it
    error: str | None = None  # an error the stream itself carried

    def content(self, at: float, token_ids: Sequence[int] | None) -> None:
        if not self.times:
            self.first_received = time.time()
        self.times.append(at)
        if token_ids is not None:
            self.listed_tokens = (self.listed_tokens or 0) + len(token_ids)

    def openai_chunk(self, at: float, data: Mapping[str, Any]) -> None:
        """One streamed chunk of /v1/completions (`text`) or /v1/chat/completions (`delta.content`)."""
        error = data.get("error")
        if error is not None:
            code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
            self.error = "stream_error" if code is None else f"stream_{code}"
            return
        for choice in data.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            token_ids = choice.get("token_ids")
            if text or token_ids:
                self.content(at, token_ids)
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        if isinstance(data.get("timings"), dict):
            try:
                self.timings = msgspec.convert(data["timings"], Timings)
            except msgspec.ValidationError:
                self.timings = None  # milestones this client cannot read are milestones not sent

    @property
    def output_tokens(self) -> int:
        if self.usage_tokens is not None:
            return self.usage_tokens
        return self.listed_tokens if self.listed_tokens is not None else len(self.times)


def measured(
    request_id: str, request: BenchRequest, arrival: float, sent: float, seen: Seen, *, error: str | None = None, timed_out: bool = False
) -> Measured:
    """The outcome of one request from what its stream showed; it finished only if its first token came and nothing failed."""
    error = error or seen.error
    done = error is None and not timed_out and bool(seen.times)
    t = seen.timings
    outcome = RequestOutcome(
        request_id=request_id,
        arrival=arrival,
        first_token=seen.times[0] if seen.times else None,
        finish=seen.times[-1] if done else None,
        output_tokens=seen.output_tokens if done else request.output_tokens,
        ttft_slo=request.ttft_slo,
        tpot_slo=request.tpot_slo,
        dropped=error is not None,
        prompt_tokens=len(request.prompt_token_ids),
        **(_phases(t) if t is not None else {}),
    )
    gaps = tuple(b - a for a, b in zip(seen.times, seen.times[1:]))
    hops = None
    if t is not None and seen.first_received is not None:
        emitted = seen.first_emitted if seen.first_emitted is not None else t.first_token  # the chunk's own stamp, else the milestone
        hops = None if emitted is None else _hops(t, emitted, seen.first_received)
    tokens = seen.output_tokens if seen.times else 0
    return Measured(outcome, sent - arrival, gaps, error=error, timed_out=timed_out, hops=hops, tokens_seen=tokens)


def _hops(t: Timings, first_emitted: float, first_received: float) -> ControlHops | None:
    if t.routed is None or t.dispatched is None or t.taken is None:
        return None
    return ControlHops(t.routed - t.arrival, t.taken - t.dispatched, first_received - first_emitted)


def _phases(t: Timings) -> dict[str, float | None]:
    """Queue, prefill, KV transfer and decode time from a worker's milestones (the simulator's definitions)."""
    decode_start = t.kv_transferred if t.kv_transferred is not None else t.first_token
    return {
        "queue_s": _gap(t.arrival, t.prefill_start),
        "prefill_s": _gap(t.prefill_start, t.first_token),
        "kv_transfer_s": _gap(t.first_token, t.kv_transferred),
        "decode_s": _gap(decode_start, t.finished),
    }


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


class Target(Protocol):
    """Where requests go: `measure` sends one at `arrival` (on the replay's clock `now`) and times its stream."""

    @property
    def backend(self) -> str: ...  # vLLM's word for the API spoken: openai, openai-chat; tropical for the bus

    @property
    def model_id(self) -> str | None: ...

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured: ...


@dataclass
class BusTarget:
    """A deployment's `requests` queue, through a bus client."""

    client: Client
    model_id: str | None = None
    backend: str = "tropical"

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured:
        request_id = f"bench-{self.client.name}-{index}"
        seen = Seen()
        error: str | None = None
        timed_out = False
        sent = now()
        try:
            async with asyncio.timeout(max(0.0, arrival + timeout_s - sent)):
                stream = self.client.generate(
                    list(request.prompt_token_ids), max_tokens=request.output_tokens, sampling=FORCED_LENGTH, slo=request.slo, request_id=request_id
                )
                async for chunk in stream:
                    if not seen.times:
                        seen.first_emitted = chunk.emitted_at
                    seen.content(now(), chunk.token_ids)
        except RequestFailed as failed:
            error = failed.reply.code.value
        except TimeoutError:
            timed_out = True
        finished = self.client.finished.pop(request_id, None)
        seen.timings = None if finished is None else finished.timings
        return measured(request_id, request, arrival, sent, seen, error=error, timed_out=timed_out)


class StreamError(ValueError):
    """An event stream this client cannot read."""


@dataclass
class HttpTarget:
    """An OpenAI-compatible server: streamed /v1/completions (token-id prompts) or /v1/chat/completions (word prompts)."""

    session: aiohttp.ClientSession
    base_url: str
    endpoint: str
    model_id: str
    api_key: str | None = None

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("/chat/completions")

    @property
    def backend(self) -> str:
        return "openai-chat" if self.chat else "openai"  # vLLM's names for these endpoints

    def body(self, request: BenchRequest) -> dict[str, Any]:
        common = {
            "model": self.model_id,
            "max_tokens": request.output_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            return {**common, "messages": [{"role": "user", "content": request.chat_text}]}
        return {**common, "prompt": list(request.prompt_token_ids)}

    def headers(self, request: BenchRequest) -> dict[str, str]:
        slo = request.slo
        headers = {"x-slo-ttft-ms": f"{slo.ttft_ms:g}", "x-slo-tpot-ms": f"{slo.tpot_ms:g}"}
        return headers | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})

    async def measure(self, index: int, request: BenchRequest, arrival: float, now: Callable[[], float], timeout_s: float) -> Measured:
        seen = Seen()
        error: str | None = None
        timed_out = False
        sent = now()
        try:
            async with asyncio.timeout(max(0.0, arrival + timeout_s - sent)):
                async with self.session.post(self.base_url + self.endpoint, json=self.body(request), headers=self.headers(request)) as response:
                    if response.status != 200:
                        error = f"http_{response.status}"
                    else:
                        async for data in sse_events(response.content):
                            seen.openai_chunk(now(), data)
                            if seen.error is not None:
                                break
        except TimeoutError:
            timed_out = True
        except aiohttp.ClientError:
            error = "connection_error"
        except StreamError:
            error = "bad_stream"
        return measured(f"bench-http-{index}", request, arrival, sent, seen, error=error, timed_out=timed_out)


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream's `data:` lines, up to `[DONE]`."""
    try:
        async for raw in content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[len(b"data:"):].strip()
            if payload == b"[DONE]":
                return
            data = json.loads(payload)
            if isinstance(data, dict):
                yield data
    except ValueError as exc:  # not JSON, or a line longer than the reader takes
        raise StreamError(str(exc)) from None


# --- a replay ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchResult:
    """Every request of one replay, in the order given."""

    requests: int
    measured: tuple[Measured, ...]

    @property
    def outcomes(self) -> list[RequestOutcome]:
        return [m.outcome for m in self.measured]


async def replay(
    target: Target | Client,
    requests: Sequence[BenchRequest],
    *,
    start: float,
    timeout_s: float = 300.0,
    max_concurrency: int | None = None,
    on_done: Callable[[Measured], None] | None = None,
) -> BenchResult:
    """Send each request at `start` + its arrival (on the loop's clock), at most `max_concurrency` at a time, and measure every stream.

    A request that gets an error reply or is not done `timeout_s` after its
    arrival fails; the whole replay is bounded by the last arrival plus that
    (once per wave of requests the cap lets through).
    """
    sender: Target = BusTarget(target) if isinstance(target, Client) else target
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    origin = time.perf_counter() - (loop.time() - start)  # `start` on a finer clock: some loops' time() ticks in whole milliseconds

    def now() -> float:
        return time.perf_counter() - origin

    async def one(index: int, request: BenchRequest) -> Measured:
        await asyncio.sleep(max(0.0, request.arrival - now()))
        held = slots is not None and slots.locked()
        async with slots or contextlib.nullcontext():
            result = await sender.measure(index, request, now() if held else request.arrival, now, timeout_s)
        if on_done is not None:
            on_done(result)
        return result

    tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]
    last = max((r.arrival for r in requests), default=0.0)
    waves = math.ceil(len(requests) / max_concurrency) if max_concurrency else 1
    try:
        async with asyncio.timeout_at(start + last + waves * timeout_s + 5.0):
            measured_all = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)  # let cancelled streams close their reply routes
    return BenchResult(len(requests), tuple(measured_all))


async def replay_all(
    target: Target,
    runs: Sequence[Sequence[BenchRequest]],
    *,
    timeout_s: float = 300.0,
    max_concurrency: int | None = None,
    progress: bool = False,
) -> list[BenchResult]:
    """One replay after another on the same target (a sweep), each with its progress bar on stderr when asked."""
    results = []
    for requests in runs:
        with tqdm(total=len(requests), unit="req", disable=not progress) as bar:
            start = asyncio.get_running_loop().time()
            results.append(
                await replay(target, requests, start=start, timeout_s=timeout_s, max_concurrency=max_concurrency, on_done=lambda _: bar.update())
            )
    return results


# --- targets ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_target(deployment: Deployment, *, timeout_s: float = 300.0, model_id: str | None = None) -> AsyncIterator[BusTarget]:
    """Start the deployment, talk to it from a client in this process; drain it afterwards."""
    await deployment.start()
    try:
        async with await deployment.client() as client:
            client.timeout_s = timeout_s  # a request's own deadline bounds its stream; a long queue is no silence to give up on
            yield BusTarget(client, model_id)
    finally:
        await deployment.stop()


@contextlib.asynccontextmanager
async def remote_target(settings: Settings, *, timeout_s: float = 300.0, model_id: str | None = None) -> AsyncIterator[BusTarget]:
    """The running deployment whose `requests` queue the settings' broker holds."""
    bus = await connect_bus(settings)
    try:
        async with Client(bus, settings) as client:
            client.timeout_s = timeout_s
            yield BusTarget(client, model_id)
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def spawned_target(
    settings: Settings, policy: str, roles: Sequence[Role], engine: EngineChoice, *, timeout_s: float = 300.0
) -> AsyncIterator[BusTarget]:
    """Serve with the router and each worker a process of its own (`tropical serve`); drain them afterwards."""
    from tropical.live.spawn import spawned

    async with spawned(settings, policy, roles, engine), remote_target(settings, timeout_s=timeout_s, model_id=engine.source) as target:
        yield target


class ServerUnreachable(RuntimeError):
    """The server at --base-url could not be asked which model it serves."""


@contextlib.asynccontextmanager
async def http_target(
    base_url: str, *, endpoint: str = "/v1/completions", model: str | None = None, api_key: str | None = None
) -> AsyncIterator[HttpTarget]:
    """An HTTP session on the server; the model is the first that GET /v1/models lists unless named."""
    base = base_url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=0)  # no pool cap: requests wait for the server, never for a free connection
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield HttpTarget(session, base, endpoint, model or await served_model(session, base, api_key), api_key)


async def served_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    """The first id of GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with asyncio.timeout(timeout_s), session.get(f"{base_url}/v1/models", headers=headers) as response:
            if response.status != 200:
                raise ServerUnreachable(f"GET {base_url}/v1/models answered {response.status}")
            listed = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ServerUnreachable(f"GET {base_url}/v1/models failed: {exc or type(exc).__name__}") from None
    models = listed.get("data") if isinstance(listed, dict) else None
    if not models or not isinstance(models[0], dict) or not models[0].get("id"):
        raise ServerUnreachable(f"{base_url}/v1/models lists no model; give --model")
    return str(models[0]["id"])


async def bench_embedded(deployment: Deployment, requests: Sequence[BenchRequest], *, timeout_s: float = 300.0) -> BenchResult:
    """Start the deployment, replay onto it from a client in the same process, drain it."""
    async with embedded_target(deployment, timeout_s=timeout_s) as target:
        return (await replay_all(target, [requests], timeout_s=timeout_s))[0]


# --- reports ---------------------------------------------------------------------------------


def bench_report(
    result: BenchResult, *, percentiles: Sequence[float] = DEFAULT_PERCENTILES, goodput: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """vLLM's result keys and per-request lists, then Tropical's: SLO attainment, phases, failures by cause, control-plane hops.

    Latency statistics cover finished requests, as vLLM's cover successful
    ones. Goodput counts the requests that meet `goodput`'s limits (ms, as
    `--goodput` gives them), or, without any, their own SLOs. Whatever was not
    measured (no request finished, a server that sends no milestones) is None.
    """
    summary = summarize(result.outcomes)
    done = [m for m in result.measured if m.outcome.finished]
    values = {
        "ttft": [m.outcome.ttft for m in done],
        "tpot": [m.outcome.tpot for m in done if m.outcome.output_tokens > 1],
        "itl": [gap for m in done for gap in m.chunk_gaps],
        "e2el": [m.outcome.latency for m in done],
    }
    good = sum(_good(m.outcome, goodput) for m in result.measured) if goodput else summary.good
    vllm = summary.as_vllm_json()
    lags = np.array([m.send_lag * 1000.0 for m in result.measured], dtype=float)
    report: dict[str, Any] = {
        "num_prompts": result.requests,
        **{key: vllm[key] for key in ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput")},
        "request_goodput": good / summary.duration if summary.duration > 0 else 0.0,
        "output_throughput": vllm["output_throughput"],
        "total_token_throughput": vllm["total_token_throughput"],
    }
    quantiles = sorted(set(ALWAYS_PERCENTILES) | set(percentiles))
    for metric in METRICS:
        report |= _metric_stats(metric, np.array(values[metric], dtype=float) * 1000.0, quantiles)
    report |= {
        "input_lens": [m.outcome.prompt_tokens for m in result.measured],
        "output_lens": [m.tokens_seen for m in result.measured],
        "ttfts": [m.outcome.ttft if m.outcome.finished else None for m in result.measured],
        "itls": [list(m.chunk_gaps) if m.outcome.finished else [] for m in result.measured],
        "errors": [m.cause or "" for m in result.measured],
        # Tropical's own
        "goodput_slo_ms": dict(goodput) if goodput else None,
        **{key: vllm[key] for key in ("slo_attainment", "ttft_slo_attainment", "tpot_slo_attainment", "dropped", "infeasible")},
        **{key: vllm[key] for key in ("mean_queue_ms", "mean_prefill_ms", "mean_kv_transfer_ms", "mean_decode_ms")},
        "failures": dict(Counter(m.cause for m in result.measured if m.cause is not None)),
        "error_replies": sum(m.error is not None for m in result.measured),
        "error_codes": dict(Counter(m.error for m in result.measured if m.error is not None)),
        "timeouts": sum(m.timed_out for m in result.measured),
        "mean_send_lag_ms": _stat(lags, np.mean),
        "max_send_lag_ms": _stat(lags, np.max),
        **_control_plane(result),
    }
    return nulled(report)


def _good(o: RequestOutcome, limits: Mapping[str, float]) -> bool:
    """Within every limit of `--goodput` (ms); TPOT of a single-token output is 0, as vLLM takes it."""
    if not o.finished:
        return False
    seconds = {"ttft": o.ttft, "tpot": o.tpot, "e2el": o.latency}
    for name, limit in limits.items():
        value = seconds[name]
        if value is None or value * 1000.0 > limit:
            return False
    return True


def _metric_stats(metric: str, ms: np.ndarray, quantiles: Sequence[float]) -> dict[str, float]:
    return {
        f"mean_{metric}_ms": _stat(ms, np.mean),
        f"median_{metric}_ms": _stat(ms, np.median),
        f"std_{metric}_ms": _stat(ms, np.std),
        **{f"p{percentile_word(q)}_{metric}_ms": _stat(ms, lambda a, q=q: np.percentile(a, q)) for q in quantiles},
    }


def _control_plane(result: BenchResult) -> dict[str, Any]:
    """p50 / p99 of each hop and of their sum per request (ms), over the requests whose milestones all arrived."""
    hops = [m.hops for m in result.measured if m.hops is not None]
    report: dict[str, Any] = {"control_plane_requests": len(hops)}
    for name in ("to_router", "to_worker", "to_client", "total"):
        values = np.array([getattr(h, name) * 1000.0 for h in hops], dtype=float)
        report[f"p50_control_{name}_ms"] = _stat(values, np.median)
        report[f"p99_control_{name}_ms"] = _stat(values, lambda a: np.percentile(a, 99))
    return report


def _stat(values: np.ndarray, reduce: Callable[[np.ndarray], Any]) -> float:
    return float(reduce(values)) if len(values) else float("nan")


def nulled(value: Any) -> Any:
    """NaN (nothing measured) as None, in dicts and lists too: JSON has no NaN, and 0 would claim a measurement."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: nulled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [nulled(item) for item in value]
    return value


def simulated_summary(setting: Setting, policy_name: str, roles: Sequence[Role], load: Sequence[SimRequest], *, seed: int = 0) -> Summary:
    """`tropical sim` on the same requests and the live deployment's roles: the reference a live run is held to."""
    from tropical.policies import make_policy

    policy = make_policy(policy_name, setting.latency_model())
    cluster = replace(setting.cluster(policy), roles=tuple(roles))
    return summarize(simulate(load, cluster, policy, seed=seed).outcomes())
