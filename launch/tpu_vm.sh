#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM or pod slice: the same command on every worker, one process each;
# jax.distributed.initialize() finds the other workers by itself. Run from your machine with
# gcloud set up. WORKDIR is a bucket path (gs://BUCKET/run: every worker writes there directly,
# docs/runs.md "Runs in a bucket") or a folder every worker sees (a Filestore/NFS mount); the
# repository must be at REPO_DIR on every worker.
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]
#   REPO_DIR=~/mae_jax launch/tpu_vm.sh my-v4-32 us-central2-b configs/imagenet_vit_l.py gs://my-runs/vit_l
#
# First time, install on every worker:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#     --command='cd ~/mae_jax && pip install -e ".[tpu]"'
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${REPO_DIR:-~/mae_jax}
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="cd $repo && \
  python -m mae_jax.main --config=$config --workdir=$workdir --distributed$extra"
