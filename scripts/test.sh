#!/usr/bin/env bash
# Installs everything a fresh machine needs and runs the whole test suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${TROPICAL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
# The CPU build of torch first, so nothing later pulls the multi-gigabyte CUDA wheels.
"$py" -m pip install --quiet --disable-pip-version-check 'torch==2.13.0' 2>&1 | grep -v '^WARNING: Location' || true
"$py" -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
"$py" -c 'import torch, shared, aio_pika, redis, pytest' # fail loudly if an install above did not land

scripts/services.sh
exec "$py" -m pytest "$@"
