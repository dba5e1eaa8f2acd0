"""Shared test configuration."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.bus_harness import Broker


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """The bus under test, once in memory and once on the real RabbitMQ."""
    harness = Broker(request.param)
    yield harness
    await harness.cleanup()
