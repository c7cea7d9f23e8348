#!/usr/bin/env bash
# Installs ddpo_jax with jax[cuda] into a virtual environment on this GPU
# machine and starts a run.
#
#   launch/gpu.sh CONFIG WORKDIR [extra flags...]
#   launch/gpu.sh configs/compress.py runs/compress --config.sample.batch_size=32
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n 2,7p "$0"
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
[ -d .venv-gpu ] || python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q -e '.[cuda]'
python -c 'import jax; print("devices:", jax.devices())'
exec python -m ddpo_jax.main --config="$config" --workdir="$workdir" "$@"
