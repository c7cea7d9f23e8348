"""Preemption and exact resumption of `python -m ddpo_jax.main`.

A run killed (SIGKILL, no clean exit) after its first checkpoint and started
again with the same --workdir must write the same metrics.jsonl records and
end with the same params as an uninterrupted run; a SIGTERM makes a run save
a checkpoint at the end of its epoch and stop.
"""

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax import checkpoints
from ddpo_jax import config_utils
from ddpo_jax import metrics
from ddpo_jax import prompts
from ddpo_jax import rewards
from ddpo_jax import steps as steps_lib
from ddpo_jax import train
from ddpo_jax import validation
from tests.conftest import TESTS_TRAINING

NUM_EPOCHS = 3
# Settings of a small run of the tiny test model: per-prompt statistics over a
# few prompts, so that the stat tracker's buffers must be restored too.
OVERRIDES = {
  **TESTS_TRAINING,
  "num_epochs": NUM_EPOCHS,
  "prompt.name": "tests.test_resume:three_shapes",
  "stat_tracking.per_prompt": True,
  "stat_tracking.buffer_size": 8,
  "stat_tracking.min_count": 4,
  "sample.batch_size": 16,
  "sample.num_steps": 4,
  "train.batch_size": 16,
  "train.gradient_accumulation_steps": 2,
  "checkpoint.every_epochs": 1,
  "logging.images_every_epochs": 0,
}
# Timings differ from run to run; everything else must not.
TIMINGS = ("seconds", "sampling_seconds", "training_seconds")


def three_shapes(**unused_kwargs):  # the tiny preset's prompt.kwargs are the constant prompt's
  return prompts.uniform(["a red circle", "a blue square", "a green cross"])


def overrides(model_dir, **more):
  return dict(OVERRIDES, **{"model.name": model_dir}, **more)


def make_config(values):
  return config_utils.override(config_utils.get_config("configs/compress.py:tiny"), values)


def flags(values):
  return [f"--config.{key}={value}" for key, value in values.items()]


def records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in metrics.read_metrics(str(workdir))]


def final_params(workdir, trainer_abstract_state):
  saver = checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(workdir)))
  step, state, _ = saver.restore_latest(trainer_abstract_state)
  saver.close()
  return step, jax.device_get(state.params)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _, state = train.train(make_config(overrides(tiny_model_dir)), str(workdir))
  return workdir, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_killed_run_resumes_exactly(tiny_model_dir, uninterrupted, tmp_path):
  reference_dir, abstract_state = uninterrupted
  values = overrides(tiny_model_dir)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  command = [sys.executable, "-m", "ddpo_jax.main", "--config=configs/compress.py:tiny", f"--workdir={tmp_path}"]
  process = subprocess.Popen(
    command + flags(values), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
  )
  first_checkpoint = tmp_path / "checkpoints" / "1"
  deadline = time.time() + 300
  while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  os.killpg(process.pid, signal.SIGKILL)
  _, stderr = process.communicate()
  assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
  done = sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
  assert done and done[-1] < NUM_EPOCHS, done  # killed part-way
  # The console: each compiled step's memory before epoch 0, and no third-party deprecation notices.
  console = stderr.decode()
  assert "compiled optimizer_step: arguments" in console and "deprecated" not in console, console[-3000:]

  summary = train.train_and_evaluate(make_config(values), str(tmp_path))
  assert summary["epoch"] == NUM_EPOCHS - 1
  assert records(tmp_path) == records(reference_dir)
  step, resumed = final_params(tmp_path, abstract_state)
  reference_step, reference = final_params(reference_dir, abstract_state)
  assert step == reference_step == NUM_EPOCHS
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


@rewards.register("test_sigterm_in_second_epoch")
def sigterm_in_second_epoch():
  """JPEG compressibility that sends this process SIGTERM on its 3rd call
  (the first of epoch 1's two sampling batches)."""
  reward = rewards.make("jpeg_compressibility")
  calls = []

  def fn(images, prompts):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return reward(images, prompts)

  return fn


def test_sigterm_saves_and_stops_after_the_epoch(tiny_model_dir, uninterrupted, tmp_path):
  _, abstract_state = uninterrupted
  values = overrides(tiny_model_dir, **{"reward.name": "test_sigterm_in_second_epoch"})
  values["checkpoint.every_epochs"] = 0  # only the preemption saves
  values["eval.every_epochs"] = 0  # the reward counts its calls: no evaluation's
  handler = signal.getsignal(signal.SIGTERM)
  summary = train.train_and_evaluate(make_config(values), str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) is handler  # restored
  assert summary["preempted"] and summary["epoch"] == 1
  assert [r["epoch"] for r in metrics.read_metrics(str(tmp_path))] == [0, 1]
  step, _ = final_params(tmp_path, abstract_state)
  assert step == 2


def test_sigterm_during_the_training_pass_saves_that_epoch(tiny_model_dir, tmp_path, monkeypatch):
  """A SIGTERM that arrives while epoch 1's training pass is still on the device saves checkpoint 2 and
  stops, and the flag is read only once the epoch's device work is done (read as soon as the pass was
  dispatched, a signal during the pass was acted on one epoch late; a Cloud TPU spot VM has about 30 s)."""
  build = steps_lib.build
  calls, last_state, ready_when_read = [], [], []
  values = overrides(tiny_model_dir, **{"checkpoint.every_epochs": 0, "eval.every_epochs": 0})
  values["train.num_inner_epochs"] = 1

  @jax.jit
  def seconds_of_work(step):  # seconds of matmuls, dispatched asynchronously (a host callback would run inline)
    work = jax.lax.fori_loop(0, 1500, lambda i, a: jnp.tanh(a @ a), jnp.full((512, 512), 1e-3))
    return step + (work[0, 0] * 0).astype(step.dtype)

  def build_with_a_slow_last_update(*args, **kwargs):
    run = build(*args, **kwargs)

    def optimizer_step(state, *rest):
      state, step_metrics = run.optimizer_step(state, *rest)
      calls.append(1)
      if len(calls) == 2 * run.num_updates * values["train.num_inner_epochs"]:  # epoch 1's last update
        state = state.replace(step=seconds_of_work(state.step))
        os.kill(os.getpid(), signal.SIGTERM)  # while that work is still running
      last_state[:] = [state]
      return state, step_metrics

    return dataclasses.replace(run, optimizer_step=optimizer_step)

  requested = checkpoints.PreemptionFlag.requested

  def requested_once_the_work_is_done(flag):
    ready_when_read.append(all(leaf.is_ready() for leaf in jax.tree.leaves(last_state[0])))
    return requested(flag)

  monkeypatch.setattr(steps_lib, "build", build_with_a_slow_last_update)
  monkeypatch.setattr(checkpoints.PreemptionFlag, "requested", requested_once_the_work_is_done)
  summary = train.train_and_evaluate(make_config(values), str(tmp_path))
  assert ready_when_read == [True, True]
  assert summary["preempted"] and summary["epoch"] == 1
  assert [r["epoch"] for r in metrics.read_metrics(str(tmp_path))] == [0, 1]
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [2]


def snapshot(folder) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_an_incompatible_config_stops_before_writing_anything(tiny_model_dir, uninterrupted, tmp_path):
  """A finished full fine-tuning workdir rerun with LoRA: no restart from the pretrained weights over it, but
  an error naming the newest checkpoint, what differs and the two ways out; every file as it was."""
  source, _ = uninterrupted
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  before = snapshot(workdir)
  config = make_config(overrides(tiny_model_dir, **{"lora.rank": 2, "lora.alpha": 2.0}))
  with pytest.raises(validation.ConfigError) as error:
    train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert os.path.join(str(workdir), "checkpoints", str(NUM_EPOCHS)) in message  # the newest checkpoint
  assert "leaves only in this run: params/" in message and "/lora_a (float32" in message, message  # what differs
  assert "leaves only in the checkpoint: " in message
  assert "config.json" in message and "new --workdir" in message  # the two ways out
  assert snapshot(workdir) == before
