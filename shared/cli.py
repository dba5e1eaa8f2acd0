"""The `tropical` command: one entry point for services, benchmarks and tools."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from shared.settings import MEMORY_URL, Settings

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
    from shared.bus import Bus, MemoryBroker
    from shared.bus.benchmark import measure_round_trips

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
            from shared.bus.rabbitmq import RabbitBus

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


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, {platform.platform(terse=True)}"
