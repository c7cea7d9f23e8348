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
damaged files) is skipped with a warning and the one before it is tried;
once an older one restores, the newer, unrestorable ones are renamed
`STEP.damaged-TIME` (never deleted), so that the run can save those steps again.
When checkpoints exist but none restores into the run's train state (other
settings: LoRA, EMA, another model), the run stops with `IncompatibleCheckpoints`
naming what differs: it never starts again from the pretrained weights over
an existing run.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from ddpo_jax import sharding
from ddpo_jax import validation


class IncompatibleCheckpoints(validation.ConfigError):
  """Checkpoints exist, but none restores into the current train state."""


class CheckpointWriteFailed(RuntimeError):
  """A checkpoint could not be written (a full disk, lost permissions); the message names the step, the cause,
  the checkpoints that are intact and how to resume."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def first_line(error: BaseException) -> str:
  """The first line of an error's message (orbax's can embed pages of TensorStore specs)."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _leaf_descriptions(tree: Any) -> dict[str, str]:
  """{"a/b/c": "float32[3, 4]"} for every leaf with a shape (arrays, ShapeDtypeStructs, orbax metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    out[sharding.path_string(path)] = f"{getattr(leaf, 'dtype', '?')}{list(shape)}"
  return out


def tree_differences(expected: Any, stored: Any, examples: int = 3) -> list[str]:
  """What differs between the state a run expects and a checkpoint's stored tree: one line per kind of
  difference (leaves only in this run, only in the checkpoint, of another shape or dtype), with a count and
  the first `examples` paths."""
  want, have = _leaf_descriptions(expected), _leaf_descriptions(stored)
  kinds = (
    ("only in this run", [f"{p} ({want[p]})" for p in want if p not in have]),
    ("only in the checkpoint", [f"{p} ({have[p]})" for p in have if p not in want]),
    (
      "of another shape or dtype",
      [f"{p}: this run {want[p]}, the checkpoint {have[p]}" for p in want if p in have and want[p] != have[p]],
    ),
  )
  lines = []
  for kind, paths in kinds:
    if paths:
      more = f", and {len(paths) - examples} more" if len(paths) > examples else ""
      lines.append(f"{len(paths)} leaves {kind}: " + "; ".join(paths[:examples]) + more)
  return lines


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
    self._writing: int | None = None  # the step being written asynchronously

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving (asynchronously); a later save or `wait` finishes it.

    Raises:
      CheckpointWriteFailed: this checkpoint, or the one still being written, could not be written.
    """
    self.wait()
    self._writing = step
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
      )
    except Exception as e:  # noqa: BLE001 - orbax raises what its storage raised; the message names it
      raise self._write_failed(e) from e

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

    Args:
      abstract_state: the TrainState as jax.ShapeDtypeStructs with shardings;
        the restored arrays get those shardings.

    Raises:
      IncompatibleCheckpoints: checkpoints exist but none restores; names the
        newest, what differs from `abstract_state`, and the two ways out.
    """
    steps = self.steps()
    problems = {}
    for step in reversed(steps):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        _check_restored(abstract_state, restored.state)
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        problems[step] = first_line(e)
        logging.warning("checkpoint %d in %s cannot be restored, skipping it: %s", step, self.directory, problems[step])
        continue
      self._set_aside([later for later in steps if later > step])
      return step, restored.state, dict(restored.meta)
    if steps:
      raise IncompatibleCheckpoints(self._incompatible_message(steps[-1], abstract_state, problems[steps[-1]]))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Renames the unrestorable checkpoints `steps` (newer than the one restored) to `STEP.damaged-TIME`,
    kept for inspection: left in place, the run would fail when it saves that step again."""
    if not steps:
      return
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if jax.process_index() == 0:
      for step in steps:
        source = epath.Path(self.directory) / str(step)
        target = source.parent / f"{step}.damaged-{stamp}"
        source.rename(target)
        logging.warning("set aside the unrestorable checkpoint %s as %s", source, target)
    sharding.sync_processes("checkpoints set aside")
    self.manager.reload()

  def _incompatible_message(self, step: int, abstract_state: Any, problem: str) -> str:
    try:
      metadata = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
      differences = tree_differences(abstract_state, getattr(metadata, "item_metadata", metadata))
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint may not even have readable metadata
      differences = [f"its metadata cannot be read ({first_line(e)})"]
    if not differences:
      differences = [problem]
    workdir = os.path.dirname(self.directory)
    return (
      f"{self.directory} holds checkpoints {self.steps()}, but none restores into this run's train state. "
      f"The newest, {os.path.join(self.directory, str(step))}, differs:\n  " + "\n  ".join(differences) + "\n"
      f"Resume with the settings that wrote it (see {os.path.join(workdir, 'config.json')}), "
      "or start this configuration in a new --workdir."
    )

  def wait(self) -> None:
    """Waits until the checkpoint being written is complete; CheckpointWriteFailed if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - see `save`
      raise self._write_failed(e) from e
    self._writing = None

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _write_failed(self, error: BaseException) -> CheckpointWriteFailed:
    step, self._writing = self._writing, None
    intact = self.steps()
    workdir = os.path.dirname(self.directory)
    cause = write_error_cause(error)
    return CheckpointWriteFailed(
      f"checkpoint {step} could not be written to {self.directory}: {cause}.{_disk_space(self.directory)}"
      f" The checkpoints written before it are intact: {intact or 'none'}; its partial folder is removed when the "
      f"run starts again. Fix the cause (free space, or lower config.checkpoint.max_to_keep) and run the same "
      f"command with --workdir={workdir} to "
      + (f"resume from checkpoint {intact[-1]}." if intact else "start it again.")
    )


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


def write_error_cause(error: BaseException) -> str:
  """What went wrong, in a line: the operating system's words where the error names an errno (TensorStore's
  "[os_error_code='28']": "No space left on device"), else the error's first line."""
  match = re.search(r"os_error_code='?(\d+)", str(error))
  if match:
    return f"{os.strerror(int(match.group(1)))} (errno {match.group(1)})"
  return first_line(error)


def _disk_space(directory: str) -> str:
  """The free space on a local folder's disk, as a sentence; "" for other storage (gs://)."""
  if "://" in directory:
    return ""
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    return ""
  return f" {free / 1e6:.1f} MB are free on its disk."


# --- A failed write's noise. When one of orbax's asynchronous writes fails (a full disk), its event loop stops
# with hundreds of other writes in flight; each of them then reports "Event loop is closed" as an unraisable
# exception, and orbax logs the first error with its traceback in four places. The cause is in
# CheckpointWriteFailed's message; these keep the rest at debug level (--verbosity=1 shows it).


def _is_failed_write_noise(exc_value: BaseException | None, obj: Any) -> bool:
  if isinstance(exc_value, RuntimeError) and "Event loop is closed" in str(exc_value):
    return True
  code = getattr(obj, "cr_code", None)  # a coroutine of orbax's, collected unfinished
  return code is not None and "/orbax/" in code.co_filename


def quiet_failed_write_noise() -> None:
  """Installs a sys.unraisablehook that drops the unraisable exceptions of a failed write's stopped writers,
  unless logging is at debug level; other unraisable exceptions reach the previous hook."""
  previous = sys.unraisablehook

  def hook(unraisable, previous=previous, level_debug=logging.level_debug):
    try:
      noise = _is_failed_write_noise(unraisable.exc_value, unraisable.object) and not level_debug()
    except Exception:  # noqa: BLE001 - at interpreter shutdown; the noise then is the stopped writers'
      noise = True
    if not noise:
      previous(unraisable)

  sys.unraisablehook = hook


def shorten_failed_write_records(record: std_logging.LogRecord) -> bool:
  """A logging filter: orbax's error records without their tracebacks, and asyncio's "exception was never
  retrieved" records of a failed write dropped, unless logging is at debug level."""
  if logging.level_debug():
    return True
  if record.name == "asyncio" and "exception was never retrieved" in record.getMessage():
    return False
  if "/orbax/" in record.pathname and record.levelno >= std_logging.ERROR:
    record.exc_info = record.exc_text = None
  return True


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
