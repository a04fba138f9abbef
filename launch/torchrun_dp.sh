#!/usr/bin/env bash
# Train the tiny LLaMA with ShardedPlumageAdamW under the real torchrun launcher (DESIGN §4.1).
#
#   launch/torchrun_dp.sh --steps 50 --rank 8 --update-interval 10      # NPROC ranks on this node
#   NPROC=4 launch/torchrun_dp.sh --steps 20
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=host0:29500 launch/torchrun_dp.sh ...   # one line per node
#
# gloo on CPU, nccl when CUDA is available (launch/train_dp.py picks it). Extra arguments go to
# launch/train_dp.py (see `python launch/train_dp.py --help`).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-localhost:0}"   # port 0: c10d picks a free port (single node)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-plumage_dp}" \
    "$HERE/train_dp.py" "$@"
