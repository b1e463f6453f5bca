#!/usr/bin/env bash
# One-shot check for a machine with an NVIDIA GPU: `python -m benchmarks --gpu` (SD 1.5 and SDXL, random weights
# from the shipped configs, under 8 minutes) and the opt-in GPU tests, each under its own timeout.
#   tools/gpu_check.sh [benchmark options, e.g. --only sd15 --compile]
# PYTHON: an interpreter with CUDA torch and the project's packages (default .venv/bin/python, else python3).
# OUT: folder for the benchmark's JSON (default benchmarks/results). BENCH_TIMEOUT / TEST_TIMEOUT: seconds (420 + 120:
# one device call runs at most 600 s). The device machine starts bare: install CUDA torch and the lock first.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || echo "nvidia-smi: not found"
status=0
PYTHONPATH=. timeout "${BENCH_TIMEOUT:-420}" "$PYTHON" -m benchmarks --gpu --out "$OUT_DIR/gpu-$(date -u +%F).json" "$@" \
    2> >(tee "$OUT_DIR/gpu-benchmark.log" >&2) || status=$?
echo "benchmark exit status: $status"
if [ "$status" -eq 2 ]; then  # refused (no CUDA) or bad options: the GPU tests would fail the same way
    exit 2
fi
SDTEX_GPU=1 timeout "${TEST_TIMEOUT:-120}" "$PYTHON" -m pytest -x -q -p no:cacheprovider \
    tests/backend/test_opt_in.py tests/test_benchmark_gpu_args.py || status=$?
echo "gpu_check exit status: $status"
exit "$status"
