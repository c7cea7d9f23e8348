"""Checkpoints of a run with orbax: save every N epochs and on preemption,
resume from the latest checkpoint that restores.

A checkpoint is the step `epoch + 1` (epochs completed) under
`workdir/checkpoints/`, with two items saved together:
  "state": the TrainState (UNet params, optimizer state, step), sharded as in
    training; every process writes its own shards.
  "meta": JSON: the epoch, the root seed and the stat tracker's buffers.
Everything else a continuation needs is a function of (seed, epoch): every
random key is `fold_in(PRNGKey(seed), epoch)` and the prompts' NumPy generator
is seeded with (seed, epoch, process), so a resumed run repeats an
uninterrupted one exactly.

orbax writes a checkpoint into a temporary folder and renames it once every
process has finished, so a process killed while saving leaves the previous
checkpoints as they were; a checkpoint that fails to restore (missing or
damaged files) is skipped with a warning and the one before it is tried.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from ddpo_jax import sharding


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def is_due(epoch: int, num_epochs: int, every_epochs: int) -> bool:
  """Whether epoch `epoch` (0-based) ends with a periodic checkpoint.

  The last epoch always does; every_epochs <= 0 saves only there.
  """
  if epoch == num_epochs - 1:
    return True
  return every_epochs > 0 and (epoch + 1) % every_epochs == 0


class Checkpointer:
  """Saves and restores (TrainState, metadata) pairs in `directory`.

  Args:
    directory: the checkpoints' folder (local or gs://).
    max_to_keep: newest checkpoints kept; older ones are deleted.
    asynchronous: write in a background thread once the arrays are on the host.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving (asynchronously); a later save or `wait` finishes it."""
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that restores, or None.

    Args:
      abstract_state: the TrainState as jax.ShapeDtypeStructs with shardings;
        the restored arrays get those shardings.
    """
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        _check_restored(abstract_state, restored.state)
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        logging.warning("checkpoint %d in %s cannot be restored, skipping it: %s", step, self.directory, e)
        continue
      return step, restored.state, dict(restored.meta)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_restored(abstract_state: Any, state: Any) -> None:
  expected = jax.tree.structure(abstract_state)
  if jax.tree.structure(state) != expected:
    raise ValueError("the checkpoint's tree differs from the train state's")
  for path, want, got in zip(
    (sharding.path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_state)),
    jax.tree.leaves(abstract_state),
    jax.tree.leaves(state),
  ):
    if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
      raise ValueError(f"{path}: checkpoint has {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")


class PreemptionFlag:
  """Set by SIGTERM (how Cloud TPU and most schedulers announce preemption).

  The training loop polls `requested()` once per epoch; with several hosts
  they agree (any host's signal counts) so that all of them save together.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint at the end of this epoch, then stopping", signum)
    self._event.set()

  def set(self) -> None:
    self._event.set()

  def requested(self) -> bool:
    return sharding.any_process(self._event.is_set())

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
