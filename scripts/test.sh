#!/usr/bin/env bash
# Installs everything a fresh machine needs and runs the whole test suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup.sh)
scripts/services.sh
exec "$py" -m pytest "$@"
