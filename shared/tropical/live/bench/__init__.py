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

The package reads in its import order: `dialect` (the flag values), `load`
(the requests), `measure` (one request as the client saw it), `targets` (the
bus and HTTP), `replays` (a replay and a sweep) and `report` (the numbers).
"""

from tropical.live.bench.dialect import (
    ALWAYS_PERCENTILES,
    DATASETS,
    DEFAULT_PERCENTILES,
    GOODPUT_METRICS,
    METRIC_TITLES,
    METRICS,
    RANDOM_DATASET,
    arrival_process,
    dataset_trace,
    parse_goodput,
    parse_percentile_metrics,
    parse_percentiles,
    parse_rates,
    percentile_word,
)
from tropical.live.bench.load import (
    CHAT_WORDS,
    INF,
    PROMPT_TOKEN_KINDS,
    BenchRequest,
    Load,
    at_once,
    bench_requests,
    fixed_length_load,
    synthetic_prompt,
)
from tropical.live.bench.measure import ControlHops, Measured, Seen, measured
from tropical.live.bench.replays import BenchResult, bench_embedded, replay, replay_all
from tropical.live.bench.report import bench_report, nulled, simulated_summary
from tropical.live.bench.targets import (
    FORCED_LENGTH,
    BusTarget,
    HttpTarget,
    ServerUnreachable,
    StreamError,
    Target,
    embedded_target,
    http_target,
    remote_target,
    served_model,
    spawned_target,
    sse_events,
)

__all__ = [
    "ALWAYS_PERCENTILES",
    "CHAT_WORDS",
    "DATASETS",
    "DEFAULT_PERCENTILES",
    "FORCED_LENGTH",
    "GOODPUT_METRICS",
    "INF",
    "METRICS",
    "METRIC_TITLES",
    "PROMPT_TOKEN_KINDS",
    "RANDOM_DATASET",
    "BenchRequest",
    "BenchResult",
    "BusTarget",
    "ControlHops",
    "HttpTarget",
    "Load",
    "Measured",
    "Seen",
    "ServerUnreachable",
    "StreamError",
    "Target",
    "arrival_process",
    "at_once",
    "bench_embedded",
    "bench_report",
    "bench_requests",
    "dataset_trace",
    "embedded_target",
    "fixed_length_load",
    "http_target",
    "measured",
    "nulled",
    "parse_goodput",
    "parse_percentile_metrics",
    "parse_percentiles",
    "parse_rates",
    "percentile_word",
    "remote_target",
    "replay",
    "replay_all",
    "served_model",
    "simulated_summary",
    "spawned_target",
    "sse_events",
    "synthetic_prompt",
]
