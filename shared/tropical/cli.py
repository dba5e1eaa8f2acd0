"""The `tropical` command: one entry point for services, benchmarks and tools."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import os
import platform
import sys
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from tropical.latency.profiling import hardware_name
from tropical.policies.admission_rule import AdmissionRule
from tropical.settings import MEMORY_URL, Settings

if TYPE_CHECKING:
    from tropical.engine import Engine
    from tropical.experiments import Replay, Setting
    from tropical.policies.records import Role
    from tropical.simulator import SimRequest
    from tropical.simulator.usage import WorkerUsage

T = TypeVar("T")

app = typer.Typer(
    help="Tropical: SLO-aware LLM serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # plain tracebacks: no local variables (URLs with passwords) printed
)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed: it is the faster loop for a bus-bound service. A broker that cannot be
    reached or refuses the login ends the command with one line and exit 2."""
    from tropical.bus import BrokerUnavailable

    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(main)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    except BrokerUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.callback()
def main(
    ctx: typer.Context,
    broker_url: Annotated[str | None, typer.Option(help="AMQP URL, or memory:// (env TROPICAL_BROKER_URL)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL, or memory:// (env TROPICAL_REDIS_URL)")] = None,
    namespace: Annotated[str | None, typer.Option(help="prefix of queue and key names (env TROPICAL_NAMESPACE)")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ... (env TROPICAL_LOG_LEVEL)")] = None,
    metrics_port: Annotated[int | None, typer.Option(min=0, max=65535, help="serve Prometheus /metrics on this port (env TROPICAL_METRICS_PORT)")] = None,
) -> None:
    """Settings come from TROPICAL_* variables (or files named after them in /run/secrets); these flags override them."""
    try:
        settings = Settings().with_overrides(
            broker_url=broker_url, redis_url=redis_url, namespace=namespace, log_level=log_level, metrics_port=metrics_port
        )
    except ValidationError as exc:
        typer.echo(f"error: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = settings


@app.command("settings")
def show_settings(ctx: typer.Context) -> None:
    """Print the effective settings (passwords masked) as JSON."""
    typer.echo(json.dumps(ctx.obj.redacted(), indent=2))


@app.command("bench-bus")
def bench_bus(
    ctx: typer.Context,
    messages: Annotated[int, typer.Option(min=1, help="round trips per run")] = 2000,
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes; 1 means unbatched")] = "1,32",
    memory_only: Annotated[bool, typer.Option(help="skip RabbitMQ")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write the results here")] = None,
) -> None:
    """Measure bus round trips per second, in memory and on RabbitMQ, with and without batching."""
    from tropical.bus import Bus, MemoryBroker
    from tropical.bus.benchmark import measure_round_trips

    settings: Settings = ctx.obj
    sizes = _counts(batches, "--batches", "batch sizes")
    rabbit = None if memory_only or settings.broker_url.startswith(MEMORY_URL) else settings.broker_url

    async def measure() -> list[dict[str, Any]]:
        memory = MemoryBroker()

        async def memory_bus() -> Bus:
            return memory.connect()

        async def rabbit_bus() -> Bus:
            from tropical.bus.rabbitmq import RabbitBus

            return await RabbitBus.connect(rabbit or "")

        targets = [("memory", memory_bus)] + ([("rabbitmq", rabbit_bus)] if rabbit else [])
        results = []
        for name, connect in targets:
            for size in sizes:
                result = await measure_round_trips(name, connect, messages=messages, batch=size)
                typer.echo(
                    f"{name:>9} batch {size:>4}: {result.round_trips_per_s:>10.1f} round trips/s"
                    f"  p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms"
                )
                results.append(result.as_dict())
        return results

    results = run_async(measure())
    if json_path:
        record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(), "results": results}
        _write_json(json_path, record)


@app.command("bench-engine")
def bench_engine(
    num_requests: Annotated[int, typer.Option(min=1, help="requests served by each side")] = 64,
    seed: Annotated[int, typer.Option(help="fixes prompts, lengths and weights")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="running sequences (ours) and static batch size (HF)")] = 32,
    max_num_batched_tokens: Annotated[int, typer.Option(min=16, help="tokens per engine step")] = 512,
    repeats: Annotated[int, typer.Option(min=1, help="turns each side takes; the fastest counts")] = 2,
    no_hf: Annotated[bool, typer.Option("--no-hf", help="time the engine only")] = False,
    device: Annotated[str, typer.Option(help="cpu, or cuda: step times against the memory roofline")] = "cpu",
    steps: Annotated[bool, typer.Option("--steps", help="step times against the roofline on any device (always with cuda)")] = False,
    shape: Annotated[str, typer.Option(help="model shape for --steps, random weights: llama3-8b or tiny")] = "llama3-8b",
    batches: Annotated[str, typer.Option(help="decode batch sizes for --steps")] = "1,8,32,64",
    context: Annotated[int, typer.Option(min=1, help="context of every decoding sequence for --steps")] = 1024,
    prefill: Annotated[int, typer.Option(min=1, help="prompt tokens of the timed prefill for --steps")] = 8192,
    timed_steps: Annotated[int, typer.Option("--timed-steps", min=1, help="decode steps timed per batch size (median)")] = 20,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write the report here")] = None,
) -> None:
    """Tokens per second of the engine (continuous batching) against Hugging Face `generate` on the same requests.

    With `--device cuda` (or `--steps`): decode step times at each batch size and one long prefill, against the
    weights+KV memory roofline and Hugging Face's own on the same device, in one run.
    """
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"cpu or cuda, not {device!r}", param_hint="--device")
    if device == "cuda" or steps:
        _bench_steps(device, shape, _counts(batches, "--batches", "batch sizes"), context, prefill, timed_steps, not no_hf, json_path)
        return
    from tropical.engine.bench import run_engine_benchmark

    report = run_engine_benchmark(
        num_requests,
        seed,
        batch_size=batch_size,
        max_num_batched_tokens=max_num_batched_tokens,
        with_hf=not no_hf,
        repeats=repeats,
    )
    typer.echo(f"ours: {report['ours_tok_s']:.1f} tok/s")
    if "hf_tok_s" in report:
        typer.echo(f"hf:   {report['hf_tok_s']:.1f} tok/s\nspeedup: {report['speedup']:.2f}x")
    if json_path:
        _write_json(json_path, report)


def _bench_steps(device: str, shape: str, batches: list[int], context: int, prefill: int, timed_steps: int, with_hf: bool,
                 json_path: Path | None) -> None:
    import torch

    from tropical.engine.bench_steps import SHAPES, run_step_benchmark

    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is available here", param_hint="--device")
    if shape not in SHAPES:
        raise typer.BadParameter(f"one of {', '.join(SHAPES)}, not {shape!r}", param_hint="--shape")
    report = run_step_benchmark(shape, device, batches=batches, context=context, prefill=prefill, steps=timed_steps, with_hf=with_hf)
    where = report["device"]["name"]
    typer.echo(f"{shape} on {where}: roofline at {report['bandwidth']['used'] / 1e12:.2f} TB/s ({report['bandwidth']['source']}),"
               f" attention {report['attention']}, decode graphs {'on' if report['decode_graphs'] else 'off'}")
    for row in report["decode"]:
        line = f"decode batch {row['batch']:>3} context {row['context']}: roofline {row['roofline_ms']:7.2f} ms, ours {row['ours_ms']:7.2f} ms ({row['ours_of_roofline']:.0%})"
        if "ours_eager_ms" in row:
            line += f", ours eager {row['ours_eager_ms']:7.2f} ms ({row['ours_eager_of_roofline']:.0%})"
        if "hf_ms" in row:
            line += f", hf {row['hf_ms']:7.2f} ms ({row['hf_of_roofline']:.0%})"
        typer.echo(line)
    long = report["prefill"]
    line = f"prefill {long['tokens']} tokens: ours {long['ours_ms']:.1f} ms ({long['ours_tflops']:.1f} TFLOP/s)"
    if "hf_ms" in long:
        line += f", hf {long['hf_ms']:.1f} ms ({long['hf_tflops']:.1f} TFLOP/s): ours/hf {long['ours_over_hf']:.2f}"
    typer.echo(line)
    if json_path:
        _write_json(json_path, report)


@app.command("bench-kv")
def bench_kv(
    transport: Annotated[str, typer.Option(help="host (shared memory) or cuda_ipc (one GPU, two processes)")] = "cuda_ipc",
    tokens: Annotated[str, typer.Option(help="comma-separated KV sizes, in tokens of Llama-3-8B's geometry (128 KiB each in bf16)")] = "1024,8192",
    repeats: Annotated[int, typer.Option(min=1, help="fetches per size after a first, uncounted one")] = 3,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write the report here")] = None,
) -> None:
    """Bandwidth of a KV handoff to another process through a services' transport, against a copy within one process."""
    import torch

    from tropical.kv.bench import run_kv_benchmark

    if transport not in ("host", "cuda_ipc"):
        raise typer.BadParameter(f"host or cuda_ipc, not {transport!r}", param_hint="--transport")
    if transport == "cuda_ipc" and not torch.cuda.is_available():
        raise typer.BadParameter("cuda_ipc needs a CUDA device, and none is available here", param_hint="--transport")
    report = run_kv_benchmark(transport, _counts(tokens, "--tokens", "token counts"), repeats)
    for row in report["sizes"]:
        typer.echo(f"{report['transport']} {row['tokens']:>6} tokens ({row['nbytes'] / 2**20:.0f} MiB): fetch {row['fetch_bytes_per_s'] / 1e9:7.1f} GB/s,"
                   f" local copy {row['copy_bytes_per_s'] / 1e9:7.1f} GB/s ({row['fetch_over_copy']:.0%})")
    if json_path:
        _write_json(json_path, report)


@app.command("bench-router")
def bench_router(
    policies: Annotated[str, typer.Option(help="comma-separated policy names")] = "vllm,sarathi,distserve,tropical,kairos,unified",
    workers: Annotated[str, typer.Option(help="comma-separated cluster sizes")] = "8,64,256",
    queue: Annotated[int, typer.Option(min=1, help="requests waiting at the router in every timed state")] = 1000,
    decisions: Annotated[int, typer.Option(min=1, help="timed decisions per policy and size")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the simulated runs the states come from")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write the report here")] = None,
) -> None:
    """Time router decisions on loaded clusters: on a 1,000-prompt burst, and per event (an arrival, a status change) in steady state."""
    from tropical.core.bench_router import RouterTiming, run_router_benchmark

    names = _policy_names(policies)
    sizes = _cluster_sizes(workers, names)

    def progress(t: RouterTiming) -> None:
        decision, views, beat = t.times["decision"], t.times["views"], t.times["heartbeat"]
        arrival, status = t.times["arrival"], t.times["status_change"]
        typer.echo(
            f"{t.policy:>10} {t.workers:>4} workers: burst decision p50 {decision.p50_ms:8.3f} ms  p99 {decision.p99_ms:8.3f} ms"
            f"  | arrival p50 {arrival.p50_ms:6.3f} p99 {arrival.p99_ms:6.3f} ms, status change p50 {status.p50_ms:6.3f} p99 {status.p99_ms:6.3f} ms"
            f" ({t.backlog:.0f} queued at the router, {t.held:.0f} on workers)"
            f"  | views p50 {views.p50_ms:6.3f} ms  p99 {views.p99_ms:6.3f} ms, one heartbeat p99 {beat.p99_ms:6.3f} ms"
            f"  | placed {t.placed:.0f}, refused {t.dropped:.0f} of {t.queued}; {t.busy_workers:.0f} busy workers"
        )

    load = os.getloadavg()
    report = run_router_benchmark(names, sizes, decisions=decisions, queue_size=queue, seed=seed, progress=progress)
    for key, what in (("profile", "burst decision"), ("event_profile", "event")):
        worst = report[key]
        typer.echo(f"slowest {what}: {worst['policy']} on {worst['workers']} workers; most time of its own (cProfile, ms per decision):")
        for row in worst["hot"]:
            typer.echo(f"  {row['own_ms_per_decision']:9.3f}  {row['function']}  ({row['calls_per_decision']:g} calls)")
    if json_path:
        busy = {"load_average_before": [round(x, 2) for x in load], "load_average_after": [round(x, 2) for x in os.getloadavg()]}
        record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(), **busy, "decisions": decisions, **report}
        _write_json(json_path, record)


@app.command("bench-scale")
def bench_scale(
    policies: Annotated[str, typer.Option(help="comma-separated policy names")] = "vllm,sarathi,distserve,tropical,kairos,unified",
    workers: Annotated[str, typer.Option(help="comma-separated cluster sizes")] = "8,32,128,512",
    per_worker_rps: Annotated[float, typer.Option(min=1e-6, help="offered load per worker (req/s)")] = 1.75,
    requests_per_worker: Annotated[int, typer.Option(min=1, help="requests replayed per worker")] = 125,
    arrival: Annotated[str, typer.Option(help="poisson: the trace's lengths at Poisson arrivals, the same load at every size; trace: its own times, rescaled")] = "poisson",
    seed: Annotated[int, typer.Option(help="seed of the replayed requests")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write the figures here")] = None,
) -> None:
    """Simulate each policy on `chat-13b` grown at constant load per worker: attainment must not fall, cost per request stay flat."""
    from tropical.simulator.bench_scale import ARRIVALS, ScalePoint, attainment_drops, scale_benchmark

    names = _policy_names(policies)
    sizes = _cluster_sizes(workers, names)
    if arrival not in ARRIVALS:
        raise typer.BadParameter(f"one of {', '.join(ARRIVALS)}, not {arrival!r}", param_hint="--arrival")

    def progress(p: ScalePoint) -> None:
        split = "" if p.prefill_workers is None else f" ({p.prefill_workers} prefill)"
        typer.echo(
            f"{p.policy:>10} {p.workers:>4} workers{split:<14} {p.requests:>6} requests: attainment {p.attainment:.4f}"
            f" (TTFT {p.ttft_attainment:.4f}, TPOT {p.tpot_attainment:.4f})  {p.wall_s:7.2f} s, {p.us_per_request:6.0f} µs a request"
        )

    points = scale_benchmark(names, sizes, per_worker_rps=per_worker_rps, requests_per_worker=requests_per_worker, arrival=arrival, seed=seed,
                             progress=progress)
    drops = attainment_drops(points)
    for name, small, large, drop in drops:
        typer.echo(f"{name}: attainment falls by {drop:.4f} from {small} to {large} workers")
    if not drops:
        typer.echo("no policy loses attainment as its cluster grows")
    if json_path:
        record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(), "per_worker_rps": per_worker_rps,
                  "requests_per_worker": requests_per_worker, "arrival": arrival, "seed": seed, "points": [p.as_json() for p in points],
                  "attainment_drops": [{"policy": n, "from": a, "to": b, "drop": d} for n, a, b, d in drops]}
        _write_json(json_path, record)


def _counts(text: str, flag: str, what: str) -> list[int]:
    """A flag's comma-separated whole numbers, each at least 1."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"not a list of whole numbers: {text!r}", param_hint=flag) from None
    if any(count < 1 for count in counts):
        raise typer.BadParameter(f"{what} must be at least 1", param_hint=flag)
    return counts


def _cluster_sizes(workers: str, policies: Sequence[str]) -> list[int]:
    """`--workers` of the benchmarks: comma-separated whole numbers, each a size every policy can split (its best
    8-worker split scaled, as `tropical.core.bench_router.cluster_roles` gives it)."""
    from tropical.core.bench_router import cluster_roles

    sizes = _counts(workers, "--workers", "cluster sizes")
    for name in policies:
        for size in sizes:
            try:
                cluster_roles(name, size)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--workers") from None
    return sizes


@app.command("profile")
def profile(
    engine_source: Annotated[str, typer.Option("--engine", help="tiny, smollm2, or a local model directory / .gguf file")] = "tiny",
    quick: Annotated[bool, typer.Option(help="a small grid that takes seconds on a CPU")] = False,
    repeats: Annotated[int | None, typer.Option(min=1, help="timed steps per grid point (default: 3; 2 with --quick)")] = None,
    max_len: Annotated[int | None, typer.Option(min=1, help="profile sequences up to this many tokens (default: the engine's limit)")] = None,
    reduce: Annotated[str, typer.Option(help="fit each point's median, its fastest step (min: for a shared machine), or all steps")] = "median",
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: CUDA when available)")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="write the model (a LatencyModelSpec) and a report here")] = None,
) -> None:
    """Time prefills, decode steps and mixed steps of an engine and fit its latency model."""
    from dataclasses import replace

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tropical.engine.bench import _cpu_stall_seconds
    from tropical.latency.profiling import REDUCTIONS, EngineLimits, GridPoint, default_grid, profile_engine, profile_record

    if reduce not in REDUCTIONS:
        raise typer.BadParameter(f"one of {', '.join(REDUCTIONS)}, not {reduce!r}", param_hint="--reduce")
    engine = _profiled_engine(engine_source, device)
    limits = EngineLimits.of(engine)
    limits = replace(limits, max_model_len=min(limits.max_model_len, max_len or limits.max_model_len))
    grid = default_grid(limits, quick=quick, repeats=repeats)
    if not grid.complete:
        raise typer.BadParameter(f"no prefill or no decode step fits in {limits.max_model_len} tokens", param_hint="--max-len")
    load, stalled = os.getloadavg(), _cpu_stall_seconds()
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("profiling", total=len(grid.points))

        def progress(done: int, total: int, point: GridPoint) -> None:
            bar.update(task, completed=done, total=total, description=f"{point.kind} B={point.batch} C={point.context} L={point.prompt}")

        found = profile_engine(engine, grid, limits=limits, reduce=reduce, progress=progress)
    name = "tiny" if engine_source == "tiny" else Path(engine_source).name
    spec = found.spec(model=name, hardware=hardware_name(engine.runner.device))
    model, mixed = found.model, found.mixed
    typer.echo(
        f"{spec.key}: {len(grid.points)} grid points, {len(found.samples)} timed steps in {found.wall_s:.1f} s\n"
        f"prefill  c0 {model.c0:.4g} s/tok²  c1 {model.c1:.4g} s/tok  c2 {model.c2:.4g} s  (residual {model.prefill_std:.1%})\n"
        f"decode   d0 {model.d0:.4g} s  d1 {model.d1:.4g} s/seq  d2 {model.d2:.4g} s/tok  (residual {model.decode_std:.1%})"
        + ("" if mixed is None else f"\nmixed    predicted within {mixed.rel_std:.1%} rms, {mixed.max_rel_error:.1%} at worst")
    )
    if json_path:
        busy = {"load_average_before": [round(x, 2) for x in load], "cpu_stalled": (_cpu_stall_seconds() - stalled) / found.wall_s}
        machine = {**_profile_machine(engine.runner.device), **busy}
        report = {**found.report(), "machine": machine, "date": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_json(json_path, profile_record(spec, report))


def _profiled_engine(source: str, device: str | None) -> Engine:
    """The engine to profile; an unknown device or a directory that holds no model is bad input."""
    import torch

    from tropical.engine import Engine, EngineConfig

    if source not in ("tiny", "smollm2") and not Path(source).exists():
        raise typer.BadParameter(f"not tiny, smollm2, a model directory nor a .gguf file: {source!r}", param_hint="--engine")
    try:
        kind = None if device is None else torch.device(device).type
        if kind not in (None, "cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"device {device!r} is not cpu or an available cuda device")
        return Engine.load(source, EngineConfig(device=device))
    except (OSError, ValueError, RuntimeError) as exc:
        raise typer.BadParameter(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None


def _profile_machine(device: Any) -> dict[str, Any]:
    """What the times were measured on; `cpu_stalled` (added by the caller) says how busy it was."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "summary": _machine(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "device": hardware_name(device),
        "torch": torch.__version__,
    }


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, {platform.platform(terse=True)}"


# --- simulation ------------------------------------------------------------------------------

SettingOption = Annotated[str, typer.Option("--setting", help="preset: longbench-70b, long-66b or chat-13b")]
TraceOption = Annotated[Path | None, typer.Option("--trace", help="trace or length table (default: the setting's)")]
def _positive(value: float | None) -> float | None:
    """An SLO or a scale: a positive finite number (None: the setting's own)."""
    if value is not None and not (math.isfinite(value) and value > 0.0):
        raise typer.BadParameter(f"must be a positive number, got {value:g}")
    return value


TtftMsOption = Annotated[float | None, typer.Option("--ttft-slo-ms", callback=_positive, help="fixed TTFT SLO for every request (ms)")]
TtftScaleOption = Annotated[
    float | None, typer.Option("--ttft-slo-scale", callback=_positive, help="TTFT SLO as a multiple of the request's isolated prefill time")
]
TpotMsOption = Annotated[float | None, typer.Option("--tpot-slo-ms", callback=_positive, help="TPOT SLO (ms)")]
AdmissionOption = Annotated[
    AdmissionRule,
    typer.Option("--admission", help="own: each policy's own refusals; none: nobody refuses or abandons; hopeless: every policy by one shared rule"),
]


OptionsOption = Annotated[
    list[str] | None,
    typer.Option("--option", help="KEY=VALUE, repeatable: a policy option, e.g. router.rule=infaas (the colocated baselines' INFaaS placement)"),
]
TuneOption = Annotated[bool, typer.Option("--tune/--no-tune", help="search each baseline's faithful tunings and keep the best / run its default")]


def _policy_options(policies: Sequence[str], setting: Setting, given: list[str] | None) -> dict[str, Any]:
    """`--option KEY=VALUE`s, typed as the field each names, checked against every named policy."""
    from tropical.policies import make_policy
    from tropical.policies.serving import option_from_text

    options: dict[str, Any] = {}
    for item in given or []:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise typer.BadParameter(f"give KEY=VALUE, got {item!r}", param_hint="--option")
        values = []
        for name in policies:
            try:
                values.append(option_from_text(make_policy(name, setting.latency_model()), key.strip(), text))
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--option") from None
        options[key.strip()] = values[0]
    return options


def _json_file(path: Path | None) -> Path | None:
    """Where `--json` writes: not a folder (checked before the run, not after it). A missing folder is made then."""
    if path is None:
        return None
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file's path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise typer.BadParameter(f"{parent} is a file, not a folder to write {path.name} into")
    return path


def _replayed(trace: Path, requests: Sequence[SimRequest], rate: float | None) -> str:
    """What a simulation replayed: the trace, how many of its requests, and at what rate."""
    span = requests[-1].arrival - requests[0].arrival if len(requests) > 1 else 0.0
    pace = f"at {rate:g} req/s" if rate is not None else "at the trace's own times" + (f" ({(len(requests) - 1) / span:.3g} req/s)" if span > 0 else "")
    return f"{trace.name}: {len(requests)} requests {pace}"


def _write_json(path: Path, content: Any) -> None:
    """A command's `--json`, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def _write_json_lines(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """One JSON object per line, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _policy_names(policies: str) -> list[str]:
    """The comma-separated policy names of `--policies`: at least one, each known, none twice."""
    from tropical.policies import POLICY_NAMES

    names = [name.strip() for name in policies.split(",") if name.strip()]
    unknown = [name for name in names if name not in POLICY_NAMES]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if not names or unknown or repeated:
        given = f"unknown policy {', '.join(unknown)!r}" if unknown else f"{', '.join(repeated)} given twice" if repeated else "no policy given"
        raise typer.BadParameter(f"{given}; known: {', '.join(POLICY_NAMES)}", param_hint="--policies")
    return names


class ArrivalProcess(enum.StrEnum):
    """`load_trace`'s arrival processes for length tables (named here so the CLI starts without numpy)."""

    POISSON = "poisson"
    GAMMA = "gamma"


NumRequestsOption = Annotated[
    int | None,
    typer.Option("--num-requests", "--requests", min=1, help="replay the first N requests (default: the setting's count, or all in the window)"),
]
StartOption = Annotated[float | None, typer.Option("--start-s", min=0.0, help="replay requests from this many seconds after the trace's first")]
DurationOption = Annotated[float | None, typer.Option("--duration-s", help="replay only requests arriving within this many seconds")]
ArrivalOption = Annotated[ArrivalProcess, typer.Option(help="length tables: the arrival process drawn at the rate")]
CvOption = Annotated[float | None, typer.Option(help="coefficient of variation of Gamma arrival gaps (burstiness; Poisson is 1)")]


def _replay(requests: int | None, start_s: float | None, duration_s: float | None, arrival: ArrivalProcess, cv: float | None) -> Replay:
    from tropical.experiments import Replay

    if duration_s is not None and duration_s <= 0.0:
        raise typer.BadParameter(f"--duration-s must be positive, got {duration_s:g}")
    if cv is not None and arrival is ArrivalProcess.POISSON:
        raise typer.BadParameter("--cv needs --arrival gamma: Poisson gaps have a cv of 1")
    return Replay(requests=requests, start_s=start_s, duration_s=duration_s, arrival=arrival.value, cv=1.0 if cv is None else cv)


def _setting(name: str, ttft_ms: float | None, ttft_scale: float | None, tpot_ms: float | None) -> Setting:
    from tropical.experiments import setting_named

    try:
        return setting_named(name, ttft_slo_ms=ttft_ms, ttft_slo_scale=ttft_scale, tpot_slo_ms=tpot_ms)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


# --- live serving -------------------------------------------------------------------------------

serve_app = typer.Typer(help="Run one service against the deployment's broker and store; SIGTERM or Ctrl-C drains it.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")

# The services' choices may come from the environment too, so a compose file sets them as variables.
PolicyName = Annotated[str, typer.Option("--policy", envvar="TROPICAL_POLICY", help="vllm, sarathi, distserve, tropical, kairos or unified")]
EngineName = Annotated[str, typer.Option("--engine", envvar="TROPICAL_ENGINE", help="tiny, smollm2, emulated, or a model directory / .gguf file")]
EmulatedSetting = Annotated[str, typer.Option("--setting", envvar="TROPICAL_SETTING", help="the cluster whose timing and KV an emulated engine has")]
MaxModelLen = Annotated[int | None, typer.Option("--max-model-len", min=1, help="longest prompt + output a request may ask for")]
EnforceEager = Annotated[
    bool, typer.Option("--enforce-eager", envvar="TROPICAL_ENFORCE_EAGER", help="on a GPU, run decode steps eagerly instead of as CUDA graphs")
]


def _engine_choice(engine: str, setting: str, max_model_len: int | None, enforce_eager: bool = False) -> Any:
    from tropical.live.engines import EngineChoice

    choice = EngineChoice(engine, setting=setting, max_model_len=max_model_len, enforce_eager=enforce_eager)
    try:
        choice.check()
        from tropical.experiments import setting_named

        setting_named(setting)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return choice


def _policy_checked(name: str) -> str:
    from tropical.policies import POLICY_NAMES

    if name not in POLICY_NAMES:
        raise typer.BadParameter(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}", param_hint="--policy")
    return name


@serve_app.command("router")
def serve_router(
    ctx: typer.Context,
    policy: PolicyName = "unified",
    engine: EngineName = "tiny",
    setting: EmulatedSetting = "chat-13b",
    max_model_len: MaxModelLen = None,
) -> None:
    """Place requests from the `requests` queue on the workers, by the policy."""
    from tropical.live.run import serve_router as run

    run_async(run(ctx.obj, _policy_checked(policy), _engine_choice(engine, setting, max_model_len)))


def _worker_command(role_name: str, summary: str) -> None:
    def command(
        ctx: typer.Context,
        policy: PolicyName = "unified",
        engine: EngineName = "tiny",
        setting: EmulatedSetting = "chat-13b",
        name: Annotated[str | None, typer.Option(help="this worker's id (default: role, host and a random suffix)")] = None,
        max_model_len: MaxModelLen = None,
        enforce_eager: EnforceEager = False,
        kv_transport: Annotated[
            str,
            typer.Option(
                envvar="TROPICAL_KV_TRANSPORT",
                help="how KV moves between workers: host (shared memory, one host), redis, cuda_ipc, or nccl "
                "(a process group: MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE as torchrun sets them; gloo without a GPU)"
            ),
        ] = "host",
    ) -> None:
        from tropical.kv.nccl import GroupAddress
        from tropical.live.run import serve_worker
        from tropical.policies.records import Role
        from tropical.protocol import KvTransport

        if kv_transport not in {t.value for t in KvTransport}:
            raise typer.BadParameter(f"{kv_transport!r} is not host, redis, cuda_ipc or nccl", param_hint="--kv-transport")
        group = None
        if kv_transport == KvTransport.NCCL:
            try:
                group = GroupAddress.from_env(os.environ)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--kv-transport") from None
        choice = _engine_choice(engine, setting, max_model_len, enforce_eager)
        run_async(serve_worker(ctx.obj, Role(role_name), _policy_checked(policy), choice, name, KvTransport(kv_transport), group))

    command.__doc__ = summary
    serve_app.command(role_name)(command)


_worker_command("prefill", "A prefill worker: prompts only; their KV goes to a decoding worker.")
_worker_command("decode", "A decode worker: decodes handed over by prefill workers.")
_worker_command("multiplex", "A multiplexing worker: decodes, plus the prompts the router places here.")
_worker_command("colocated", "A colocated worker: every request's prompt and decode.")


@serve_app.command("profiler")
def serve_profiler(
    ctx: typer.Context,
    engine_source: Annotated[
        str, typer.Option("--engine", envvar="TROPICAL_ENGINE", help="tiny, smollm2, or a local model directory / .gguf file")
    ] = "tiny",
    quick: Annotated[bool, typer.Option(envvar="TROPICAL_PROFILER_QUICK", help="a small grid that takes seconds on a CPU")] = False,
    once: Annotated[bool, typer.Option(help="return once the model is published (default: stay up; SIGHUP profiles again)")] = False,
    device: Annotated[str | None, typer.Option(envvar="TROPICAL_DEVICE", help="cpu or cuda[:N] (default: CUDA when available)")] = None,
) -> None:
    """Profile this machine's engine and publish its latency model to the store, where routers and workers pick it up."""
    from redis.exceptions import RedisError

    from tropical.live.engines import EMULATED
    from tropical.live.profiler_service import serve_profiler as run
    from tropical.store import StoreError

    if engine_source == EMULATED:
        typer.echo("an emulated engine's timing is its setting's latency model: nothing to profile", err=True)
        return
    engine = _profiled_engine(engine_source, device)
    name = "tiny" if engine_source == "tiny" else Path(engine_source).name
    try:
        spec = run_async(run(ctx.obj, engine, model=name, hardware=hardware_name(engine.runner.device), quick=quick, once=once))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (StoreError, RedisError, OSError) as exc:
        typer.echo(f"error: the store at {ctx.obj.redacted()['redis_url']}: {exc}", err=True)
        raise typer.Exit(1) from None
    if spec is not None:
        typer.echo(f"published {spec.key} (fitted at {spec.fitted_at:.0f}, {spec.samples} timed steps)")


GatewayHost = Annotated[str, typer.Option("--host", envvar="TROPICAL_GATEWAY_HOST", help="address the gateway listens on (beyond localhost it needs an API key)")]
ApiKeys = Annotated[list[str] | None, typer.Option("--api-key", help="a key clients send as `Authorization: Bearer KEY` (repeat for more; also TROPICAL_API_KEYS)")]


@serve_app.command("gateway")
def serve_gateway(
    ctx: typer.Context,
    host: GatewayHost = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, envvar="TROPICAL_GATEWAY_PORT", help="HTTP port")] = 8000,
    engine: EngineName = "tiny",
    setting: EmulatedSetting = "chat-13b",
    model_name: Annotated[str | None, typer.Option(envvar="TROPICAL_MODEL_NAME", help="the model id clients name (default: the --engine word)")] = None,
    api_key: ApiKeys = None,
    request_timeout_s: Annotated[float, typer.Option(min=1e-3, envvar="TROPICAL_REQUEST_TIMEOUT_S", help="a request with no answer this long gets a 504")] = 300.0,
    max_model_len: MaxModelLen = None,
) -> None:
    """OpenAI's HTTP API (completions, chat completions, models, health, metrics) in front of the `requests` queue."""
    from tropical.gateway.server import check_binding
    from tropical.gateway.server import serve_gateway as run

    settings: Settings = ctx.obj
    choice = _engine_choice(engine, setting, max_model_len)
    keys = frozenset(api_key or ())
    try:
        check_binding(host, keys | settings.api_key_set())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    run_async(run(settings, model_name=model_name or _model_id(engine), tokenizer=choice.tokenizer(), host=host, port=port,
                  api_keys=keys, request_timeout_s=request_timeout_s, max_model_len=max_model_len))


def _model_id(engine: str) -> str:
    """The model id a gateway names by default: the engine word, or a model directory's / file's name."""
    return Path(engine).name if Path(engine).exists() else engine


@app.command("up")
def up(
    ctx: typer.Context,
    policy: PolicyName = "unified",
    workers: Annotated[int, typer.Option(min=1, help="workers in this process")] = 2,
    engine: EngineName = "tiny",
    setting: EmulatedSetting = "chat-13b",
    prompt: Annotated[str | None, typer.Option(help="send this prompt (as a chat message where the model has a template), print the answer, stop")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    max_model_len: MaxModelLen = None,
    enforce_eager: EnforceEager = False,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="also serve OpenAI's HTTP API on this port (the gateway); --prompt then goes through it")] = None,
    host: GatewayHost = "127.0.0.1",
    api_key: ApiKeys = None,
) -> None:
    """A whole deployment in one process: router and workers (in-memory bus and store unless URLs are given), and the gateway with --port."""
    from tropical.gateway.server import check_binding

    settings: Settings = ctx.obj
    if not os.environ.get("TROPICAL_BROKER_URL") and ctx.parent is not None and ctx.parent.params.get("broker_url") is None:
        settings = settings.with_overrides(broker_url=MEMORY_URL, redis_url=MEMORY_URL)
    choice = _engine_choice(engine, setting, max_model_len, enforce_eager)
    _policy_checked(policy)
    keys = frozenset(api_key or ()) | settings.api_key_set()
    if port is not None:
        try:
            check_binding(host, keys)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    front = None if port is None else _Front(host, port, keys, _model_id(engine))
    run_async(_up(settings, policy, workers, choice, prompt, max_tokens, front))


@dataclass(frozen=True)
class _Front:
    """Where `tropical up` serves the gateway, and for which model id."""

    host: str
    port: int
    api_keys: frozenset[str]
    model: str


async def _up(settings: Settings, policy: str, workers: int, choice: Any, prompt: str | None, max_tokens: int, front: _Front | None) -> None:
    from tropical.live.run import deployment, until_signalled

    served = deployment(settings, policy, workers, choice)
    try:
        await served.start()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        if front is not None:
            await _up_gateway(served, front, prompt, max_tokens, workers)
            return
        if prompt is None:
            typer.echo(f"serving {policy} on {workers} worker(s); publish requests to {settings.queue('requests')}; Ctrl-C stops", err=True)
            stopped = await until_signalled(_noop)
            await stopped.wait()
            return
        tokenizer = served.tokenizer
        request: str | list[int] = prompt
        if tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
            request = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        async with await served.client() as client:
            tokens: list[int] = []
            async for chunk in client.generate(request, max_tokens=max_tokens):
                tokens.extend(chunk.token_ids)
            typer.echo(tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens)))
    finally:
        await served.stop()


async def _up_gateway(served: Any, front: _Front, prompt: str | None, max_tokens: int, workers: int) -> None:
    """Serve the gateway on the deployment; with a prompt, ask it over HTTP as any client would, print the answer, stop."""
    from tropical.gateway.client import chat_once
    from tropical.gateway.server import Gateway, running_gateway
    from tropical.live.run import until_signalled

    bus, store = await served.connections()
    gateway = Gateway(bus, store, served.settings, model_name=front.model, tokenizer=served.tokenizer, telemetry=served.telemetry,
                      api_keys=front.api_keys)
    async with running_gateway(gateway, front.host, front.port) as url:
        if prompt is not None:
            key = next(iter(front.api_keys), None)
            typer.echo(await chat_once(url, front.model, prompt, max_tokens=max_tokens, api_key=key))
            return
        typer.echo(f"serving {served.policy} on {workers} worker(s): OpenAI API at {url}/v1 (model {front.model!r}); Ctrl-C stops", err=True)
        stopped = await until_signalled(_noop)
        await stopped.wait()


async def _noop() -> None:
    return None


@app.command("sim")
def sim(
    setting_name: SettingOption,
    policy: Annotated[str, typer.Option(help="vllm, sarathi, distserve, tropical, kairos or unified")],
    rate: Annotated[float | None, typer.Option(min=1e-9, help="cluster arrival rate (req/s); default: a timed trace's own")] = None,
    trace: TraceOption = None,
    requests: NumRequestsOption = None,
    start_s: StartOption = None,
    duration_s: DurationOption = None,
    arrival: ArrivalOption = ArrivalProcess.POISSON,
    cv: CvOption = None,
    prefill_workers: Annotated[
        int | None,
        typer.Option(help="dedicated prefill workers of a disaggregated policy (default: half; `goodput` finds the best)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="arrival and noise seed")] = 0,
    noise: Annotated[bool, typer.Option(help="perturb step times by the latency model's residual spread")] = False,
    ttft_slo_ms: TtftMsOption = None,
    ttft_slo_scale: TtftScaleOption = None,
    tpot_slo_ms: TpotMsOption = None,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write the summary here")] = None,
    admission: AdmissionOption = AdmissionRule.OWN,
    option: OptionsOption = None,
    requests_out: Annotated[
        Path | None, typer.Option("--requests-out", callback=_json_file, help="also write one JSON line per request here (FILE.jsonl)")
    ] = None,
    cluster_file: Annotated[
        Path | None, typer.Option("--cluster", help="a deployment file (TOML: worker groups with role, count, TP, profile, KV) instead of the setting's workers")
    ] = None,
) -> None:
    """Simulate one policy at one rate and print a `vllm bench serve`-style summary."""
    import time
    from collections import Counter

    from tropical.experiments import options_as_json, run_policy, tuned, workload
    from tropical.metrics import request_record, summarize
    from tropical.policies import make_policy
    from tropical.simulator.deployment import DeploymentError, load_deployment
    from tropical.simulator.usage import usage_by_role, worker_usage

    setting = _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
    options = _policy_options([_policy_checked(policy)], setting, option)
    served = make_policy(policy, setting.latency_model(), **tuned(setting, policy, options))
    if prefill_workers is not None and not served.disaggregated:
        raise typer.BadParameter(f"{policy} runs prompts and decodes on every worker: it has no prefill workers", param_hint="--prefill-workers")
    deployment = None
    if cluster_file is not None:
        if prefill_workers is not None:
            raise typer.BadParameter("a deployment file sets the prefill workers itself", param_hint="--prefill-workers")
        try:
            deployment = load_deployment(cluster_file)
            served.check_roles(deployment.roles)
        except (DeploymentError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--cluster") from None
    trace = trace or setting.trace
    replay = _replay(requests, start_s, duration_s, arrival, cv)
    started = time.perf_counter()
    try:
        load = workload(setting, trace, rate, replay=replay, seed=seed, model=None if deployment is None else deployment.model)
        result = run_policy(
            setting, policy, load, prefill_workers=prefill_workers, seed=seed, noise=noise, admission=admission, options=options, record_steps=True,
            cluster=deployment,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    wall = time.perf_counter() - started
    layout = served.roles(setting.workers, prefill_workers) if deployment is None else deployment.roles
    roles = Counter(role.value for role in layout)
    workers = " + ".join(f"{count} {role}" for role, count in roles.items())
    if deployment is not None:
        pipelined = any(group.pipeline_parallel > 1 for group in deployment.groups)
        workers += f" on {deployment.gpus} GPUs" + (" (one worker per pipeline stage)" if pipelined else "")
    summary = summarize(result.outcomes())
    window = (load.requests[0].arrival, load.requests[-1].arrival)
    usage = worker_usage(result.step_log, layout, *window) if window[1] > window[0] else ()
    pooled = usage_by_role(usage)
    record = {
        "setting": setting.name,
        "trace": str(trace),
        "policy": policy,
        "rate": rate,
        "prefill_workers": prefill_workers,
        "cluster_file": None if cluster_file is None else str(cluster_file),
        "admission": admission.value,
        "options": options_as_json(options),
        "workers": dict(roles),
        "gpus": None if deployment is None else deployment.gpus,
        "slo": setting.slo.describe(),
        "replay": replay.describe(setting),
        "simulated_requests": len(load.requests),
        "wall_seconds": round(wall, 3),
        "refused_requests": result.refused,
        "abandoned_requests": result.abandoned,
        **summary.as_vllm_json(),
        "usage_window_s": list(window),
        "worker_usage": [u.as_json() for u in usage],
    }
    lines = [
        f"{' Simulated Serving Result ':=^60}",
        f"{'Setting:':<40}{setting.name} ({setting.slo.describe()})",
        f"{'Replayed:':<40}{_replayed(trace, load.requests, rate)}",
        f"{'Policy:':<40}{policy}" + ("" if admission is AdmissionRule.OWN else f" (admission: {admission.value})"),
        f"{'Workers:':<40}{workers}",
        f"{'Successful requests:':<40}{summary.finished}",
        f"{'Infeasible requests (counted as misses):':<40}{summary.infeasible}",
        f"{'Refused / abandoned (counted as misses):':<40}{result.refused} / {result.abandoned}",
        f"{'Benchmark duration (s):':<40}{summary.duration:.2f}",
        f"{'Request throughput (req/s):':<40}{summary.request_throughput:.3f}",
        f"{'Request goodput (req/s):':<40}{summary.goodput:.3f}",
        f"{'SLO attainment (both / TTFT / TPOT):':<40}{summary.attainment:.3f} / {summary.ttft_attainment:.3f} / {summary.tpot_attainment:.3f}",
        f"{'Mean / P90 / P99 TTFT (ms):':<40}{summary.mean_ttft_ms:.1f} / {summary.p90_ttft_ms:.1f} / {summary.p99_ttft_ms:.1f}",
        f"{'Mean / P90 / P99 TPOT (ms):':<40}{summary.mean_tpot_ms:.1f} / {summary.p90_tpot_ms:.1f} / {summary.p99_tpot_ms:.1f}",
        *_usage_lines(pooled),
        f"{'Simulated in (s):':<40}{wall:.2f}",
        "=" * 60,
    ]
    typer.echo("\n".join(lines))
    if json_path:
        _write_json(json_path, record)
    if requests_out:
        _write_json_lines(requests_out, [request_record(o) for o in result.outcomes()])


def _usage_lines(pooled: Mapping[Role, WorkerUsage]) -> list[str]:
    """Per role, while requests arrive: the mean worker's busy share, and the decode tokens made per second and per step."""
    if not pooled:
        return []
    busy = ", ".join(f"{role.value} {u.busy:.3f}" for role, u in pooled.items())
    decoding = ", ".join(f"{role.value} {u.decode_tokens_per_s:.0f} / {u.mean_decode_batch:.1f}" for role, u in pooled.items() if u.decode_steps)
    lines = [f"{'Busy share while arriving (per worker):':<40}{busy}"]
    if decoding:
        lines.append(f"{'Decode tok/s / mean batch (same span):':<40}{decoding}")
    return lines


@app.command("goodput")
def goodput(
    setting_name: SettingOption,
    policies: Annotated[str, typer.Option(help="comma-separated policy names")] = "vllm,sarathi,distserve,tropical,kairos,unified",
    trace: TraceOption = None,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="write the results here")] = None,
    requests: NumRequestsOption = None,
    start_s: StartOption = None,
    duration_s: DurationOption = None,
    arrival: ArrivalOption = ArrivalProcess.POISSON,
    cv: CvOption = None,
    rel_tolerance: Annotated[float, typer.Option(min=1e-6, help="bisection stops when the bracket is this fraction of the rate")] = 0.02,
    seed: Annotated[int, typer.Option(help="arrival and noise seed")] = 0,
    noise: Annotated[bool, typer.Option(help="perturb step times by the latency model's residual spread")] = False,
    ttft_slo_ms: TtftMsOption = None,
    ttft_slo_scale: TtftScaleOption = None,
    tpot_slo_ms: TpotMsOption = None,
    plot: Annotated[Path | None, typer.Option(help="also sweep rates and write PNG curves with this path prefix")] = None,
    admission: AdmissionOption = AdmissionRule.OWN,
    option: OptionsOption = None,
    tune: TuneOption = True,
) -> None:
    """Find each policy's goodput (highest rate with >= 90 % joint SLO attainment) by bisection."""
    from tropical.experiments import PolicyGoodput, SearchSettings, goodput_report
    from tropical.policies.tuning import DEFAULT

    setting = _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
    names = _policy_names(policies)
    options = _policy_options(names, setting, option)
    search = SearchSettings(replay=_replay(requests, start_s, duration_s, arrival, cv), rel_tolerance=rel_tolerance, seed=seed, noise=noise,
                            admission=admission, tune=tune)

    def progress(found: PolicyGoodput) -> None:
        split = "" if found.prefill_workers is None else f" at {found.prefill_workers} prefill worker(s)"
        if found.by_tuning:
            split += f", {found.tuning}"
        unsettled = "" if found.converged else "  (not converged: the evaluation budget ran out; the goodput is at least this)"
        typer.echo(
            f"{found.policy:>10}: {found.goodput_rps:.4g} req/s ({found.per_gpu:.4g} per GPU){split}  [{found.seconds:.1f} s]{unsettled}"
        )

    def evaluated(policy: str, split: int | None, rate: float, value: float, tuning: str) -> None:
        layout = "" if split is None else f" with {split} prefill worker(s)"
        if tuning != DEFAULT.label:
            layout += f", {tuning}"
        typer.echo(f"  {policy} at {rate:.4g} req/s{layout}: {100 * value:.1f} % attain both SLOs", err=True)

    try:
        report = goodput_report(setting, trace or setting.trace, names, search, progress=progress,
                                evaluated=evaluated if sys.stderr.isatty() else None, options=options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if plot:
        from tropical.plots import sweep_and_plot

        report["figures"] = sweep_and_plot(setting, trace or setting.trace, report, plot, search, options)
    if json_path:
        _write_json(json_path, report)


@app.command("slo-sweep")
def slo_sweep(
    setting_name: SettingOption,
    rate: Annotated[float, typer.Option(min=1e-9, help="cluster arrival rate (req/s)")],
    policies: Annotated[str, typer.Option(help="comma-separated policy names")] = "vllm,sarathi,distserve,tropical,kairos,unified",
    scales: Annotated[str, typer.Option(help="comma-separated multipliers applied to both SLOs")] = "0.5,0.75,1,1.25,1.5,2",
    trace: TraceOption = None,
    requests: NumRequestsOption = None,
    start_s: StartOption = None,
    duration_s: DurationOption = None,
    arrival: ArrivalOption = ArrivalProcess.POISSON,
    cv: CvOption = None,
    seed: Annotated[int, typer.Option(help="arrival and noise seed")] = 0,
    noise: Annotated[bool, typer.Option(help="perturb step times by the latency model's residual spread")] = False,
    ttft_slo_ms: TtftMsOption = None,
    ttft_slo_scale: TtftScaleOption = None,
    tpot_slo_ms: TpotMsOption = None,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="write the results here")] = None,
    plot: Annotated[Path | None, typer.Option(help="also draw attainment against the scale into this PNG")] = None,
    admission: AdmissionOption = AdmissionRule.OWN,
) -> None:
    """Joint SLO attainment of each policy at one rate as both SLOs are scaled (tightest scale attaining 90 %)."""
    from tropical.experiments import PolicySloSweep, SearchSettings, slo_sweep_report

    setting = _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
    names = _policy_names(policies)
    try:
        factors = [float(x) for x in scales.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--scales must be comma-separated numbers, got {scales!r}") from None
    if not factors or not all(math.isfinite(x) and x > 0.0 for x in factors):
        raise typer.BadParameter(f"--scales must be positive numbers, got {scales!r}")
    search = SearchSettings(replay=_replay(requests, start_s, duration_s, arrival, cv), seed=seed, noise=noise, admission=admission)

    def progress(found: PolicySloSweep) -> None:
        points = "  ".join(f"{scale:g}:{100 * value:.1f}%" for scale, value in found.sweep.points)
        tightest = "none" if found.sweep.min_scale is None else f"{found.sweep.min_scale:g}"
        typer.echo(f"{found.policy:>10}: {points}  (tightest scale attaining: {tightest})")

    try:
        report = slo_sweep_report(setting, trace or setting.trace, names, rate, factors, search, progress=progress)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if plot:
        from tropical.plots import plot_slo_sweep

        report["figure"] = plot_slo_sweep(setting, report, plot)
    if json_path:
        _write_json(json_path, report)


@app.command("validate")
def validate(
    folder: Annotated[
        Path | None, typer.Argument(help="a validation set's folder (runs.json and its traces); default: the shipped DistServe OPT-13B set")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write every run's figures here")] = None,
    step_overhead_ms: Annotated[float, typer.Option(min=0.0, help="engine work per step beyond the profiled forward pass (ms)")] = 0.0,
    sequence_overhead_ms: Annotated[float, typer.Option(min=0.0, help="... and per decode in a step (ms)")] = 0.0,
) -> None:
    """Replay each real run of a validation set on its deployment and print our figures beside the real ones."""
    from tropical.validation import ATTAINMENT_KEYS, Overhead, ValidationError, validate as run_validation

    try:
        report = run_validation(folder, Overhead(step_overhead_ms, sequence_overhead_ms))
    except ValidationError as exc:
        raise typer.BadParameter(str(exc), param_hint="FOLDER") from None
    short = {"joint_attainment_pct": "joint", "ttft_attainment_pct": "TTFT", "tpot_attainment_pct": "TPOT"}
    lines = [
        f"{report['model']} on {report['hardware']}, SLO TTFT {report['slo_ms']['ttft']:g} ms / TPOT {report['slo_ms']['tpot']:g} ms"
        + (f", engine overhead {step_overhead_ms:g} ms a step + {sequence_overhead_ms:g} ms a decode" if step_overhead_ms or sequence_overhead_ms else "")
        + ": attainment % (joint / TTFT / TPOT) and P90 TTFT / TPOT ms, real → ours",
        f"{'run':<28}{'real':>22}{'ours':>22}   {'P90 TTFT':^17}   {'P90 TPOT':^15}",
    ]
    for run in report["runs"]:
        real, ours = run["real"], run["ours"]
        lines.append(
            f"{run['name']:<28}"
            f"{' / '.join(f'{real[k]:.1f}' for k in ATTAINMENT_KEYS):>22}{' / '.join(f'{ours[k]:.1f}' for k in ATTAINMENT_KEYS):>22}"
            f"   {real['p90_ttft_ms']:>7.0f} → {ours['p90_ttft_ms']:<7.0f}   {real['p90_tpot_ms']:>6.0f} → {ours['p90_tpot_ms']:<6.0f}"
        )
    reference = next(key for key in report if key.endswith("_mean_abs_diff") and key != "mean_abs_diff")
    lines.append(f"mean absolute difference, points ({short['joint_attainment_pct']} / TTFT / TPOT); {reference.removesuffix('_mean_abs_diff')} in brackets:")
    for subset, diffs in report["mean_abs_diff"].items():
        theirs = report[reference].get(subset, {})
        ours_text = " / ".join(f"{diffs[k]:.1f}" for k in ATTAINMENT_KEYS)
        theirs_text = " / ".join(f"{theirs[k]:.1f}" for k in ATTAINMENT_KEYS if k in theirs)
        lines.append(f"  {subset:<12}{diffs['runs']:>3} runs  {ours_text}" + (f"  ({theirs_text})" if theirs_text else ""))
    for name, ratio in report["overload_p90_ttft_ratio"].items():
        lines.append(f"  overload run {name}: our P90 TTFT is {ratio:.2f}x the real one")
    typer.echo("\n".join(lines))
    if json_path:
        _write_json(json_path, report)


@app.command("ablate")
def ablate(
    setting_name: SettingOption,
    trace: TraceOption = None,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="write the results here")] = None,
    requests: NumRequestsOption = None,
    start_s: StartOption = None,
    duration_s: DurationOption = None,
    arrival: ArrivalOption = ArrivalProcess.POISSON,
    cv: CvOption = None,
    rel_tolerance: Annotated[float, typer.Option(min=1e-6, help="bisection stops when the bracket is this fraction of the rate")] = 0.02,
    seed: Annotated[int, typer.Option(help="arrival and noise seed")] = 0,
    admission: AdmissionOption = AdmissionRule.OWN,
) -> None:
    """Goodput of `unified` with each of its ideas taken out in turn."""
    from tropical.experiments import PolicyGoodput, SearchSettings, ablation_report

    setting = _setting(setting_name, None, None, None)
    search = SearchSettings(replay=_replay(requests, start_s, duration_s, arrival, cv), rel_tolerance=rel_tolerance, seed=seed, admission=admission)

    def progress(label: str, found: PolicyGoodput) -> None:
        typer.echo(f"{label:<64} {found.goodput_rps:.4g} req/s  [{found.seconds:.1f} s]")

    try:
        report = ablation_report(setting, trace or setting.trace, search, progress=progress)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if json_path:
        _write_json(json_path, report)


# --- live benchmark -----------------------------------------------------------------------------


@app.command("bench", context_settings={"allow_extra_args": True})  # `--goodput ttft:MS tpot:MS`: vLLM's values after one flag
def bench(
    ctx: typer.Context,
    embedded: Annotated[bool, typer.Option("--embedded", help="serve in this process (in-memory bus and store unless URLs are given)")] = False,
    spawn: Annotated[
        bool, typer.Option("--spawn", help="serve as separate processes (`tropical serve` router and workers) on the broker and Redis, then stop them")
    ] = False,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="drive this OpenAI-compatible server (e.g. http://127.0.0.1:8000): Tropical's gateway, vLLM, ...")
    ] = None,
    endpoint: Annotated[str, typer.Option(help="--base-url: /v1/completions (token-id prompts) or /v1/chat/completions (word prompts)")] = "/v1/completions",
    model: Annotated[str | None, typer.Option(help="--base-url: the model to ask for (default: the first GET /v1/models lists)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="--base-url: sent as `Authorization: Bearer`", show_default=False)] = None,
    policy: PolicyName = "unified",
    workers: Annotated[int, typer.Option(help="--embedded / --spawn: workers to serve")] = 2,
    engine: Annotated[str, typer.Option("--engine", help="--embedded / --spawn: tiny, or emulated (the setting's timing and KV)")] = "tiny",
    setting_name: Annotated[
        str | None,
        typer.Option("--setting", help="replay this preset's trace with its SLOs as `tropical sim` does (emulated engines time by it; default chat-13b)"),
    ] = None,
    trace: TraceOption = None,
    dataset_name: Annotated[
        str | None, typer.Option("--dataset-name", help="random (fixed lengths; the default), azure-conv, mooncake, distserve-sharegpt, arxiv or sharegpt")
    ] = None,
    dataset_path: Annotated[Path | None, typer.Option("--dataset-path", help="a trace or length table, recognised by its columns (as --trace)")] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            "--request-rate", help="req/s, or inf (all at once; the default); a comma-separated list sweeps, e.g. 4,8,inf. A timed trace keeps its own pace without it"
        ),
    ] = None,
    burstiness: Annotated[float | None, typer.Option(help="Gamma arrivals of this shape, as vLLM draws them (1: Poisson; lower: burstier)")] = None,
    num_prompts: Annotated[int | None, typer.Option("--num-prompts", "--num-requests", help="requests per rate (default: 100; a setting's as in `sim`)")] = None,
    start_s: StartOption = None,
    duration_s: DurationOption = None,
    arrival: ArrivalOption = ArrivalProcess.POISSON,
    cv: CvOption = None,
    input_len: Annotated[int, typer.Option("--random-input-len", "--input-len", help="random dataset: prompt tokens")] = 128,
    output_len: Annotated[int, typer.Option("--random-output-len", "--output-len", help="random dataset: output tokens")] = 64,
    max_concurrency: Annotated[int | None, typer.Option(help="requests in flight at most; the others wait for a slot")] = None,
    goodput: Annotated[
        list[str] | None,
        typer.Option(
            help="ttft:MS tpot:MS e2el:MS: what goodput counts against (default: each request's own SLOs; without --setting or --*-slo-ms also the SLOs sent)"
        ),
    ] = None,
    percentile_metrics: Annotated[str, typer.Option(help="sections printed, of ttft,tpot,itl,e2el")] = "ttft,tpot,itl",
    metric_percentiles: Annotated[str, typer.Option(help="percentiles printed and saved, e.g. 50,90,99")] = "99",
    seed: Annotated[int, typer.Option(help="arrival seed, as `tropical sim --seed`")] = 0,
    ttft_slo_ms: TtftMsOption = None,
    ttft_slo_scale: TtftScaleOption = None,
    tpot_slo_ms: TpotMsOption = None,
    request_timeout_s: Annotated[float, typer.Option(help="a request not done this long after its arrival fails")] = 300.0,
    compare_sim: Annotated[
        bool, typer.Option("--compare-sim", help="--embedded / --spawn emulated: also simulate the same requests on the same roles")
    ] = False,
    save_result: Annotated[bool, typer.Option("--save-result", help="write each run's JSON into --result-dir")] = False,
    result_dir: Annotated[Path | None, typer.Option(help="where --save-result and a sweep's curves go (default: here, or beside --json)")] = None,
    result_filename: Annotated[str | None, typer.Option(help="--save-result's file name (default: {backend}-{rate}qps-{model}-{date}.json)")] = None,
    disable_tqdm: Annotated[bool, typer.Option("--disable-tqdm", help="no progress bar (there is none when stderr is not a terminal)")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="also write the report here (a sweep: every run's)")] = None,
) -> None:
    """Replay a trace or synthetic load onto a deployment or an OpenAI-compatible server; print `vllm bench serve`'s summary."""
    import time
    from collections import Counter

    from tropical.experiments import setting_named
    from tropical.live import bench as live
    from tropical.live.run import deployment

    started = time.perf_counter()
    settings: Settings = ctx.obj
    modes = [name for name, given in (("--embedded", embedded), ("--spawn", spawn), ("--base-url", base_url is not None)) if given]
    try:
        if len(modes) > 1:
            raise typer.BadParameter(f"{' and '.join(modes)} are different targets: give one")
        if compare_sim and (base_url is not None or max_concurrency is not None):
            raise typer.BadParameter("--compare-sim needs --embedded or --spawn and open-loop arrivals (no --max-concurrency)")
        for flag, value in (("--workers", workers), ("--num-prompts", num_prompts), ("--random-input-len", input_len), ("--random-output-len", output_len),
                            ("--max-concurrency", max_concurrency), ("--request-timeout-s", request_timeout_s), ("--burstiness", burstiness)):
            if value is not None and not value > 0:
                raise typer.BadParameter(f"must be positive, got {value:g}", param_hint=flag)
        rates = _dialect(live.parse_rates, rate, "--request-rate") if rate is not None else [None]
        limits = _dialect(live.parse_goodput, [*(goodput or ()), *ctx.args], "--goodput") if goodput or ctx.args else None
        metrics = _dialect(live.parse_percentile_metrics, percentile_metrics, "--percentile-metrics")
        percentiles = _dialect(live.parse_percentiles, metric_percentiles, "--metric-percentiles")
        arrival_name, cv_value = _bench_arrivals(burstiness, arrival, cv)
        trace_path = _bench_trace(trace, dataset_name, dataset_path)
        setting = None if setting_name is None else _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
        if base_url is not None:
            if not base_url.startswith(("http://", "https://")):
                raise typer.BadParameter(f"not an http:// or https:// URL: {base_url!r}", param_hint="--base-url")
            if not (endpoint.startswith("/") and endpoint.rstrip("/").endswith("/completions")):
                raise typer.BadParameter(f"{endpoint!r} is no completions path such as /v1/completions", param_hint="--endpoint")
        if setting is None and ttft_slo_scale is not None:
            raise typer.BadParameter("--ttft-slo-scale scales a setting's prefill times: it needs --setting")
        if setting is not None and dataset_name == live.RANDOM_DATASET:
            raise typer.BadParameter("--setting replays its trace; --dataset-name random is fixed-length load: give one")
        ttft_ms = ttft_slo_ms or (limits or {}).get("ttft") or settings.default_ttft_slo_ms
        tpot_ms = tpot_slo_ms or (limits or {}).get("tpot") or settings.default_tpot_slo_ms
        spec = live.Load(
            setting, trace_path, num_prompts, start_s, duration_s, arrival_name, cv_value, seed, input_len, output_len, ttft_ms / 1000.0, tpot_ms / 1000.0,
            name=dataset_name,
        )
        rates = [live.INF if r is None and spec.trace_file is None else r for r in rates]  # fixed-length load has no pace of its own
        try:
            loads = [spec.at(r) for r in rates]
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        timing = setting_named(setting_name or "chat-13b")  # what emulated engines and --compare-sim time steps by
        roles: tuple[Any, ...] = ()
        if embedded or spawn:
            choice = _engine_choice(engine, timing.name, None)
            roles = _live_roles(_policy_checked(policy), workers, choice.latency_model())
            if compare_sim and engine != "emulated":
                raise typer.BadParameter("--compare-sim needs --engine emulated: only emulated engines keep the simulator's time")
        if spawn and (settings.broker_url.startswith(MEMORY_URL) or settings.redis_url.startswith(MEMORY_URL)):
            raise typer.BadParameter("--spawn needs a real broker and Redis (--broker-url, --redis-url)")
        if not (embedded or spawn or base_url) and (settings.broker_url.startswith(MEMORY_URL) or compare_sim):
            raise typer.BadParameter(
                "give --embedded, --spawn, --base-url, or the --broker-url of a running deployment (--compare-sim needs --embedded or --spawn)"
            )
    except typer.BadParameter as exc:
        raise _bench_failure(exc.format_message()) from None

    if spawn:
        settings = settings.with_overrides(namespace=f"{settings.namespace}.bench-{uuid.uuid4().hex[:8]}")
        target = live.spawned_target(settings, policy, roles, choice, timeout_s=request_timeout_s)
    elif embedded:
        if not os.environ.get("TROPICAL_BROKER_URL") and ctx.parent is not None and ctx.parent.params.get("broker_url") is None:
            settings = settings.with_overrides(broker_url=MEMORY_URL, redis_url=MEMORY_URL)
        target = live.embedded_target(deployment(settings, policy, workers, choice), timeout_s=request_timeout_s, model_id=engine)
    elif base_url is not None:
        target = live.http_target(base_url, endpoint=endpoint, model=model, api_key=api_key)
    else:
        target = live.remote_target(settings, timeout_s=request_timeout_s)

    async def run() -> tuple[str, str | None, list[Any]]:
        async with target as sender:
            runs = [live.bench_requests(load) for load in loads]
            progress = not disable_tqdm and sys.stderr.isatty()
            results = await live.replay_all(sender, runs, timeout_s=request_timeout_s, max_concurrency=max_concurrency, progress=progress)
            return sender.backend, sender.model_id, results

    try:
        backend, model_id, results = run_async(run())
    except typer.Exit:
        raise  # run_async said why already
    except RuntimeError as exc:  # a spawned process that would not start, a server that would not answer
        raise _bench_failure(str(exc)) from None
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    mode = "embedded" if embedded else "spawned" if spawn else "http" if base_url is not None else "broker"
    records = []
    for r, load, result in zip(rates, loads, results, strict=True):
        simulated = live.simulated_summary(timing, policy, roles, load, seed=seed) if compare_sim else None
        report = live.bench_report(result, percentiles=percentiles, goodput=limits)
        records.append({
            "date": date,
            "backend": backend,
            "model_id": model_id,
            "num_prompts": report["num_prompts"],
            "request_rate": _rate_word(r),
            "burstiness": burstiness if burstiness is not None else 1.0 / (cv_value * cv_value),
            "max_concurrency": max_concurrency,
            "mode": mode,
            "base_url": base_url,
            "endpoint": endpoint if base_url is not None else None,
            "namespace": None if base_url is not None else settings.namespace,  # a spawned deployment's own: its queues are removed afterwards
            "dataset": spec.describe(),
            "setting": None if setting is None else setting.name,
            "trace": None if spec.trace_file is None else str(spec.trace_file),
            "policy": policy if embedded or spawn else None,
            "engine": engine if embedded or spawn else None,
            "workers": dict(Counter(role.value for role in roles)) if embedded or spawn else None,
            "rate": _rate_word(r),
            "seed": seed,
            "wall_seconds": round(time.perf_counter() - started, 3),
            **report,
            "sim": None if simulated is None else live.nulled(simulated.as_vllm_json()),
            "live_minus_sim_attainment": None if simulated is None else live.nulled(report["slo_attainment"] - simulated.attainment),
        })
    typer.echo("\n\n".join("\n".join(_bench_lines(record, metrics, percentiles)) for record in records))
    _bench_write(records, json_path=json_path, save_result=save_result, result_dir=result_dir, result_filename=result_filename)


def _dialect(parse: Any, value: Any, flag: str) -> Any:
    """A vLLM-dialect flag value parsed; its ValueError as bad input for that flag."""
    try:
        return parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None


def _bench_failure(message: str) -> typer.Exit:
    """Bad input, or a target that cannot be reached: one line on stderr, and the exit (2) to raise."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(2)


def _bench_arrivals(burstiness: float | None, arrival: ArrivalProcess, cv: float | None) -> tuple[str, float]:
    """The arrival process: vLLM's --burstiness b, or --arrival gamma --cv c (the same Gamma gaps, c = 1/√b)."""
    from tropical.live.bench import arrival_process

    if burstiness is not None:
        if arrival is not ArrivalProcess.POISSON or cv is not None:
            raise typer.BadParameter("--burstiness b is --arrival gamma --cv 1/sqrt(b) in vLLM's words: give one of them")
        return arrival_process(burstiness)
    if cv is not None and arrival is ArrivalProcess.POISSON:
        raise typer.BadParameter("--cv needs --arrival gamma: Poisson gaps have a cv of 1")
    if cv is not None and cv <= 0:
        raise typer.BadParameter(f"must be positive, got {cv:g}", param_hint="--cv")
    return arrival.value, 1.0 if cv is None else cv


def _bench_trace(trace: Path | None, dataset_name: str | None, dataset_path: Path | None) -> Path | None:
    """The trace file to replay (None: fixed-length synthetic requests) from --trace, --dataset-path or --dataset-name."""
    from tropical.live.bench import RANDOM_DATASET, dataset_trace

    if trace is not None and dataset_path is not None and trace != dataset_path:
        raise typer.BadParameter("--trace and --dataset-path name the same thing: give one")
    path = trace or dataset_path
    if dataset_name is None:
        return path
    if path is not None:
        raise typer.BadParameter("--dataset-name picks a shipped dataset, --dataset-path a file: give one")
    if dataset_name == RANDOM_DATASET:
        return None
    return _dialect(dataset_trace, dataset_name, "--dataset-name")


def _rate_word(rate: float | None) -> float | str | None:
    """A rate as vLLM's JSON writes it: a number, or "inf"; None for a trace at its own pace."""
    return "inf" if rate == float("inf") else rate


def _bench_write(records: list[dict[str, Any]], *, json_path: Path | None, save_result: bool, result_dir: Path | None, result_filename: str | None) -> None:
    """--save-result's files (one per rate, named as vLLM names them), --json, and a sweep's curves."""
    directory = result_dir or (json_path.parent if json_path is not None else Path("."))
    sweep = len(records) > 1
    if save_result:
        directory.mkdir(parents=True, exist_ok=True)
        for record in records:
            name = _result_name(record, result_filename, sweep)
            (directory / name).write_text(json.dumps(record, indent=2) + "\n")
    figure = None
    if sweep:
        from tropical.plots import plot_bench_sweep

        first = records[0]
        stem = json_path.stem if json_path is not None and result_dir is None else f"{first['backend']}-{_model_word(first)}-{first['date']}"
        directory.mkdir(parents=True, exist_ok=True)
        figure = plot_bench_sweep(records, directory / f"{stem}-sweep.png")
        typer.echo(f"\nsweep curves: {figure}")
    if json_path is not None:
        content: Any = {"runs": records, "figure": figure} if sweep else records[0]
        _write_json(json_path, content)


def _model_word(record: dict[str, Any]) -> str:
    return str(record["model_id"] or "unknown").rstrip("/").split("/")[-1]


def _result_name(record: dict[str, Any], given: str | None, sweep: bool) -> str:
    """vLLM's default `{backend}-{rate}qps[-concurrency{n}]-{model}-{date}.json`; a given name gets the rate when a sweep writes several."""
    rate = record["request_rate"]
    rate_word = "trace" if rate is None else f"{rate if isinstance(rate, str) else format(rate, 'g')}qps"
    if given is not None:
        path = Path(given)
        return f"{path.stem}-{rate_word}{path.suffix}" if sweep else given
    concurrency = "" if record["max_concurrency"] is None else f"-concurrency{record['max_concurrency']}"
    return f"{record['backend']}-{rate_word}{concurrency}-{_model_word(record)}-{record['date']}.json"


def _live_roles(policy: str, workers: int, model: Any) -> tuple[Any, ...]:
    """The embedded deployment's roles (a disaggregated policy splits its workers in half); exit 2 when too few."""
    from tropical.live.run import policy_roles
    from tropical.policies import make_policy

    try:
        return policy_roles(make_policy(policy, model), workers)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _bench_lines(record: dict[str, Any], metrics: tuple[str, ...] = ("ttft", "tpot", "itl"), percentiles: tuple[float, ...] = (99.0,)) -> list[str]:
    """The console block: `vllm bench serve`'s lines in its order and format, then Tropical's (attainment, where the time went, failures)."""
    from tropical.live.bench import METRIC_TITLES, percentile_word

    r = record

    def line(label: str, value: Any, spec: str = "") -> str:
        return f"{label:<40} {_shown(value, spec):<10}"

    lines = [f"{' Serving Benchmark Result ':=^50}", line("Successful requests:", r["completed"]), line("Failed requests:", r["failed"])]
    if r["max_concurrency"] is not None:
        lines.append(line("Maximum request concurrency:", r["max_concurrency"]))
    if isinstance(r["request_rate"], float | int):
        lines.append(line("Request rate configured (RPS):", r["request_rate"], ".2f"))
    lines += [
        line("Benchmark duration (s):", r["duration"], ".2f"),
        line("Total input tokens:", r["total_input_tokens"]),
        line("Total generated tokens:", r["total_output_tokens"]),
        line("Request throughput (req/s):", r["request_throughput"], ".2f"),
        line("Request goodput (req/s):", r["request_goodput"], ".2f"),
        line("Output token throughput (tok/s):", r["output_throughput"], ".2f"),
        line("Total Token throughput (tok/s):", r["total_token_throughput"], ".2f"),
    ]
    for metric in metrics:
        title, short = METRIC_TITLES[metric]
        lines.append(f"{title:-^50}")
        lines.append(line(f"Mean {short} (ms):", r[f"mean_{metric}_ms"], ".2f"))
        lines.append(line(f"Median {short} (ms):", r[f"median_{metric}_ms"], ".2f"))
        lines += [line(f"P{percentile_word(q)} {short} (ms):", r[f"p{percentile_word(q)}_{metric}_ms"], ".2f") for q in percentiles]

    rate = "the trace's own pace" if r["rate"] is None else "once" if r["rate"] == "inf" else f"{r['rate']:g} req/s"
    if r["workers"] is not None:
        serving = f"{r['policy']} on " + " + ".join(f"{count} {role}" for role, count in r["workers"].items())
    else:
        serving = f"{r['model_id']} at {r['base_url']}{r['endpoint']}" if r["base_url"] else f"the deployment on {r['namespace']}"
    limits = r["goodput_slo_ms"]
    counted = "each request's own SLOs" if not limits else ", ".join(f"{name} <= {ms:g} ms" for name, ms in limits.items())
    causes = ", ".join(f"{cause} {count}" for cause, count in r["failures"].items()) or "none"
    lines += [
        f"{'Tropical: SLOs and where the time went':-^50}",
        line("Load:", f"{r['dataset']}, {r['num_prompts']} requests at {rate}" + ("" if r["burstiness"] == 1.0 else f", burstiness {r['burstiness']:.3g}")),
        line("Serving:", serving),
        line("SLO attainment (both / TTFT / TPOT):", " / ".join(_shown(r[k], ".3f") for k in ("slo_attainment", "ttft_slo_attainment", "tpot_slo_attainment"))),
        line("Goodput counts:", counted),
        line("Queue / prefill / KV / decode (ms):", " / ".join(_shown(r[f"mean_{p}_ms"], ".1f") for p in ("queue", "prefill", "kv_transfer", "decode"))),
    ]
    if r["control_plane_requests"]:
        lines.append(
            line("Control plane p50 / p99 (ms):", f"{r['p50_control_total_ms']:.2f} / {r['p99_control_total_ms']:.2f}")
            + f" (queue {r['p50_control_to_router_ms']:.2f}, dispatch {r['p50_control_to_worker_ms']:.2f}, first token {r['p50_control_to_client_ms']:.2f} at p50)"
        )
    lines += [
        line("Failed requests by cause:", causes),
        line("Late sends, mean / max (ms):", f"{_shown(r['mean_send_lag_ms'], '.1f')} / {_shown(r['max_send_lag_ms'], '.1f')}"),
    ]
    if r["sim"] is not None:
        sim = r["sim"]
        shown = " / ".join(_shown(sim[k], ".3f") for k in ("slo_attainment", "ttft_slo_attainment", "tpot_slo_attainment"))
        lines.append(line("Simulated attainment (same requests):", shown))
    return lines + ["=" * 50]


def _shown(value: Any, spec: str = "") -> str:
    """A value as the block prints it; n/a where nothing was measured."""
    return "n/a" if value is None else format(value, spec)


# --- faults ---------------------------------------------------------------------------------------


@app.command("chaos")
def chaos(
    ctx: typer.Context,
    scenario: Annotated[str | None, typer.Option(help="kill-worker, restart-broker, restart-redis, kill-router, kv-fault or overload")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", callback=_json_file, help="write the report here")] = None,
    policy: Annotated[str | None, typer.Option(help="default: the scenario's (tropical; kv-fault distserve; overload unified)")] = None,
    workers: Annotated[int | None, typer.Option(help="workers to spawn (default: the scenario's, 2 or 3)")] = None,
    request_rate: Annotated[
        float | None, typer.Option("--request-rate", help="req/s (default: half the simulated goodput of these workers; overload: three times it)")
    ] = None,
    num_prompts: Annotated[int | None, typer.Option("--num-prompts", help="requests sent (default: 60)")] = None,
    duration_s: Annotated[
        float | None, typer.Option("--duration-s", help="instead of --num-prompts: as many requests as the rate sends in this many seconds")
    ] = None,
    seed: Annotated[int, typer.Option(help="arrival seed, as `tropical sim --seed`")] = 0,
    setting_name: Annotated[str, typer.Option("--setting", help="the preset whose GPUs the emulated engines time, whose trace and SLOs are sent")] = "chat-13b",
    fault_at_s: Annotated[float | None, typer.Option(help="when the fault begins, in seconds from the load's start (default: 40 % into the arrivals)")] = None,
    grace_s: Annotated[float, typer.Option(help="a request's deadline: arrival + TTFT SLO + output tokens x TPOT SLO + this")] = 10.0,
    drain_s: Annotated[float, typer.Option(help="how long after its deadline a request is still waited for before it counts as lost")] = 30.0,
) -> None:
    """Inject one fault into a spawned deployment (emulated engines) under load; count every request from the clients' side.

    Exits 0 when no request hung or was lost, 1 otherwise.
    """
    from dataclasses import replace

    from tropical.chaos import SCENARIOS, ChaosPlan, ServerMissing, goodput_rps, run_chaos
    from tropical.live.bench import Load

    settings: Settings = ctx.obj
    try:
        if scenario is None or scenario not in SCENARIOS:
            given = "" if scenario is None else f"unknown scenario {scenario!r}; "
            raise typer.BadParameter(f"{given}give --scenario: one of {', '.join(SCENARIOS)}")
        if json_path is None:
            raise typer.BadParameter("give --json OUT: where the report goes")
        for flag, value in (("--workers", workers), ("--request-rate", request_rate), ("--num-prompts", num_prompts), ("--duration-s", duration_s)):
            if value is not None and not value > 0:
                raise typer.BadParameter(f"{flag} must be positive, got {value:g}")
        for flag, value in (("--grace-s", grace_s), ("--drain-s", drain_s), ("--fault-at-s", fault_at_s)):
            if value is not None and value < 0:
                raise typer.BadParameter(f"{flag} must not be negative, got {value:g}")
        if num_prompts is not None and duration_s is not None:
            raise typer.BadParameter("give --num-prompts or --duration-s, not both")
        if settings.broker_url.startswith(MEMORY_URL) or settings.redis_url.startswith(MEMORY_URL):
            raise typer.BadParameter("chaos spawns separate processes: it needs a real broker and Redis (--broker-url, --redis-url)")
        chosen = SCENARIOS[scenario]
        setting = _setting(setting_name, None, None, None)
        plan = ChaosPlan(chosen, _policy_checked(policy or chosen.policy), workers or chosen.workers, Load(setting, count=num_prompts or 60, seed=seed),
                         request_rate or 0.0, setting.name, fault_at_s, grace_s, drain_s)
        roles = plan.roles()
    except (typer.BadParameter, ValueError) as exc:
        message = exc.format_message() if isinstance(exc, typer.BadParameter) else str(exc)
        raise _bench_failure(message) from None

    goodput = goodput_rps(setting.name, plan.policy, roles)
    rate = request_rate or chosen.rate_factor * goodput
    count = plan.load.count if duration_s is None else max(1, round(rate * duration_s))  # --duration-s: what the rate sends in that time
    plan = replace(plan, rate=rate, load=replace(plan.load, count=count))
    for noisy in ("aio_pika", "aiormq"):  # a broker going away is the point here, not news
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        result = run_async(run_chaos(plan, settings))
    except typer.Exit:
        raise  # run_async said why already
    except (ServerMissing, RuntimeError, OSError) as exc:  # a server missing, a process that would not start
        raise _bench_failure(str(exc)) from None
    record = {**result.as_json(), "goodput_rps": goodput, "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "machine": _machine()}
    _write_json(json_path, record)
    typer.echo("\n".join(_chaos_lines(record)))
    raise typer.Exit(0 if result.accounts.clean else 1)


def _chaos_lines(r: dict[str, Any]) -> list[str]:
    """The console block of one chaos run."""

    def line(label: str, value: Any) -> str:
        return f"{label:<40} {value}"

    fault = dict(r["fault"])
    at = fault.pop("at_s")
    facts = ", ".join(f"{key} {format(value, '.2f') if isinstance(value, float) else value}" for key, value in fault.items())
    workers = " + ".join(f"{count} {role}" for role, count in r["workers"].items())
    lines = [
        f"{' Chaos: ' + r['scenario'] + ' ':=^60}",
        line("Fault:", "none" if at is None else f"at {at:.2f} s: {facts}"),
        line("Serving:", f"{r['policy']} on {workers}, {r['engine']}" + (f", {r['routers']} routers" if r["routers"] > 1 else "")),
        line("Load:", f"{r['num_prompts']} requests at {r['request_rate']:.2f} req/s (goodput {r['goodput_rps']:.2f}), {r['dataset']}"),
        line("Offered / completed / errored:", f"{r['offered']} / {r['completed']} / {r['errored']}"),
        line("Hung / lost:", f"{r['hung']} / {r['lost']}"),
        line("Errors by code:", ", ".join(f"{code} {n}" for code, n in r["error_codes"].items()) or "none"),
        line("Refused (p50 / p99 ms to the refusal):", f"{r['refused']} ({_shown(r['p50_refusal_ms'], '.1f')} / {_shown(r['p99_refusal_ms'], '.1f')})"),
        line("Resumed elsewhere:", _shown(r["resumes"])),
        line("Recovery (s):", _shown(r["recovery_s"], ".2f")),
        line("SLO attainment (admitted / all):", f"{_shown(r['admitted_attainment'], '.3f')} / {_shown(r['slo_attainment'], '.3f')}"),
    ]
    if r["sim"] is not None:
        lines.append(line("Simulated, same requests (adm./all):", f"{_shown(r['sim']['admitted_attainment'], '.3f')} / {r['sim']['slo_attainment']:.3f}"))
    for name, exited in r["exited"].items():
        lines.append(line(f"Exited on its own: {name}", f"status {exited['exit_status']}: {(exited['log_tail'] or [''])[-1]}"))
    return lines + ["=" * 60]


if __name__ == "__main__":
    app()
