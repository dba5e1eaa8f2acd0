"""The shipped workloads: unmodified copies of the published files, documented, packaged, found by name."""

from __future__ import annotations

import gzip
import hashlib
import tomllib
from pathlib import Path

import pytest

from tropical.data import PACKAGE_DATA, data_dir, data_file, shipped_file
from tropical.experiments import DATA, SETTINGS

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTES = {"__init__.py", "README.md", "SHA256SUMS"}


def published_sums() -> dict[str, str]:
    """Original file name → sha256 of its uncompressed content, as the shipped SHA256SUMS records it."""
    sums = {}
    for line in (PACKAGE_DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name] = digest
    return sums


def stored_files() -> set[Path]:
    return {p for p in PACKAGE_DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.name not in NOTES}


def test_every_shipped_file_decompresses_to_its_published_original() -> None:
    sums = published_sums()
    assert {shipped_file(name) for name in sums} == stored_files()
    for name, digest in sums.items():
        stored = shipped_file(name)
        content = stored.read_bytes()
        if stored.suffix == ".gz":
            content = gzip.decompress(content)
        assert hashlib.sha256(content).hexdigest() == digest, f"{name} differs from the published file"


def test_large_files_are_stored_compressed_and_the_whole_stays_small() -> None:
    for path in stored_files():
        original = len(gzip.decompress(path.read_bytes())) if path.suffix == ".gz" else path.stat().st_size
        assert (path.suffix == ".gz") == (original > 100_000), path.name
    assert sum(p.stat().st_size for p in stored_files()) < 3_000_000


def test_readme_names_every_shipped_file() -> None:
    readme = (PACKAGE_DATA / "README.md").read_text()
    for name in published_sums():
        assert name in readme, name


def test_pyproject_ships_every_data_file() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["tropical.data"]
    shipped = {path for pattern in patterns for path in PACKAGE_DATA.glob(pattern)}
    assert stored_files() | {PACKAGE_DATA / "README.md", PACKAGE_DATA / "SHA256SUMS"} <= shipped


def test_every_preset_trace_is_a_shipped_file() -> None:
    assert DATA == data_dir()
    for setting in SETTINGS.values():
        assert setting.trace.is_file(), setting.name
        name = setting.trace.relative_to(DATA).as_posix().removesuffix(".gz")
        assert name in published_sums(), setting.name


def test_data_dir_is_the_package_unless_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TROPICAL_DATA_DIR", raising=False)
    assert data_dir() == PACKAGE_DATA
    assert data_file("traces/azure_conv_2023.csv") == PACKAGE_DATA / "traces" / "azure_conv_2023.csv.gz"
    monkeypatch.setenv("TROPICAL_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert shipped_file("traces/azure_conv_2023.csv") == PACKAGE_DATA / "traces" / "azure_conv_2023.csv.gz"


def test_data_file_prefers_the_plain_file_then_its_gzip_twin(tmp_path: Path) -> None:
    assert data_file("t/a.csv", tmp_path) == tmp_path / "t" / "a.csv"  # neither: the name asked for
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.csv.gz").write_bytes(gzip.compress(b"x"))
    assert data_file("t/a.csv", tmp_path) == tmp_path / "t" / "a.csv.gz"
    (tmp_path / "t" / "a.csv").write_text("x")
    assert data_file("t/a.csv", tmp_path) == tmp_path / "t" / "a.csv"
