#!/usr/bin/env bash
# The main job under DeepSpeed on one GPU node (nccl).
#   launch/deepspeed_single_node.sh [DS_CONFIG=configs/deepspeed/zero2.json] [NGPUS=all] [plumage-ds train arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:-$ROOT/configs/deepspeed/zero2.json}"
NGPUS="${2:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
shift $(( $# > 2 ? 2 : $# )) || true
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec deepspeed --num_gpus "$NGPUS" --module plumage_ds train --deepspeed "$CONFIG" "$@"
