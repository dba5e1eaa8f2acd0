#!/usr/bin/env bash
# Installs what a fresh machine needs and runs the `tropical` command; by default the main job on the
# embedded default: SmolLM2-135M-Instruct served on the CPU by a whole deployment in this process, behind the
# OpenAI-compatible gateway, answering one chat request sent to it over HTTP.
# Usage: scripts/run.sh [tropical args...]
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup.sh)
[ "$#" -gt 0 ] || set -- up --engine smollm2 --port 0 --prompt "What is the capital of France?"
exec "$(dirname "$py")/tropical" "$@"
