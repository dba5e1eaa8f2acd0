"""The real servers the integration tests use; missing servers fail the tests, never skip them."""

from __future__ import annotations

import os

import pytest

from tropical.bus.base import Bus

RABBITMQ_URL = os.environ.get("TROPICAL_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TROPICAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_HINT = "start it with scripts/services.sh (or deselect with -m 'not integration')"


async def connect_rabbit(url: str = RABBITMQ_URL) -> Bus:
    from tropical.bus.rabbitmq import RabbitBus

    try:
        return await RabbitBus.connect(url, connect_timeout=5.0)
    except (OSError, ConnectionError, TimeoutError) as exc:
        pytest.fail(f"RabbitMQ at {url} cannot be reached ({exc!r}); {START_HINT}", pytrace=False)
