#!/usr/bin/env bash
# The main job on FSDP2 or HSDP under torchrun, one line per node (CUDA/NCCL; gloo on CPU).
#
#   launch/torchrun_fsdp.sh fsdp2 --config configs/demo.yaml --out runs/fsdp2            # one node
#   NNODES=2 NODE_RANK=0 NPROC=8 RDZV_ENDPOINT=node0:29500 launch/torchrun_fsdp.sh hsdp --config configs/small.yaml --out runs/hsdp
#   NNODES=2 NODE_RANK=1 NPROC=8 RDZV_ENDPOINT=node0:29500 launch/torchrun_fsdp.sh hsdp --config configs/small.yaml --out runs/hsdp
#
# hsdp: FSDP shards inside each node (NPROC ranks), the optimizer syncs the nodes with compressed
# projections (docs/fsdp.md). Every argument after the engine goes to `plumage-ds train`.
set -euo pipefail
ENGINE="${1:?usage: launch/torchrun_fsdp.sh fsdp2|hsdp ARGS...}"
shift
case "$ENGINE" in fsdp2|hsdp) ;; *) echo "launch/torchrun_fsdp.sh: engine must be fsdp2 or hsdp, got '$ENGINE'" >&2; exit 2 ;; esac
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" --engine "$ENGINE" "$@"
