#!/usr/bin/env bash
# One-device GPU check (docs/benchmarks.md, "GPU check"): the CUDA/bf16 path against the CPU oracle,
# then optimizer-step / refresh timings and peak memory at 1B-layer shapes vs torch AdamW (fused) and
# galore-torch. Prints markdown tables. Needs a CUDA device (exits 2 without one); runs in < 8 minutes.
#
#   benchmarks/gpu_check.sh                          # from the repository root, after `make install`
#   PYTHON=python3 benchmarks/gpu_check.sh --layers 2
#   benchmarks/gpu_check.sh --device cpu --tiny      # dry run of every part on CPU (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" benchmarks/gpu_check.py "$@"
