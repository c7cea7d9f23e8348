#!/usr/bin/env bash
# Creates a Cloud TPU VM, installs ddpo_jax with jax[tpu] on every worker, and
# starts the same run on all of them. Single-host slices (v4-8, v5litepod-8,
# ...) are supported; multi-host pod slices are not yet (the trainer does not
# initialise jax.distributed nor gather rewards across hosts so far).
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra flags...]
#   launch/tpu_vm.sh ddpo us-central2-b v4-8 configs/compress.py runs/compress
#
# Needs gcloud, authenticated, with a project set.
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n 2,10p "$0"
  exit 2
fi
name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5
shift 5
version=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
repo=${DDPO_JAX_REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin)}

gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$version"

# The same commands on every worker: clone, install with jax[tpu], run.
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  [ -d ddpo_jax ] || git clone '$repo' ddpo_jax
  cd ddpo_jax && python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e '.[tpu]'
  nohup python -m ddpo_jax.main --config='$config' --workdir='$workdir' $* > run.log 2>&1 &
"
echo "started on every worker of $name; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=0 --command='tail -f ddpo_jax/run.log'"
