"""The names and properties of the deployment's queues, in one place.

The work queues (`requests` and each worker's) are durable and of the
deployment's `queue_type`: quorum queues, replicated across a RabbitMQ
cluster, when it is `quorum`. Reply queues are always classic: each is
exclusive to its client's connection, which a quorum queue cannot be.
"""

from __future__ import annotations

from tropical.bus import Bus, QueueSpec
from tropical.settings import Settings


def work_queue(settings: Settings, name: str) -> QueueSpec:
    """A durable queue of this deployment whose refused messages are dead-lettered."""
    return QueueSpec(settings.queue(name), quorum=settings.queue_type == "quorum")


def requests_queue(settings: Settings) -> QueueSpec:
    """Where clients publish: durable, so requests survive a broker restart; refused ones are dead-lettered."""
    return work_queue(settings, "requests")


def worker_queue(settings: Settings, name: str) -> str:
    """Where the router and other workers reach worker `name`."""
    return worker_queue_spec(settings, name).name


def worker_queue_spec(settings: Settings, name: str) -> QueueSpec:
    """Worker `name`'s queue as it declares it."""
    return work_queue(settings, f"worker.{name}")


def reply_queue(settings: Settings, client_id: str) -> QueueSpec:
    """A client's private stream of tokens and errors; it vanishes with the client's connection."""
    return QueueSpec.reply(settings.queue(f"reply.{client_id}"))


async def declare_requests_queue(bus: Bus, settings: Settings) -> str:
    """Every side declares what it uses, idempotently: whichever starts first creates it."""
    spec = requests_queue(settings)
    await bus.declare_queue(spec)
    return spec.name
