"""The workload traces and length tables shipped with the package, so a bare checkout runs every preset.

Files keep the names they have in the published collection they come from
(`traces/azure_conv_2023.csv`, `lengths/…`); the larger ones are stored gzip
compressed under the same name plus `.gz`, and `data_file` finds either, so
callers name a file once, whatever its storage. Provenance, licences and the
sha256 of each original file are in `README.md` and `SHA256SUMS` beside this
module.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent
DATA_DIR_VARIABLE = "TROPICAL_DATA_DIR"  # a fuller copy of the collection elsewhere, used instead of the shipped files
COMPRESSED_SUFFIX = ".gz"


def data_dir() -> Path:
    """Where data files are looked up: `TROPICAL_DATA_DIR` when set, else the files shipped here."""
    configured = os.environ.get(DATA_DIR_VARIABLE)
    return Path(configured) if configured else PACKAGE_DATA


def data_file(name: str | Path, directory: Path | None = None) -> Path:
    """The data file `name` (e.g. 'traces/azure_conv_2023.csv') in `directory`, as stored there.

    The file as named when it exists, else its gzip-compressed twin
    (`name` + '.gz'); when neither exists, the path as named, so the error
    that follows names the file the caller asked for.
    """
    base = data_dir() if directory is None else directory
    plain = base / name
    compressed = plain.with_name(plain.name + COMPRESSED_SUFFIX)
    if not plain.exists() and compressed.exists():
        return compressed
    return plain


def shipped_file(name: str | Path) -> Path:
    """The file `name` among those shipped with the package, whatever `TROPICAL_DATA_DIR` says."""
    return data_file(name, PACKAGE_DATA)
