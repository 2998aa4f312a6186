#!/usr/bin/env bash
# Pretrain on all GPUs of one workstation: one process drives every visible GPU (JAX shards the
# batch over a 1-D 'data' mesh of all devices). Run it again with the same workdir to resume.
#
#   launch/workstation.sh CONFIG WORKDIR [--config.field=value ...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/workstation.sh configs/cifar10_vit_t.py runs/cifar10
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# Let XLA take most of each GPU up front; the grain workers use the CPU cores.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m mae_jax.main --config="$config" --workdir="$workdir" "$@"
