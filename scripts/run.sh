#!/usr/bin/env bash
# Installs what a fresh machine needs and runs the `tropical` command; by default the main job on the
# embedded default: the unified policy on the chat-13b preset (8 simulated A100 workers, the shipped Azure trace).
# Usage: scripts/run.sh [tropical args...]
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup.sh)
[ "$#" -gt 0 ] || set -- sim --setting chat-13b --policy unified --rate 12
exec "$(dirname "$py")/tropical" "$@"
