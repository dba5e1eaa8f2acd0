#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the GPU tests, then the engine's step benchmark against the memory
# roofline and Hugging Face, then the KV handoff over CUDA IPC. Reports and logs go to REPORT_DIR.
#
#   scripts/gpu-check.sh [REPORT_DIR]      (default gpu-reports; $PYTHON picks the interpreter, default python3)
#
# Needs the project importable by that interpreter (installed, or PYTHONPATH=shared:.) with a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-reports}
py=${PYTHON:-python3}
mkdir -p "$out"
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu-check: no CUDA device is available")'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/device.csv" 2>&1 || true
status=0
"$py" -m pytest -q -p no:cacheprovider -rs \
    tests/test_engine_gpu.py tests/test_kv_gpu.py tests/test_engine_decode_graphs.py tests/test_kv_nccl.py \
    2>&1 | tee "$out/gpu-tests.log" || status=1
"$py" -m tropical.cli bench-engine --device cuda --json "$out/engine-steps.json" 2>&1 | tee "$out/engine-steps.log" || status=1
"$py" -m tropical.cli bench-kv --transport cuda_ipc --json "$out/kv-handoff.json" 2>&1 | tee "$out/kv-handoff.log" || status=1
exit $status
