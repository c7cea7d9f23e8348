"""Fault injection: the tiny preset through SIGKILL and SIGTERM in each phase, a damaged newest
checkpoint and a changed config. Each ends in an exact resume or a clear refusal, and nothing
already written is lost.

One chain of runs on one workdir: every run after a fault resumes from what the last one left,
and is the next fault's victim (tests/fault_worker.py injects it). The last run finishes, and its
metrics and params must equal an uninterrupted run's. The runs share a persistent compilation
cache, so only the first compiles.
"""

import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpo_jax import checkpoints
from ddpo_jax import metrics
from ddpo_jax import train
from ddpo_jax import validation
from tests import test_resume

NUM_EPOCHS = 7
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")
# (phase, signal): the faults in the order the chain meets them. A SIGKILL loses the epoch in
# flight; a SIGTERM saves it (and, arriving while a checkpoint is written, the epoch after it).
FAULTS = [
  ("sampling", "KILL"),
  ("sampling", "TERM"),
  ("rewards", "KILL"),
  ("rewards", "TERM"),
  ("training", "KILL"),
  ("training", "TERM"),
  ("checkpoint", "KILL"),
  ("checkpoint", "TERM"),
]


def values(model_dir):
  return test_resume.overrides(model_dir, **{"num_epochs": NUM_EPOCHS, "eval.every_epochs": 0})


def newest_checkpoint(workdir) -> int:
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=0)


def run_with_fault(workdir, model_dir, cache, phase, signal_name, seed):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    FAULT_SEED=str(seed),
  )
  command = [sys.executable, WORKER, phase, signal_name, "0", "0", "--", "--config=configs/compress.py:tiny"]
  command += [f"--workdir={workdir}", *test_resume.flags(values(model_dir))]
  repo = os.path.dirname(os.path.dirname(WORKER))
  return subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _, state = train.train(test_resume.make_config(values(tiny_model_dir)), str(workdir))
  return workdir, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_a_run_through_every_fault_ends_as_an_uninterrupted_one(tiny_model_dir, reference, tmp_path):
  reference_dir, abstract_state = reference
  workdir, cache = tmp_path / "workdir", tmp_path / "cache"
  for seed, (phase, signal_name) in enumerate(FAULTS):
    start = newest_checkpoint(workdir)  # the epoch this run resumes at
    result = run_with_fault(workdir, tiny_model_dir, cache, phase, signal_name, seed)
    where = f"{signal_name} in {phase} of epoch {start}: rc {result.returncode}\n{result.stderr[-3000:]}"
    done = newest_checkpoint(workdir)
    if signal_name == "KILL":
      assert result.returncode == -signal.SIGKILL, where
      assert done in ((start, start + 1) if phase == "checkpoint" else (start,)), where
    else:
      assert result.returncode == 143, where
      assert done == start + (2 if phase == "checkpoint" else 1), where
      assert [r["epoch"] for r in metrics.read_metrics(str(workdir))] == list(range(done)), where

  # A damaged newest checkpoint: set aside, its epoch trained again.
  newest = newest_checkpoint(workdir)
  files = [os.path.join(r, n) for r, _, names in os.walk(workdir / "checkpoints" / str(newest)) for n in names]
  # Every file beside the largest (the arrays' data files) cut in half: one cut file alone can hold only bytes
  # that the restore never reads (seen: a chain whose restore of the cut checkpoint succeeded).
  data = os.path.dirname(max(files, key=os.path.getsize))
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(os.path.getsize(os.path.join(data, name)) // 2)
  summary = train.train_and_evaluate(test_resume.make_config(values(tiny_model_dir)), str(workdir))
  assert summary["epoch"] == NUM_EPOCHS - 1
  assert [n for n in os.listdir(workdir / "checkpoints") if n.startswith(f"{newest}.damaged-")]

  assert test_resume.records(workdir) == test_resume.records(reference_dir)
  saver = checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(workdir)))
  _, resumed, _ = saver.restore_latest(abstract_state)
  saver.close()
  _, expected = test_resume.final_params(reference_dir, abstract_state)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)

  # A changed config: refused, every file as it was.
  before = test_resume.snapshot(workdir)
  changed = test_resume.make_config(dict(values(tiny_model_dir), **{"lora.rank": 2, "lora.alpha": 2.0}))
  with pytest.raises(validation.ConfigError, match="new --workdir"):
    train.train_and_evaluate(changed, str(workdir))
  assert test_resume.snapshot(workdir) == before
  shutil.rmtree(cache, ignore_errors=True)
