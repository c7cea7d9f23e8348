r"""`python -m ddpo_jax.bench memory`: does a config fit in a target's HBM?

    python -m ddpo_jax.bench memory --config=configs/compress.py
    python -m ddpo_jax.bench memory --config=configs/compress.py --target=v5e-8 --json
    python -m ddpo_jax.bench memory --config=configs/compress.py:tiny --grid=config --nosearch
    python -m ddpo_jax.bench memory --config=configs/compress.py --topology=v5e:2x4,v4:2x2x1   # needs libtpu

Runs no model and downloads nothing: the model is built without weights
(ddpo_jax.models.architectures), the steps are jitted on abstract params, and their
sampler and training step are lowered with abstract inputs and compiled for
the target's mesh: with --target on fake CPU devices (XLA:CPU, the fallback
without libtpu), with --topology by the TPU compiler for the compile-only
devices of that TPU slice (`ddpo_jax.bench.tpu`), the config's "auto"
settings resolved for the TPU (flash attention, scanned accumulation), the
same jitted functions and shardings as the trainer's. Per device, per target and setting:

  * params: the trained UNet as the train state shards it, the frozen VAE and
    text encoder (replicated), and the optimizer state (AdamW's mu and nu);
  * buffers: one sampling call's outputs (trajectory latents [B, T+1, C, h, w]
    float32, log-probs [B, T], prompt embeddings [B, L, D], uint8 images), the
    epoch's rollouts that the training phase keeps, and the inner epoch's
    transitions [num_updates, accumulation, M, ...];
  * working memory: `compiled.memory_analysis()` of the sampler and of the
    training step (arguments + outputs - donated + temporaries), and the saved
    activations of one minibatch's backward pass counted on its jaxpr;
  * the peaks of the two phases of an epoch:
      sampling = sampler call + optimizer state + the epoch's earlier calls' outputs,
      training = training step + frozen params + the epoch's rollouts,
    and the verdict against the HBM; when the config does not fit, the
    largest per-device sample and train batches that do (found by compiling
    a few sizes, each guessed on the line through the nearest sizes that fit
    and that do not).

What the numbers are (printed with the report):
  * XLA:CPU's buffer assignment for that mesh, not TPU's or GPU's (their
    layouts, fusion and scheduling differ). For SD v1.4 in float32 with 16
    to 32 UNet rows per device its temporaries are within 7% of the saved
    activations counted on the jaxpr, which no backend changes.
  * XLA:CPU computes bfloat16 dots and reductions in float32 and so overstates
    bfloat16 working memory (SD v1.4, 16 UNet rows: 112 GiB of temporaries
    against 79 GiB of bfloat16 saved activations); the jaxpr column keeps the
    dtype.
  * XLA:CPU expands jax.checkpoint's optimization barriers, after which CSE
    merges the recomputation back into the forward pass and remat saves
    nothing; the bench keeps the barriers (XLA flag
    --xla_disable_hlo_passes=cse_barrier_expander), as TPU and GPU do.
  * The training step is compiled with gradient_accumulation_steps=1 and the
    same transitions per epoch: on accelerators the accumulation is a
    lax.scan whose body, one minibatch's forward and backward pass, is the
    same for any count, while XLA:CPU unrolls it (update.UpdateSettings) and
    would compile that many copies.
  * With --topology (or --platform=native on a TPU), the rooflines of a
    sampling call and of an optimiser step on the slice's chip (`tpu.CHIPS`):
    max(FLOPs / peak bfloat16 FLOP/s, bytes accessed / HBM bandwidth) of the
    TPU compiler's cost analysis, which counts a while loop's body once: the
    sampler's loop body (one denoising step) and the step's accumulation body
    (one minibatch) are compiled alone and added (num_steps - 1) and
    (gradient_accumulation_steps - 1) times. Then the epoch's time,
    num_batches_per_epoch sampling calls + num_inner_epochs x
    num_updates_per_inner_epoch optimiser steps, and its samples per second.
    Bounds, not measurements: no overlap, no host, reward or evaluation time.
  * --nocompile skips compilation: params, optimizer state and buffers are
    exact; the training step's activations are the jaxpr's saved residuals
    (plus, with remat, the largest rematerialised block's), and the sampler's
    are a rough 1.3 x its largest intermediate.

The device count of a target is fixed before jax starts its backend: with
--target=all each target runs in a child process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any
from typing import Callable
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddpo_jax.bench import gpu as gpu_lib
from ddpo_jax.bench import tpu

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  """A machine: its devices and the HBM of each, in bytes.

  topology: the TPU slice (`--topology`) whose compile-only devices the steps
  are compiled for with the TPU compiler; "" for the targets of `--target`
  (fake CPU devices). chip: its generation's figures (`tpu.Chip`), for the
  rooflines; None where unknown.
  """

  name: str
  num_devices: int
  hbm_bytes: int
  description: str
  topology: str = ""
  chip: Any = None


TARGETS = {
  "v4-8": Target("v4-8", 4, 32 * GiB, "TPU v4-8: 4 chips x 32 GiB HBM"),
  "v5e-8": Target("v5e-8", 8, 16 * GiB, "TPU v5e-8: 8 chips x 16 GiB HBM"),
  "gpu-80gb": Target("gpu-80gb", 1, 80 * GiB, "one 80 GB GPU (A100/H100 80GB: 80 GiB)"),
}
# Removed from XLA:CPU's pipeline so that jax.checkpoint's barriers survive (see the docstring).
CPU_XLA_FLAGS = ("--xla_disable_hlo_passes=cse_barrier_expander",)
# The sampler's rough working memory without compiling: this many times its
# largest intermediate (XLA:CPU: 41 GiB of temporaries for SD v1.4's 32 samples
# per device, whose largest intermediate, an attention score, is 32 GiB).
ROUGH_SAMPLER_FACTOR = 1.3

FLAGS = flags.FLAGS
GRIDS = {
  "paper": "the config in float32 and bfloat16, remat off and on, fsdp 1 and all devices",
  "finetuning": "the config in bfloat16 and float32, full fine-tuning and LoRA (rank 4), remat on and off, on "
  "the config's mesh",
  "config": "the config's own",
}
# The LoRA rank of the "finetuning" grid (the pre-flight's lever: preflight.LORA_RANK).
GRID_LORA_RANK = 4


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this subcommand's flags (called by `python -m ddpo_jax.bench memory`
  only, so that importing this module defines no flag beside other programs')."""
  config_flags.DEFINE_config_file(
    "config", None, "A config file of configs/, optionally with :preset.", lock_config=True, flag_values=flag_values
  )
  flags.DEFINE_enum(
    "target",
    "all",
    ["all", *TARGETS],
    "The machine whose mesh and HBM to check; all: each in turn.",
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    "topology",
    None,
    "TPU slices to compile for with the TPU compiler (needs libtpu), comma-separated jax topology names, e.g. "
    "v5e:2x4,v4:2x2x1,v6e:2x4; replaces --target, and adds each call's roofline time and the epoch's.",
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    "gpu",
    None,
    "GPUs of one host to compile for with XLA:GPU, without a GPU (needs jax's CUDA plugin: pip install "
    f"'jax[cuda12]'), comma-separated NAME[:COUNT] of {', '.join(gpu_lib.GPUS)}, e.g. h100-80gb:8; replaces "
    "--target. Memory only: XLA:GPU gives no cost analysis without a device.",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "num_devices", 0, "Devices of the mesh; 0: the target's (v4-8: 4, v5e-8: 8, gpu-80gb: 1).", flag_values=flag_values
  )
  flags.DEFINE_enum(
    "grid",
    "paper",
    list(GRIDS),
    "; ".join(f"{name}: {what}" for name, what in GRIDS.items()),
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "compile",
    True,
    "Compile the sampler and training step (else: analytical, rough activations).",
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "compile_sampler",
    True,
    "With --compile: compile the sampler too (else its shape-only estimate, no times: planning the training step "
    "alone, whose SD v1.4 compilation takes minutes).",
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "search", True, "When a setting does not fit, find the largest per-device batches that do.", flag_values=flag_values
  )
  flags.DEFINE_float(
    "headroom", 0.9, "Fraction of the HBM the peak may use (the rest: runtime, fragmentation).", flag_values=flag_values
  )
  flags.DEFINE_bool(
    "json", False, "Print one JSON object per (target, setting) instead of the table.", flag_values=flag_values
  )
  flags.DEFINE_enum(
    "platform",
    "cpu",
    ["cpu", "native"],
    "cpu: compile on fake CPU devices; native: on this machine's own devices (e.g. on the target itself).",
    flag_values=flag_values,
  )
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


# ----------------------------------------------------------------------------
# Verdicts and batch search: pure functions of byte counts.
# ----------------------------------------------------------------------------


def budget(hbm_bytes: int, headroom: float) -> int:
  """The bytes per device a peak may reach."""
  return int(hbm_bytes * headroom)


def verdict(peak_bytes: int, hbm_bytes: int, headroom: float) -> str:
  """ "fits" (within the headroom), "tight" (within the HBM only) or "does not fit"."""
  if peak_bytes <= budget(hbm_bytes, headroom):
    return "fits"
  return "tight" if peak_bytes <= hbm_bytes else "does not fit"


def linear_fit(points: dict[int, int]) -> tuple[float, float]:
  """(intercept, slope) of the least-squares line through {batch: peak bytes}."""
  xs, ys = list(points), list(points.values())
  if len(xs) == 1:
    return 0.0, ys[0] / xs[0]
  mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
  slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
  return mean_y - slope * mean_x, slope


def largest_fitting(points: dict[int, int], limit: int, candidates: Sequence[int]) -> int | None:
  """The largest candidate batch whose linearly predicted peak is <= limit, or None."""
  intercept, slope = linear_fit(points)
  fitting = [c for c in candidates if intercept + slope * c <= limit]
  return max(fitting) if fitting else None


def search_batch(
  peak_of: Callable[[int], int], start: int, candidates: Sequence[int], limit: int, max_tries: int = 4
) -> tuple[int | None, dict[int, int]]:
  """The largest batch in `candidates` + [start] whose peak_of(batch) <= limit.

  Peaks grow with the batch: measures `start`, then the smallest candidate,
  then guesses between the largest batch known to fit and the smallest known
  not to: the largest that the line through those two predicts to fit, else
  the next one up (at most `max_tries` guesses; each is one compilation).

  Returns (that batch, or None if even the smallest does not fit; {batch: peak} measured).
  """
  points = {start: peak_of(start)}
  if points[start] <= limit:
    return start, points
  smaller = sorted(c for c in set(candidates) if c < start)
  if not smaller:
    return None, points
  points[smaller[0]] = peak_of(smaller[0])
  if points[smaller[0]] > limit:
    return None, points
  fits, fails = smaller[0], start
  for _ in range(max_tries):
    between = [c for c in smaller if fits < c < fails]
    if not between:
      break
    guess = largest_fitting({fits: points[fits], fails: points[fails]}, limit, between) or between[0]
    points[guess] = peak_of(guess)
    if points[guess] <= limit:
      fits = guess
    else:
      fails = guess
  return fits, points


def divisors_below(total: int, unit: int, below: int) -> list[int]:
  """Per-device batches b < below such that b * unit divides total."""
  return [b for b in range(1, below) if total % (b * unit) == 0]


# ----------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------


def with_overrides(config, overrides: dict[str, Any]):
  """A copy of `config` with {"section.field": value} set."""
  from ddpo_jax import config_utils

  return config_utils.override(copy.deepcopy(config), overrides)


def grid_overrides(config, num_devices: int, grid: str) -> list[dict[str, Any]]:
  """The settings to report on `num_devices` devices (GRIDS).

  paper: float32 / bfloat16 x remat off / on x fsdp 1 / all devices;
  finetuning: bfloat16 / float32 x full / LoRA x remat on / off, on the config's mesh;
  config: the config's own (its mesh resolved on these devices).
  """
  from ddpo_jax import sharding

  data, fsdp = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  if grid == "config":
    return [{"mesh.data": data, "mesh.fsdp": fsdp}]
  if grid == "finetuning":  # the likeliest to fit first: settings sharing a dtype share one sampler compilation
    return [
      {"model.dtype": dtype, "train.remat": remat, "lora.rank": rank, "mesh.data": data, "mesh.fsdp": fsdp}
      for dtype in ("bfloat16", "float32")
      for rank in (0, GRID_LORA_RANK)
      for remat in (True, False)
    ]
  fsdps = [1] if num_devices == 1 else [1, num_devices]
  return [
    {"model.dtype": dtype, "train.remat": remat, "mesh.data": num_devices // fsdp, "mesh.fsdp": fsdp}
    for dtype in ("float32", "bfloat16")
    for remat in (False, True)
    for fsdp in fsdps
  ]


def samples_per_epoch(config) -> int:
  return config.sample.batch_size * config.sample.num_batches_per_epoch


def transitions_per_update(config) -> int:
  return config.train.batch_size * config.train.gradient_accumulation_steps


def measuring_config(config, num_devices: int, sample_per_device: int, train_per_device: int):
  """The config the bench compiles: the same epoch, in sampling calls of
  `sample_per_device` x devices and minibatches of `train_per_device` x
  devices, one minibatch per optimiser step (see the module docstring)."""
  samples = samples_per_epoch(config)
  return with_overrides(
    config,
    {
      "sample.batch_size": sample_per_device * num_devices,
      "sample.num_batches_per_epoch": samples // (sample_per_device * num_devices),
      "train.batch_size": train_per_device * num_devices,
      "train.gradient_accumulation_steps": 1,
    },
  )


# ----------------------------------------------------------------------------
# Abstract inputs and byte counts (these import jax).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Memory:
  """One compiled function's bytes per device (memory_analysis), or their estimate.

  argument: all its arguments, from their shapes: params it does not read
  (the VAE's encoder in the sampler) are pruned from the compiled program
  (compiled_argument) but stay on the device all the same; or the compiled
  arguments where they are more (the TPU's tiled layouts pad small dimensions).
  """

  argument: int
  output: int
  alias: int
  temp: int
  compiled_argument: int = 0
  seconds: float = 0.0
  cost: Any = None  # tpu.Cost of the compiled program (cost_analysis: loop bodies counted once); None if not compiled
  # The compiler's refusal for lack of device memory (XLA:TPU's); `temp` is then the lower bound it names.
  refused: str = ""

  @property
  def total(self) -> int:
    """Live at once while it runs: arguments, outputs not donated into, temporaries."""
    return self.argument + self.output - self.alias + self.temp


@functools.lru_cache(maxsize=4)
def abstract_model(name: str, dtype: str):
  from ddpo_jax.models import architectures

  return architectures.abstract_model(name, dtype)


def _sds(x, sharding):
  import jax

  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def bytes_per_device(tree) -> int:
  """Bytes per device of abstract arrays carrying their shardings."""
  import jax

  from ddpo_jax import sharding

  return sharding.bytes_per_device(tree, jax.tree.map(lambda x: x.sharding, tree))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The run's train-state layout and jitted steps (`ddpo_jax.steps`) on abstract params, as the plan builds them."""

  config: Any
  model: Any
  mesh: Any
  layout: Any
  jitted: Any
  settings: Any

  @property
  def replicated(self):
    from ddpo_jax import sharding

    return sharding.replicated(self.mesh)

  @property
  def batch_sharding(self):
    from ddpo_jax import sharding

    return sharding.batch(self.mesh)

  def sampler(self):
    """The sampler as a pure function (not jitted), for tracing on one device's shapes."""
    from ddpo_jax import steps

    return functools.partial(
      steps.sample, model=self.model, settings=steps.sampler_settings(self.config), adapter=self.settings.adapter
    )


def make_plan(config, devices, backend: str | None = None):
  """The Plan of `config` on abstract params, and those params.

  backend: the platform its "auto" settings resolve for ("tpu" for a
  topology's devices: flash attention, scanned accumulation); None: jax's default.
  """
  import jax

  from ddpo_jax import config_utils
  from ddpo_jax import models
  from ddpo_jax import sharding
  from ddpo_jax import steps
  from ddpo_jax import train_state

  config = config_utils.resolve_auto(config, backend or jax.default_backend())
  model, params = abstract_model(config.model.name, config.model.dtype)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  model = models.with_attention(model, config.model.attention, float(config.model.attention_block_mb), mesh)
  settings = steps.update_settings(config)
  optimizer = train_state.make_optimizer(config.train)
  layout = train_state.layout(config, params["unet"], mesh, settings.adapter, optimizer, settings.needs_base)
  return Plan(config, model, mesh, layout, steps.jit(config, model, mesh, layout), settings), params


def sampler_args(plan, params, batch: int) -> tuple:
  """(params, base, token_ids [B, L], negative_token_ids [L], key) of sample_fn, abstract, with its shardings."""
  import jax
  import jax.numpy as jnp

  rep = plan.replicated
  frozen = jax.tree.map(lambda x: _sds(x, rep), {"vae": params["vae"], "text_encoder": params["text_encoder"]})
  length = plan.model.max_prompt_tokens
  return (
    dict(frozen, unet=plan.layout.state.params),
    plan.layout.base,
    jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=plan.batch_sharding),
    jax.ShapeDtypeStruct((length,), jnp.int32, sharding=rep),
    jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
  )


def sampler_outputs(plan, args) -> tuple:
  """(trajectory, context [B, L, D], images [B, H, W, 3]) of one call, abstract, with their shardings."""
  import jax

  trajectory, context, images = jax.eval_shape(plan.jitted.sample, *args)
  batch, rep = plan.batch_sharding, plan.replicated
  trajectory = trajectory.replace(
    latents=_sds(trajectory.latents, batch),
    log_probs=_sds(trajectory.log_probs, batch),
    timesteps=_sds(trajectory.timesteps, rep),
  )
  return trajectory, _sds(context, batch), _sds(images, batch)


def epoch_rollouts(plan, outputs, num_batches: int):
  """The epoch's Rollouts (N = num_batches calls' samples), abstract, with their shardings."""
  import jax
  import jax.numpy as jnp

  from ddpo_jax import update

  trajectory, context, _ = outputs
  batch = plan.batch_sharding
  grow = lambda x: jax.ShapeDtypeStruct((x.shape[0] * num_batches,) + x.shape[1:], x.dtype, sharding=batch)
  return update.Rollouts(
    latents=grow(trajectory.latents),
    log_probs=grow(trajectory.log_probs),
    timesteps=trajectory.timesteps,
    context=grow(context),
    weights=jax.ShapeDtypeStruct((context.shape[0] * num_batches,), jnp.float32, sharding=batch),
  )


def step_args(plan, params, rollouts) -> tuple:
  """(state, transitions, index, negative_context, base) of step_fn, abstract, with its shardings."""
  import jax
  import jax.numpy as jnp

  from ddpo_jax import sharding

  rep = plan.replicated
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
  transitions = jax.eval_shape(plan.jitted.make_examples, rollouts, key)
  transitions = jax.tree.map(lambda x: _sds(x, sharding.batch_axis(plan.mesh, 2)), transitions)
  tokens = jax.ShapeDtypeStruct((1, plan.model.max_prompt_tokens), jnp.int32, sharding=rep)
  context = jax.eval_shape(plan.jitted.encode, jax.tree.map(lambda x: _sds(x, rep), params["text_encoder"]), tokens)
  negative = jax.ShapeDtypeStruct(context.shape[1:], context.dtype, sharding=rep)
  index = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  return plan.layout.state, transitions, index, negative, plan.layout.base


def compiled_memory(jitted, args) -> Memory:
  """Lowers and compiles `jitted` for abstract `args`; its memory_analysis and cost (`compiled_cost`) per device."""
  import jax

  from ddpo_jax import steps

  start = time.perf_counter()
  traced = jitted.trace(*args)
  try:
    compiled = traced.lower().compile()
  except jax.errors.JaxRuntimeError as error:
    refusal = steps.out_of_memory(error)
    if refusal is None:
      raise
    refused = steps.refused_memory(refusal, args, time.perf_counter() - start)
    logging.info("  refused by the compiler: %s", refusal.message)
    return Memory(
      argument=bytes_per_device(args),
      output=0,
      alias=0,
      temp=refused.temporaries,
      seconds=refused.compile_seconds,
      refused=refusal.message,
    )
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  return Memory(
    # The TPU's tiled layouts pad small dimensions, so its compiled arguments may exceed their bytes.
    argument=max(bytes_per_device(args), int(stats.argument_size_in_bytes)),
    output=int(stats.output_size_in_bytes),
    alias=int(stats.alias_size_in_bytes),
    temp=int(stats.temp_size_in_bytes),
    compiled_argument=int(stats.argument_size_in_bytes),
    seconds=seconds,
    cost=program_cost(traced, compiled),
  )


def program_cost(traced, compiled):
  """The tpu.Cost per device of a compiled program: its cost_analysis, plus the FLOPs of the Pallas kernels that
  carry no cost estimate (the flash attention's backward ones: `tpu.uncosted_kernel_flops`), found in the jaxpr
  it was `traced` from."""
  flops, unknown = tpu.uncosted_kernel_flops(traced.jaxpr.jaxpr)
  if unknown:
    logging.warning("%d Pallas kernels without a cost estimate count 0 FLOPs in the roofline.", unknown)
  return tpu.cost_of(compiled.cost_analysis()) + tpu.Cost(flops, 0.0)


def compiled_cost(jitted, args):
  """The tpu.Cost per device of `jitted` compiled for abstract `args` (`program_cost`)."""
  traced = jitted.trace(*args)
  return program_cost(traced, traced.lower().compile())


# ----------------------------------------------------------------------------
# Loop bodies, compiled alone: cost_analysis counts a while loop's body once
# (tpu.loop_cost), so a call's cost is its program's plus (trips - 1) bodies.
# ----------------------------------------------------------------------------


def jitted_denoise_step(plan):
  """The sampler's loop body, one guided DDIM step (`sampling.denoise_step`), jitted with the sampler's shardings:
  (unet params as the adapter forms them, latents [B, C, h, w], t, key, context [B, L, D], negative [L, D])
  -> (latents [B, C, h, w], log-probs [B])."""
  import jax

  from ddpo_jax import sampling
  from ddpo_jax import steps

  batch, rep = plan.batch_sharding, plan.replicated
  step = functools.partial(sampling.denoise_step, plan.model, settings=steps.sampler_settings(plan.config))
  return jax.jit(
    step,
    in_shardings=(plan.layout.unet_sharding, batch, rep, rep, batch, rep),
    out_shardings=(batch, batch),
  )


def denoise_step_args(plan, sampler_outputs_) -> tuple:
  """Abstract arguments of `jitted_denoise_step` for a sampling call's `sampler_outputs`, with their shardings."""
  import jax
  import jax.numpy as jnp

  trajectory, context, _ = sampler_outputs_
  latents = trajectory.latents
  rep = plan.replicated
  return (
    plan.layout.unet,
    jax.ShapeDtypeStruct((latents.shape[0],) + latents.shape[2:], latents.dtype, sharding=plan.batch_sharding),
    jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    context,
    jax.ShapeDtypeStruct(context.shape[1:], context.dtype, sharding=rep),
  )


def jitted_accumulation_step(plan):
  """The optimiser step's accumulation body, one minibatch's gradients added to the sum (`update.optimizer_step`'s
  `accumulate`), jitted with the step's shardings: (trained params, gradient sum, minibatch [M, ...], negative
  context [L, D], base) -> (gradient sum, metrics)."""
  import jax
  import jax.numpy as jnp

  from ddpo_jax import methods

  settings, model = plan.settings, plan.model
  method_loss = methods.get(settings.method).loss
  params_sharding = plan.layout.state_sharding.params

  def accumulate(trained, grads_sum, minibatch, negative, base):
    def loss(p):
      return method_loss(model, settings.adapter.unet_params(p, base), minibatch, negative, settings, base)

    grads, metrics = jax.grad(loss, has_aux=True)(trained)
    return jax.tree.map(jnp.add, grads_sum, grads), metrics

  return jax.jit(
    accumulate,
    in_shardings=(params_sharding, params_sharding, plan.batch_sharding, plan.replicated, plan.layout.base_sharding),
    out_shardings=(params_sharding, plan.replicated),
    donate_argnums=(1,),
  )


def accumulation_step_args(plan, step_args_) -> tuple:
  """Abstract arguments of `jitted_accumulation_step` for the optimiser step's `step_args`, with their shardings."""
  import jax

  state, transitions, _, negative, base = step_args_
  minibatch = jax.tree.map(lambda x: _sds(jax.ShapeDtypeStruct(x.shape[2:], x.dtype), plan.batch_sharding), transitions)
  return state.params, state.params, minibatch, negative, base


# ----------------------------------------------------------------------------
# Activations counted on jaxprs (backend-independent).
# ----------------------------------------------------------------------------

_REMAT_PRIMITIVES = ("checkpoint", "remat", "remat2")


def _aval_bytes(aval) -> int:
  """Bytes of an abstract value; 0 for non-numeric ones (PRNG keys, tokens)."""
  import numpy as np

  try:
    itemsize = np.dtype(aval.dtype).itemsize
  except TypeError:
    return 0
  return int(np.prod(aval.shape, dtype=np.int64)) * itemsize


def residual_bytes(closed_jaxpr) -> int:
  """Bytes of a vjp jaxpr's outputs (the residuals) that are not its inputs or constants."""
  from jax.extend import core

  inputs = set(closed_jaxpr.jaxpr.invars) | set(closed_jaxpr.jaxpr.constvars)
  seen, total = set(), 0
  for var in closed_jaxpr.jaxpr.outvars:
    if isinstance(var, core.Literal) or var in inputs or var in seen:
      continue
    seen.add(var)
    total += _aval_bytes(var.aval)
  return total


def _remat_blocks(jaxpr):
  """The rematerialised sub-jaxprs of a jaxpr, at any depth."""
  from jax.extend import core

  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _REMAT_PRIMITIVES:
      inner = eqn.params["jaxpr"]
      yield inner if isinstance(inner, core.ClosedJaxpr) else core.ClosedJaxpr(inner, [])
  for sub in core.subjaxprs(jaxpr):
    yield from _remat_blocks(sub)


def _vjp_residual_bytes(fn, *args) -> int:
  import jax

  return residual_bytes(jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1])(*args))


def saved_activation_bytes(model, settings, unet_params, minibatch, negative_context, base=None) -> int:
  """Activations one minibatch's backward pass needs at once, counted on the jaxpr.

  The residuals of the loss's vjp in the UNet params; with remat, plus the
  largest rematerialised block's own residuals (recomputed in the backward
  pass). Abstract arguments without shardings: pass one device's minibatch.
  """
  import jax

  from ddpo_jax import methods

  method_loss = methods.get(settings.method).loss

  def loss(trained, minibatch, negative, base):
    return method_loss(model, settings.adapter.unet_params(trained, base), minibatch, negative, settings, base)[0]

  def vjp(params, minibatch, negative, base):
    return jax.vjp(lambda p: loss(p, minibatch, negative, base), params)[1]

  total = residual_bytes(jax.make_jaxpr(vjp)(unet_params, minibatch, negative_context, base))
  if settings.remat:
    forward = jax.make_jaxpr(loss)(unet_params, minibatch, negative_context, base)
    total += max((block_residual_bytes(block) for block in _remat_blocks(forward.jaxpr)), default=0)
  return total


def block_residual_bytes(block) -> int:
  """Residual bytes of a (closed) sub-jaxpr's vjp, for abstract inputs of its input types."""
  import jax
  from jax.extend import core

  args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in block.jaxpr.invars]
  return _vjp_residual_bytes(core.jaxpr_as_fun(block), *args)


def largest_intermediate_bytes(fn, *args) -> int:
  """The largest value any equation of fn's jaxpr produces, at any depth."""
  import jax
  from jax.extend import core

  def largest(jaxpr) -> int:
    own = max((_aval_bytes(v.aval) for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")), default=0)
    return max([own] + [largest(sub) for sub in core.subjaxprs(jaxpr)])

  return largest(jax.make_jaxpr(fn)(*args).jaxpr)


def _unsharded(tree, leading: int | None = None):
  """Abstract arrays without shardings; with `leading`, the first axis set to it."""
  import jax

  def one(x):
    shape = x.shape if leading is None else (leading,) + x.shape[1:]
    return jax.ShapeDtypeStruct(shape, x.dtype)

  return jax.tree.map(one, tree)


def local_minibatch(transitions, per_device: int):
  """One device's minibatch [M / devices, ...] of abstract transitions [U, A, M, ...]."""
  import jax

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((per_device,) + x.shape[3:], x.dtype), transitions)


# ----------------------------------------------------------------------------
# One setting on one mesh.
# ----------------------------------------------------------------------------


def sampling_peak(sample: Memory, sizes: dict[str, int]) -> int:
  """Per-device peak of the sampling phase: a sampler call, the optimizer
  state (not one of its arguments) and the outputs of the epoch's earlier
  calls (train.py keeps them until training)."""
  return sample.total + sizes["opt_state"] + (sizes["num_batches"] - 1) * sizes["sample_outputs"]


def training_peak(step: Memory, sizes: dict[str, int]) -> int:
  """Per-device peak of the training phase: a training step (state,
  transitions, temporaries), the frozen params and the epoch's rollouts
  (every sampler call's outputs, plus their concatenation when there are
  several calls)."""
  return step.total + sizes["frozen_params"] + sizes["epoch_buffers"]


def buffer_sizes(outputs, rollouts, num_batches: int) -> dict[str, int]:
  """Bytes per device of one sampling call's `outputs` and of the epoch's buffers: the `num_batches`
  calls' outputs, their concatenation into `rollouts` (both live when there are several calls) and
  the rollouts' weights."""
  out_bytes = bytes_per_device(outputs)
  weights = bytes_per_device(rollouts.weights)
  copies = bytes_per_device(rollouts) - weights if num_batches > 1 else 0
  return {
    "sample_outputs": out_bytes,
    "epoch_buffers": num_batches * out_bytes + copies + weights,
    "num_batches": num_batches,
  }


# Sampler measurements by `sampler_key`: settings that differ in training only share them.
_SAMPLERS: dict[tuple, tuple] = {}


def sampler_key(config, per_device: int, compile_: bool, devices: str = "") -> tuple:
  """What the sampler's memory depends on (not remat, nor the training batch); `devices` names the
  devices it is compiled for (their platform and kind: a v5e and a v4 slice of 4 chips differ)."""
  m, s = config.mesh, config.sample
  return (
    devices,
    config.model.attention,
    config.model.name,
    config.model.dtype,
    m.data,
    m.fsdp,
    tuple(tuple(rule) for rule in m.partition_rules),
    m.fsdp_min_size,
    s.num_steps,
    s.eta,
    s.guidance_scale,
    samples_per_epoch(config),
    per_device,
    compile_,
  )


class Setting:
  """One config on one mesh: builds Plans and measures the two phases.

  backend: the platform the config's "auto" settings resolve for: the
  devices' own ("tpu" for a topology's compile-only devices), not
  necessarily jax's default backend.
  """

  def __init__(self, config, devices, compile_: bool, backend: str | None = None, compile_sampler: bool = True):
    self.config, self.devices, self.compile = config, list(devices), compile_
    self.compile_sampler = compile_ and compile_sampler
    self.num_devices = len(self.devices)
    self.backend = backend or self.devices[0].platform
    self._steps: dict[int, tuple] = {}
    self._plans: dict[int, tuple] = {}
    self._costs: dict[tuple, Any] = {}

  @property
  def devices_key(self) -> str:
    """The devices' platform and kind (what the sampler cache tells apart)."""
    return f"{self.backend}:{self.devices[0].device_kind}:{self.num_devices}"

  def plan(self, train_per_device: int):
    """The Plan of minibatches of `train_per_device` transitions per device, and the abstract params."""
    if train_per_device not in self._plans:
      sample_per_device = self.config.sample.batch_size // self.num_devices
      config = measuring_config(self.config, self.num_devices, sample_per_device, train_per_device)
      self._plans[train_per_device] = make_plan(config, self.devices, self.backend)
    return self._plans[train_per_device]

  def static_sizes(self) -> dict[str, Any]:
    """Bytes per device of the trained params (the UNet's or LoRA adapters), the rest of the train state
    (optimizer state, step, EMA params), the frozen base UNet (LoRA's and the KL's; 0 without) and the
    frozen VAE and text encoder."""
    from ddpo_jax import sharding
    from ddpo_jax.models import architectures

    plan, params = self.plan(self.config.train.batch_size // self.num_devices)
    state, shardings = plan.layout.state, plan.layout.state_sharding
    unet = sharding.bytes_per_device(state.params, shardings.params)
    total = sharding.bytes_per_device(state, shardings)
    frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"]}
    base = plan.layout.base
    return {
      "unet_params": unet,
      "opt_state": total - unet,
      "base_params": 0 if base is None else sharding.bytes_per_device(base, plan.layout.base_sharding),
      "frozen_params": architectures.num_bytes(frozen),
      "state_sharded_fraction": sharding.sharded_fraction(state, shardings),
    }

  def sample(self, per_device: int) -> tuple[Memory, dict[str, int]]:
    """The sampler's memory for `per_device` samples per device, and buffer sizes."""
    key = sampler_key(self.config, per_device, self.compile_sampler, self.devices_key)
    if key in _SAMPLERS:
      return _SAMPLERS[key]
    plan, params = self.plan(self.config.train.batch_size // self.num_devices)
    args = sampler_args(plan, params, per_device * self.num_devices)
    outputs = sampler_outputs(plan, args)
    num_batches = samples_per_epoch(self.config) // (per_device * self.num_devices)
    sizes = buffer_sizes(outputs, epoch_rollouts(plan, outputs, num_batches), num_batches)
    if self.compile_sampler:
      logging.info("compiling the sampler: %d samples per device ...", per_device)
      memory = compiled_memory(plan.jitted.sample, args)
      logging.info("  %.1f s, %.2f GiB of temporaries", memory.seconds, memory.temp / GiB)
    else:
      memory = self._rough_sampler(plan, args, outputs, per_device)
    _SAMPLERS[key] = (memory, sizes)
    return memory, sizes

  def _rough_sampler(self, plan, args, outputs, per_device: int) -> Memory:
    params, base, tokens, negative, key = args
    local = (
      _unsharded(params),
      _unsharded(base),
      _unsharded(tokens, per_device),
      _unsharded(negative),
      _unsharded(key),
    )
    rough = int(ROUGH_SAMPLER_FACTOR * largest_intermediate_bytes(plan.sampler(), *local))
    return Memory(argument=bytes_per_device(args), output=bytes_per_device(outputs), alias=0, temp=rough)

  def train(self, per_device: int) -> tuple[Memory, int]:
    """The training step's memory for `per_device` transitions per device, and its saved activations.

    The step's inputs are the epoch's transitions whatever the sampling
    calls' size, so sampling the epoch in the config's calls is as good as any.
    """
    if per_device in self._steps:
      return self._steps[per_device]
    plan, args = self._step_inputs(per_device)
    state, transitions, index, negative, base = args
    activations = saved_activation_bytes(
      plan.model,
      plan.settings,
      _unsharded(state.params),
      local_minibatch(transitions, per_device),
      _unsharded(negative),
      _unsharded(base),
    )
    if self.compile:
      logging.info("compiling the training step: %d transitions per device ...", per_device)
      memory = compiled_memory(plan.jitted.optimizer_step, (state, transitions, index, negative, base))
      logging.info("  %.1f s, %.2f GiB of temporaries", memory.seconds, memory.temp / GiB)
    else:
      state_bytes = bytes_per_device(state)
      unet_bytes = bytes_per_device(state.params)
      argument = bytes_per_device((state, transitions, index, negative, base))
      # Outputs alias the donated state; the summed and the current gradients live beside the activations.
      memory = Memory(argument=argument, output=state_bytes, alias=state_bytes, temp=2 * unet_bytes + activations)
    self._steps[per_device] = (memory, activations)
    return memory, activations

  def _step_inputs(self, per_device: int) -> tuple:
    """(Plan, abstract step_args) of the training step for `per_device` transitions per device."""
    plan, params = self.plan(per_device)
    sample_per_device = self.config.sample.batch_size // self.num_devices
    _, sizes = self.sample(sample_per_device)
    outputs = sampler_outputs(plan, sampler_args(plan, params, sample_per_device * self.num_devices))
    return plan, step_args(plan, params, epoch_rollouts(plan, outputs, sizes["num_batches"]))

  def sampling_call_cost(self, per_device: int):
    """The tpu.LoopCost per device of one sampling call of `per_device` samples: the compiled sampler's, its loop
    of config.sample.num_steps denoising steps counted once, and one denoising step's, compiled alone."""
    key = ("sample", per_device)
    if key not in self._costs:
      memory, _ = self.sample(per_device)
      trips, body = self.config.sample.num_steps, tpu.Cost(0.0, 0.0)
      if trips > 1:
        plan, params = self.plan(self.config.train.batch_size // self.num_devices)
        outputs = sampler_outputs(plan, sampler_args(plan, params, per_device * self.num_devices))
        logging.info("compiling the sampler's denoising step alone: %d samples per device ...", per_device)
        body = compiled_cost(jitted_denoise_step(plan), denoise_step_args(plan, outputs))
      self._costs[key] = tpu.LoopCost(memory.cost, body, trips)
    return self._costs[key]

  def optimizer_step_cost(self, per_device: int):
    """The tpu.LoopCost per device of one optimiser step of the config's transitions per update in minibatches
    of `per_device` transitions per device: the compiled step's (one minibatch, see `measuring_config`) and one
    minibatch's accumulation body, compiled alone."""
    key = ("train", per_device)
    if key not in self._costs:
      memory, _ = self.train(per_device)
      trips, body = transitions_per_update(self.config) // (per_device * self.num_devices), tpu.Cost(0.0, 0.0)
      if trips > 1:
        plan, args = self._step_inputs(per_device)
        logging.info("compiling the optimiser step's accumulation body alone: %d transitions per device", per_device)
        body = compiled_cost(jitted_accumulation_step(plan), accumulation_step_args(plan, args))
      self._costs[key] = tpu.LoopCost(memory.cost, body, trips)
    return self._costs[key]


def measure(
  config,
  target: Target,
  devices,
  compile_: bool = True,
  search: bool = True,
  headroom: float = 0.9,
  backend: str | None = None,
  setting: Setting | None = None,
  compile_sampler: bool = True,
):
  """The report of one setting (a dict, JSON-ready) on `devices` (the mesh's).

  backend: the platform the config's "auto" settings resolve for (None: the devices').
  setting: a Setting of this config, devices and compile_ whose measurements to reuse (None: a new one).
  With a compiled step and the target's chip known, the report has the rooflines ("time").
  """
  num_devices = len(devices)
  setting = setting or Setting(config, devices, compile_, backend, compile_sampler)
  sample0 = config.sample.batch_size // num_devices
  train0 = config.train.batch_size // num_devices
  sizes = setting.static_sizes()
  sample_memory, buffers = setting.sample(sample0)
  train_memory, activations = setting.train(train0)
  sizes.update(buffers)
  peaks = {"sampling": sampling_peak(sample_memory, sizes), "training": training_peak(train_memory, sizes)}
  peak = max(peaks.values())
  limit = budget(target.hbm_bytes, headroom)
  cfg_rows = 1 if config.sample.guidance_scale == 1.0 else 2
  record = {
    "target": target.name,
    "description": target.description,
    "model": config.model.name,
    "devices": num_devices,
    "hbm_bytes": target.hbm_bytes,
    "headroom": headroom,
    "topology": target.topology or None,
    "estimate": f"XLA:{setting.backend.upper()} compiled" if compile_ else "analytical (rough activations)",
    # --nocompile_sampler: the training step compiled, the sampler's peak the shape-only estimate, no times.
    "sampler_compiled": setting.compile_sampler,
    "attention": setting.plan(train0)[0].config.model.attention,
    "mesh": dict(zip(("data", "fsdp"), setting.plan(train0)[0].mesh.devices.shape)),
    "dtype": config.model.dtype,
    "remat": bool(config.train.remat),
    "lora_rank": int(config.lora.rank),
    "bytes_per_device": {
      k: sizes[k]
      for k in ("unet_params", "opt_state", "base_params", "frozen_params", "sample_outputs", "epoch_buffers")
    },
    "state_sharded_fraction": sizes["state_sharded_fraction"],
    "sample": dict(
      _phase_record(sample_memory, sample0, num_devices, peaks["sampling"]),
      num_batches_per_epoch=buffers["num_batches"],
    ),
    "train": dict(
      _phase_record(train_memory, train0, num_devices, peaks["training"]),
      unet_rows_per_device=cfg_rows * train0,
      saved_activations=activations,
    ),
    "peak_bytes": peak,
    "verdict": verdict(peak, target.hbm_bytes, headroom),
    "fits": peak <= limit,
    "largest_fitting": None,
    "time": None,
  }
  if search and peak > limit:
    record["largest_fitting"] = _search(setting, config, sizes, sample0, train0, limit)
  if setting.compile_sampler and target.chip:
    record["time"] = timed_batches_record(config, target.chip, setting, record)
  return record


def timed_batches_record(config, chip, setting: Setting, record: dict) -> dict[str, Any] | None:
  """The rooflines (`time_record`) at the batches a run would use: the config's when they fit, else the largest
  that fit (`largest_fitting`); None when a phase fits at no batch or a program was refused."""
  sample_per_device, train_per_device = record["sample"]["batch_per_device"], record["train"]["batch_per_device"]
  fit = record["largest_fitting"]
  if not record["fits"]:
    if not fit or not fit["sample_batch_per_device"] or not fit["train_batch_per_device"]:
      return None
    sample_per_device, train_per_device = fit["sample_batch_per_device"], fit["train_batch_per_device"]
  if setting.sample(sample_per_device)[0].refused or setting.train(train_per_device)[0].refused:
    return None
  return time_record(config, chip, setting, sample_per_device, train_per_device)


def epoch_composition(config) -> tuple[int, int]:
  """(sampling calls, optimiser steps) of one epoch: config.sample.num_batches_per_epoch calls, then
  config.train.num_inner_epochs passes over its transitions of `update.num_updates_per_inner_epoch` steps
  (each of config.train.gradient_accumulation_steps minibatches)."""
  from ddpo_jax import update

  return config.sample.num_batches_per_epoch, config.train.num_inner_epochs * update.num_updates_per_inner_epoch(config)


def _roofline_record(cost, chip) -> dict[str, Any]:
  """The roofline of a call's tpu.LoopCost on `chip`, with the parts it adds up (the program and its loop body)."""
  total = cost.total
  line = tpu.roofline(total, chip)
  return {
    "flops": total.flops,
    "bytes_accessed": total.bytes_accessed,
    "seconds": line.seconds,
    "compute_seconds": line.compute_seconds,
    "memory_seconds": line.memory_seconds,
    "bound": line.bound,
    "program": dataclasses.asdict(cost.program),
    "loop_body": dataclasses.asdict(cost.body),
    "loop_trips": cost.trips,
  }


def time_record(config, chip, setting: Setting, sample_per_device: int, train_per_device: int) -> dict[str, Any]:
  """Rooflines per device of a sampling call and an optimiser step on `chip` (`tpu.Chip`) and the epoch's
  estimated time (its sampling calls and optimiser steps one after another) and samples per second."""
  sampling = _roofline_record(setting.sampling_call_cost(sample_per_device), chip)
  step = _roofline_record(setting.optimizer_step_cost(train_per_device), chip)
  _, steps_ = epoch_composition(config)
  calls = samples_per_epoch(config) // (sample_per_device * setting.num_devices)
  epoch = tpu.epoch_seconds(sampling["seconds"], calls, step["seconds"], steps_)
  return {
    "chip": dataclasses.asdict(chip),
    "sample_batch_per_device": sample_per_device,
    "train_batch_per_device": train_per_device,
    "sampling_call": sampling,
    "optimizer_step": step,
    "sampling_calls_per_epoch": calls,
    "optimizer_steps_per_epoch": steps_,
    "epoch_seconds": epoch,
    "samples_per_second": samples_per_epoch(config) / epoch if epoch > 0 else None,
  }


def _phase_record(memory: Memory, per_device: int, num_devices: int, peak: int) -> dict[str, Any]:
  return {
    "batch_per_device": per_device,
    "global_batch": per_device * num_devices,
    "argument": memory.argument,
    "compiled_argument": memory.compiled_argument,
    "output": memory.output,
    "alias": memory.alias,
    "temp": memory.temp,
    "peak": peak,
    "compile_seconds": round(memory.seconds, 1),
    # The compiler's refusal for lack of memory ("" when it compiled): `temp` and `peak` are then lower bounds.
    "refused": memory.refused,
  }


def _search(setting: Setting, config, sizes, sample0: int, train0: int, limit: int) -> dict[str, Any]:
  """The largest per-device sample and train batches whose phases fit in `limit`."""
  n = setting.num_devices

  def sample_peak_of(per_device: int) -> int:
    memory, buffers = setting.sample(per_device)
    return sampling_peak(memory, dict(sizes, **buffers))

  samples = samples_per_epoch(config)
  sample_fit, sample_points = search_batch(sample_peak_of, sample0, divisors_below(samples, n, sample0), limit)
  # The training phase keeps the epoch's rollouts as the fitting sampling calls leave them.
  _, fit_buffers = setting.sample(sample_fit or sample0)

  def train_peak_of(per_device: int) -> int:
    return training_peak(setting.train(per_device)[0], dict(sizes, **fit_buffers))

  per_update = transitions_per_update(config)
  train_fit, train_points = search_batch(train_peak_of, train0, divisors_below(per_update, n, train0), limit)
  return {
    "sample_batch_per_device": sample_fit,
    "num_batches_per_epoch": samples // (sample_fit * n) if sample_fit else None,
    "train_batch_per_device": train_fit,
    "gradient_accumulation_steps": per_update // (train_fit * n) if train_fit else None,
    "sampling_peaks": {str(k): v for k, v in sorted(sample_points.items())},
    "training_peaks": {str(k): v for k, v in sorted(train_points.items())},
  }


# ----------------------------------------------------------------------------
# Devices, child processes, output.
# ----------------------------------------------------------------------------


def cpu_environment(num_devices: int, environ: dict[str, str] | None = None) -> dict[str, str]:
  """An environment whose jax has `num_devices` CPU devices and keeps remat barriers."""
  env = dict(os.environ if environ is None else environ)
  kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  kept = [f for f in kept if f not in CPU_XLA_FLAGS]
  env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}", *CPU_XLA_FLAGS])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def devices_for(num_devices: int, platform: str):
  """`num_devices` devices; on the CPU, set up before jax starts its backend."""
  if platform == "cpu":
    os.environ.update(cpu_environment(num_devices))
  import jax

  if platform == "cpu":
    jax.config.update("jax_platforms", "cpu")
  devices = jax.devices()
  if len(devices) < num_devices:
    raise app.UsageError(
      f"jax has {len(devices)} devices and the mesh needs {num_devices}; its backend started before the bench "
      "could set the device count: run it as `python -m ddpo_jax.bench memory` in a fresh process."
    )
  return devices[:num_devices]


def run_target(
  config,
  target: Target,
  num_devices: int,
  grid: str = "paper",
  compile_: bool = True,
  search: bool = True,
  headroom: float = 0.9,
  platform: str = "cpu",
) -> list[dict]:
  """Reports of every setting of `grid` on `target` (in this process)."""
  return run_grid(config, target, devices_for(num_devices, platform), grid, compile_, search, headroom)


def grid_configs(config, num_devices: int, grid: str, backend: str) -> list[tuple[dict[str, Any], Any]]:
  """(overrides, config) of every setting of `grid`, each validated for `backend` (raises ConfigError naming
  the setting before anything compiles)."""
  from ddpo_jax import validation

  settings = []
  for overrides in grid_overrides(config, num_devices, grid):
    setting = with_overrides(config, overrides)
    validation.validate(setting, None, num_devices, backend=backend)
    settings.append((overrides, setting))
  return settings


def run_grid(
  config,
  target: Target,
  devices,
  grid: str = "paper",
  compile_: bool = True,
  search: bool = True,
  headroom: float = 0.9,
  on_record: Callable[[dict], None] | None = None,
  compile_sampler: bool = True,
) -> list[dict]:
  """Reports of every setting of `grid` on `devices` (the target's), their "auto" settings resolved for the
  devices' platform; on TPU devices of a known chip (a topology's, or this machine's with --platform=native),
  with the rooflines. on_record: called with each report as it is made."""
  backend = devices[0].platform
  if target.chip is None and backend == "tpu":
    target = dataclasses.replace(target, chip=tpu.chip_for(devices[0].device_kind, target.topology))
  records = []
  for overrides, setting in grid_configs(config, len(devices), grid, backend):
    logging.info("%s: %s", target.name, overrides)
    start = time.perf_counter()
    record = measure(setting, target, devices, compile_, search, headroom, backend, compile_sampler=compile_sampler)
    record["seconds"] = round(time.perf_counter() - start, 1)
    records.append(record)
    if on_record is not None:
      on_record(record)
  return records


def topology_target(name: str, devices) -> Target:
  """The Target of the TPU slice `name` on its compile-only `devices`: the HBM the device reports, else its
  chip's (`tpu.CHIPS`); ValueError naming --topology when neither is known."""
  chip = tpu.chip_for(devices[0].device_kind, name)
  if chip is not None:  # a v4 slice compiled without megacore has a device per core
    chip = chip.per_device(getattr(devices[0], "num_cores", chip.cores))
  hbm = tpu.device_hbm_bytes(devices[0]) or (chip.hbm_bytes if chip else None)
  if hbm is None:
    raise ValueError(
      f"--topology={name}: its devices ({devices[0].device_kind!r}) are of no TPU generation whose HBM is known "
      f"here ({', '.join(tpu.CHIPS)}); add it to ddpo_jax.bench.tpu.CHIPS."
    )
  kind = chip.name if chip else devices[0].device_kind
  return Target(
    name=name,
    num_devices=len(devices),
    hbm_bytes=hbm,
    description=f"TPU {kind} slice {name}: {len(devices)} devices x {hbm / GiB:.0f} GiB HBM (TPU compiler)",
    topology=name,
    chip=chip,
  )


def topology_slices(config, names: Sequence[str], grid: str) -> list[tuple[Target, list]]:
  """(Target, compile-only devices) of each TPU slice of `names`, every slice and every setting of `grid` on it
  checked first: ValueError (naming --topology or the setting) before anything compiles."""
  slices = []
  for name in names:
    devices = tpu.topology_devices(name)
    grid_configs(config, len(devices), grid, "tpu")
    slices.append((topology_target(name, devices), devices))
  return slices


def _own_flags(argv: list[str]) -> list[str]:
  """argv's flags without --target, --num_devices and --json (the child gets its own)."""
  kept, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    name = arg.split("=", 1)[0]
    if name in ("--target", "--num_devices") and "=" not in arg:
      skip = True
      continue
    if name in ("--target", "--num_devices", "--json", "--nojson"):
      continue
    kept.append(arg)
  return kept


def run_child(target: Target, argv: list[str], num_devices: int) -> list[dict]:
  """Runs one target in a child process (its own device count); its records."""
  command = [sys.executable, "-m", "ddpo_jax.bench", "memory", *_own_flags(argv)]
  command += [f"--target={target.name}", f"--num_devices={num_devices}", "--json"]
  logging.info("%s: %s", target.name, " ".join(command))
  result = subprocess.run(command, env=cpu_environment(num_devices), stdout=subprocess.PIPE, text=True)
  if result.returncode:
    raise RuntimeError(f"the bench of {target.name} failed (exit status {result.returncode}); see its log above.")
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _size(value: int | None) -> str:
  """Bytes as GiB, or MiB below 0.1 GiB."""
  if value is None:
    return "-"
  return f"{value / GiB:.1f} GiB" if value >= GiB / 10 else f"{value / 2**20:.1f} MiB"


ESTIMATE_NOTES = {
  "XLA:CPU compiled": (
    "working memory as XLA:CPU compiles it for the target's mesh on fake devices: not TPU's or GPU's buffer "
    "assignment, and bfloat16 is overstated (XLA:CPU computes it in float32); the fallback without the TPU "
    "compiler: with libtpu installed, --topology=v5e:2x4 (or v4:2x2x1, ...) compiles for the TPU slice itself"
  ),
  "XLA:TPU compiled": (
    "the TPU compiler's (libtpu's) buffer assignment for the slice's mesh, compiled on this machine for the "
    "slice's compile-only devices (nothing ran), config.model.attention and accumulation resolved for the TPU"
  ),
  "XLA:GPU compiled": (
    "XLA:GPU's buffer assignment for the host's GPUs, compiled on this machine for compile-only devices (nothing "
    "ran, no autotuning), config.model.attention resolved for the GPU (cuDNN); no times: XLA:GPU gives no cost "
    "analysis without a device"
  ),
  "analytical (rough activations)": (
    "nothing compiled: training step = its arguments + 2 x the gradients + the jaxpr's saved activations; "
    f"sampler = its arguments and outputs + {ROUGH_SAMPLER_FACTOR} x its largest intermediate (rough)"
  ),
}


def _fitting(record: dict) -> str:
  fit = record.get("largest_fitting")
  if record["fits"]:
    return "as configured"
  if not fit:
    return "not searched"
  train = fit["train_batch_per_device"]
  return f"{fit['sample_batch_per_device'] or 'none'}, {train or 'none'}" + (
    f" ({fit['gradient_accumulation_steps']})" if train else ""
  )


def _trained(record: dict) -> str:
  rank = record.get("lora_rank", 0)
  return f"LoRA r{rank}" if rank else "full"


def _peak(phase: dict) -> str:
  """A phase's peak; "≥" where the compiler refused the program (its figure is a lower bound)."""
  return ("≥ " if phase.get("refused") else "") + _size(phase["peak"])


def _seconds(phase: dict) -> str:
  return f"{phase['compile_seconds']:.0f}" if phase["compile_seconds"] else "-"


def _duration(seconds: float) -> str:
  """Seconds as µs, ms, s or h, three significant digits."""
  for unit, scale in (("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)):
    if seconds < 1000 * scale or unit == "s" and seconds < 3600:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds / 3600:.3g} h"


def _time_columns(record: dict) -> str:
  """The roofline columns of a record: sampling call, optimiser step (each with its bound), epoch, samples/s."""
  t = record.get("time")
  if not t:
    return "| - | - | - | - |"
  call, step = t["sampling_call"], t["optimizer_step"]
  rate = t["samples_per_second"]
  return (
    f"| {_duration(call['seconds'])} ({call['bound']}) | {_duration(step['seconds'])} ({step['bound']}) "
    f"| {_duration(t['epoch_seconds'])} | {f'{rate:.3g}' if rate else '-'} |"
  )


def format_table(records: list[dict]) -> str:
  """A markdown table of the records (bytes per device) and its notes."""
  timed = any(r.get("time") for r in records)
  header = (
    "| target | mesh data×fsdp | trained | dtype | remat | UNet params + opt | frozen params | rollouts "
    "| sampling peak (samples) | training peak (transitions) | saved act. (jaxpr) | HBM | verdict "
    "| fits at samples, transitions (accum.) | compile s: sampler, step |"
  )
  if timed:
    header += " sampling call (bound) | optimiser step (bound) | epoch | samples/s |"
  lines = [header, "|" + "---|" * (header.count(" | ") + 1)]
  for r in records:
    b, s, t = r["bytes_per_device"], r["sample"], r["train"]
    lines.append(
      f"| {r['target']} | {r['mesh']['data']}×{r['mesh']['fsdp']} | {_trained(r)} | {r['dtype']} "
      f"| {'on' if r['remat'] else 'off'} "
      f"| {_size(b['unet_params'])} + {_size(b['opt_state'])}"
      + (f" + base {_size(b['base_params'])}" if b.get("base_params") else "")
      + f" | {_size(b['frozen_params'])} "
      f"| {_size(b['epoch_buffers'])} "
      f"| {_peak(s)}{'' if r.get('sampler_compiled', True) else ' est.'} ({s['batch_per_device']}) "
      f"| {_peak(t)} ({t['batch_per_device']}) "
      f"| {_size(t['saved_activations'])} | {_size(r['hbm_bytes'])} | {r['verdict']} | {_fitting(r)} "
      f"| {_seconds(s)}, {_seconds(t)} |" + (_time_columns(r)[1:] if timed else "")
    )
  models_ = sorted({r["model"] for r in records})
  notes = [
    f"Per device; model {', '.join(models_)}; batches per device (transitions: UNet rows x2 with CFG); "
    "'UNet params + opt': the trained params (UNet or LoRA adapters) + optimizer state, step and EMA "
    "(+ the frozen base UNet of LoRA or the KL)."
  ]
  notes += [
    f"{e}: {ESTIMATE_NOTES.get(e, 'as compiled for this backend')}." for e in sorted({r["estimate"] for r in records})
  ]
  notes.append(
    "Peak = max(sampling: sampler call + optimizer state + earlier calls' outputs; training: step + frozen params "
    f"+ the epoch's rollouts); 'fits' below {records[0]['headroom'] if records else ''} x HBM, 'tight' below the "
    "HBM; 'est.': the sampler not compiled (--nocompile_sampler), its shape-only estimate; '≥': the TPU "
    "compiler refused the program for lack of HBM, the figure its message names. 'saved act. "
    "(jaxpr)': one minibatch's backward activations counted on its jaxpr (dtype-exact, any backend)."
  )
  if timed:
    chips = sorted(
      {
        (r["time"]["chip"]["name"], r["time"]["chip"]["peak_flops"], r["time"]["chip"]["hbm_bandwidth"])
        for r in records
        if r.get("time")
      }
    )
    notes.append(
      "Times are rooflines per chip, not measurements: max(FLOPs / peak bfloat16 FLOP/s, bytes accessed / HBM "
      "bandwidth) of the TPU compiler's cost analysis ("
      + "; ".join(f"{name}: {flops / 1e12:g} TFLOP/s, {bw / 1e9:g} GB/s" for name, flops, bw in chips)
      + "), with the bound that sets each; a sampling call counts its config.sample.num_steps denoising steps, an "
      "optimiser step its minibatches (the config's transitions per update); epoch = sampling calls x call + "
      "num_inner_epochs x optimiser steps x step (no evaluation, reward or host time); samples/s = samples "
      "per epoch / epoch; at the configured batches where they fit, else at the largest that fit."
    )
  return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def gpu_target(gpu: gpu_lib.Gpu, devices) -> Target:
  """The Target of `devices`, compile-only GPUs of `gpu`."""
  return Target(
    name=f"{gpu.name}:{len(devices)}",
    num_devices=len(devices),
    hbm_bytes=gpu.memory_bytes,
    description=f"{len(devices)} x {gpu.description} ({gpu.memory_bytes / GiB:.1f} GiB) on one host (GPU compiler)",
    topology=f"{gpu.name}:{len(devices)}",
  )


def gpu_hosts(config, value: str, grid: str) -> list[tuple[Target, list]]:
  """(Target, compile-only devices) of each host of --gpu, every setting of `grid` checked first (ValueError
  naming --gpu or the setting before anything compiles)."""
  hosts = []
  for gpu, count in gpu_lib.parse_gpus(value):
    grid_configs(config, count, grid, "gpu")
    devices = gpu_lib.gpu_devices(gpu, count)
    hosts.append((gpu_target(gpu, devices), devices))
  return hosts


def check_topology_flags(topology: str, target_given: bool, num_devices: int, platform: str) -> list[str]:
  """The slices of --topology, or app.UsageError naming the flag and the fix (before jax starts)."""
  if target_given or num_devices or platform != "cpu":
    raise app.UsageError(
      "--topology compiles for the slice's own devices: drop --target, --num_devices and --platform "
      "(or drop --topology to compile on fake CPU devices)."
    )
  if not tpu.tpu_compiler_installed():
    raise app.UsageError(tpu.MISSING_COMPILER)
  try:
    return tpu.parse_topologies(topology)
  except ValueError as error:
    raise app.UsageError(str(error)) from error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  if FLAGS.gpu is not None:
    if FLAGS.topology is not None or FLAGS["target"].present or FLAGS.num_devices or FLAGS.platform != "cpu":
      raise app.UsageError(
        "--gpu compiles for its own devices: drop --topology, --target, --num_devices and --platform."
      )
    import jax

    if "JAX_PLATFORMS" not in os.environ:  # compile-only GPUs: jax's own backend is the CPU's
      jax.config.update("jax_platforms", "cpu")
    try:
      hosts = gpu_hosts(FLAGS.config, FLAGS.gpu, FLAGS.grid)
    except ValueError as error:
      raise app.UsageError(str(error)) from error
    _run_slices(hosts)
    return
  if FLAGS.topology is not None:
    names = check_topology_flags(FLAGS.topology, FLAGS["target"].present, FLAGS.num_devices, FLAGS.platform)
    import jax

    if "JAX_PLATFORMS" not in os.environ:  # the slices' devices are compile-only: jax's own backend is the CPU's
      jax.config.update("jax_platforms", "cpu")
    try:
      slices = topology_slices(FLAGS.config, names, FLAGS.grid)
    except ValueError as error:  # an unknown slice or an invalid setting, before anything compiles
      raise app.UsageError(str(error)) from error
    _run_slices(slices)
    return
  targets = list(TARGETS.values()) if FLAGS.target == "all" else [TARGETS[FLAGS.target]]
  if len(targets) > 1 and FLAGS.platform == "native":
    raise app.UsageError("--platform=native measures this machine's devices: name its --target.")
  if len(targets) > 1:
    records = [r for t in targets for r in run_child(t, sys.argv[1:], FLAGS.num_devices or t.num_devices)]
  else:
    target = targets[0]
    num_devices = FLAGS.num_devices or target.num_devices
    records = run_target(
      FLAGS.config, target, num_devices, FLAGS.grid, FLAGS.compile, FLAGS.search, FLAGS.headroom, FLAGS.platform
    )
  _write(records, FLAGS.json)


def _run_slices(slices: list[tuple[Target, list]]) -> None:
  """Runs the grid on each (Target, compile-only devices) and writes the reports; with --json each as it is made
  (a slice's grid takes minutes to hours)."""
  args = (FLAGS.grid, FLAGS.compile, FLAGS.search, FLAGS.headroom)
  on_record = (lambda record: _write([record], True)) if FLAGS.json else None
  records = [
    r
    for target, devices in slices
    for r in run_grid(FLAGS.config, target, devices, *args, on_record, compile_sampler=FLAGS.compile_sampler)
  ]
  if not FLAGS.json:
    _write(records, False)


def _write(records: list[dict], as_json: bool) -> None:
  """One JSON object per record, or the markdown table."""
  if as_json:
    for record in records:
      sys.stdout.write(json.dumps(record) + "\n")
  else:
    sys.stdout.write(format_table(records))
  sys.stdout.flush()
