"""The gateway: OpenAI's HTTP API in front of the deployment's `requests` queue (tropical.gateway)."""

import sys

from tropical.cli import app


def main() -> None:
    """Settings from TROPICAL_* variables; options as `tropical serve gateway --help` lists them."""
    app(args=["serve", "gateway", *sys.argv[1:]], prog_name="python -m services.gateway")
