"""A multiplex worker: the core's plans on its engine, over the bus (tropical.live.worker_service)."""

import sys

from tropical.cli import app


def main() -> None:
    """Settings from TROPICAL_* variables; options as `tropical serve multiplex --help` lists them."""
    app(args=["serve", "multiplex", *sys.argv[1:]], prog_name="python -m services.multiplex")
