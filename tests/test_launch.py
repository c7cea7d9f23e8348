"""The launch scripts and the Colab notebook: syntax, usage, the gcloud commands of DRY_RUN=1, and that the
notebook refers only to configs, modules and functions that exist. Fast: no gcloud, no network, no training."""

import ast
import configparser
import importlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from unittest import mock

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu_vm.sh"
GPU = LAUNCH / "gpu.sh"
NOTEBOOK = LAUNCH / "colab_tpu.ipynb"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "DDPO_JAX_", "EXTRA_PIP"))}
  for name in ("DRY_RUN", "COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "VENV", "SKIP_INSTALL", "PYTHON"):
    env.pop(name, None)
  env.update(extra)
  return env


def _run(script, *args, cwd=None, **env):
  return subprocess.run(
    ["bash", str(script), *args], capture_output=True, text=True, env=_env(**env), cwd=cwd or ROOT, timeout=60
  )


def _dry(script, *args, **env):
  result = _run(script, *args, DRY_RUN="1", **env)
  assert result.returncode == 0, result.stderr
  return result


def _gcloud_commands(stdout):
  """The argv of each `gcloud ...` line that DRY_RUN=1 printed (every line must be valid shell)."""
  return [argv for argv in map(shlex.split, stdout.splitlines()) if argv and argv[0] == "gcloud"]


def _flag(argv, name):
  values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _ssh_commands(commands):
  """The remote --command of each `gcloud compute tpus tpu-vm ssh` that targets every worker."""
  ssh = [argv for argv in commands if argv[1:5] == ["compute", "tpus", "tpu-vm", "ssh"]]
  for argv in ssh:
    assert _flag(argv, "--worker") == "all", argv
  return [_flag(argv, "--command") for argv in ssh]


def _shows(stderr, env, command):
  """Whether stderr shows `ENV... PATH/launch/SCRIPT COMMAND...` (the script as called: here by its full path)."""
  return re.search(re.escape(env) + r" \S*" + re.escape(command), stderr) is not None


def _assert_bash_syntax(command):
  result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
  assert result.returncode == 0, (result.stderr, command)


# ----------------------------------------------------------------------------------------------------------
# Every script


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert script.read_text().startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_usage_without_arguments(script):
  result = _run(script)
  assert result.returncode == 2
  assert result.stderr.startswith("usage: launch/" + script.name), result.stderr
  assert result.stdout == ""


def test_tpu_usage_and_bad_input():
  help_ = _run(TPU, "help")
  assert help_.returncode == 0 and help_.stdout.startswith("usage: launch/tpu_vm.sh")
  for command in ("create", "setup", "run", "up", "logs", "status", "stop", "delete", "DRY_RUN=1"):
    assert command in help_.stdout
  assert _run(TPU, "frobnicate", "a", "b").returncode == 2
  assert _run(TPU, "run", "ddpo", "us-central2-b", "configs/compress.py").returncode == 2  # no WORKDIR
  assert _run(TPU, "create", "ddpo", "us-central2-b", "tpu-8", DRY_RUN="1").returncode == 2
  bad_capacity = _run(TPU, "create", "ddpo", "us-central2-b", "v4-8", DRY_RUN="1", TPU_CAPACITY="cheap")
  assert bad_capacity.returncode == 2 and "spot, preemptible or reserved" in bad_capacity.stderr


# ----------------------------------------------------------------------------------------------------------
# launch/tpu_vm.sh


def test_tpu_single_host_dry_run():
  workdir = "runs/compress"
  result = _dry(TPU, "up", "ddpo", "us-central2-b", "v4-8", "configs/compress.py", workdir, "--config.num_epochs=3")
  commands = _gcloud_commands(result.stdout)
  kinds = [argv[4] for argv in commands]
  assert kinds == ["describe", "create", "scp", "ssh", "ssh"], result.stdout

  create = commands[1]
  assert create[5] == "ddpo"
  assert _flag(create, "--zone") == "us-central2-b"
  assert _flag(create, "--accelerator-type") == "v4-8"
  assert _flag(create, "--version") == "tpu-ubuntu2204-base"
  assert not {"--spot", "--preemptible", "--reserved"} & set(create)
  assert not any(arg.startswith("--project") for argv in commands for arg in argv)

  # This checkout goes to every worker as a tarball of its git files.
  scp = commands[2]
  assert _flag(scp, "--worker") == "all" and scp[6] == "ddpo:ddpo_jax-src.tar.gz"
  assert "ls-files" in result.stdout and "--exclude-standard" in result.stdout

  setup, run = _ssh_commands(commands)
  for command in (setup, run):
    _assert_bash_syntax(command)
  assert "tar -xzf ddpo_jax-src.tar.gz -C ddpo_jax" in setup
  assert 'pip install -q -e ".[tpu]"' in setup
  assert "python3.11" in setup  # jax needs >= 3.11; the TPU images have 3.10
  main = "python -m ddpo_jax.main --config=configs/compress.py --workdir=runs/compress --config.num_epochs=3"
  assert "setsid nohup .venv/bin/" + main + " >> logs/worker-$w.log" in run
  assert "agent-worker-number" in run and "logs/run.pid" in run
  assert "gcsfuse" not in setup + run and "mountpoint" not in run  # no TPU_BUCKET: nothing to mount

  # How to follow the logs and how to resume come with it.
  assert "v4-8: one host" in result.stderr
  assert "launch/tpu_vm.sh logs ddpo us-central2-b" in result.stderr
  assert f"launch/tpu_vm.sh up ddpo us-central2-b v4-8 configs/compress.py {workdir} --config.num_epochs=3" in (
    result.stderr
  )
  assert "it is gone with the VM's disk" in result.stderr and "TPU_BUCKET=BUCKET" in result.stderr
  assert "warning" not in result.stderr  # one host, not preemptible: a local workdir is fine


@pytest.mark.parametrize(
  "accelerator, version, hosts",
  [("v4-32", "tpu-ubuntu2204-base", 4), ("v5litepod-16", "v2-alpha-tpuv5-lite", 4), ("v6e-64", "v2-alpha-tpuv6e", 16)],
)
def test_tpu_pod_slice_dry_run(accelerator, version, hosts):
  repo = "https://example.com/me/ddpo_jax.git"
  result = _dry(
    TPU,
    "up",
    "ddpo-pod",
    "us-central2-b",
    accelerator,
    "configs/incompress.py",
    "~/gcs/my-bucket/runs/pod",
    "--config.sample.batch_size=512",
    TPU_BUCKET="my-bucket",
    TPU_CAPACITY="spot",
    TPU_PROJECT="my-project",
    DDPO_JAX_REPO=repo,
    DDPO_JAX_REF="v1.0",
  )
  commands = _gcloud_commands(result.stdout)
  assert [argv[4] for argv in commands] == ["describe", "create", "ssh", "ssh"], result.stdout  # cloned: no scp
  for argv in commands:
    assert _flag(argv, "--project") == "my-project"
  create = commands[1]
  assert _flag(create, "--accelerator-type") == accelerator
  assert _flag(create, "--version") == version
  assert "--spot" in create
  assert f"a pod slice of {hosts} hosts" in result.stderr

  setup, run = _ssh_commands(commands)
  for command in (setup, run):
    _assert_bash_syntax(command)
  assert f"git clone -q {repo} ddpo_jax" in setup and "checkout -q v1.0" in setup
  assert 'pip install -q -e ".[tpu]"' in setup
  # The bucket is mounted on every worker by setup (installing gcsfuse) and checked again by run.
  assert setup.index("gcsfuse --implicit-dirs") < setup.index("git clone") and "apt-get" in setup
  assert 'gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket "$m"' in run and "apt-get" not in run
  assert run.index('mountpoint -q "$m"') < run.index("nohup")
  workdir = '--workdir="$HOME"/gcs/my-bucket/runs/pod'  # ~ is the worker's home
  assert f"--config=configs/incompress.py {workdir} --config.sample.batch_size=512" in run
  assert "warning" not in result.stderr
  assert "is in gs://my-bucket: re-create the VM and resume from ~/gcs/my-bucket/runs/pod/checkpoints" in result.stderr
  resume = (
    f"launch/tpu_vm.sh up ddpo-pod us-central2-b {accelerator} "
    "configs/incompress.py '~/gcs/my-bucket/runs/pod' --config.sample.batch_size=512"
  )
  assert _shows(result.stderr, "TPU_BUCKET=my-bucket TPU_CAPACITY=spot", resume)  # the same bucket, the same VM


def test_tpu_warns_about_a_local_workdir():
  pod = _dry(TPU, "up", "p", "z", "v4-32", "configs/compress.py", "runs/compress")
  assert "warning: v4-32 has 4 hosts that must share WORKDIR" in pod.stderr
  assert "set TPU_BUCKET=BUCKET and give WORKDIR ~/gcs/BUCKET/runs/NAME" in pod.stderr
  spot = _dry(TPU, "up", "p", "z", "v4-8", "configs/compress.py", "runs/compress", TPU_CAPACITY="spot")
  assert "warning: a spot VM's disk goes with it" in spot.stderr and "TPU_BUCKET=BUCKET" in spot.stderr
  assert "--spot" in _gcloud_commands(spot.stdout)[1]
  assert "warning" not in _dry(TPU, "up", "p", "z", "v4-8", "configs/compress.py", "runs/compress").stderr

  # A bucket that is mounted, but a workdir outside it; a workdir in it; one in ~/gcs with nothing mounted.
  outside = _dry(TPU, "up", "p", "z", "v4-32", "configs/compress.py", "runs/c", TPU_BUCKET="gs://my-bucket/")
  assert "give a WORKDIR under ~/gcs/my-bucket, where TPU_BUCKET=my-bucket is mounted" in outside.stderr
  inside = _dry(TPU, "up", "p", "z", "v4-32", "configs/compress.py", "~/gcs/my-bucket/c", TPU_BUCKET="my-bucket")
  assert "warning" not in inside.stderr
  unmounted = _dry(TPU, "up", "p", "z", "v4-8", "configs/compress.py", "~/gcs/my-bucket/c")
  assert "TPU_BUCKET is not set: nothing mounts it" in unmounted.stderr and "TPU_BUCKET=my-bucket" in unmounted.stderr
  assert "gcsfuse" not in unmounted.stdout


def test_tpu_refuses_a_gs_workdir(tmp_path):
  """A gs:// workdir stops the script (exit 2) before any gcloud command, with the TPU_BUCKET way to do it."""
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(f"#!/bin/sh\ntouch {tmp_path}/called\n")
  gcloud.chmod(0o755)
  path = f"{tmp_path}:{os.environ['PATH']}"
  up = _run(
    TPU, "up", "ddpo", "z", "v4-32", "configs/compress.py", "gs://my-bucket/runs/c", "--config.seed=1", PATH=path
  )
  assert up.returncode == 2 and up.stdout == "" and not (tmp_path / "called").exists()
  assert "not to gs:// URLs" in up.stderr
  fix = "launch/tpu_vm.sh up ddpo z v4-32 configs/compress.py '~/gcs/my-bucket/runs/c' --config.seed=1"
  assert _shows(up.stderr, "TPU_BUCKET=my-bucket", fix)

  run = _run(TPU, "run", "t", "z", "configs/compress.py", "gs://my-bucket", PATH=path, TPU_BUCKET_MOUNT="/mnt/b")
  assert run.returncode == 2 and run.stdout == "" and not (tmp_path / "called").exists()
  assert _shows(run.stderr, "TPU_BUCKET=my-bucket", "launch/tpu_vm.sh run t z configs/compress.py '~/gcs/my-bucket'")
  env = {"TPU_BUCKET": "my-bucket", "TPU_BUCKET_MOUNT": "/mnt/b"}  # this bucket, mounted elsewhere
  mounted = _run(TPU, "run", "t", "z", "configs/compress.py", "gs://my-bucket/r", DRY_RUN="1", **env)
  assert mounted.returncode == 2 and mounted.stdout == ""
  assert _shows(
    mounted.stderr, "TPU_BUCKET=my-bucket TPU_BUCKET_MOUNT=/mnt/b", "tpu_vm.sh run t z configs/compress.py /mnt/b/r"
  )

  other = _run(TPU, "run", "t", "z", "configs/compress.py", "s3://b/r", DRY_RUN="1")
  assert other.returncode == 2 and other.stdout == "" and "local file APIs" in other.stderr
  bad = _run(TPU, "setup", "t", "z", DRY_RUN="1", TPU_BUCKET="My_Bucket")
  assert bad.returncode == 2 and bad.stdout == "" and "expected the name of a Cloud Storage bucket" in bad.stderr


@pytest.mark.parametrize(
  "mount, remote",
  [
    (None, '"$HOME"/gcs/my-bucket'),
    ("/mnt/my bucket", "'/mnt/my bucket'"),
    ("~/b", '"$HOME"/b'),
    ("data/b", '"$HOME"/data/b'),
  ],
)
def test_tpu_bucket_mount_dry_run(mount, remote):
  """TPU_BUCKET: setup installs gcsfuse and mounts the bucket on every worker, unless it is mounted."""
  env = {"TPU_BUCKET": "my-bucket"} | ({"TPU_BUCKET_MOUNT": mount} if mount else {})
  commands = _gcloud_commands(_dry(TPU, "setup", "t", "z", **env).stdout)
  assert [argv[4] for argv in commands] == ["scp", "ssh"]
  (setup,) = _ssh_commands(commands)  # --worker=all
  _assert_bash_syntax(setup)
  assert setup.startswith("set -e; w=$(curl ") and f'm={remote}; if mountpoint -q "$m"; then' in setup
  assert "command -v gcsfuse >/dev/null || {" in setup
  assert "https://packages.cloud.google.com/apt gcsfuse-" in setup
  assert "apt-get -qq -y -o DPkg::Lock::Timeout=600 install gcsfuse" in setup
  assert 'mkdir -p "$m" && gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket "$m"' in setup

  # The local home, where the user's shell expanded ~, is the worker's home.
  home = pathlib.Path.home()
  run = _dry(TPU, "run", "t", "z", "configs/compress.py", str(home / "gcs/my-bucket/r"), **env)
  (command,) = _ssh_commands(_gcloud_commands(run.stdout))
  _assert_bash_syntax(command)
  assert f"m={remote}; if mountpoint" in command and '--workdir="$HOME"/gcs/my-bucket/r' in command
  assert ("is in gs://my-bucket" in run.stderr) == (mount is None)


def _stub(path, text):
  path.write_text(text)
  path.chmod(0o755)


def test_tpu_bucket_mount_on_a_worker(tmp_path):
  """The mount commands of setup and run, run here with stub mountpoint, gcsfuse, sudo and apt: install once,
  mount once, then leave the mount alone; run without gcsfuse stops."""
  if shutil.which("gcsfuse"):
    pytest.skip("gcsfuse is installed here")
  home, stubs, calls = tmp_path / "home", tmp_path / "bin", tmp_path / "calls.jsonl"
  (home / "ddpo_jax" / ".venv" / "bin").mkdir(parents=True)
  stubs.mkdir()
  record = f"import json, sys; open({str(calls)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
  _stub(stubs / "curl", "#!/bin/sh\necho 3\n")
  _stub(stubs / "mountpoint", f"#!/bin/sh\n[ -f {tmp_path}/mounted ]\n")
  _stub(stubs / "fusermount", "#!/bin/sh\nexit 1\n")
  gcsfuse = f"#!{sys.executable}\n{record}open({str(tmp_path / 'mounted')!r}, 'w')\n"
  _stub(
    stubs / "sudo",  # tee reads stdin; `apt-get install gcsfuse` installs the gcsfuse stub
    f"#!{sys.executable}\nimport os, sys\n{record}"
    "if 'tee' in sys.argv: sys.stdin.read()\n"
    f"if 'install' in sys.argv and 'gcsfuse' in sys.argv: open({str(stubs / 'gcsfuse')!r}, 'w').write({gcsfuse!r}); "
    f"os.chmod({str(stubs / 'gcsfuse')!r}, 0o755)\n",
  )
  _stub(home / "ddpo_jax" / ".venv" / "bin" / "python", f'#!/bin/sh\necho "$*" > {tmp_path}/python-args\n')
  env = dict(os.environ, HOME=str(home), PATH=f"{stubs}:{os.environ['PATH']}")

  def remote(*args):
    (command,) = _ssh_commands(_gcloud_commands(_dry(TPU, *args, TPU_BUCKET="my-bucket").stdout))
    if args[0] == "setup":  # only its mount part: no tarball, no pip here
      command = command.split("; mkdir -p ddpo_jax && tar")[0]
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=30)

  def ran():
    return [json.loads(line)[1:] for line in calls.read_text().splitlines()] if calls.exists() else []

  run_args = ("run", "t", "z", "configs/compress.py", "~/gcs/my-bucket/runs/x")
  no_gcsfuse = remote(*run_args)
  assert no_gcsfuse.returncode == 1 and "gcsfuse is not installed here: run TPU_BUCKET=my-bucket" in no_gcsfuse.stderr
  assert not (tmp_path / "python-args").exists()

  setup = remote("setup", "t", "z")
  assert setup.returncode == 0, setup.stderr
  assert "worker 3: installing gcsfuse" in setup.stdout and "worker 3: mounted gs://my-bucket at" in setup.stdout
  mount = str(home / "gcs" / "my-bucket")
  assert (home / "gcs" / "my-bucket").is_dir()
  assert ran()[-1] == ["--implicit-dirs", "--rename-dir-limit=200000", "my-bucket", mount]
  assert any(argv[-2:] == ["install", "gcsfuse"] for argv in ran())

  n = len(ran())
  again = remote("setup", "t", "z")
  assert again.returncode == 0 and f"worker 3: gs://my-bucket is mounted at {mount}" in again.stdout
  started = remote(*run_args)
  assert started.returncode == 0, started.stderr
  assert len(ran()) == n  # mounted: neither installed nor mounted again
  for _ in range(100):
    if (tmp_path / "python-args").exists():
      break
    time.sleep(0.05)
  assert f"--workdir={mount}/runs/x" in (tmp_path / "python-args").read_text()

  (tmp_path / "mounted").unlink()  # e.g. the VM restarted: run mounts the bucket again
  (home / "ddpo_jax" / "logs" / "run.pid").unlink()
  remounted = remote(*run_args)
  assert remounted.returncode == 0 and "worker 3: mounted gs://my-bucket" in remounted.stdout
  assert ran()[-1] == ["--implicit-dirs", "--rename-dir-limit=200000", "my-bucket", mount]


def test_tpu_subcommands_dry_run():
  create = _gcloud_commands(
    _dry(
      TPU, "create", "t", "europe-west4-a", "v5litepod-8", "--reserved", "--network=n", TPU_CREATE_FLAGS="--x=1"
    ).stdout
  )
  assert create == [
    [
      "gcloud",
      *"compute tpus tpu-vm create t".split(),
      "--zone=europe-west4-a",
      "--accelerator-type=v5litepod-8",
      "--version=v2-alpha-tpuv5-lite",
      "--x=1",
      "--reserved",
      "--network=n",
    ]
  ]
  version = _dry(TPU, "create", "t", "z", "v5p-8", TPU_SOFTWARE_VERSION="my-version").stdout
  assert _flag(_gcloud_commands(version)[0], "--version") == "my-version"

  run = _dry(TPU, "run", "t", "z", "configs/compress.py", "runs/a b", "--config.seed=1")
  (command,) = _ssh_commands(_gcloud_commands(run.stdout))
  _assert_bash_syntax(command)
  assert "'--workdir=runs/a b' --config.seed=1" in command  # quoted for the worker's shell

  logs = _gcloud_commands(_dry(TPU, "logs", "t", "z").stdout)
  assert _flag(logs[0], "--worker") == "0" and "tail" in _flag(logs[0], "--command")
  assert _flag(_gcloud_commands(_dry(TPU, "logs", "t", "z", "3").stdout)[0], "--worker") == "3"

  status = _gcloud_commands(_dry(TPU, "status", "t", "z").stdout)
  assert status[0][4] == "describe"
  for name in ("status", "stop"):
    for command in _ssh_commands(_gcloud_commands(_dry(TPU, name, "t", "z").stdout)):
      _assert_bash_syntax(command)
  delete = _gcloud_commands(_dry(TPU, "delete", "t", "z").stdout)
  assert delete == [["gcloud", *"compute tpus tpu-vm delete t --zone=z --quiet".split()]]


def test_tpu_runs_the_commands_it_prints(tmp_path):
  """Without DRY_RUN the script runs what DRY_RUN=1 prints (a fake gcloud records it), then removes its tarball."""
  if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse"]).returncode:
    pytest.skip("not a git checkout")
  calls, stubs = tmp_path / "calls.jsonl", tmp_path / "bin"
  stubs.mkdir()
  gcloud = stubs / "gcloud"
  gcloud.write_text(
    f"#!{sys.executable}\n"
    "import json, os, sys\n"
    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    "if sys.argv[4] == 'scp': assert os.path.getsize(sys.argv[5]) > 0\n"
    "sys.exit(1 if sys.argv[4] == 'describe' else 0)  # describe: no such VM yet\n"
  )
  gcloud.chmod(0o755)
  args = ("up", "ddpo", "us-central2-b", "v4-32", "configs/compress.py", "~/gcs/my-bucket/r", "--config.seed=2")
  env = {"PATH": f"{stubs}:{os.environ['PATH']}", "TMPDIR": str(tmp_path), "TPU_CAPACITY": "preemptible"}
  env["TPU_BUCKET"] = "my-bucket"
  result = _run(TPU, *args, **env)
  assert result.returncode == 0, result.stderr
  ran = [json.loads(line) for line in calls.read_text().splitlines()]
  printed = [argv[1:] for argv in _gcloud_commands(_dry(TPU, *args, **env).stdout)]
  assert [argv[3] for argv in ran] == ["describe", "create", "scp", "ssh", "ssh"]
  tarball = next(arg for arg in ran[2] if arg.endswith(".tar.gz") and ":" not in arg)
  for done, shown in zip(ran, printed):
    assert [arg if arg != tarball else "TARBALL" for arg in done] == [
      "TARBALL" if arg.endswith(".tar.gz") and ":" not in arg else arg for arg in shown
    ]
  assert "--preemptible" in ran[1]
  assert not list(tmp_path.glob("*.tar.gz"))  # removed on exit


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(shutil.which("setsid") is None or not os.path.isdir("/proc"), reason="needs setsid and /proc")
def test_tpu_worker_commands_run_stop_status(tmp_path):
  """The remote commands of run, status and stop, run here in a fake worker's home with a stub python."""
  home, stubs = tmp_path / "home", tmp_path / "bin"
  (home / "ddpo_jax" / ".venv" / "bin").mkdir(parents=True)
  stubs.mkdir()
  python = home / "ddpo_jax" / ".venv" / "bin" / "python"
  python.write_text('#!/bin/sh\necho "stub python $*"\nexec sleep 60\n')
  (stubs / "curl").write_text("#!/bin/sh\necho 3\n")  # the metadata server's agent-worker-number
  for stub in (python, stubs / "curl"):
    stub.chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f"{stubs}:{os.environ['PATH']}")

  def remote(*args):
    (command,) = _ssh_commands(_gcloud_commands(_dry(TPU, *args, "t", "z", *extra[args[0]]).stdout))
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=30)

  extra = {"run": ["configs/compress.py", "runs/x", "--config.seed=1"], "status": [], "stop": []}
  log = home / "ddpo_jax" / "logs" / "worker-3.log"
  pid = None
  try:
    started = remote("run")
    assert started.returncode == 0, started.stderr
    assert "worker 3: started pid" in started.stdout
    pid = int((home / "ddpo_jax" / "logs" / "run.pid").read_text())
    for _ in range(100):
      if "stub python" in log.read_text():
        break
      time.sleep(0.05)
    assert "stub python -m ddpo_jax.main --config=configs/compress.py --workdir=runs/x --config.seed=1" in (
      log.read_text()
    )
    assert _alive(pid) and os.getpgid(pid) == pid  # its own process group, so that stop ends all of it

    again = remote("run")
    assert again.returncode == 1 and "a run is still going" in again.stderr
    assert "worker 3: running" in remote("status").stdout

    stopped = remote("stop")
    assert stopped.returncode == 0 and f"worker 3: stopped pid {pid}" in stopped.stdout
    for _ in range(100):
      if not _alive(pid):
        break
      time.sleep(0.05)
    assert not _alive(pid)
    assert "worker 3: no run going" in remote("stop").stdout
  finally:
    if pid is not None and _alive(pid):
      os.kill(pid, signal.SIGKILL)


def test_tpu_setup_packs_this_checkout(tmp_path):
  """The tarball that setup copies to the workers: the project's files, not the virtual environments."""
  if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse"]).returncode:
    pytest.skip("not a git checkout")
  result = _dry(TPU, "setup", "t", "z", TMPDIR=str(tmp_path))
  (pack,) = [line for line in result.stdout.splitlines() if line.startswith("git ")]
  subprocess.run(["bash", "-c", pack], check=True, timeout=60)
  (tarball,) = tmp_path.glob("ddpo_jax-src-*.tar.gz")
  names = set(subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True).stdout.split())
  for name in ("setup.cfg", "ddpo_jax/main.py", "configs/compress.py", "ddpo_jax/toy/model/model_index.json"):
    assert name in names
  assert not any(name.startswith((".venv/", "runs/")) for name in names)


# ----------------------------------------------------------------------------------------------------------
# launch/gpu.sh


def test_gpu_dry_run_one_machine():
  result = _dry(GPU, "configs/compress.py", "runs/compress", "--config.sample.batch_size=32")
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  venv = str(ROOT / ".venv-gpu")
  assert lines[0] == ["python3", "-m", "venv", venv]
  assert [venv + "/bin/python", "-m", "pip", "install", "-q", "-e", ".[cuda]"] in lines
  check = next(argv for argv in lines if argv[1] == "-c")
  compile(check[2], "<gpu check>", "exec")
  assert 'jax.default_backend() != "gpu"' in check[2]
  assert lines[-1] == [
    venv + "/bin/python",
    "-m",
    "ddpo_jax.main",
    "--config=configs/compress.py",
    "--workdir=runs/compress",
    "--config.sample.batch_size=32",
  ]


def test_gpu_dry_run_several_machines(tmp_path):
  env = {"COORDINATOR_ADDRESS": "10.0.0.2:1234", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}
  result = _dry(GPU, "configs/compress.py", "/mnt/shared/runs/c", VENV=str(tmp_path / "v"), SKIP_INSTALL="1", **env)
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert not any("pip" in argv or "venv" in argv for argv in lines)  # SKIP_INSTALL
  assert lines[-1] == [
    str(tmp_path / "v/bin/python"),
    "-m",
    "ddpo_jax.main",
    "--config=configs/compress.py",
    "--workdir=/mnt/shared/runs/c",
    "--coordinator_address=10.0.0.2:1234",
    "--num_processes=2",
    "--process_id=1",
  ]
  assert "process 1 of 2" in result.stderr
  for bad in ({"NUM_PROCESSES": "2"}, dict(env, PROCESS_ID="2"), dict(env, COORDINATOR_ADDRESS="10.0.0.2")):
    assert _run(GPU, "configs/compress.py", "runs/c", DRY_RUN="1", **bad).returncode == 2
  assert _run(GPU, "configs/compress.py").returncode == 2


def test_gpu_refuses_a_gs_workdir():
  result = _run(GPU, "configs/compress.py", "gs://my-bucket/runs/c", "--config.seed=1", DRY_RUN="1")
  assert result.returncode == 2 and result.stdout == ""  # before installing anything
  assert "mkdir -p ~/gcs/my-bucket && gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket ~/gcs/my-bucket" in (
    result.stderr
  )
  assert "launch/gpu.sh configs/compress.py ~/gcs/my-bucket/runs/c --config.seed=1" in result.stderr
  assert "shared filesystem" in result.stderr
  other = _run(GPU, "configs/compress.py", "s3://b/c", DRY_RUN="1")
  assert other.returncode == 2 and other.stdout == "" and "local file APIs" in other.stderr


# ----------------------------------------------------------------------------------------------------------
# launch/colab_tpu.ipynb


def _notebook():
  return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def _source(cell):
  return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def _python(cell):
  """A code cell without its IPython lines (! shell, % magics)."""
  return "\n".join(line for line in _source(cell).splitlines() if not line.lstrip().startswith(("!", "%")))


def test_notebook_structure():
  notebook = _notebook()
  assert notebook["nbformat"] == 4 and isinstance(notebook["nbformat_minor"], int)
  assert notebook["metadata"]["accelerator"] == "TPU"
  assert notebook["metadata"]["kernelspec"]["name"] == "python3"
  cells = notebook["cells"]
  assert cells and cells[0]["cell_type"] == "markdown"
  for cell in cells:
    assert cell["cell_type"] in ("markdown", "code")
    assert isinstance(cell["metadata"], dict)
    assert isinstance(cell["source"], str) or all(isinstance(line, str) for line in cell["source"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None  # nothing stored
  if importlib.util.find_spec("nbformat"):
    import nbformat

    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4))


def test_notebook_installs_the_pinned_jax():
  code = [_source(cell) for cell in _notebook()["cells"] if cell["cell_type"] == "code"]
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  (jax_pin,) = [line for line in setup["options"]["install_requires"].split() if line.startswith("jax==")]
  assert f'!pip install -q "jax[tpu]=={jax_pin[5:]}"' in code
  assert any('"-e", PROJECT_DIR' in source and "REPO_URL" in source for source in code)
  assert 'REPO_URL = ""' in code[0]


def test_notebook_code_compiles():
  for i, cell in enumerate(_notebook()["cells"]):
    if cell["cell_type"] == "code":
      compile(_python(cell), f"<cell {i}>", "exec")


def _resolve(dotted):
  """Imports the longest module prefix of `dotted`, then gets the rest as attributes."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ModuleNotFoundError(dotted)


def test_notebook_refers_to_what_exists():
  cells = _notebook()["cells"]
  text = "\n".join(_source(cell) for cell in cells)
  configs = set(re.findall(r"\bconfigs/[\w/]+\.py\b", text))
  assert "configs/compress.py" in configs
  for path in configs:
    assert (ROOT / path).is_file(), path
  for spec in re.findall(r"\bconfigs/[\w/]+\.py:(\w+)", text):
    assert spec == "tiny"
  for dotted in set(re.findall(r"\bddpo_jax(?:\.[A-Za-z_]\w*)+", text)):
    _resolve(dotted)

  used = set()
  for cell in cells:
    if cell["cell_type"] != "code":
      continue
    tree = ast.parse(_python(cell))
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ddpo_jax":
        for alias in node.names:
          aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] == "ddpo_jax":  # `import ddpo_jax.x as y` binds y, `import ddpo_jax.x` ddpo_jax
            aliases[alias.asname or "ddpo_jax"] = alias.name if alias.asname else "ddpo_jax"
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
        used.add(f"{aliases[node.value.id]}.{node.attr}")
    used.update(aliases.values())
  assert {"ddpo_jax.config_utils.get_config", "ddpo_jax.train.train_and_evaluate", "ddpo_jax.metrics.read_metrics"} <= (
    used
  )
  for dotted in used:
    assert callable(_resolve(dotted)) or isinstance(_resolve(dotted), types.ModuleType), dotted


def test_python_m_modules_exist():
  texts = [_source(cell) for cell in _notebook()["cells"]] + [script.read_text() for script in SCRIPTS]
  modules = set(re.findall(r"\bpython3?(?:\.\d+)? -m ([A-Za-z_][\w.]*)", "\n".join(texts)))
  assert "ddpo_jax.main" in modules
  for module in modules:
    if module.startswith("ddpo_jax"):
      importlib.import_module(module)
    else:
      assert importlib.util.find_spec(module) is not None, module


def test_notebook_plots_and_shows_a_run(tmp_path, monkeypatch):
  """The reward-curve and sample-grid cells on a workdir that MetricWriter wrote, matplotlib and IPython stubbed."""
  from ddpo_jax import metrics

  with metrics.MetricWriter(str(tmp_path)) as writer:
    for epoch, mean in [(0, -1.2), (1, -1.1), (2, -9.0), (2, -1.0)]:  # epoch 2 twice: a resumed run
      writer.write_scalars(epoch, {"samples": 64 * (epoch + 1), "reward_mean": mean, "reward_std": 0.1})
    writer.write_scalars(1, {"samples": 128, "reward_mean": 5.0, "reward_std": 0.0}, split="eval")  # not plotted
    for epoch in (0, 2):
      writer.write_images(epoch, "samples", np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"])

  ax = mock.MagicMock()
  pyplot = mock.MagicMock()
  pyplot.subplots.return_value = (mock.MagicMock(), ax)
  display = mock.MagicMock()
  monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(pyplot=pyplot))
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
  monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(display=display))
  monkeypatch.setitem(sys.modules, "IPython.display", display)

  cells = [_python(cell) for cell in _notebook()["cells"] if cell["cell_type"] == "code"]
  (plot,) = [source for source in cells if "read_metrics" in source]
  (show,) = [source for source in cells if "IPython.display" in source]
  namespace = {"WORKDIR": str(tmp_path)}
  exec(compile(plot, "<plot cell>", "exec"), namespace)
  exec(compile(show, "<show cell>", "exec"), namespace)

  samples, mean = ax.plot.call_args.args
  np.testing.assert_array_equal(samples, [64, 128, 192])
  np.testing.assert_allclose(mean, [-1.2, -1.1, -1.0])
  _, low, high = ax.fill_between.call_args.args
  np.testing.assert_allclose(high - low, 0.2)
  pyplot.show.assert_called_once()
  assert display.Image.call_args.kwargs == {"filename": str(tmp_path / "images" / "samples_00002.png")}
  display.display.assert_called_once_with(display.Image.return_value)


@pytest.mark.parametrize(
  "spec, devices", [("configs/compress.py:tiny", (1, 4, 8)), ("configs/compress.py", (4, 8, 16))]
)
def test_configs_fit_the_launch_targets(spec, devices):
  """The tiny preset on Colab (v5e-1: 1 device, v2-8: 8); the paper's on v4-8 (4), v5litepod-8 (8), v4-32 (16)."""
  from ddpo_jax import config_utils
  from ddpo_jax import validation

  for count in devices:
    validation.validate(config_utils.get_config(str(ROOT / spec)), None, count)
