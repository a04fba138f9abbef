#!/usr/bin/env bash
# PLUMAGE + DeepSpeed on several nodes with DeepSpeed's pdsh launcher.
#   launch/deepspeed_multinode.sh HOSTFILE [CONFIG=configs/deepspeed/zero2.json] [extra args]
# HOSTFILE (one line per node, see docs/deepspeed.md):
#   node-a slots=8
#   node-b slots=8
# Requirements: passwordless ssh from this node to every node, the same repository path and
# Python environment on every node, pdsh installed (or pass --launcher openmpi via DS_LAUNCHER).
# MASTER_ADDR defaults to the first host of HOSTFILE.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${1:?usage: $0 HOSTFILE [CONFIG] [extra args]}"
CONFIG="${2:-$ROOT/configs/deepspeed/zero2.json}"
shift $(( $# > 2 ? 2 : $# )) || true
MASTER="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER" --launcher "${DS_LAUNCHER:-pdsh}" \
    "$ROOT/launch/deepspeed_train.py" --deepspeed_config "$CONFIG" "$@"
