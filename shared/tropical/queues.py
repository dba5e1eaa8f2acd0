"""The names and properties of the deployment's queues, in one place."""

from __future__ import annotations

from tropical.bus import Bus, QueueSpec
from tropical.settings import Settings


def requests_queue(settings: Settings) -> QueueSpec:
    """Where clients publish: durable, so requests survive a broker restart; refused ones are dead-lettered."""
    return QueueSpec(settings.queue("requests"))


def worker_queue(settings: Settings, name: str) -> str:
    """Where the router and other workers reach worker `name`."""
    return settings.queue(f"worker.{name}")


def reply_queue(settings: Settings, client_id: str) -> QueueSpec:
    """A client's private stream of tokens and errors; it vanishes with the client's connection."""
    return QueueSpec.reply(settings.queue(f"reply.{client_id}"))


async def declare_requests_queue(bus: Bus, settings: Settings) -> str:
    """Every side declares what it uses, idempotently: whichever starts first creates it."""
    spec = requests_queue(settings)
    await bus.declare_queue(spec)
    return spec.name
