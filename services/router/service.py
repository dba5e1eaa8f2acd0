"""The router: places requests from the `requests` queue on the workers (tropical.live.router_service)."""

import sys

from tropical.cli import app


def main() -> None:
    """Settings from TROPICAL_* variables; options as `tropical serve router --help` lists them."""
    app(args=["serve", "router", *sys.argv[1:]], prog_name="python -m services.router")
