"""Latency models: how long prefills and decode steps take, fitted from profiles."""

from shared.latency.model import Chunk, LatencyModel

__all__ = ["Chunk", "LatencyModel"]
