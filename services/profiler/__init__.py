"""Profiler: measures the engine, fits latency models and publishes them to the store."""
