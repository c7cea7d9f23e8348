"""One run per workdir (ddpo_jax/workdir_lock.py): a second process is refused, a dead one blocks nothing."""

import json
import os
import socket
import subprocess
import sys

import pytest

from ddpo_jax import config_utils
from ddpo_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Takes the lock of argv[1], says so, and holds it until its stdin closes.
HOLDER = """
import sys
from ddpo_jax import workdir_lock
lock = workdir_lock.acquire(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def hold_in_child(workdir: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  child = subprocess.Popen(
    [sys.executable, "-c", HOLDER, workdir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
  )
  assert child.stdout.readline().strip() == "locked"
  return child


def holder(workdir: str) -> dict:
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
    text = f.read()
  return json.loads(text) if text else {}


def test_second_process_is_refused_until_the_first_ends(tmp_path):
  workdir = str(tmp_path)
  child = hold_in_child(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirInUse) as error:
      workdir_lock.acquire(workdir)
    assert f"another run (pid {child.pid}, host {socket.gethostname()}) is using {workdir}" in str(error.value)
    assert holder(workdir) == {"pid": child.pid, "host": socket.gethostname()}  # a refused attempt keeps them
  finally:
    child.stdin.close()
    child.wait(timeout=60)
  assert holder(workdir) == {}  # released: no stale pid
  with workdir_lock.acquire(workdir):
    assert holder(workdir) == {"pid": os.getpid(), "host": socket.gethostname()}


def test_a_killed_holder_blocks_nothing(tmp_path):
  """A run killed with SIGKILL leaves its pid in the file, but the OS has released its lock: resuming works."""
  workdir = str(tmp_path)
  child = hold_in_child(workdir)
  child.kill()
  child.wait(timeout=60)
  assert holder(workdir)["pid"] == child.pid
  lock = workdir_lock.acquire(workdir)
  assert holder(workdir)["pid"] == os.getpid()
  lock.release()


def test_one_process_cannot_lock_twice_and_can_lock_again_after_release(tmp_path):
  workdir = str(tmp_path)
  lock = workdir_lock.acquire(workdir)
  with pytest.raises(workdir_lock.WorkdirInUse, match=f"pid {os.getpid()}"):
    workdir_lock.acquire(workdir)
  lock.release()
  lock.release()
  workdir_lock.acquire(workdir).release()


def test_train_refuses_a_locked_workdir_before_loading_and_releases_on_error(tmp_path, monkeypatch):
  from ddpo_jax import models
  from ddpo_jax import train

  def load(*args, **kwargs):
    raise RuntimeError("models.load called")

  monkeypatch.setattr(models, "load", load)
  workdir = str(tmp_path)
  config = config_utils.get_config("configs/compress.py:tiny")
  with workdir_lock.acquire(workdir):
    with pytest.raises(workdir_lock.WorkdirInUse, match=f"another run \\(pid {os.getpid()}, "):
      train.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  with pytest.raises(RuntimeError, match="models.load called"):
    train.train(config, workdir)
  workdir_lock.acquire(workdir).release()  # the failed run let go of its lock
