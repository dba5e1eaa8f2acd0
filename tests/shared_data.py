"""Where the project's data collection lives: `<repo root>/../shared/data` (CI keeps it there)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """Path of a file in the data collection; fails the test, with the reason, when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.fail(
            f"data file {relative!r} not found: the tests expect the project's data collection at {SHARED_DATA} "
            "(beside the repository checkout, as on CI)"
        )
    return path
