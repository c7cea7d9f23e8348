#!/usr/bin/env bash
# Runs ddpo_jax on a Cloud TPU VM: one host (v4-8, v5litepod-8, v6e-8, ...) or a
# multi-host pod slice (v4-32, v5litepod-16, ...). Every step acts on every worker.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND NAME ZONE [ARGS...]

  create NAME ZONE ACCELERATOR [GCLOUD_FLAGS...]
                     create the TPU VM (extra flags go to `gcloud ... create`,
                     e.g. --spot, --preemptible, --reserved)
  setup  NAME ZONE   copy this checkout (or clone $DDPO_JAX_REPO) onto every
                     worker and `pip install -e '.[tpu]'` into ~/ddpo_jax/.venv
  run    NAME ZONE CONFIG WORKDIR [FLAGS...]
                     start `python -m ddpo_jax.main --config=CONFIG
                     --workdir=WORKDIR FLAGS...` on every worker at once
                     (nohup; log in ~/ddpo_jax/logs/worker-N.log on worker N)
  up     NAME ZONE ACCELERATOR CONFIG WORKDIR [FLAGS...]
                     create (unless READY; a PREEMPTED VM is deleted and
                     re-created), setup, run: re-run it after a preemption and
                     the run resumes from WORKDIR/checkpoints
  logs   NAME ZONE [WORKER]  follow a worker's log (default 0: metrics, images)
  status NAME ZONE   the VM's state, and whether the run is alive on each worker
  stop   NAME ZONE   SIGTERM the run on every worker: it saves a checkpoint at
                     the end of the epoch and exits; `run` resumes it
  delete NAME ZONE   delete the TPU VM

examples:
  launch/tpu_vm.sh up ddpo us-central2-b v4-8 configs/compress.py runs/compress
  TPU_BUCKET=my-bucket TPU_CAPACITY=spot launch/tpu_vm.sh up ddpo-pod us-central2-b v4-32 \
    configs/compress.py '~/gcs/my-bucket/runs/compress'

WORKDIR is a path on the workers: a relative one is in ~/ddpo_jax; ~ is the
worker's home (so is your local home, where your shell expanded ~). ddpo_jax
writes it with local file APIs: gs:// URLs are refused. On a pod slice every
worker must see the same WORKDIR, and only a WORKDIR off the VM's disk survives a
preemption: set TPU_BUCKET=BUCKET and use ~/gcs/BUCKET/..., which setup and run
mount on every worker with gcsfuse, or a filesystem that every worker mounts at
the same path (Filestore, NFS).

environment:
  DRY_RUN=1             print the gcloud commands instead of running them
  TPU_PROJECT           --project for every gcloud command (default: gcloud's)
  TPU_CAPACITY          spot | preemptible | reserved: adds --spot, ... to create
  TPU_SOFTWARE_VERSION  default by accelerator: v6e v2-alpha-tpuv6e, v5p
                        v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite,
                        others tpu-ubuntu2204-base
  TPU_CREATE_FLAGS      more flags for create, split on spaces (used by up)
  TPU_BUCKET            a Cloud Storage bucket (name or gs://name): setup installs
                        gcsfuse and mounts it on every worker (unless mounted),
                        run mounts it again if needed (after a restart). The VM's
                        service account needs read/write access to it
  TPU_BUCKET_MOUNT      where, on the workers (default ~/gcs/BUCKET)
  DDPO_JAX_REPO         git URL to clone on the workers instead of copying this
                        checkout; DDPO_JAX_REF: commit, tag or origin/BRANCH
  EXTRA_PIP_PACKAGES    more packages to pip install on every worker
Needs gcloud, authenticated; for more than one worker run `ssh-add
~/.ssh/google_compute_engine` first (gcloud's advice for --worker=all).
EOF
}

DRY_RUN=${DRY_RUN:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=ddpo_jax # the project's folder on each worker, relative to the home folder
# On a worker: whether process $1 is running (neither gone nor a zombie).
ALIVE='alive() { case $(ps -o stat= -p "$1" 2>/dev/null | tr -d " ") in "" | Z*) return 1 ;; esac; }'
WORKER_ID='$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

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

say() { echo "$*" >&2; }

# gcloud, or under DRY_RUN=1 the command line that would run, on stdout.
gc() {
  local args=("$@")
  if [ -n "${TPU_PROJECT:-}" ]; then args+=("--project=$TPU_PROJECT"); fi
  if [ "$DRY_RUN" = 1 ]; then
    quote gcloud "${args[@]}"
  else
    gcloud "${args[@]}"
  fi
}

# Runs COMMAND (one line of bash) on every worker at once.
on_all() {
  local name=$1 zone=$2 command=$3
  gc compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$command"
}

# A path as the workers read it: your local home (where your shell expanded ~) becomes ~, their home.
worker_path() {
  local p=$1
  if [ -n "${HOME:-}" ] && [ "$HOME" != / ]; then
    if [ "$p" = "$HOME" ]; then
      p="~"
    elif [[ $p == "$HOME"/* ]]; then
      p="~/${p#"$HOME"/}"
    fi
  fi
  echo "$p"
}

# The shell word that names worker_path $1 on a worker: ~ becomes "$HOME", the rest is quoted.
remote_word() {
  case $1 in
    "~") echo '"$HOME"' ;;
    "~/"*) echo "\"\$HOME\"/$(quote "${1#"~/"}")" ;;
    *) quote "$1" ;;
  esac
}

# NAME=VALUE as a shell word that still assigns (only the value is quoted).
assign() { echo "$1=$(quote "$2")"; }

# TPU_BUCKET, mounted with gcsfuse at MOUNT on every worker (~ is the worker's home).
BUCKET=${TPU_BUCKET:-}
BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
if [ -n "${TPU_BUCKET_MOUNT:-}" ]; then
  MOUNT=$(worker_path "$TPU_BUCKET_MOUNT")
  if [[ $MOUNT != /* && $MOUNT != "~" && $MOUNT != "~/"* ]]; then MOUNT="~/$MOUNT"; fi
  MOUNT=${MOUNT%/}
else
  # shellcheck disable=SC2088  # ~ is expanded on the worker
  MOUNT="~/gcs/$BUCKET"
fi

check_bucket() {
  if [ -n "$BUCKET" ] && [[ ! $BUCKET =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]]; then
    say "TPU_BUCKET=$TPU_BUCKET: expected the name of a Cloud Storage bucket, e.g. my-bucket"
    exit 2
  fi
}

# Whether WORKDIR (a worker path) is in the mounted bucket.
in_bucket() {
  [ -n "$BUCKET" ] && [[ $1 == "$MOUNT" || $1 == "$MOUNT"/* ]]
}

# On a worker (with $w its number): mount the bucket at MOUNT unless it is mounted. With $1 = install,
# install gcsfuse first when it is missing (from packages.cloud.google.com, as Google's docs do).
mount_bucket() {
  local m b=$BUCKET get
  m=$(remote_word "$MOUNT")
  if [ "${1:-}" = install ]; then
    get="echo \"worker \$w: installing gcsfuse\"; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(. /etc/os-release && echo \$VERSION_CODENAME) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get -qq -o DPkg::Lock::Timeout=600 update; sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -y -o DPkg::Lock::Timeout=600 install gcsfuse >/dev/null"
  else
    get="echo \"worker \$w: gcsfuse is not installed here: run TPU_BUCKET=$b launch/tpu_vm.sh setup NAME ZONE\" >&2; exit 1"
  fi
  # A directory rename (how orbax completes a checkpoint) in a bucket without hierarchical namespace copies
  # every file; gcsfuse refuses it unless the directory has fewer than --rename-dir-limit descendants.
  echo "m=$m; if mountpoint -q \"\$m\"; then echo \"worker \$w: gs://$b is mounted at \$m\"; else fusermount -u -z \"\$m\" 2>/dev/null || true; command -v gcsfuse >/dev/null || { $get; }; mkdir -p \"\$m\" && gcsfuse --implicit-dirs --rename-dir-limit=200000 $b \"\$m\" || { echo \"worker \$w: cannot mount gs://$b at \$m: does the bucket exist, and may the VM's service account read and write it?\" >&2; exit 1; }; echo \"worker \$w: mounted gs://$b at \$m\"; fi"
}

# Stops (exit 2, before any gcloud command) on a URL workdir: ddpo_jax writes the workdir with local file APIs.
refuse_url() {
  local workdir=$1
  if [[ $workdir != *://* ]]; then return 0; fi
  if [[ $workdir != gs://* ]]; then
    say "WORKDIR=$workdir: ddpo_jax writes its workdir with local file APIs, not to URLs; mount the storage on every worker and give the mounted path"
    exit 2
  fi
  local rest=${workdir#gs://} b path mount args=() a env
  b=${rest%%/*}
  path=${rest#"$b"}
  path=${path#/}
  path=${path%/}
  # shellcheck disable=SC2088  # ~ is expanded on the worker
  mount="~/gcs/$b"
  env=$(assign TPU_BUCKET "$b")
  if [ "$b" = "$BUCKET" ] && [ -n "${TPU_BUCKET_MOUNT:-}" ]; then
    mount=$MOUNT
    env="$env $(assign TPU_BUCKET_MOUNT "$MOUNT")"
  fi
  for a in "${ARGS[@]}"; do
    if [ "$a" = "$workdir" ]; then a=$mount${path:+/$path}; fi
    args+=("$a")
  done
  say "WORKDIR=$workdir: ddpo_jax writes its workdir (checkpoints, metrics, images) with local file APIs, not to gs:// URLs."
  say "Set TPU_BUCKET to mount the bucket with gcsfuse on every worker, and give the path under the mount:"
  say "  $env $(quote "$0" "$COMMAND" "${args[@]}")"
  exit 2
}

# Warns when WORKDIR looks like a bucket mount that nothing mounts.
check_mount_path() {
  local workdir=$1
  if [ -z "$BUCKET" ] && [[ $workdir == "~/gcs/"?* ]]; then
    local b=${workdir#"~/gcs/"}
    b=${b%%/*}
    say "warning: $workdir looks like a bucket mount, but TPU_BUCKET is not set: nothing mounts it, and the run would write to the VM's disk. Set TPU_BUCKET=$b"
  fi
}

need() {
  if [ "$1" -lt "$2" ]; then
    usage >&2
    exit 2
  fi
}

software_version() {
  if [ -n "${TPU_SOFTWARE_VERSION:-}" ]; then
    echo "$TPU_SOFTWARE_VERSION"
    return
  fi
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# Hosts (TPU VMs) of a slice. v2-v4, v5p: the number counts TensorCores, 8 per host.
# v5e, v6e: it counts chips; up to 8 on one host, 4 per host in multi-host slices.
hosts() {
  local n=${1##*-}
  if [[ ! $n =~ ^[0-9]+$ ]]; then
    echo 1
  elif [[ $1 == v5litepod-* || $1 == v5e-* || $1 == v6e-* ]] && [ "$n" -gt 8 ]; then
    echo $(((n + 3) / 4))
  else
    echo $(((n + 7) / 8))
  fi
}

capacity_flag() {
  case ${TPU_CAPACITY:-} in
    "") ;;
    spot | preemptible | reserved) echo "--$TPU_CAPACITY" ;;
    *)
      say "TPU_CAPACITY=$TPU_CAPACITY: use spot, preemptible or reserved"
      exit 2
      ;;
  esac
}

cmd_create() {
  need $# 3
  local name=$1 zone=$2 accelerator=$3
  shift 3
  if [[ ! $accelerator =~ ^v[0-9][0-9a-z]*-[0-9]+$ ]]; then
    say "ACCELERATOR=$accelerator: expected a type such as v4-8, v4-32, v5litepod-8, v6e-16"
    exit 2
  fi
  local flags=() capacity
  capacity=$(capacity_flag)
  if [ -n "$capacity" ]; then flags+=("$capacity"); fi
  # shellcheck disable=SC2206  # TPU_CREATE_FLAGS is split on spaces on purpose
  if [ -n "${TPU_CREATE_FLAGS:-}" ]; then flags+=(${TPU_CREATE_FLAGS}); fi
  local n
  n=$(hosts "$accelerator")
  if [ "$n" -gt 1 ]; then
    say "$accelerator: a pod slice of $n hosts; every step runs on all of them"
  else
    say "$accelerator: one host"
  fi
  gc compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
    --version="$(software_version "$accelerator")" ${flags[@]+"${flags[@]}"} "$@"
}

cmd_setup() {
  need $# 2
  check_bucket
  local name=$1 zone=$2 fetch mount=""
  if [ -n "${DDPO_JAX_REPO:-}" ]; then
    fetch="{ [ -d $DIR/.git ] || git clone -q $(quote "$DDPO_JAX_REPO") $DIR; }; git -C $DIR fetch -q origin; git -C $DIR checkout -q $(quote "${DDPO_JAX_REF:-origin/HEAD}")"
  else
    # This checkout's tracked and untracked-but-not-ignored files, as they are now.
    local tarball=${TMPDIR:-/tmp}/ddpo_jax-src-$$.tar.gz
    if [ "$DRY_RUN" = 1 ]; then
      echo "git -C $(quote "$ROOT") ls-files -z -c -o --exclude-standard | tar -C $(quote "$ROOT") --null -T - --ignore-failed-read -czf $(quote "$tarball")"
    else
      if ! git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
        say "$ROOT is not a git checkout: set DDPO_JAX_REPO to a git URL to clone on the workers"
        exit 1
      fi
      trap "rm -f $(quote "$tarball")" EXIT
      git -C "$ROOT" ls-files -z -c -o --exclude-standard | tar -C "$ROOT" --null -T - --ignore-failed-read -czf "$tarball"
    fi
    gc compute tpus tpu-vm scp "$tarball" "$name:ddpo_jax-src.tar.gz" --zone="$zone" --worker=all
    fetch="mkdir -p $DIR && tar -xzf ddpo_jax-src.tar.gz -C $DIR && rm -f ddpo_jax-src.tar.gz"
  fi
  if [ -n "$BUCKET" ]; then mount="w=$WORKER_ID; $(mount_bucket install); "; fi
  local extra=""
  if [ -n "${EXTRA_PIP_PACKAGES:-}" ]; then extra="; .venv/bin/python -m pip install -q ${EXTRA_PIP_PACKAGES}"; fi
  # jax 0.10 needs Python >= 3.11; the TPU images have 3.10, so uv fetches 3.11 when no newer python is there.
  on_all "$name" "$zone" "set -e; $mount$fetch; cd $DIR; py=; for c in python3.13 python3.12 python3.11 python3; do if command -v \$c >/dev/null && \$c -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then py=\$c; break; fi; done; if [ ! -x .venv/bin/python ]; then if [ -z \"\$py\" ] || ! \$py -m venv .venv; then rm -rf .venv; python3 -m pip install -q --user uv; ~/.local/bin/uv venv -q --seed --python 3.11 .venv; fi; fi; .venv/bin/python -m pip install -q --upgrade pip; .venv/bin/python -m pip install -q -e \".[tpu]\"$extra; echo \"worker $WORKER_ID: \$(.venv/bin/python -c 'import sys, jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)')\""
  say "installed on every worker of $name"
}

cmd_run() {
  need $# 4
  check_bucket
  local name=$1 zone=$2 config=$3 workdir
  workdir=$(worker_path "$4")
  shift 4
  refuse_url "$workdir"
  if [ -z "${ACCELERATOR:-}" ]; then check_mount_path "$workdir"; fi # up has checked it
  local words=(.venv/bin/python -m ddpo_jax.main "--config=$config") main mount=""
  if [[ $workdir == "~" || $workdir == "~/"* ]]; then
    words=("$(quote "${words[@]}")" "--workdir=$(remote_word "$workdir")")
  else
    words=("$(quote "${words[@]}" "--workdir=$workdir")")
  fi
  if [ $# -gt 0 ]; then words+=("$(quote "$@")"); fi
  main="${words[*]}"
  if [ -n "$BUCKET" ]; then mount=" $(mount_bucket);"; fi
  on_all "$name" "$zone" "cd $DIR 2>/dev/null && [ -x .venv/bin/python ] || { echo 'ddpo_jax is not installed here: run launch/tpu_vm.sh setup $name $zone' >&2; exit 1; }; $ALIVE; w=$WORKER_ID; mkdir -p logs; if [ -f logs/run.pid ] && alive \"\$(cat logs/run.pid)\"; then echo \"worker \$w: a run is still going (pid \$(cat logs/run.pid)); stop it first: launch/tpu_vm.sh stop $name $zone\" >&2; exit 1; fi;$mount echo \"=== \$(date -u +%FT%TZ) worker \$w starts:\" $main >> logs/worker-\$w.log; PYTHONUNBUFFERED=1 setsid nohup $main >> logs/worker-\$w.log 2>&1 < /dev/null & echo \$! > logs/run.pid; echo \"worker \$w: started pid \$(cat logs/run.pid), log ~/$DIR/logs/worker-\$w.log\""
  local accelerator=${ACCELERATOR:-ACCELERATOR} env=()
  if [ -n "$BUCKET" ]; then env+=("$(assign TPU_BUCKET "$BUCKET")"); fi
  if [ -n "${TPU_BUCKET_MOUNT:-}" ]; then env+=("$(assign TPU_BUCKET_MOUNT "$MOUNT")"); fi
  if [ -n "${TPU_CAPACITY:-}" ]; then env+=("$(assign TPU_CAPACITY "$TPU_CAPACITY")"); fi
  local up
  up=$(quote "$0" up "$name" "$zone" "$accelerator" "$config" "$workdir" "$@")
  say ""
  say "Started on every worker of $name. Worker 0 logs the metrics and writes $workdir. Follow it with:"
  say "  $(quote "$0" logs "$name" "$zone")"
  if in_bucket "$workdir"; then
    say "A preempted VM cannot be restarted, but $workdir is in gs://$BUCKET: re-create the VM and resume from $workdir/checkpoints with:"
  else
    say "A preempted VM cannot be restarted, and unless $workdir is on a shared filesystem it is gone with the VM's disk"
    say "(keep it in a bucket to resume: TPU_BUCKET=BUCKET and WORKDIR ~/gcs/BUCKET/...). Start again with:"
  fi
  say "  ${env[*]+${env[*]} }$up"
  say "If only the run died (the VM is READY), restart it with:"
  say "  ${env[*]+${env[*]} }$(quote "$0" run "$name" "$zone" "$config" "$workdir" "$@")"
}

# Sets STATE to the VM's state, empty when there is no such VM (and under DRY_RUN=1).
state_of() {
  STATE=
  if [ "$DRY_RUN" = 1 ]; then
    gc compute tpus tpu-vm describe "$1" --zone="$2" --format='value(state)'
  else
    STATE=$(gc compute tpus tpu-vm describe "$1" --zone="$2" --format='value(state)' 2>/dev/null || true)
  fi
}

cmd_up() {
  need $# 5
  check_bucket
  local name=$1 zone=$2 accelerator=$3 config=$4 workdir
  workdir=$(worker_path "$5")
  shift 5
  refuse_url "$workdir"
  check_mount_path "$workdir"
  local n capacity fix
  n=$(hosts "$accelerator")
  capacity=${TPU_CAPACITY:-}
  if [ -n "$BUCKET" ]; then
    fix="give a WORKDIR under $MOUNT, where TPU_BUCKET=$BUCKET is mounted (e.g. $MOUNT/runs/NAME)"
  else
    fix="set TPU_BUCKET=BUCKET and give WORKDIR ~/gcs/BUCKET/runs/NAME (the bucket mounted with gcsfuse on every worker), or a filesystem shared by every worker"
  fi
  if ! in_bucket "$workdir"; then
    if [ "$n" -gt 1 ]; then
      say "warning: $accelerator has $n hosts that must share WORKDIR, and $workdir is not in a mounted bucket: each host would write its own. To fix it, $fix"
    elif [ -n "$capacity" ] && [ "$capacity" != reserved ]; then
      say "warning: a $capacity VM's disk goes with it when preempted, and $workdir/checkpoints too. To resume after a preemption, $fix"
    fi
  fi
  state_of "$name" "$zone"
  local state=$STATE
  case $state in
    "") cmd_create "$name" "$zone" "$accelerator" ;;
    READY) say "$name is READY: not creating it" ;;
    PREEMPTED | TERMINATED)
      say "$name is $state: deleting it and creating it again"
      gc compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
      cmd_create "$name" "$zone" "$accelerator"
      ;;
    STOPPED) gc compute tpus tpu-vm start "$name" --zone="$zone" ;;
    *)
      say "$name is $state: wait until it is READY (launch/tpu_vm.sh status $name $zone), then re-run"
      exit 1
      ;;
  esac
  cmd_setup "$name" "$zone"
  ACCELERATOR=$accelerator cmd_run "$name" "$zone" "$config" "$workdir" "$@"
}

cmd_logs() {
  need $# 2
  local name=$1 zone=$2 worker=${3:-0}
  gc compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$worker" --command="tail -n 200 -F $DIR/logs/worker-*.log"
}

cmd_status() {
  need $# 2
  local name=$1 zone=$2
  gc compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(state,acceleratorType)'
  on_all "$name" "$zone" "$ALIVE; w=$WORKER_ID; if [ -f $DIR/logs/run.pid ] && alive \"\$(cat $DIR/logs/run.pid)\"; then s=running; else s='not running'; fi; echo \"worker \$w: \$s; last log line: \$(tail -n 1 $DIR/logs/worker-\$w.log 2>/dev/null)\""
}

cmd_stop() {
  need $# 2
  local name=$1 zone=$2
  # setsid made the run the leader of its own process group: stop the whole group.
  on_all "$name" "$zone" "$ALIVE; w=$WORKER_ID; pid=\$(cat $DIR/logs/run.pid 2>/dev/null || true); if [ -n \"\$pid\" ] && alive \"\$pid\"; then kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\"; echo \"worker \$w: stopped pid \$pid\"; else echo \"worker \$w: no run going\"; fi"
}

cmd_delete() {
  need $# 2
  gc compute tpus tpu-vm delete "$1" --zone="$2" --quiet
}

if [ $# -lt 1 ]; then
  usage >&2
  exit 2
fi
command=$1
shift
COMMAND=$command
ARGS=("$@")
case $command in
  create | setup | run | up | logs | status | stop | delete) "cmd_$command" "$@" ;;
  -h | --help | help) usage ;;
  *)
    say "unknown command: $command"
    usage >&2
    exit 2
    ;;
esac
