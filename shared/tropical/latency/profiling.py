"""Profile an engine into a latency model: time exact steps over a grid, then fit.

Every timed step runs one `EnginePlan`, so each sample is a known operating
point rather than whatever a scheduler happened to batch:

- a prefill point: one prompt of L tokens prefilled whole, alone in its step;
- a decode point: B sequences of about C tokens each decoding one token together;
- a mixed point: such a decode batch plus one whole prompt of n tokens.

Prefill and decode samples are fitted with `tropical.latency.fit`; mixed
samples are not fitted but checked against the fitted model's `step_time`,
which says whether adding a chunk's token terms to a decode step holds on
this engine. The time of a step is what the engine reports
(`StepResult.step_time_s`), the same number the live system measures.

Each grid point first runs `warmup` steps whose times are dropped (lazy
initialisation, a CUDA graph captured on a batch size's first step), then
`repeats` timed ones, in rounds over the points so that a burst of other work
spoils one repeat of many points rather than every repeat of one. Decode
points that share a context share their sequences: those are prefilled once
per context, and each batch size decodes the first B of them.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from tropical.latency.fit import DecodeFit, PrefillFit, fit_decode, fit_prefill, latency_model_from_fits
from tropical.latency.model import LatencyModel
from tropical.protocol import LatencyModelSpec, SamplingParams

if TYPE_CHECKING:
    from tropical.engine.plan import EnginePlan
    from tropical.engine.serving import ServingEngine

GREEDY_TO_LENGTH = SamplingParams(temperature=0.0, ignore_eos=True)  # no stop token ends a sequence early
PROMPT_TOKEN_RANGE = 256  # prompt token ids are drawn below this: the byte range every vocabulary covers
REDUCTIONS = ("median", "min", "all")  # how the repeats of a grid point become what is fitted
DEFAULT_MODELS = {"tiny": "tiny-cpu.json"}  # engine preset -> its shipped profile in defaults/


@dataclass(frozen=True)
class EngineLimits:
    """What bounds a grid: the longest sequence, the KV cache and how many sequences one step may decode."""

    max_model_len: int
    kv_capacity_tokens: int
    block_size: int = 1  # KV is allocated in blocks: a sequence holds whole blocks
    max_batch: int | None = None  # the most decodes one step may name, where something caps it

    @classmethod
    def of(cls, engine: ServingEngine) -> EngineLimits:
        """The engine's own limits (a plan is not held to its default planner's batch limit, so neither is the grid)."""
        book = engine.book
        return cls(book.limits.max_model_len, engine.kv_capacity_tokens, book.blocks.block_size)

    def fits(self, lengths: Sequence[int]) -> bool:
        """Whether sequences of these total lengths (prompt + outputs) can be held at once."""
        if not lengths:
            return True
        blocks = sum(-(-n // self.block_size) for n in lengths)
        return max(lengths) <= self.max_model_len and blocks * self.block_size <= self.kv_capacity_tokens


@dataclass(frozen=True, order=True)
class GridPoint:
    """`batch` sequences of `context` tokens decoding together, plus one whole prompt of `prompt` tokens.

    batch = 0 is an isolated prefill, prompt = 0 a pure decode step, both set a mixed step.
    """

    batch: int = 0
    context: int = 0
    prompt: int = 0

    def __post_init__(self) -> None:
        if min(self.batch, self.context, self.prompt) < 0:
            raise ValueError(f"grid point {self} has a negative size")
        if self.batch == 0 and self.prompt == 0:
            raise ValueError("a grid point needs a prompt, a decode batch, or both")
        if self.batch > 0 and self.context < 1:
            raise ValueError(f"decoding sequences need a context of at least 1 token, got {self.context}")

    @property
    def kind(self) -> Literal["prefill", "decode", "mixed"]:
        if self.batch == 0:
            return "prefill"
        return "decode" if self.prompt == 0 else "mixed"


@dataclass(frozen=True)
class ProfileGrid:
    """The operating points to time, with `warmup` dropped and `repeats` timed steps at each."""

    points: tuple[GridPoint, ...]
    warmup: int = 1
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")

    @classmethod
    def cross(
        cls,
        prompts: Iterable[int],
        batches: Iterable[int],
        contexts: Iterable[int],
        mixed: Iterable[tuple[int, int, int]] = (),
        *,
        warmup: int = 1,
        repeats: int = 3,
    ) -> ProfileGrid:
        """Prefills of each prompt length, decodes of every batch size at every context, and (B, C, n) mixed steps."""
        contexts = tuple(contexts)
        points = [GridPoint(prompt=n) for n in prompts]
        points += [GridPoint(batch=b, context=c) for c in contexts for b in batches]
        points += [GridPoint(batch=b, context=c, prompt=n) for b, c, n in mixed]
        return cls(tuple(sorted(set(points))), warmup, repeats)

    @property
    def complete(self) -> bool:
        """Whether it has a prefill and a decode point: the least a model can be fitted to."""
        return bool(self.of_kind("prefill")) and bool(self.of_kind("decode"))

    @property
    def steps_per_point(self) -> int:
        return self.warmup + self.repeats

    def of_kind(self, kind: str) -> tuple[GridPoint, ...]:
        return tuple(p for p in self.points if p.kind == kind)

    def decode_steps(self, context: int) -> int:
        """Decode steps the sequences of one context take over the whole grid."""
        return self.steps_per_point * sum(1 for p in self.points if p.batch and p.context == context)

    def bounded(self, limits: EngineLimits) -> ProfileGrid:
        """The points the engine can run: within its longest sequence, its KV cache and its batch limit."""
        kept = [p for p in self.of_kind("prefill") if limits.fits([p.prompt + 1])]
        for context in sorted({p.context for p in self.points if p.batch}):
            length = context + self.decode_steps(context) + 2
            group = [p for p in self.points if p.batch and p.context == context]
            group = [p for p in group if limits.max_batch is None or p.batch <= limits.max_batch]
            group = [p for p in group if limits.fits([length] * p.batch)]
            width = max((p.batch for p in group), default=0)
            kept += [p for p in group if not p.prompt or limits.fits([length] * width + [p.prompt + 1])]
        return replace(self, points=tuple(sorted(kept)))

    def describe(self) -> dict[str, Any]:
        return {
            "prompt_lengths": [p.prompt for p in self.of_kind("prefill")],
            "batch_sizes": sorted({p.batch for p in self.of_kind("decode")}),
            "contexts": sorted({p.context for p in self.of_kind("decode")}),
            "decode_points": [[p.batch, p.context] for p in self.of_kind("decode")],
            "mixed_points": [[p.batch, p.context, p.prompt] for p in self.of_kind("mixed")],
            "warmup": self.warmup,
            "repeats": self.repeats,
        }


def default_grid(limits: EngineLimits, *, quick: bool = False, repeats: int | None = None) -> ProfileGrid:
    """A grid spanning the engine's range: prompts up to its longest, decodes up to half of it.

    `quick` is a small grid (seconds on a CPU) for a first model; the full one
    covers enough points for a model to publish. Points past the engine's
    limits are dropped by `ProfileGrid.bounded`.
    """
    longest = limits.max_model_len - 1  # a prefill samples one token
    if quick:
        prompts = _geometric(16, min(longest, 1024), 4)
        batches, contexts = (1, 4, 16), _geometric(64, min(limits.max_model_len // 2, 512), 8)
        mixed_batches, chunks = (4,), (64, 256)
    else:
        prompts = _geometric(16, min(longest, 16384), 2)
        batches, contexts = (1, 2, 4, 8, 16, 32), _geometric(64, min(limits.max_model_len // 2, 4096), 4)
        mixed_batches, chunks = (4, 16), (128, 512)
    mixed = [(b, c, n) for b in mixed_batches for c in (contexts[0], contexts[-1]) for n in chunks]
    grid = ProfileGrid.cross(prompts, batches, contexts, mixed, warmup=1, repeats=repeats or (2 if quick else 3))
    return grid.bounded(limits)


def _geometric(low: int, high: int, factor: int) -> tuple[int, ...]:
    """low, low·factor, ... below high, and high itself."""
    if high < low:
        return (high,) if high > 0 else ()
    values = list(itertools.takewhile(lambda v: v < high, (low * factor**i for i in itertools.count())))
    return (*values, high)


@dataclass(frozen=True)
class StepSample:
    """One timed step: `batch` decodes attending over `context_tokens` together, plus a prompt of `prompt_tokens`."""

    point: GridPoint
    batch: int
    context_tokens: int
    prompt_tokens: int
    seconds: float


@dataclass(frozen=True)
class MixedCheck:
    """How well the fitted model predicts steps it was not fitted to (decode batch + a prompt)."""

    rel_std: float  # root mean square of actual/predicted − 1
    max_rel_error: float
    samples: int


@dataclass(frozen=True)
class Profile:
    """A fitted model, its two fits, every timed step, and the grid that was run."""

    model: LatencyModel
    prefill: PrefillFit
    decode: DecodeFit
    mixed: MixedCheck | None
    samples: tuple[StepSample, ...]
    grid: ProfileGrid
    limits: EngineLimits
    reduce: str
    wall_s: float

    def spec(self, *, model: str, hardware: str, tensor_parallel: int = 1, fitted_at: float | None = None) -> LatencyModelSpec:
        """The wire record the profiler publishes."""
        return self.model.to_spec(
            model=model,
            hardware=hardware,
            tensor_parallel=tensor_parallel,
            samples=len(self.samples),
            fitted_at=time.time() if fitted_at is None else fitted_at,
        )

    def report(self) -> dict[str, Any]:
        """Plain data: the grid, the fits' quality, the mixed-step check and every timed step."""
        return {
            "grid": self.grid.describe(),
            "limits": asdict(self.limits),
            "reduce": self.reduce,
            "wall_s": round(self.wall_s, 3),
            "prefill_fit": _fit_report(self.prefill),
            "decode_fit": _fit_report(self.decode),
            "mixed_check": None if self.mixed is None else asdict(self.mixed),
            "samples": [
                {"batch": s.batch, "context_tokens": s.context_tokens, "prompt_tokens": s.prompt_tokens, "seconds": s.seconds}
                for s in self.samples
            ],
        }


def _fit_report(fit: PrefillFit | DecodeFit) -> dict[str, float]:
    coefficients = {k: v for k, v in asdict(fit).items() if k != "quality"}
    return {**coefficients, **asdict(fit.quality)}


Progress = Callable[[int, int, GridPoint], None]  # (points done, points in all, the point just done)


def profile_engine(
    engine: ServingEngine,
    grid: ProfileGrid | None = None,
    *,
    limits: EngineLimits | None = None,
    reduce: str = "median",
    name: str = "",
    progress: Progress | None = None,
    seed: int = 0,
) -> Profile:
    """Time every point of `grid` (default: `default_grid`) on `engine` and fit a latency model.

    The grid is first bounded by the engine's limits. `reduce="median"` fits
    one sample per point, the median of its repeats; `"min"` the fastest
    repeat (other work on the machine only ever adds time, so on a shared
    machine the fastest is closest to the engine alone); `"all"` fits every
    timed step. The engine is left holding no request of the profile, also
    when a step fails.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, not {reduce!r}")
    limits = limits or EngineLimits.of(engine)
    grid = (grid or default_grid(limits)).bounded(limits)
    if not grid.complete:
        raise ValueError(
            f"no prefill or no decode point fits this engine (max_model_len {limits.max_model_len}, "
            f"KV capacity {limits.kv_capacity_tokens} tokens)"
        )
    started = time.perf_counter()
    samples = _Profiler(engine, grid, progress, random.Random(seed)).run()
    wall_s = time.perf_counter() - started
    fitted = samples if reduce == "all" else _reduced(samples, reduce)
    prefill = fit_prefill([(s.prompt_tokens, s.seconds) for s in fitted if s.point.kind == "prefill"])
    decode = fit_decode([(s.batch, s.context_tokens, s.seconds) for s in fitted if s.point.kind == "decode"])
    model = latency_model_from_fits(prefill, decode, name=name)
    mixed = _mixed_check(model, [s for s in fitted if s.point.kind == "mixed"])
    return Profile(model, prefill, decode, mixed, tuple(samples), grid, limits, reduce, wall_s)


def _reduced(samples: Sequence[StepSample], reduce: str) -> list[StepSample]:
    """One sample per grid point, with its own context: the step of median time (the lower of two middles), or the fastest."""
    by_point: dict[GridPoint, list[StepSample]] = {}
    for sample in samples:
        by_point.setdefault(sample.point, []).append(sample)
    ordered = (sorted(group, key=lambda s: s.seconds) for group in by_point.values())
    return [group[0] if reduce == "min" else group[(len(group) - 1) // 2] for group in ordered]


def _mixed_check(model: LatencyModel, samples: Sequence[StepSample]) -> MixedCheck | None:
    if not samples:
        return None
    errors = [s.seconds / model.step_time(s.batch, s.context_tokens, [(0, s.prompt_tokens)]) - 1.0 for s in samples]
    return MixedCheck(
        rel_std=math.sqrt(sum(e * e for e in errors) / len(errors)),
        max_rel_error=max(abs(e) for e in errors),
        samples=len(errors),
    )


@dataclass
class _Profiler:
    """Runs one grid on one engine; owns the request ids and the sequences it started."""

    engine: ServingEngine
    grid: ProfileGrid
    progress: Progress | None
    rng: random.Random
    samples: list[StepSample] = field(default_factory=list)
    lengths: dict[str, int] = field(default_factory=dict)  # tokens (prompt + outputs) of each request it holds
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _done: int = 0

    def run(self) -> list[StepSample]:
        try:
            self._rounds(self.grid.of_kind("prefill"), self._prefill_step)
            for context in sorted({p.context for p in self.grid.points if p.batch}):
                self._context_group(context, [p for p in self.grid.points if p.batch and p.context == context])
        finally:
            for request_id in list(self.lengths):
                self._finish(request_id)
        return self.samples

    def _rounds(self, points: Sequence[GridPoint], step: Callable[[GridPoint, bool], None]) -> None:
        """Each round steps every point once, so a burst of other work spoils one repeat of many points, not all of one."""
        rounds = list(self._timed_steps())
        for number, timed in enumerate(rounds, 1):
            for point in points:
                step(point, timed)
                if number == len(rounds):
                    self._advance(point)

    def _prefill_step(self, point: GridPoint, timed: bool) -> None:
        request_id = self._start(point.prompt, 1)
        seconds = self._step(_plan(chunks=((request_id, point.prompt),)))
        self._finish(request_id)
        if timed:
            self.samples.append(StepSample(point, 0, 0, point.prompt, seconds))

    def _context_group(self, context: int, points: list[GridPoint]) -> None:
        """Prefill the widest batch of sequences once; every point at this context decodes the first B of them."""
        max_tokens = self.grid.decode_steps(context) + 2  # the prefill samples one, and none may finish early
        sequences = [self._start(context, max_tokens) for _ in range(max(p.batch for p in points))]
        for request_id in sequences:
            self._step(_plan(chunks=((request_id, context),)))
            self.lengths[request_id] += 1
        self._rounds(points, lambda point, timed: self._decode_step(point, sequences[: point.batch], timed))
        for request_id in sequences:
            self._finish(request_id)

    def _decode_step(self, point: GridPoint, sequences: list[str], timed: bool) -> None:
        context_tokens = sum(self.lengths[r] for r in sequences)  # what the step attends over, new tokens included
        chunks: tuple[tuple[str, int], ...] = ()
        if point.prompt:
            chunks = ((self._start(point.prompt, 1), point.prompt),)
        seconds = self._step(_plan(decode=tuple(sequences), chunks=chunks))
        for request_id, _ in chunks:
            self._finish(request_id)
        for request_id in sequences:
            self.lengths[request_id] += 1
        if timed:
            self.samples.append(StepSample(point, point.batch, context_tokens, point.prompt, seconds))

    def _timed_steps(self) -> Iterator[bool]:
        """False for each warm-up step, then True for each timed one."""
        return itertools.chain(itertools.repeat(False, self.grid.warmup), itertools.repeat(True, self.grid.repeats))

    def _start(self, prompt_tokens: int, max_tokens: int) -> str:
        request_id = f"profile-{next(self._ids)}"
        prompt = [self.rng.randrange(PROMPT_TOKEN_RANGE) for _ in range(prompt_tokens)]
        self.engine.add_request(request_id, prompt, GREEDY_TO_LENGTH, max_tokens)
        self.lengths[request_id] = prompt_tokens
        return request_id

    def _finish(self, request_id: str) -> None:
        """Drop a request and its KV; one that has finished is already gone, which is fine."""
        self.engine.abort(request_id)
        del self.lengths[request_id]

    def _step(self, plan: EnginePlan) -> float:
        seconds = self.engine.step(plan).step_time_s
        if not (math.isfinite(seconds) and seconds > 0.0):
            raise ValueError(f"the engine reported a step time of {seconds} s for {plan}")
        return seconds

    def _advance(self, point: GridPoint) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(self._done, len(self.grid.points), point)


def _plan(decode: tuple[str, ...] = (), chunks: tuple[tuple[str, int], ...] = ()) -> EnginePlan:
    from tropical.engine.plan import EnginePlan  # the engine package loads torch: only profiling needs it

    return EnginePlan(decode=decode, chunks=chunks)


# --- profile files: the wire spec plus the report, as written by `tropical profile --json` ---------


def hardware_name(device: Any) -> str:
    """`cpu`, or the GPU's name in lower case with dashes (`nvidia-h200`): the hardware part of a model's key."""
    if device.type != "cuda":
        return "cpu"
    import torch

    return "-".join(torch.cuda.get_device_name(device).lower().split())


def profile_record(spec: LatencyModelSpec, report: dict[str, Any]) -> dict[str, Any]:
    """What a profile file holds: the model as the profiler publishes it, and how it was measured."""
    return {"spec": msgspec.to_builtins(spec), "report": report}


def read_profile_spec(path: str | Path) -> LatencyModelSpec:
    """The `LatencyModelSpec` of a profile file, validated as the wire validates it."""
    try:
        record = json.loads(Path(path).read_text())
        return msgspec.convert(record["spec"], LatencyModelSpec)
    except (KeyError, TypeError, json.JSONDecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{path} is not a profile file: {exc}") from None


def default_latency_spec(engine: str = "tiny") -> LatencyModelSpec:
    """The shipped profile of an engine preset (see defaults/README.md for where it was measured)."""
    if engine not in DEFAULT_MODELS:
        raise ValueError(f"no shipped latency model for engine {engine!r}; shipped: {', '.join(DEFAULT_MODELS)}")
    with resources.as_file(resources.files("tropical.latency") / "defaults" / DEFAULT_MODELS[engine]) as path:
        return read_profile_spec(path)


def default_latency_model(engine: str = "tiny") -> LatencyModel:
    """A model of the engine preset, so every policy can be built before any profiling has run."""
    return LatencyModel.from_spec(default_latency_spec(engine))
