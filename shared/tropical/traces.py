"""Workload traces: when requests arrive and how many tokens they carry.

A file's format is recognised by its columns, never by its name, so a renamed
or re-exported trace still loads, and a file with unexpected columns fails
loudly instead of being half-understood. Four shapes are known:

- Azure LLM inference trace: CSV `TIMESTAMP, ContextTokens, GeneratedTokens`
  with datetime stamps;
- Mooncake: JSON lines `timestamp` (ms), `input_length`, `output_length`,
  `hash_ids`;
- DistServe-style CSV `arrival_s, prompt_len, output_len`;
- length tables `num_prefill_tokens, num_decode_tokens` without times, which
  get synthetic Poisson or Gamma arrivals at a given rate.

A file may be gzip compressed (`azure.csv.gz`, `mooncake.jsonl.gz`): it is
recognised by its first bytes and decompressed in memory, then read by its
columns like any other. A relative path that names no file here may name a
data file (`traces/azure_conv_2023.csv`): one shipped with the package, or in
`TROPICAL_DATA_DIR` when that is set; it is read from there, compressed or not.

Every request must have at least one prompt token and one output token: the
prefill itself produces the first token, so a zero-token output cannot be
replayed faithfully, and we refuse the file rather than guess what it meant.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tropical.data import data_file

GZIP_MAGIC = b"\x1f\x8b"
MOONCAKE_BUCKET_S = 3.0  # the Mooncake conversation trace stamps arrivals in 3-second buckets
MOONCAKE_GRID_TOLERANCE_S = 0.01  # its bucket stamps sit within 3 ms of multiples of 3 s; a stamp farther off is a real time

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
DISTSERVE_COLUMNS = ("arrival_s", "prompt_len", "output_len")
LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


class TraceError(ValueError):
    """A trace file that cannot be read as a workload; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the start of the (windowed, rescaled) trace
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class _Rows:
    arrivals: np.ndarray | None  # seconds from the trace's first request, or None for length tables
    prompts: np.ndarray
    outputs: np.ndarray


def load_trace(
    path: str | Path,
    *,
    rate: float | None = None,
    arrival: str = "poisson",
    cv: float = 1.0,
    seed: int = 0,
    num_requests: int | None = None,
    start_s: float | None = None,
    duration_s: float | None = None,
) -> list[TraceRequest]:
    """Read a trace and shape it into the workload to replay.

    Timed traces: keep requests arriving in [start_s, start_s + duration_s)
    (seconds from the trace's first request), then the first `num_requests`
    of those, re-based so the first kept request arrives at 0; `rate` then
    scales every gap by one factor so the mean gap becomes 1/rate: the
    burst structure is kept, only compressed or stretched.

    Length tables: arrivals are drawn for the rows in file order, with
    exponential gaps (`arrival="poisson"`) or Gamma gaps of coefficient of
    variation `cv` (`arrival="gamma"`), mean 1/rate, seeded by `seed`, first
    request at 0; then the window and count cuts apply as above. `arrival`,
    `cv` and `seed` matter only here: a timed trace keeps its own arrival process.
    """
    path = locate_trace(path)
    _check_options(rate, arrival, cv, num_requests, start_s, duration_s)
    rows = _read(path)
    arrivals = rows.arrivals
    if arrivals is None:
        if rate is None:
            raise TraceError(path, "a length table has no arrival times: give a rate to draw them at")
        arrivals = synthetic_arrivals(len(rows.prompts), rate=rate, arrival=arrival, cv=cv, seed=seed)
        rate = None  # already drawn at the requested rate
    elif arrival != "poisson" or cv != 1.0:
        raise TraceError(path, "has its own arrival times: an arrival process (Gamma, cv) applies to length tables only")
    order = np.argsort(arrivals, kind="stable")
    arrivals, prompts, outputs = arrivals[order], rows.prompts[order], rows.outputs[order]

    keep = np.ones(len(arrivals), dtype=bool)
    if start_s is not None:
        keep &= arrivals >= start_s
    if duration_s is not None:
        keep &= arrivals < (start_s or 0.0) + duration_s
    arrivals, prompts, outputs = arrivals[keep], prompts[keep], outputs[keep]
    if num_requests is not None:
        arrivals, prompts, outputs = arrivals[:num_requests], prompts[:num_requests], outputs[:num_requests]
    if len(arrivals) == 0:
        return []
    arrivals = arrivals - arrivals[0]
    if rate is not None and len(arrivals) > 1 and arrivals[-1] > 0.0:
        mean_gap = arrivals[-1] / (len(arrivals) - 1)
        arrivals = arrivals * (1.0 / rate) / mean_gap
    return [
        TraceRequest(arrival=float(a), prompt_tokens=int(p), output_tokens=int(o))
        for a, p, o in zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), strict=True)
    ]


def locate_trace(path: str | Path) -> Path:
    """The file `load_trace` reads for `path`: the path itself, its `.gz` twin, or a data file of that name.

    A path that exists is read as given; otherwise its compressed twin
    (`path` + '.gz') beside it; otherwise, for a relative path, the data file
    of that name (`tropical.data.data_file`: shipped, or in `TROPICAL_DATA_DIR`),
    so `--trace traces/azure_conv_2023.csv` works from any directory. A path
    found nowhere is returned unchanged, for the error to name.
    """
    given = Path(path)
    beside = data_file(given.name, given.parent)
    if beside.exists() or given.is_absolute():
        return beside
    named = data_file(given)
    return named if named.exists() else given


def synthetic_arrivals(count: int, *, rate: float, arrival: str = "poisson", cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """`count` arrival times with mean gap 1/rate, the first at 0.

    Gamma gaps with shape 1/cv² and scale cv²/rate have mean 1/rate and
    coefficient of variation cv; cv = 1 is the Poisson process, larger is burstier.
    """
    if count == 0:
        return np.zeros(0)
    generator = np.random.default_rng(seed)
    if arrival == "poisson":
        gaps = generator.exponential(1.0 / rate, size=count - 1)
    elif arrival == "gamma":
        shape = 1.0 / (cv * cv)
        gaps = generator.gamma(shape, 1.0 / (rate * shape), size=count - 1)
    else:
        raise ValueError(f"arrival must be 'poisson' or 'gamma', got {arrival!r}")
    return np.concatenate([[0.0], np.cumsum(gaps)])


def describe(requests: Sequence[TraceRequest]) -> dict[str, float]:
    """Count, span, mean rate and length percentiles: what a trace looks like at a glance."""
    if not requests:
        return {"count": 0, "duration_s": 0.0, "rate": 0.0}
    arrivals = np.array([r.arrival for r in requests], dtype=float)
    duration = float(arrivals.max() - arrivals.min())
    summary: dict[str, float] = {
        "count": len(requests),
        "duration_s": duration,
        "rate": (len(requests) - 1) / duration if duration > 0.0 else 0.0,
    }
    for name, values in (
        ("prompt", [r.prompt_tokens for r in requests]),
        ("output", [r.output_tokens for r in requests]),
    ):
        array = np.array(values, dtype=float)
        summary[f"{name}_mean"] = float(array.mean())
        for q in (50, 90, 99):
            summary[f"{name}_p{q}"] = float(np.percentile(array, q))
        summary[f"{name}_max"] = float(array.max())
    return summary


# --- reading -------------------------------------------------------------------------------


def _check_options(
    rate: float | None,
    arrival: str,
    cv: float,
    num_requests: int | None,
    start_s: float | None,
    duration_s: float | None,
) -> None:
    if rate is not None and not (math.isfinite(rate) and rate > 0.0):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if arrival not in ("poisson", "gamma"):
        raise ValueError(f"arrival must be 'poisson' or 'gamma', got {arrival!r}")
    if not (math.isfinite(cv) and cv > 0.0):
        raise ValueError(f"cv must be positive, got {cv}")
    if arrival == "poisson" and cv != 1.0:
        raise ValueError(f"cv {cv} needs Gamma arrivals: Poisson gaps have a cv of 1")
    if num_requests is not None and num_requests < 0:
        raise ValueError(f"num_requests must be non-negative, got {num_requests}")
    if start_s is not None and start_s < 0.0:
        raise ValueError(f"start_s must be non-negative, got {start_s}")
    if duration_s is not None and duration_s <= 0.0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")


def _read(path: Path) -> _Rows:
    try:
        text = _decompressed(path, path.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise TraceError(path, "no such file") from None
    except IsADirectoryError:
        raise TraceError(path, "is a directory, not a trace file") from None
    except UnicodeDecodeError:
        raise TraceError(path, "not a UTF-8 text file") from None
    stripped = text.lstrip()
    if not stripped:
        raise TraceError(path, "empty file")
    rows = _read_jsonl(path, text) if stripped.startswith("{") else _read_csv(path, text)
    if len(rows.prompts) == 0:
        raise TraceError(path, "no requests after the header")
    return rows


def _decompressed(path: Path, content: bytes) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic number, whatever the file is called."""
    if not content.startswith(GZIP_MAGIC):
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError, zlib.error):
        raise TraceError(path, "starts like a gzip file but cannot be decompressed") from None


def _read_csv(path: Path, text: str) -> _Rows:
    reader = csv.reader(text.splitlines())
    header = [name.strip() for name in next(reader)]
    column = {name: index for index, name in enumerate(header)}
    parse_time: Callable[[str], float]
    if all(name in column for name in AZURE_COLUMNS):
        time_col, prompt_col, output_col = (column[name] for name in AZURE_COLUMNS)
        parse_time = _datetime_seconds
    elif all(name in column for name in DISTSERVE_COLUMNS):
        time_col, prompt_col, output_col = (column[name] for name in DISTSERVE_COLUMNS)
        parse_time = float
    elif all(name in column for name in LENGTH_COLUMNS):
        time_col, (prompt_col, output_col) = None, (column[name] for name in LENGTH_COLUMNS)
        parse_time = float
    else:
        raise TraceError(path, f"unrecognised columns {header}; {_KNOWN_FORMATS}")

    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise TraceError(path, f"line {line} has {len(row)} fields, the header has {len(header)}")
        if time_col is not None:
            times.append(_time(path, line, row[time_col], parse_time))
        prompts.append(_length(path, line, header[prompt_col], row[prompt_col]))
        outputs.append(_length(path, line, header[output_col], row[output_col]))
    arrivals = None
    if time_col is not None:
        arrivals = np.array(times, dtype=float)
        if len(arrivals):
            arrivals -= arrivals.min()
    return _Rows(arrivals, np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64))


def _read_jsonl(path: Path, text: str) -> _Rows:
    stamps: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    for line, record in _json_lines(path, text):
        missing = [key for key in MOONCAKE_KEYS if key not in record]
        if missing:
            raise TraceError(path, f"line {line} lacks {missing}; {_KNOWN_FORMATS}")
        stamps.append(_time(path, line, record["timestamp"], float))
        prompts.append(_length(path, line, "input_length", record["input_length"]))
        outputs.append(_length(path, line, "output_length", record["output_length"]))
    seconds = np.array(stamps, dtype=float) / 1000.0
    on_grid = np.abs(seconds - MOONCAKE_BUCKET_S * np.round(seconds / MOONCAKE_BUCKET_S)) <= MOONCAKE_GRID_TOLERANCE_S  # bucket starts
    if len(seconds):
        seconds -= seconds.min()
    return _Rows(_spread_buckets(seconds, on_grid), np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64))


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise TraceError(path, f"line {line} is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise TraceError(path, f"line {line} is not a JSON object")
        yield line, record


def _spread_buckets(seconds: np.ndarray, on_grid: np.ndarray) -> np.ndarray:
    """Spread the k requests stamped t on the bucket grid evenly over [t, t + bucket): t + i·bucket/k.

    Mooncake quantises arrivals to 3-second buckets; replaying them as
    simultaneous bursts would invent a burstiness the service never saw. Even
    spacing is deterministic, so runs are repeatable without a seed. A stamp
    off that grid (`on_grid` False: a trace in the same format with real
    times) is a real arrival time and is kept.
    """
    if not on_grid.any():
        return seconds
    spread = seconds.copy()
    spread[on_grid] = _spread_all(seconds[on_grid])
    return spread


def _spread_all(seconds: np.ndarray) -> np.ndarray:
    order = np.argsort(seconds, kind="stable")
    ordered = seconds[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(ordered)])
    rank = np.arange(len(ordered)) - np.repeat(starts, sizes)
    spread = np.empty_like(seconds)
    spread[order] = ordered + rank * MOONCAKE_BUCKET_S / np.repeat(sizes, sizes)
    return spread


def _datetime_seconds(value: str) -> float:
    """Seconds since the epoch; stamps without a zone are read as UTC, never as the host's local time."""
    stamp = datetime.fromisoformat(value.strip())
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _time(path: Path, line: int, value: Any, parse: Callable[[Any], float]) -> float:
    try:
        seconds = parse(value)
    except (TypeError, ValueError):
        raise TraceError(path, f"line {line}: cannot read arrival time {value!r}") from None
    if not math.isfinite(seconds):
        raise TraceError(path, f"line {line}: arrival time {value!r} is not finite")
    return seconds


def _length(path: Path, line: int, name: str, value: Any) -> int:
    """A token count: a positive integer, also when written as '512.0'."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TraceError(path, f"line {line}: {name} {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number):
        raise TraceError(path, f"line {line}: {name} {value!r} is not a whole number of tokens")
    if number < 1:
        raise TraceError(path, f"line {line}: {name} is {value!r}; every request needs at least one prompt and one output token")
    return int(number)


_KNOWN_FORMATS = (
    "expected one of: Azure (TIMESTAMP, ContextTokens, GeneratedTokens), "
    "DistServe (arrival_s, prompt_len, output_len), "
    "length table (num_prefill_tokens, num_decode_tokens), "
    "or Mooncake JSON lines (timestamp, input_length, output_length)"
)
