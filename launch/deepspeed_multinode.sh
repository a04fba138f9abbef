#!/usr/bin/env bash
# The main job under DeepSpeed on several nodes with DeepSpeed's pdsh launcher.
#   launch/deepspeed_multinode.sh HOSTFILE [DS_CONFIG=configs/deepspeed/zero2.json] [plumage-ds train arguments]
# HOSTFILE (one line per node, see docs/deepspeed.md):
#   node-a slots=8
#   node-b slots=8
# Requirements: passwordless ssh from this node to every node, the same repository path and
# Python environment on every node, a shared file system for --out (checkpoints are written by
# every rank into the same directory), pdsh installed (or pass --launcher openmpi via DS_LAUNCHER).
# MASTER_ADDR defaults to the first host of HOSTFILE.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${1:?usage: $0 HOSTFILE [DS_CONFIG] [plumage-ds train arguments]}"
CONFIG="${2:-$ROOT/configs/deepspeed/zero2.json}"
shift $(( $# > 2 ? 2 : $# )) || true
MASTER="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER" --launcher "${DS_LAUNCHER:-pdsh}" \
    --module plumage_ds train --deepspeed "$CONFIG" "$@"
