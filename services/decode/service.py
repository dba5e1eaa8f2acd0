"""A decode worker: the core's plans on its engine, over the bus (tropical.live.worker_service)."""

import sys

from tropical.cli import app


def main() -> None:
    """Settings from TROPICAL_* variables; options as `tropical serve decode --help` lists them."""
    app(args=["serve", "decode", *sys.argv[1:]], prog_name="python -m services.decode")
