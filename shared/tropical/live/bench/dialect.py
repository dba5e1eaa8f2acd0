"""The flag values of `vllm bench serve`'s dialect: request rates, goodput limits, percentiles, dataset names.

They are parsed here, apart from the run, so the command line can turn a bad
value into one line of error before anything starts, and the report names its
metrics and percentiles the way vLLM's do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tropical.data import data_file

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
