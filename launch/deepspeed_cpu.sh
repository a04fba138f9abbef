#!/usr/bin/env bash
# The main job under DeepSpeed on CPU (gloo), one node, N processes, through the real launcher.
#   launch/deepspeed_cpu.sh [DS_CONFIG=configs/deepspeed/zero2.json] [NPROC=2] [plumage-ds train arguments]
#   launch/deepspeed_cpu.sh configs/deepspeed/zero2.json 2 --config configs/tiny.yaml --out runs/ds
# On CPU `--num_gpus` means "processes": this build accepts `--num_nodes 1 --num_accelerators N`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:-$ROOT/configs/deepspeed/zero2.json}"
NPROC="${2:-2}"
shift $(( $# > 2 ? 2 : $# )) || true
export DS_ACCELERATOR=cpu
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec deepspeed --num_nodes 1 --num_accelerators "$NPROC" --module plumage_ds train --deepspeed "$CONFIG" "$@"
