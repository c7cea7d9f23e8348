"""The memory pre-flight: do the compiled steps fit in the devices' memory? Checked before epoch 0.

`check` runs after `steps.build` has compiled the run's steps and before any param is
placed on the devices or anything is written to the workdir. It compares the peak per
device of each phase of an epoch, counted as the memory planner counts them
(ddpo_jax.bench.memory's `sampling_peak` and `training_peak`), with the device's memory:

  sampling = a sampler call (its arguments, outputs and temporaries) + the rest of the
             train state (optimizer state, step, EMA) + the outputs of the epoch's earlier calls;
  training = an optimiser step (the state, the epoch's examples, temporaries) + the frozen
             VAE and text encoder + the epoch's rollouts.

The device's memory is `memory_stats()["bytes_limit"]`, which TPU and GPU report and the
CPU does not (there the check is skipped); config.preflight.device_memory_bytes replaces it
(tests, what-ifs). A phase above config.preflight.headroom x that figure stops the run with
a ConfigError naming the settings that were measured to fit: the levers below compiled on
the run's own devices, at most config.preflight.max_compilations compilations (a lever that
leaves a step unchanged reuses its memory analysis). A run that fits compiles nothing more.

Levers, in the order they are tried (the first ones keep the method, the samples per epoch
and the transitions per optimiser step):
  * the sampling phase: smaller sampling calls, more of them per epoch (the same samples);
  * the training phase: smaller minibatches per device with more gradient accumulation
    (the same transitions per optimiser step), then train.remat (alone, and with smaller
    minibatches when those alone do not fit);
  * either: mesh.fsdp over all devices, model.dtype bfloat16, LoRA (lora.rank);
  * when none of those fits alone: the ones that lowered a peak, together, at the smallest batches.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any
from typing import Callable
from typing import Sequence

from absl import logging
import jax
import ml_collections

from ddpo_jax import models
from ddpo_jax import sharding
from ddpo_jax import steps as steps_lib
from ddpo_jax import train_state
from ddpo_jax import validation
from ddpo_jax.bench import memory as planner

PHASES = ("sampling", "training")
# The compiled steps the phases count, and the settings whose change recompiles each
# (the number of samples per epoch is fixed: the sampling calls' count never changes the step).
SAMPLER, STEP = "sample", "optimizer_step"
_BOTH = ("model.dtype", "mesh.data", "mesh.fsdp", "lora.rank")
STEP_SETTINGS = {
  SAMPLER: _BOTH + ("sample.batch_size",),
  STEP: _BOTH + ("train.remat", "train.batch_size", "train.gradient_accumulation_steps"),
}
# A lever that saves less than this fraction of a failing peak is not combined with others
# (remat on XLA:CPU, whose CSE merges the recomputation back: bench/memory.py's docstring).
MIN_SAVING = 0.01
# The rank of the LoRA lever (with base.py's lora.alpha = 4: scale 1).
LORA_RANK = 4
# Lever names, as the message calls them.
SAMPLE_BATCH, TRAIN_BATCH, REMAT, FSDP, BFLOAT16, LORA, COMBINED = (
  "smaller sampling calls",
  "smaller minibatches, more accumulation",
  "remat",
  "fsdp",
  "bfloat16",
  "LoRA (trains adapters only)",
  "together",
)


@dataclasses.dataclass(frozen=True)
class Peaks:
  """Per-device peaks of an epoch's two phases, in bytes."""

  sampling: int
  training: int

  def over(self, allowed: int) -> tuple[str, ...]:
    """The phases whose peak exceeds `allowed` bytes."""
    return tuple(phase for phase in PHASES if getattr(self, phase) > allowed)


@dataclasses.dataclass(frozen=True)
class Trial:
  """A setting tried as a fix: config overrides {"section.field": value} and its peaks
  (None: not measured, `note` says why)."""

  lever: str
  overrides: dict[str, Any]
  peaks: Peaks | None = None
  note: str = ""

  def fits(self, allowed: int) -> bool:
    return self.peaks is not None and not self.peaks.over(allowed)


# ----------------------------------------------------------------------------
# The device's memory, and the run's peaks (nothing compiles).
# ----------------------------------------------------------------------------


def device_memory(devices: Sequence[Any]) -> int | None:
  """The smallest `memory_stats()["bytes_limit"]` of `devices`, in bytes; None if one reports none (the CPU)."""
  limits = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # a backend without memory statistics
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def memory_limit(override_bytes: int, devices: Sequence[Any]) -> tuple[int | None, str]:
  """(bytes per device to check against, or None: skip; where the figure comes from)."""
  if override_bytes:
    return int(override_bytes), f"config.preflight.device_memory_bytes={override_bytes}"
  limit = device_memory(devices)
  kind = getattr(devices[0], "device_kind", "device") if devices else "device"
  return limit, f"the bytes_limit of {kind}"


def planner_memory(memory: steps_lib.Memory, args: tuple) -> planner.Memory:
  """A compiled step's memory analysis as the planner counts it: every argument's bytes
  (those the program prunes, such as the sampler's unused VAE encoder, stay on the device)."""
  return planner.Memory(
    argument=planner.bytes_per_device(args),
    output=memory.outputs,
    alias=memory.aliased,
    temp=memory.temporaries,
    compiled_argument=memory.arguments,
    seconds=memory.compile_seconds,
    refused=memory.out_of_memory.message if memory.out_of_memory else "",
  )


def phase_sizes(config, model, mesh, layout, jitted, inputs: steps_lib.AbstractInputs) -> dict[str, int]:
  """The planner's buffer sizes per device (the `sizes` of its sampling_peak and training_peak), in bytes.

  From shapes alone: `inputs` are the steps' abstract arguments (`steps.abstract_inputs`).
  """
  plan = planner.Plan(config, model, mesh, layout, jitted, None)
  outputs = planner.sampler_outputs(plan, inputs.sample)
  params = inputs.sample[0]
  return {
    "opt_state": planner.bytes_per_device(layout.state) - planner.bytes_per_device(layout.state.params),
    "frozen_params": planner.bytes_per_device({k: v for k, v in params.items() if k != "unet"}),
    **planner.buffer_sizes(outputs, inputs.make_examples[0], config.sample.num_batches_per_epoch),
  }


def run_peaks(config: ml_collections.ConfigDict, run: steps_lib.Steps) -> Peaks:
  """The peaks of `run`'s compiled steps (built with the sampler and the optimizer step)."""
  sizes = phase_sizes(config, run.model, run.mesh, run.layout, run.jitted, run.inputs)
  samplers = [planner_memory(run.memory[n], run.inputs.sample) for n in ("sample", "eval_sample") if n in run.memory]
  step = planner_memory(run.memory[STEP], run.inputs.optimizer_step)
  return Peaks(max(planner.sampling_peak(s, sizes) for s in samplers), planner.training_peak(step, sizes))


# ----------------------------------------------------------------------------
# Levers: pure functions of the config.
# ----------------------------------------------------------------------------


def setting(config: ml_collections.ConfigDict, name: str) -> Any:
  """config's value of "section.field"."""
  return functools.reduce(lambda node, key: node[key], name.split("."), config)


def effective(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> dict[str, Any]:
  """`overrides` without the values the config already has."""
  return {k: v for k, v in overrides.items() if setting(config, k) != v}


def changed_steps(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> dict[str, tuple]:
  """{step name: the overrides that change it, as a sorted tuple of items} (empty: the run's own step)."""
  changed = effective(config, overrides)
  return {name: tuple(sorted((k, v) for k, v in changed.items() if k in keys)) for name, keys in STEP_SETTINGS.items()}


def sample_batch(config: ml_collections.ConfigDict, per_device: int, num_devices: int) -> dict[str, Any]:
  """Sampling calls of `per_device` samples per device, as many as keep the samples per epoch."""
  samples = config.sample.batch_size * config.sample.num_batches_per_epoch
  calls = per_device * num_devices
  return {"sample.batch_size": calls, "sample.num_batches_per_epoch": samples // calls}


def train_batch(config: ml_collections.ConfigDict, per_device: int, num_devices: int) -> dict[str, Any]:
  """Minibatches of `per_device` transitions per device, accumulated to keep the transitions per optimiser step."""
  per_update = config.train.batch_size * config.train.gradient_accumulation_steps
  minibatch = per_device * num_devices
  return {"train.batch_size": minibatch, "train.gradient_accumulation_steps": per_update // minibatch}


def global_levers(config: ml_collections.ConfigDict, num_devices: int) -> list[tuple[str, dict[str, Any]]]:
  """The levers that change both phases, as (name, overrides), those the config does not use yet."""
  levers = []
  _, fsdp = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  if num_devices > 1 and fsdp != num_devices:
    levers.append((FSDP, {"mesh.data": 1, "mesh.fsdp": num_devices}))
  if config.model.dtype != "bfloat16":
    levers.append((BFLOAT16, {"model.dtype": "bfloat16"}))
  if not config.lora.rank:
    levers.append((LORA, {"lora.rank": LORA_RANK}))
  return levers


def is_valid(config: ml_collections.ConfigDict, overrides: dict[str, Any], num_devices: int) -> bool:
  try:
    validation.validate(planner.with_overrides(config, overrides), None, num_devices, jax.process_count())
  except validation.ConfigError:
    return False
  return True


# ----------------------------------------------------------------------------
# Measuring settings by compiling their steps.
# ----------------------------------------------------------------------------


class Measurer:
  """Peaks of the run's config with overrides, compiled on the run's devices.

  Compiles only the steps a setting changes (`changed_steps`; the others reuse
  the memory analysis already known), at most `max_compilations` in all.
  """

  def __init__(self, config, run: steps_lib.Steps, unet_shapes, frozen, max_compilations: int):
    self.config, self.run, self.unet_shapes, self.frozen = config, run, unet_shapes, frozen
    self.base = run_peaks(config, run)
    self.max_compilations = max_compilations
    self.compilations, self.seconds = 0, 0.0
    self._memory = {
      (SAMPLER, ()): planner_memory(run.memory[SAMPLER], run.inputs.sample),
      (STEP, ()): planner_memory(run.memory[STEP], run.inputs.optimizer_step),
    }
    self._trials: dict[tuple, Trial] = {}

  def needed(self, overrides: dict[str, Any]) -> int:
    """Compilations that measuring `overrides` takes."""
    return sum((name, key) not in self._memory for name, key in changed_steps(self.config, overrides).items())

  def measure(self, lever: str, overrides: dict[str, Any]) -> Trial:
    """The peaks of the config with `overrides` (a Trial without peaks when invalid or over the budget)."""
    memo = tuple(sorted(effective(self.config, overrides).items()))
    if not memo:
      return Trial("as configured", {}, self.base)
    if memo not in self._trials:
      self._trials[memo] = self._measure(lever, overrides)
    return self._trials[memo]

  def _measure(self, lever: str, overrides: dict[str, Any]) -> Trial:
    config = planner.with_overrides(self.config, overrides)
    try:
      validation.validate(config, None, jax.device_count(), jax.process_count())
    except validation.ConfigError as e:
      return Trial(lever, overrides, note=f"not valid here: {e}")
    needed, left = self.needed(overrides), self.max_compilations - self.compilations
    if needed > left:
      return Trial(
        lever,
        overrides,
        note=f"needs {needed} compilation(s), {left} left of config.preflight.max_compilations={self.max_compilations}",
      )
    model = self.run.model
    if config.model.dtype != self.config.model.dtype:
      model = models.with_dtype(model, config.model.dtype)
    same_mesh = (config.mesh.data, config.mesh.fsdp) == (self.config.mesh.data, self.config.mesh.fsdp)
    mesh = self.run.mesh if same_mesh else sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    try:
      config, model, layout = steps_lib.configure(config, model, self.unet_shapes, mesh)
    except ValueError as e:
      return Trial(lever, overrides, note=f"not valid here: {e}")
    problem = train_state.check_sharded(layout, mesh, config.mesh.min_sharded_fraction)
    if problem:
      return Trial(lever, overrides, note=f"not valid here: {problem}")
    jitted = steps_lib.jit(config, model, mesh, layout)
    inputs = steps_lib.abstract_inputs(config, model, mesh, layout, self.frozen, jitted)
    memory = {}
    for name, key in changed_steps(self.config, overrides).items():
      if (name, key) not in self._memory:
        args = getattr(inputs, name)
        _, compiled = steps_lib.compile_ahead(getattr(jitted, name), args)
        self.compilations += 1
        self.seconds += compiled.compile_seconds
        logging.info("pre-flight: compiled %s with %s: %s", name, dict(key), compiled.describe())
        self._memory[(name, key)] = planner_memory(compiled, args)
      memory[name] = self._memory[(name, key)]
    sizes = phase_sizes(config, model, mesh, layout, jitted, inputs)
    peaks = Peaks(planner.sampling_peak(memory[SAMPLER], sizes), planner.training_peak(memory[STEP], sizes))
    return Trial(lever, overrides, peaks)


# ----------------------------------------------------------------------------
# Which levers fit.
# ----------------------------------------------------------------------------


class _NotMeasured(Exception):
  pass


def _lowered(trial: Trial, reference: Trial, phases: Sequence[str]) -> bool:
  """Whether `trial` needs at least MIN_SAVING less than `reference` in one of `phases` (both measured)."""
  if trial.peaks is None or reference.peaks is None:
    return False
  return any(getattr(trial.peaks, p) <= (1 - MIN_SAVING) * getattr(reference.peaks, p) for p in phases)


def _batch_search(
  measure: Callable[[str, dict], Trial],
  lever: str,
  phase: str,
  overrides_of: Callable[[int], dict],
  start: int,
  candidates: Sequence[int],
  allowed: int,
) -> int | None:
  """The largest per-device batch measured whose `phase` fits (the planner's search_batch: the
  smallest candidate, then one guess on the line between), or None."""
  measured = {}

  def peak_of(per_device: int) -> int:
    trial = measure(lever, overrides_of(per_device))
    if trial.peaks is None:
      raise _NotMeasured
    measured[per_device] = getattr(trial.peaks, phase)
    return measured[per_device]

  try:
    planner.search_batch(peak_of, start, candidates, allowed, max_tries=1)
  except _NotMeasured:
    pass
  fitting = [b for b, peak in measured.items() if peak <= allowed and b != start]
  return max(fitting) if fitting else None


def find_fixes(
  config: ml_collections.ConfigDict,
  num_devices: int,
  base: Peaks,
  allowed: int,
  measure: Callable[[str, dict], Trial],
) -> list[Trial]:
  """The settings tried, in order, each a Trial (`Measurer.measure` measures them).

  Args:
    base: the run's peaks, some phase above `allowed` bytes.
  """
  failing = base.over(allowed)
  tried: dict[tuple, Trial] = {}

  def record(lever: str, overrides: dict) -> Trial:
    trial = measure(lever, overrides)
    if effective(config, overrides):  # the run's own setting is not a fix
      tried.setdefault(tuple(sorted(effective(config, overrides).items())), trial)
    return trial

  def batches(total: int, per_device: int, overrides_of) -> list[int]:
    below = planner.divisors_below(total, num_devices, per_device)
    return [b for b in below if is_valid(config, overrides_of(b), num_devices)]

  n = num_devices
  prefix: dict[str, Any] = {}
  smallest: dict[str, Any] = {}
  if "sampling" in failing:
    of = lambda b: sample_batch(config, b, n)
    start = config.sample.batch_size // n
    candidates = batches(config.sample.batch_size * config.sample.num_batches_per_epoch, start, of)
    best = _batch_search(record, SAMPLE_BATCH, "sampling", of, start, candidates, allowed)
    prefix = of(best) if best else {}
    smallest.update(of(candidates[0]) if candidates else {})
  # What the levers below are compared with: the sampling fix, or the run as configured.
  reference = record(SAMPLE_BATCH, prefix) if prefix else Trial("as configured", {}, base)
  # More sampling calls hold one more copy of the epoch's rollouts in training (train.py's concatenation).
  if reference.peaks is not None and "training" in reference.peaks.over(allowed):
    failing = tuple(dict.fromkeys(failing + ("training",)))
  if "training" in failing:
    # Smaller minibatches first (on an accelerator they cost less than remat's recomputation),
    # then remat: alone, and with smaller minibatches when those alone do not fit.
    of = lambda b: dict(prefix, **train_batch(config, b, n))
    start = config.train.batch_size // n
    candidates = batches(config.train.batch_size * config.train.gradient_accumulation_steps, start, of)
    best = _batch_search(record, TRAIN_BATCH, "training", of, start, candidates, allowed)
    smallest.update(train_batch(config, candidates[0], n) if candidates else {})
    if not config.train.remat:
      remat = dict(prefix, **{"train.remat": True})
      trial = record(REMAT, remat)
      if _lowered(trial, reference, ("training",)):
        smallest["train.remat"] = True
        if best is None and trial.peaks.training > allowed:
          of = lambda b: dict(remat, **train_batch(config, b, n))
          _batch_search(record, TRAIN_BATCH, "training", of, start, candidates, allowed)
  for lever, overrides in global_levers(config, n):
    trial = record(lever, dict(prefix, **overrides))
    if lever != LORA and _lowered(trial, reference, failing):
      smallest.update(overrides)
  trials = list(tried.values())
  if not any(t.fits(allowed) for t in trials) and effective(config, smallest):
    key = tuple(sorted(effective(config, smallest).items()))
    if key not in tried:
      trials.append(record(COMBINED, smallest))
  return trials


# ----------------------------------------------------------------------------
# The verdict and the message.
# ----------------------------------------------------------------------------


def size(num_bytes: int) -> str:
  """Bytes as GiB, or MiB below 1 GiB."""
  return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.2f} MiB"


def flags(overrides: dict[str, Any]) -> str:
  """Overrides as the command line's --config flags."""
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def _peaks(peaks: Peaks) -> str:
  return f"sampling {size(peaks.sampling)}, training {size(peaks.training)}"


def best_fits(trials: Sequence[Trial], allowed: int) -> list[Trial]:
  """The trials that fit, one per lever: of a batch search, the one of the largest per-device batches."""
  best: dict[str, Trial] = {}
  for trial in trials:
    if not trial.fits(allowed):
      continue
    batch = lambda t: (t.overrides.get("sample.batch_size", 0), t.overrides.get("train.batch_size", 0))
    if trial.lever not in best or batch(trial) > batch(best[trial.lever]):
      best[trial.lever] = trial
  return list(best.values())


def refusal(
  base: Peaks,
  limit: int,
  source: str,
  headroom: float,
  trials: Sequence[Trial],
  compilations: int,
  seconds: float,
) -> str:
  """The ConfigError's message: what does not fit, what was measured to fit, what was not measured."""
  allowed = planner.budget(limit, headroom)
  phases = [
    f"the {phase} phase needs {size(getattr(base, phase))} per device"
    + (" (fits)" if getattr(base, phase) <= allowed else "")
    for phase in PHASES
  ]
  lines = [
    f"The run's steps do not fit in the devices' memory: {'; '.join(phases)}; the limit is config.preflight.headroom="
    f"{headroom} x {size(limit)} ({source}) = {size(allowed)}."
  ]
  if max(base.sampling, base.training) <= limit:
    lines.append(
      "The peak is within the device's memory itself: config.preflight.headroom=1.0 accepts it "
      "(at the risk of an out-of-memory error from fragmentation)."
    )
  fits = best_fits(trials, allowed)
  measured = f"{compilations} compilation(s) in {seconds:.0f} s on this run's devices, XLA's memory analysis"
  if fits:
    lines.append(f"Measured to fit ({measured}):")
    lines += [f"  {t.lever}: {flags(t.overrides)}  ({_peaks(t.peaks)})" for t in fits]
  else:
    lines.append(f"No setting measured fits ({measured}).")
  misses = [t for t in trials if t.peaks is not None and not t.fits(allowed)]
  if misses:
    lines.append("Measured, does not fit:")
    lines += [f"  {t.lever}: {flags(t.overrides)}  ({_peaks(t.peaks)})" for t in misses]
  others = [t for t in trials if t.peaks is None]
  if others:
    lines.append("Not measured:")
    lines += [f"  {t.lever}: {flags(t.overrides)}  ({t.note})" for t in others]
  lines.append(
    "Nothing was sampled, and the workdir's files are as they were. The planner reports any setting without a run: "
    "python -m ddpo_jax.bench memory --config=... --grid=config --platform=native; "
    "config.preflight.enabled=False skips this check."
  )
  return "\n".join(lines)


def refusals(refused: dict[str, steps_lib.OutOfMemory]) -> str:
  """The compiler's refusals of the run's steps, as one sentence."""
  return "The compiler refused " + "; ".join(f"the {name} step ({r.message})" for name, r in refused.items())


def check(config: ml_collections.ConfigDict, run: steps_lib.Steps, unet_shapes: Any, frozen: Any) -> Peaks | None:
  """Raises ConfigError, naming the settings measured to fit, when a phase of `run` exceeds the devices' memory.

  Args:
    config: the run's resolved config.
    run: its compiled steps (with the sampler and the optimizer step).
    unet_shapes, frozen: the UNet's params and the frozen {"vae", "text_encoder"} (arrays or
      ShapeDtypeStructs), to lay out and compile other settings.

  A step that the compiler refused for lack of memory (XLA:TPU refuses at compile time;
  `steps.compile_ahead` returns its Memory with `out_of_memory`) does not fit: its
  temporaries are the figure the refusal names; with the check off the run stops naming it.

  Returns:
    The run's peaks, or None when the check is off or the devices report no memory (the CPU).
  """
  p = config.preflight
  refused = {name: m.out_of_memory for name, m in run.memory.items() if m.out_of_memory is not None}
  if not p.enabled:
    if refused:
      raise validation.ConfigError(
        f"{refusals(refused)}; config.preflight.enabled=True (the default) measures which settings fit."
      )
    return None
  limit, source = memory_limit(p.device_memory_bytes, jax.local_devices())
  named = [r.available for r in refused.values() if r.available]
  if limit is None and named:
    limit, source = min(named), "the device memory the compiler's refusal names"
  if limit is None:
    if refused:
      raise validation.ConfigError(f"{refusals(refused)}; config.preflight.device_memory_bytes sets the device's.")
    logging.info("pre-flight skipped: %s is unknown (config.preflight.device_memory_bytes sets one)", source)
    return None
  base = run_peaks(config, run)
  allowed = planner.budget(limit, p.headroom)
  if not base.over(allowed) and refused:  # a device-memory figure above the compiler's own
    raise validation.ConfigError(
      f"{refusals(refused)}; the limit checked was {size(allowed)} ({source}): "
      "lower config.preflight.device_memory_bytes."
    )
  if not base.over(allowed):
    logging.info(
      "pre-flight: sampling peak %s, training peak %s per device, within %s x %s (%s)",
      size(base.sampling),
      size(base.training),
      p.headroom,
      size(limit),
      source,
    )
    return base
  logging.warning(
    "pre-flight: %s per device above %s; measuring fixes (at most %d compilations)",
    _peaks(base),
    size(allowed),
    p.max_compilations,
  )
  start = time.perf_counter()
  measurer = Measurer(config, run, unet_shapes, frozen, p.max_compilations)
  trials = find_fixes(config, jax.device_count(), base, allowed, measurer.measure)
  logging.info("pre-flight: measured %d settings in %.0f s", len(trials), time.perf_counter() - start)
  message = refusal(base, limit, source, p.headroom, trials, measurer.compilations, measurer.seconds)
  if refused:
    message = f"{refusals(refused)}: its figure is a lower bound.\n{message}"
  raise validation.ConfigError(message)
