"""Checkpoints: sharded round trip, a kill while saving, damaged checkpoints,
and the metrics file of a resumed run."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax import checkpoints
from ddpo_jax import metrics
from ddpo_jax import sharding
from ddpo_jax import train_state


def make_state(mesh, scale=1.0, size=64):
  params = {
    "conv": {"kernel": scale * jnp.arange(3 * 3 * size * 8, dtype=jnp.float32).reshape(3, 3, size, 8)},
    "bias": scale * jnp.ones((8,), jnp.float32),
  }
  opt_state = (jax.tree.map(jnp.sqrt, params),)
  state = train_state.TrainState(step=jnp.array(7, jnp.int32), params=params, opt_state=opt_state)
  shardings = sharding.tree_shardings(state, mesh, min_size=64)
  return jax.device_put(state, shardings), shardings


def abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_round_trip(tmp_path):
  mesh = sharding.make_mesh(2, 4)
  state, shardings = make_state(mesh)
  assert state.params["conv"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
  saver = checkpoints.Checkpointer(str(tmp_path))
  meta = {"epoch": 3, "seed": 0, "tracker": {"a cat": [0.1, 1 / 3]}}
  saver.save(4, state, meta)
  saver.close()
  step, restored, restored_meta = checkpoints.Checkpointer(str(tmp_path)).restore_latest(abstract(state, shardings))
  assert step == 4 and restored_meta == meta
  assert_same(state, restored)
  assert restored.params["conv"]["kernel"].sharding == shardings.params["conv"]["kernel"]


def test_keeps_the_last_k(tmp_path):
  state, _ = make_state(sharding.make_mesh(8, 1))
  saver = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    saver.save(step, state, {"epoch": step - 1})
  saver.close()
  assert checkpoints.Checkpointer(str(tmp_path)).steps() == [2, 3]


# Saves step 1, starts an asynchronous save of step 2 (big enough to take a
# while) and kills itself with SIGKILL as soon as orbax's temporary folder of
# step 2 exists: a process dying in the middle of writing a checkpoint.
KILLED_WRITER = textwrap.dedent(
  """
  import os, signal, sys, time
  import jax, jax.numpy as jnp
  from ddpo_jax import checkpoints
  directory = sys.argv[1]
  saver = checkpoints.Checkpointer(directory)
  saver.save(1, {"w": jnp.ones((4, 4))}, {"epoch": 0})
  saver.wait()
  big = jax.random.normal(jax.random.PRNGKey(0), (64, 1024, 1024))  # 256 MB
  saver.save(2, {"w": big}, {"epoch": 1})
  deadline = time.time() + 60
  while time.time() < deadline:
    if any("tmp" in name for name in os.listdir(directory)):
      open(os.path.join(directory, "..", "killed_mid_write"), "w").close()
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.001)
  """
)


def test_kill_while_saving_leaves_the_previous_checkpoint(tmp_path):
  directory = tmp_path / "checkpoints"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(directory)], env=env, capture_output=True)
  assert result.returncode == -9, result.stderr.decode()[-2000:]
  assert (tmp_path / "killed_mid_write").exists()
  saver = checkpoints.Checkpointer(str(directory))
  assert saver.steps() == [1]
  abstract_state = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=sharding.replicated(sharding.make_mesh()))}
  step, state, meta = saver.restore_latest(abstract_state)
  assert step == 1 and meta == {"epoch": 0}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 4)))


# Saves checkpoint 1, then checkpoint 2 of 64 leaves of 64 kB with every file limited to 1 MB (RLIMIT_FSIZE, as
# a full disk: the write fails part-way), with the program's logging (absl to stderr, main.quiet_logs).
FAILED_WRITER = textwrap.dedent(
  """
  import resource, signal, sys
  from absl import logging
  import jax, numpy as np
  from ddpo_jax import checkpoints, main
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  main.quiet_logs()
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  rng = np.random.default_rng(0)
  saver = checkpoints.Checkpointer(sys.argv[1])
  saver.save(1, {"w": jax.numpy.ones((4, 4))}, {"epoch": 0})
  saver.wait()
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
  state = {f"w{i}": jax.numpy.asarray(rng.normal(size=(64, 256)), "float32") for i in range(64)}
  try:
    saver.save(2, state, {"epoch": 1})
    saver.close()
  except checkpoints.CheckpointWriteFailed as e:
    print("CheckpointWriteFailed:", e)
  """
)


def test_a_failed_write_reports_its_cause_in_one_message_not_pages_of_tracebacks(tmp_path):
  directory = tmp_path / "checkpoints"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(
    [sys.executable, "-c", FAILED_WRITER, str(directory)], env=env, capture_output=True, text=True
  )
  output = result.stdout + result.stderr
  failure = [line for line in result.stdout.splitlines() if line.startswith("CheckpointWriteFailed:")]
  assert failure, output[-3000:]
  assert f"checkpoint 2 could not be written to {directory}: File too large (errno 27)." in failure[0]
  assert "intact: [1]" in failure[0] and "resume from checkpoint 1." in failure[0]
  assert output.count("Traceback") == 0 and len(output.splitlines()) < 20, output[-3000:]
  assert checkpoints.Checkpointer(str(directory)).steps() == [1]


def _damage(step_dir, how):
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state") for name in names]
  data = [f for f in files if f"{os.sep}d{os.sep}" in f] or files
  assert data
  for path in data:
    if how == "deleted":
      os.remove(path)
    else:
      size = os.path.getsize(path)
      with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def save_two_steps(directory):
  """Checkpoints 1 and 2 (of another state) in `directory`; returns (state 1, its shardings, state 2)."""
  state, shardings = make_state(sharding.make_mesh(8, 1))
  saver = checkpoints.Checkpointer(str(directory))
  saver.save(1, state, {"epoch": 0})
  saver.wait()
  later, _ = make_state(sharding.make_mesh(8, 1), scale=2.0)
  saver.save(2, later, {"epoch": 1})
  saver.close()
  return state, shardings, later


@pytest.mark.parametrize("how", ["deleted", "garbled"])
def test_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, how, caplog):
  state, shardings, later = save_two_steps(tmp_path)
  _damage(tmp_path / "2", how)
  with caplog.at_level(logging.WARNING):
    step, restored, meta = checkpoints.Checkpointer(str(tmp_path)).restore_latest(abstract(state, shardings))
  assert step == 1 and meta == {"epoch": 0}
  assert_same(state, restored)
  assert any("checkpoint 2" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


def test_a_damaged_newest_checkpoint_is_set_aside_and_its_step_saved_again(tmp_path):
  """The run that restored step 1 over a damaged step 2 trains its epoch again and saves step 2: that must
  work (it used to fail with StepAlreadyExistsError on every rerun), and the damaged files must be kept."""
  state, shardings, later = save_two_steps(tmp_path)
  _damage(tmp_path / "2", "garbled")
  damaged_files = sorted(os.listdir(tmp_path / "2" / "state"))

  resumed = checkpoints.Checkpointer(str(tmp_path))
  step, _, _ = resumed.restore_latest(abstract(state, shardings))
  assert step == 1 and resumed.steps() == [1]
  (aside,) = [name for name in os.listdir(tmp_path) if name.startswith("2.damaged-")]
  assert sorted(os.listdir(tmp_path / aside / "state")) == damaged_files
  resumed.save(2, later, {"epoch": 1})
  resumed.close()
  step, restored, meta = checkpoints.Checkpointer(str(tmp_path)).restore_latest(abstract(state, shardings))
  assert step == 2 and meta == {"epoch": 1}
  assert_same(later, restored)
  assert os.path.isdir(tmp_path / aside)  # never deleted


def test_a_run_that_starts_again_from_nothing_sets_aside_the_evaluation_before_training(tmp_path):
  """A run killed before its first checkpoint starts again at epoch 0 and evaluates the pretrained params
  again (epoch -1): its earlier record of that must not stay beside the new one."""
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_scalars(-1, {"eval_reward_mean": 0.5})
  writer.close()
  writer = metrics.MetricWriter(str(tmp_path))
  assert writer.resume_at(0) == 1
  writer.write_scalars(-1, {"eval_reward_mean": 0.5})
  writer.close()
  assert [r["epoch"] for r in metrics.read_metrics(str(tmp_path))] == [-1]


def test_no_checkpoint_restores_none(tmp_path):
  state, shardings = make_state(sharding.make_mesh(8, 1))
  assert checkpoints.Checkpointer(str(tmp_path)).restore_latest(abstract(state, shardings)) is None


def test_metrics_of_repeated_epochs_are_set_aside(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for epoch in range(4):
    writer.write_scalars(epoch, {"reward_mean": float(epoch)})
  writer.close()
  with open(tmp_path / metrics.METRICS_FILE, "a") as f:
    f.write('{"epoch": 4, "rew')  # torn by a kill
  writer = metrics.MetricWriter(str(tmp_path))
  assert writer.resume_at(2) == 3
  writer.write_scalars(2, {"reward_mean": 20.0})
  writer.close()
  assert [(r["epoch"], r["reward_mean"]) for r in metrics.read_metrics(str(tmp_path))] == [
    (0, 0.0),
    (1, 1.0),
    (2, 20.0),
  ]
  with open(tmp_path / metrics.DISCARDED_FILE) as f:
    discarded = f.read().splitlines()
  assert [json.loads(line)["epoch"] for line in discarded[:2]] == [2, 3] and discarded[2].startswith('{"epoch": 4')
