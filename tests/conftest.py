"""Shared test configuration."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from tests.bus_harness import Broker

if not torch.cuda.is_available():  # Triton kernels then run in Triton's interpreter, on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """The bus under test, once in memory and once on the real RabbitMQ."""
    harness = Broker(request.param)
    yield harness
    await harness.cleanup()


@pytest.fixture
def lengths(tmp_path: Path) -> Path:
    """A small length table: 200 chat-like prompts and outputs, for the simulator's commands and searches."""
    rng = random.Random(11)
    path = tmp_path / "lengths.csv"
    rows = ["num_prefill_tokens,num_decode_tokens"] + [f"{rng.randint(50, 1500)},{rng.randint(5, 150)}" for _ in range(200)]
    path.write_text("\n".join(rows) + "\n")
    return path
