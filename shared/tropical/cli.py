"""The `tropical` command: one entry point for services, benchmarks and tools."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import platform
import sys
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from tropical.latency.profiling import hardware_name
from tropical.settings import MEMORY_URL, Settings

if TYPE_CHECKING:
    from tropical.engine import Engine
    from tropical.experiments import Replay, Setting

T = TypeVar("T")

app = typer.Typer(
    help="Tropical: SLO-aware LLM serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # plain tracebacks: no local variables (URLs with passwords) printed
)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed: it is the faster loop for a bus-bound service."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@app.callback()
def main(
    ctx: typer.Context,
    broker_url: Annotated[str | None, typer.Option(help="AMQP URL, or memory:// (env TROPICAL_BROKER_URL)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL, or memory:// (env TROPICAL_REDIS_URL)")] = None,
    namespace: Annotated[str | None, typer.Option(help="prefix of queue and key names (env TROPICAL_NAMESPACE)")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ... (env TROPICAL_LOG_LEVEL)")] = None,
) -> None:
    """Settings come from TROPICAL_* variables; these flags override them."""
    try:
        settings = Settings().with_overrides(broker_url=broker_url, redis_url=redis_url, namespace=namespace, log_level=log_level)
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
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the results here")] = None,
) -> None:
    """Measure bus round trips per second, in memory and on RabbitMQ, with and without batching."""
    from tropical.bus import Bus, MemoryBroker
    from tropical.bus.benchmark import measure_round_trips

    settings: Settings = ctx.obj
    try:
        sizes = [int(size) for size in batches.split(",")]
    except ValueError:
        raise typer.BadParameter(f"not a list of whole numbers: {batches!r}", param_hint="--batches") from None
    if any(size < 1 for size in sizes):
        raise typer.BadParameter("batch sizes must be at least 1", param_hint="--batches")
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
        json_path.write_text(json.dumps(record, indent=2) + "\n")


@app.command("bench-engine")
def bench_engine(
    num_requests: Annotated[int, typer.Option(min=1, help="requests served by each side")] = 64,
    seed: Annotated[int, typer.Option(help="fixes prompts, lengths and weights")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="running sequences (ours) and static batch size (HF)")] = 32,
    max_num_batched_tokens: Annotated[int, typer.Option(min=16, help="tokens per engine step")] = 512,
    repeats: Annotated[int, typer.Option(min=1, help="turns each side takes; the fastest counts")] = 2,
    no_hf: Annotated[bool, typer.Option("--no-hf", help="time the engine only")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report here")] = None,
) -> None:
    """Tokens per second of the engine (continuous batching) against Hugging Face `generate` on the same requests."""
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
        json_path.write_text(json.dumps(report, indent=2) + "\n")


@app.command("bench-router")
def bench_router(
    policies: Annotated[str, typer.Option(help="comma-separated policy names")] = "vllm,sarathi,distserve,tropical,kairos,unified",
    workers: Annotated[str, typer.Option(help="comma-separated cluster sizes")] = "8,64,256",
    queue: Annotated[int, typer.Option(min=1, help="requests waiting at the router in every timed state")] = 1000,
    decisions: Annotated[int, typer.Option(min=1, help="timed decisions per policy and size")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the simulated runs the states come from")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report here")] = None,
) -> None:
    """Time router decisions on loaded clusters: on a 1,000-prompt burst, and per event (an arrival, a status change) in steady state."""
    from tropical.core.bench_router import RouterTiming, cluster_roles, run_router_benchmark
    from tropical.policies import POLICY_NAMES

    names = [name.strip() for name in policies.split(",") if name.strip()]
    unknown = [name for name in names if name not in POLICY_NAMES]
    if not names or unknown:
        given = f"unknown policy {', '.join(unknown)!r}" if unknown else "no policy given"
        raise typer.BadParameter(f"{given}; known: {', '.join(POLICY_NAMES)}", param_hint="--policies")
    try:
        sizes = [int(size) for size in workers.split(",")]
    except ValueError:
        raise typer.BadParameter(f"not a list of whole numbers: {workers!r}", param_hint="--workers") from None
    if any(size < 1 for size in sizes):
        raise typer.BadParameter("cluster sizes must be at least 1", param_hint="--workers")
    for name in names:
        for size in sizes:
            try:
                cluster_roles(name, size)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--workers") from None

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
        json_path.write_text(json.dumps(record, indent=2) + "\n")


@app.command("profile")
def profile(
    engine_source: Annotated[str, typer.Option("--engine", help="`tiny` (the random-weight preset) or a local model directory")] = "tiny",
    quick: Annotated[bool, typer.Option(help="a small grid that takes seconds on a CPU")] = False,
    repeats: Annotated[int | None, typer.Option(min=1, help="timed steps per grid point (default: 3; 2 with --quick)")] = None,
    max_len: Annotated[int | None, typer.Option(min=1, help="profile sequences up to this many tokens (default: the engine's limit)")] = None,
    reduce: Annotated[str, typer.Option(help="fit each point's median, its fastest step (min: for a shared machine), or all steps")] = "median",
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: CUDA when available)")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the model (a LatencyModelSpec) and a report here")] = None,
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
        json_path.write_text(json.dumps(profile_record(spec, report), indent=2) + "\n")


def _profiled_engine(source: str, device: str | None) -> Engine:
    """The engine to profile; an unknown device or a directory that holds no model is bad input."""
    import torch

    from tropical.engine import Engine, EngineConfig

    if source != "tiny" and not Path(source).is_dir():
        raise typer.BadParameter(f"not `tiny` nor a model directory: {source!r}", param_hint="--engine")
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
TtftMsOption = Annotated[float | None, typer.Option("--ttft-slo-ms", help="fixed TTFT SLO for every request (ms)")]
TtftScaleOption = Annotated[float | None, typer.Option("--ttft-slo-scale", help="TTFT SLO as a multiple of the request's isolated prefill time")]
TpotMsOption = Annotated[float | None, typer.Option("--tpot-slo-ms", help="TPOT SLO (ms)")]


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

PolicyName = Annotated[str, typer.Option("--policy", help="vllm, sarathi, distserve, tropical, kairos or unified")]
EngineName = Annotated[str, typer.Option("--engine", help="tiny, smollm2, emulated, or a model directory / .gguf file")]
EmulatedSetting = Annotated[str, typer.Option("--setting", help="the cluster whose timing and KV an emulated engine has")]
MaxModelLen = Annotated[int | None, typer.Option("--max-model-len", min=1, help="longest prompt + output a request may ask for")]


def _engine_choice(engine: str, setting: str, max_model_len: int | None) -> Any:
    from tropical.live.engines import EngineChoice

    choice = EngineChoice(engine, setting=setting, max_model_len=max_model_len)
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
        kv_transport: Annotated[
            str,
            typer.Option(
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
        choice = _engine_choice(engine, setting, max_model_len)
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
    engine_source: Annotated[str, typer.Option("--engine", help="`tiny` (the random-weight preset) or a local model directory")] = "tiny",
    quick: Annotated[bool, typer.Option(help="a small grid that takes seconds on a CPU")] = False,
    once: Annotated[bool, typer.Option(help="return once the model is published (default: stay up; SIGHUP profiles again)")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: CUDA when available)")] = None,
) -> None:
    """Profile this machine's engine and publish its latency model to the store, where routers and workers pick it up."""
    from redis.exceptions import RedisError

    from tropical.live.profiler_service import serve_profiler as run
    from tropical.store import StoreError

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
) -> None:
    """A whole deployment in one process: router and workers (in-memory bus and store unless URLs are given)."""
    settings: Settings = ctx.obj
    if not os.environ.get("TROPICAL_BROKER_URL") and ctx.parent is not None and ctx.parent.params.get("broker_url") is None:
        settings = settings.with_overrides(broker_url=MEMORY_URL, redis_url=MEMORY_URL)
    choice = _engine_choice(engine, setting, max_model_len)
    _policy_checked(policy)
    run_async(_up(settings, policy, workers, choice, prompt, max_tokens))


async def _up(settings: Settings, policy: str, workers: int, choice: Any, prompt: str | None, max_tokens: int) -> None:
    from tropical.live.run import deployment, until_signalled

    served = deployment(settings, policy, workers, choice)
    try:
        await served.start()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
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
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the summary here")] = None,
) -> None:
    """Simulate one policy at one rate and print a `vllm bench serve`-style summary."""
    import time
    from collections import Counter

    from tropical.experiments import run_policy, workload
    from tropical.metrics import summarize
    from tropical.policies import make_policy

    setting = _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
    trace = trace or setting.trace
    replay = _replay(requests, start_s, duration_s, arrival, cv)
    started = time.perf_counter()
    try:
        load = workload(setting, trace, rate, replay=replay, seed=seed)
        result = run_policy(setting, policy, load, prefill_workers=prefill_workers, seed=seed, noise=noise)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    wall = time.perf_counter() - started
    roles = Counter(role.value for role in make_policy(policy, setting.latency_model()).roles(setting.workers, prefill_workers))
    workers = " + ".join(f"{count} {role}" for role, count in roles.items())
    summary = summarize(result.outcomes())
    record = {
        "setting": setting.name,
        "trace": str(trace),
        "policy": policy,
        "rate": rate,
        "prefill_workers": prefill_workers,
        "workers": dict(roles),
        "slo": setting.slo.describe(),
        "replay": replay.describe(setting),
        "simulated_requests": len(load.requests),
        "wall_seconds": round(wall, 3),
        "refused_requests": result.refused,
        "abandoned_requests": result.abandoned,
        **summary.as_vllm_json(),
    }
    lines = [
        f"{' Simulated Serving Result ':=^60}",
        f"{'Setting:':<40}{setting.name} ({setting.slo.describe()})",
        f"{'Policy:':<40}{policy}",
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
        f"{'Simulated in (s):':<40}{wall:.2f}",
        "=" * 60,
    ]
    typer.echo("\n".join(lines))
    if json_path:
        json_path.write_text(json.dumps(record, indent=2) + "\n")


@app.command("goodput")
def goodput(
    setting_name: SettingOption,
    policies: Annotated[str, typer.Option(help="comma-separated policy names")] = "vllm,sarathi,distserve,tropical,kairos,unified",
    trace: TraceOption = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
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
) -> None:
    """Find each policy's goodput (highest rate with >= 90 % joint SLO attainment) by bisection."""
    from tropical.experiments import PolicyGoodput, SearchSettings, goodput_report

    setting = _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
    names = [name.strip() for name in policies.split(",") if name.strip()]
    search = SearchSettings(replay=_replay(requests, start_s, duration_s, arrival, cv), rel_tolerance=rel_tolerance, seed=seed, noise=noise)

    def progress(found: PolicyGoodput) -> None:
        split = "" if found.prefill_workers is None else f" at {found.prefill_workers} prefill worker(s)"
        typer.echo(
            f"{found.policy:>10}: {found.goodput_rps:.4g} req/s ({found.per_gpu:.4g} per GPU){split}  [{found.seconds:.1f} s]"
        )

    try:
        report = goodput_report(setting, trace or setting.trace, names, search, progress=progress)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if plot:
        from tropical.plots import sweep_and_plot

        report["figures"] = sweep_and_plot(setting, trace or setting.trace, report, plot, search)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


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
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    plot: Annotated[Path | None, typer.Option(help="also draw attainment against the scale into this PNG")] = None,
) -> None:
    """Joint SLO attainment of each policy at one rate as both SLOs are scaled (tightest scale attaining 90 %)."""
    from tropical.experiments import PolicySloSweep, SearchSettings, slo_sweep_report

    setting = _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
    names = [name.strip() for name in policies.split(",") if name.strip()]
    try:
        factors = [float(x) for x in scales.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--scales must be comma-separated numbers, got {scales!r}") from None
    search = SearchSettings(replay=_replay(requests, start_s, duration_s, arrival, cv), seed=seed, noise=noise)

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
        json_path.write_text(json.dumps(report, indent=2) + "\n")


@app.command("ablate")
def ablate(
    setting_name: SettingOption,
    trace: TraceOption = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    requests: NumRequestsOption = None,
    start_s: StartOption = None,
    duration_s: DurationOption = None,
    arrival: ArrivalOption = ArrivalProcess.POISSON,
    cv: CvOption = None,
    rel_tolerance: Annotated[float, typer.Option(min=1e-6, help="bisection stops when the bracket is this fraction of the rate")] = 0.02,
    seed: Annotated[int, typer.Option(help="arrival and noise seed")] = 0,
) -> None:
    """Goodput of `unified` with each of its ideas taken out in turn."""
    from tropical.experiments import PolicyGoodput, SearchSettings, ablation_report

    setting = _setting(setting_name, None, None, None)
    search = SearchSettings(replay=_replay(requests, start_s, duration_s, arrival, cv), rel_tolerance=rel_tolerance, seed=seed)

    def progress(label: str, found: PolicyGoodput) -> None:
        typer.echo(f"{label:<64} {found.goodput_rps:.4g} req/s  [{found.seconds:.1f} s]")

    try:
        report = ablation_report(setting, trace or setting.trace, search, progress=progress)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


# --- live benchmark -----------------------------------------------------------------------------


@app.command("bench")
def bench(
    ctx: typer.Context,
    embedded: Annotated[bool, typer.Option("--embedded", help="serve in this process (in-memory bus and store unless URLs are given)")] = False,
    spawn: Annotated[
        bool, typer.Option("--spawn", help="serve as separate processes (`tropical serve` router and workers) on the broker and Redis, then stop them")
    ] = False,
    policy: PolicyName = "unified",
    workers: Annotated[int, typer.Option(min=1, help="--embedded / --spawn: workers to serve")] = 2,
    engine: Annotated[str, typer.Option("--engine", help="--embedded / --spawn: tiny, or emulated (the setting's timing and KV)")] = "tiny",
    setting_name: Annotated[
        str | None,
        typer.Option("--setting", help="replay this preset's trace with its SLOs as `tropical sim` does; without it, Poisson load (emulated engines: chat-13b)"),
    ] = None,
    trace: TraceOption = None,
    rate: Annotated[float | None, typer.Option("--request-rate", min=1e-9, help="arrival rate (req/s); a timed trace keeps its own without it")] = None,
    num_prompts: Annotated[int | None, typer.Option("--num-prompts", "--num-requests", min=1, help="requests (default: 100 synthetic; a setting's as in `sim`)")] = None,
    start_s: StartOption = None,
    duration_s: DurationOption = None,
    arrival: ArrivalOption = ArrivalProcess.POISSON,
    cv: CvOption = None,
    input_len: Annotated[int, typer.Option(min=1, help="synthetic load: prompt tokens")] = 128,
    output_len: Annotated[int, typer.Option(min=1, help="synthetic load: output tokens")] = 64,
    seed: Annotated[int, typer.Option(help="arrival seed, as `tropical sim --seed`")] = 0,
    ttft_slo_ms: TtftMsOption = None,
    ttft_slo_scale: TtftScaleOption = None,
    tpot_slo_ms: TpotMsOption = None,
    request_timeout_s: Annotated[float, typer.Option(min=1e-3, help="a request not done this long after its arrival fails")] = 300.0,
    compare_sim: Annotated[
        bool, typer.Option("--compare-sim", help="--embedded / --spawn emulated: also simulate the same requests on the same roles")
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report here")] = None,
) -> None:
    """Replay a trace or Poisson load onto a deployment and print a `vllm bench serve`-style summary."""
    import time
    from collections import Counter

    from tropical.experiments import setting_named, workload
    from tropical.live.bench import bench_embedded, bench_remote, bench_report, bench_requests, bench_spawned, poisson_load, simulated_summary
    from tropical.live.run import deployment

    settings: Settings = ctx.obj
    setting = None if setting_name is None else _setting(setting_name, ttft_slo_ms, ttft_slo_scale, tpot_slo_ms)
    if setting is None:
        if rate is None or trace is not None or start_s is not None or duration_s is not None or ttft_slo_scale is not None:
            raise typer.BadParameter("without --setting the load is Poisson: give --request-rate; --trace, windows and --ttft-slo-scale need --setting")
        ttft = (ttft_slo_ms or settings.default_ttft_slo_ms) / 1000.0
        tpot = (tpot_slo_ms or settings.default_tpot_slo_ms) / 1000.0
        load = poisson_load(num_prompts or 100, rate=rate, input_len=input_len, output_len=output_len, ttft_slo=ttft, tpot_slo=tpot, seed=seed)
    else:
        try:
            load = workload(setting, trace or setting.trace, rate, replay=_replay(num_prompts, start_s, duration_s, arrival, cv), seed=seed).requests
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    timing = setting_named(setting_name or "chat-13b")  # what emulated engines and --compare-sim time steps by
    roles: tuple[Any, ...] = ()
    started = time.perf_counter()
    if embedded and spawn:
        raise typer.BadParameter("--embedded serves in this process, --spawn in processes of their own: give one")
    if embedded or spawn:
        choice = _engine_choice(engine, timing.name, None)
        roles = _live_roles(_policy_checked(policy), workers, choice.latency_model())
        if compare_sim and engine != "emulated":
            raise typer.BadParameter("--compare-sim needs --engine emulated: only emulated engines keep the simulator's time")
    if spawn:
        if settings.broker_url.startswith(MEMORY_URL) or settings.redis_url.startswith(MEMORY_URL):
            raise typer.BadParameter("--spawn needs a real broker and Redis (--broker-url, --redis-url)")
        settings = settings.with_overrides(namespace=f"{settings.namespace}.bench-{uuid.uuid4().hex[:8]}")
        try:
            result = run_async(bench_spawned(settings, policy, roles, choice, bench_requests(load), timeout_s=request_timeout_s))
        except RuntimeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    elif embedded:
        if not os.environ.get("TROPICAL_BROKER_URL") and ctx.parent is not None and ctx.parent.params.get("broker_url") is None:
            settings = settings.with_overrides(broker_url=MEMORY_URL, redis_url=MEMORY_URL)
        result = run_async(bench_embedded(deployment(settings, policy, workers, choice), bench_requests(load), timeout_s=request_timeout_s))
    else:
        if settings.broker_url.startswith(MEMORY_URL) or compare_sim:
            raise typer.BadParameter("give --embedded, --spawn, or the --broker-url of a running deployment (--compare-sim needs --embedded or --spawn)")
        result = run_async(bench_remote(settings, bench_requests(load), timeout_s=request_timeout_s))
    report = bench_report(result)
    simulated = simulated_summary(timing, policy, roles, load, seed=seed) if compare_sim else None
    record = {
        "mode": "embedded" if embedded else "spawned" if spawn else "broker",
        "namespace": settings.namespace,  # a spawned deployment's own: its queues are removed afterwards
        "setting": None if setting is None else setting.name,
        "trace": None if setting is None else str(trace or setting.trace),
        "policy": policy if embedded or spawn else None,
        "engine": engine if embedded or spawn else None,
        "workers": dict(Counter(role.value for role in roles)),
        "rate": rate,
        "seed": seed,
        "wall_seconds": round(time.perf_counter() - started, 3),
        **report,
    }
    if simulated is not None:
        record["sim"] = simulated.as_vllm_json()
        record["live_minus_sim_attainment"] = report["slo_attainment"] - simulated.attainment
    typer.echo("\n".join(_bench_lines(record, simulated)))
    if json_path:
        json_path.write_text(json.dumps(record, indent=2) + "\n")


def _live_roles(policy: str, workers: int, model: Any) -> tuple[Any, ...]:
    """The embedded deployment's roles (a disaggregated policy splits its workers in half); exit 2 when too few."""
    from tropical.live.run import policy_roles
    from tropical.policies import make_policy

    try:
        return policy_roles(make_policy(policy, model), workers)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _bench_lines(record: dict[str, Any], simulated: Any) -> list[str]:
    """The console block of `tropical bench`: `vllm bench serve`'s lines, attainment and where the time went."""
    r = record
    workers = " + ".join(f"{count} {role}" for role, count in r["workers"].items()) or "those of the running deployment"
    rate = "the trace's own rate" if r["rate"] is None else f"{r['rate']:g} req/s"
    lines = [
        f"{' Serving Benchmark Result ':=^60}",
        f"{'Load:':<40}{r['setting'] or 'poisson'}, {r['num_prompts']} requests at {rate}",
        f"{'Policy / workers:':<40}{r['policy'] or '-'} / {workers}",
        f"{'Successful requests:':<40}{r['completed']}",
        f"{'Failed requests (error / timeout):':<40}{r['failed']} ({r['error_replies']} / {r['timeouts']})",
        f"{'Benchmark duration (s):':<40}{r['duration']:.2f}",
        f"{'Request throughput (req/s):':<40}{r['request_throughput']:.3f}",
        f"{'Request goodput (req/s):':<40}{r['request_goodput']:.3f}",
        f"{'Output token throughput (tok/s):':<40}{r['output_throughput']:.1f}",
        f"{'SLO attainment (both / TTFT / TPOT):':<40}{r['slo_attainment']:.3f} / {r['ttft_slo_attainment']:.3f} / {r['tpot_slo_attainment']:.3f}",
        f"{'Mean / P90 / P99 TTFT (ms):':<40}{r['mean_ttft_ms']:.1f} / {r['p90_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f}",
        f"{'Mean / P90 / P99 TPOT (ms):':<40}{r['mean_tpot_ms']:.1f} / {r['p90_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f}",
        f"{'Mean / P99 ITL (ms):':<40}{r['mean_itl_ms']:.1f} / {r['p99_itl_ms']:.1f}",
        f"{'Queue / prefill / KV / decode (ms):':<40}"
        f"{r['mean_queue_ms']:.1f} / {r['mean_prefill_ms']:.1f} / {r['mean_kv_transfer_ms']:.1f} / {r['mean_decode_ms']:.1f}",
        f"{'Late publishes, mean / max (ms):':<40}{r['mean_send_lag_ms']:.1f} / {r['max_send_lag_ms']:.1f}",
        f"{'Control plane p50 / p99 (ms):':<40}{r['p50_control_total_ms']:.2f} / {r['p99_control_total_ms']:.2f}"
        f"  (queue {r['p50_control_to_router_ms']:.2f}, dispatch {r['p50_control_to_worker_ms']:.2f}, first token {r['p50_control_to_client_ms']:.2f} at p50)",
    ]
    if simulated is not None:
        lines.append(f"{'Simulated attainment (same requests):':<40}{simulated.attainment:.3f} / {simulated.ttft_attainment:.3f} / {simulated.tpot_attainment:.3f}")
    return lines + ["=" * 60]


if __name__ == "__main__":
    app()
