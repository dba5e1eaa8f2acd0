"""The message bus: one interface, a RabbitMQ implementation and an in-process one."""

from tropical.bus.base import (
    BrokerUnavailable,
    Bus,
    BusClosed,
    BusError,
    Delivery,
    Handler,
    QueueLocked,
    QueueMismatch,
    QueueNotFound,
    QueueSpec,
    Subscription,
    Unroutable,
    dead_letter_queue,
)
from tropical.bus.memory import MemoryBroker, MemoryBus
from tropical.settings import MEMORY_URL, Settings

__all__ = [
    "BrokerUnavailable",
    "Bus",
    "BusClosed",
    "BusError",
    "Delivery",
    "Handler",
    "MemoryBroker",
    "MemoryBus",
    "QueueLocked",
    "QueueMismatch",
    "QueueNotFound",
    "QueueSpec",
    "Subscription",
    "Unroutable",
    "connect_bus",
    "dead_letter_queue",
]


async def connect_bus(settings: Settings, *, broker: MemoryBroker | None = None) -> Bus:
    """Connect to the broker that `settings.broker_url` names.

    With `memory://`, pass the process's MemoryBroker so every service in it
    shares the same queues; without one, the bus gets a broker of its own.
    """
    if settings.broker_url.startswith(MEMORY_URL):
        return MemoryBus(broker)
    from tropical.bus.rabbitmq import RabbitBus

    return await RabbitBus.connect(settings.broker_url)
