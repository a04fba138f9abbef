#!/usr/bin/env bash
# Training quality at GPU scale (issue 20; docs/quality.md §10): AdamW, GaLore and PLUMAGE × 2 seeds on
# the ~11M-parameter LLaMA (6 × 384, seq 256 × batch 64, 1000 steps, fp32, rank 96, τ = 200), each at its
# matrix LR swept at width 256 (the widest point measured), then the ~40M point (8 × 640) if it fits. Prints the per-seed tables.
# Needs a CUDA device (exits 2 without one); sized to finish in < 9 minutes on one H200.
#
#   bash benchmarks/gpu_quality.sh                            # from the repository root
#   bash benchmarks/gpu_quality.sh --out "$OUT/gpu_quality"   # keep the run folders somewhere else
#   PYTHON=python3 bash benchmarks/gpu_quality.sh --points 40m --big-steps 1000   # the 40M point alone
#   bash benchmarks/gpu_quality.sh --device cpu --tiny        # dry run of every part on CPU (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_QUALITY_TIMEOUT:-530}" "$PYTHON" benchmarks/gpu_quality.py "$@"
