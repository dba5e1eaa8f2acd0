"""The requests a bench replays: what is offered at each rate, and each request with its synthetic prompt.

A `Load` turns a setting, a trace, a length table or fixed lengths into the
simulator's requests at a rate; `bench_requests` gives them prompts and makes
the first arrive at 0, so the same requests can go to the simulator and to a
live system alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tropical.live.bench.dialect import RANDOM_DATASET
from tropical.protocol import Slo
from tropical.simulator import SimRequest
from tropical.traces import load_trace, synthetic_arrivals

if TYPE_CHECKING:
    from tropical.experiments import Setting

PROMPT_TOKEN_KINDS = 250  # request i's prompt repeats token (i % 250) + 1: inside every engine's vocabulary
CHAT_WORDS = ("sun", "sea", "sky", "oak", "elm", "fox", "owl", "bee", "ant", "cow", "hen", "dog", "cat", "yak", "elk", "emu")
INF = math.inf


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
