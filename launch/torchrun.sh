#!/usr/bin/env bash
# The main job under the real torchrun launcher (engines ddp, ddp_hook, sharded, fsdp2, hsdp; gloo
# on CPU, nccl with CUDA). Every argument goes to `plumage-ds train`:
#
#   launch/torchrun.sh --config configs/tiny.yaml --engine sharded --out runs/sharded
#   NPROC=4 launch/torchrun.sh --config configs/demo.yaml --engine ddp --out runs/ddp --set optimizer.estimator=galore
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=host0:29500 launch/torchrun.sh ...   # one line per node
#   launch/torchrun.sh --out runs/sharded --resume                           # continue a run
#   MAX_RESTARTS=3 launch/torchrun.sh --config ... --set train.save_interval=100 --out runs/x
#       # a failed attempt is restarted and continues from the newest complete checkpoint
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
NODE_RANK_ARG=()
[[ -n "${NODE_RANK:-}" ]] && NODE_RANK_ARG=(--node-rank="$NODE_RANK")
RDZV_ENDPOINT="${RDZV_ENDPOINT:-localhost:0}"   # port 0: c10d picks a free port (single node)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Elastic restarts (--max-restarts): with the store shared by torchrun's agent (the default since
# torch 2.5) a restarted attempt can read the previous attempt's addresses and fail to connect
# (pytorch/pytorch#135712); a fresh store per attempt avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
exec python -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NPROC" "${NODE_RANK_ARG[@]}" --max-restarts="$MAX_RESTARTS" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-plumage_ds}" \
    -m plumage_ds train "$@"
