#!/usr/bin/env bash
# Installs ddpo_jax with jax[cuda12] on this GPU machine and runs it: one process
# that drives all the machine's GPUs. Optionally one process per machine over several.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu.sh CONFIG WORKDIR [FLAGS...]

Installs ddpo_jax with `pip install -e '.[cuda]'` into a virtual environment
(.venv-gpu in the repository) and runs
  python -m ddpo_jax.main --config=CONFIG --workdir=WORKDIR FLAGS...
as one process that uses every GPU of this machine (jax sees all local GPUs;
choose some with CUDA_VISIBLE_DEVICES). Stop it with SIGTERM (kill PID): it
saves a checkpoint at the end of the epoch; the same command resumes from
WORKDIR/checkpoints.

  launch/gpu.sh configs/compress.py runs/compress
  nohup launch/gpu.sh configs/compress.py runs/compress > compress.log 2>&1 &

Several machines, one process each: the same command on every machine, with
the same COORDINATOR_ADDRESS (host:port of process 0) and NUM_PROCESSES, and
PROCESS_ID 0, 1, ..., NUM_PROCESSES-1. WORKDIR must be the same folder on all
of them: a shared filesystem (NFS, Filestore), or a Cloud Storage bucket mounted
with gcsfuse at the same path on every machine. ddpo_jax writes WORKDIR with
local file APIs: gs:// URLs are refused.

  mkdir -p ~/gcs/BUCKET && gcsfuse --implicit-dirs --rename-dir-limit=200000 BUCKET ~/gcs/BUCKET
  COORDINATOR_ADDRESS=10.0.0.2:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu.sh configs/compress.py ~/gcs/BUCKET/runs/compress
  COORDINATOR_ADDRESS=10.0.0.2:1234 NUM_PROCESSES=2 PROCESS_ID=1 launch/gpu.sh configs/compress.py ~/gcs/BUCKET/runs/compress

environment:
  DRY_RUN=1           print the commands instead of running them
  VENV                the virtual environment (default: .venv-gpu in the repository)
  PYTHON              the python that creates VENV (default python3; jax needs >= 3.11)
  SKIP_INSTALL=1      use VENV as it is
  EXTRA_PIP_PACKAGES  more packages to pip install into VENV
EOF
}

case ${1:-} in -h | --help)
  usage
  exit 0
  ;;
esac
if [ $# -lt 2 ]; then
  usage >&2
  exit 2
fi
config=$1 workdir=$2
shift 2

say() { echo "$*" >&2; }

# ddpo_jax writes WORKDIR (checkpoints, metrics, images) with local file APIs: no URLs.
if [[ $workdir == *://* ]]; then
  if [[ $workdir == gs://* ]]; then
    bucket=${workdir#gs://}
    bucket=${bucket%%/*}
    path=${workdir#gs://"$bucket"}
    say "WORKDIR=$workdir: ddpo_jax writes its workdir with local file APIs, not to gs:// URLs. Mount the bucket"
    say "with gcsfuse (https://cloud.google.com/storage/docs/cloud-storage-fuse/install) and give the path under it:"
    say "  mkdir -p ~/gcs/$bucket && gcsfuse --implicit-dirs --rename-dir-limit=200000 $bucket ~/gcs/$bucket"
    say "  launch/gpu.sh $config ~/gcs/$bucket$path${*+$(printf ' %q' "$@")}"
    say "or use a shared filesystem (NFS, Filestore). Several machines: mount it at the same path on each."
  else
    say "WORKDIR=$workdir: ddpo_jax writes its workdir with local file APIs, not to URLs: mount the storage (or use a shared filesystem) and give the mounted path."
  fi
  exit 2
fi

DRY_RUN=${DRY_RUN:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv-gpu}
PYTHON=${PYTHON:-python3}

# Shell-quotes its arguments, readably (words that need no quotes keep none).
quote() {
  local out=() a q
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_./:=@,+%-]* ]]; then
      out+=("$a")
    else
      q=${a//\'/\'\\\'\'}
      out+=("'$q'")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or under DRY_RUN=1 prints it on stdout.
run() {
  if [ "$DRY_RUN" = 1 ]; then quote "$@"; else "$@"; fi
}

# Several processes: all three variables or none.
distributed=()
if [ -n "${COORDINATOR_ADDRESS:-}${NUM_PROCESSES:-}${PROCESS_ID:-}" ]; then
  if [ -z "${COORDINATOR_ADDRESS:-}" ] || [ -z "${NUM_PROCESSES:-}" ] || [ -z "${PROCESS_ID:-}" ]; then
    say "set all of COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID, or none"
    exit 2
  fi
  if [[ ! $COORDINATOR_ADDRESS =~ ^[^:[:space:]]+:[0-9]+$ ]]; then
    say "COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS: expected HOST:PORT of process 0, e.g. 10.0.0.2:1234"
    exit 2
  fi
  if [[ ! $NUM_PROCESSES =~ ^[0-9]+$ ]] || [ "$NUM_PROCESSES" -lt 1 ]; then
    say "NUM_PROCESSES=$NUM_PROCESSES: expected a positive integer"
    exit 2
  fi
  if [[ ! $PROCESS_ID =~ ^[0-9]+$ ]] || [ "$PROCESS_ID" -ge "$NUM_PROCESSES" ]; then
    say "PROCESS_ID=$PROCESS_ID: expected 0 to $((NUM_PROCESSES - 1))"
    exit 2
  fi
  distributed=(--coordinator_address="$COORDINATOR_ADDRESS" --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID")
  say "process $PROCESS_ID of $NUM_PROCESSES, coordinator $COORDINATOR_ADDRESS"
fi

cd "$ROOT"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    if [ "$DRY_RUN" != 1 ] && ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      say "$PYTHON is $("$PYTHON" --version 2>&1); jax needs Python >= 3.11: set PYTHON=python3.11 (or newer)"
      exit 1
    fi
    run "$PYTHON" -m venv "$VENV"
  fi
  run "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086  # EXTRA_PIP_PACKAGES is split on spaces on purpose
  run "$VENV/bin/python" -m pip install -q -e '.[cuda]' ${EXTRA_PIP_PACKAGES:-}
fi
# Stop here rather than train on the CPU when jax finds no GPU.
run "$VENV/bin/python" -c 'import sys, jax; d = jax.local_devices(); print("local devices:", d); sys.exit(jax.default_backend() != "gpu" and "jax sees no GPU: check the NVIDIA driver (nvidia-smi) and the jax[cuda12] install")'
if [ "$DRY_RUN" = 1 ]; then
  quote "$VENV/bin/python" -m ddpo_jax.main --config="$config" --workdir="$workdir" ${distributed[@]+"${distributed[@]}"} "$@"
  exit 0
fi
exec "$VENV/bin/python" -m ddpo_jax.main --config="$config" --workdir="$workdir" ${distributed[@]+"${distributed[@]}"} "$@"
