"""The profiler: profiles this machine's engine and publishes its latency model (tropical.live.profiler_service)."""

import sys

from tropical.cli import app


def main() -> None:
    """Settings from TROPICAL_* variables; options as `tropical serve profiler --help` lists them."""
    app(args=["serve", "profiler", *sys.argv[1:]], prog_name="python -m services.profiler")
