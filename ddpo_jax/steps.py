"""The run's device functions, jitted for its mesh and compiled ahead of the loop.

`build` compiles the sampler, the method's example layout and the optimiser
step (`jit(...).lower(...).compile()`) from the shapes of the train state and
the frozen params, before epoch 0, so that the run reports what each step
needs per device (`Steps.memory`) before it samples anything, and so that a
shape that would retrace is an error rather than a silent recompilation. The
evaluation, the trainer and the benchmarks call these compiled functions.

  sample(params, base, token_ids [B, L], negative_token_ids [L], key)
      -> (Trajectory, context [B, L, D], images uint8 [B, H, W, 3])
  make_examples(rollouts, key) -> examples [num_updates, accumulation, M, ...]
  optimizer_step(state, examples, index, negative_context [L, D], base) -> (state, metrics)

`params` is {"unet": the trained params (the state's), "vae", "text_encoder"};
`base` the frozen pretrained UNet when the adapter or the KL needs it, else None.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from ddpo_jax import adapters
from ddpo_jax import config_utils
from ddpo_jax import methods
from ddpo_jax import models
from ddpo_jax import sampling
from ddpo_jax import sharding
from ddpo_jax import train_state
from ddpo_jax import update


def sampler_settings(config: ml_collections.ConfigDict, eta: float | None = None) -> sampling.SamplerSettings:
  """The guided DDIM sampler of config.sample (with another `eta` if given)."""
  return sampling.SamplerSettings(
    num_steps=config.sample.num_steps,
    eta=float(config.sample.eta if eta is None else eta),
    guidance_scale=config.sample.guidance_scale,
    noise_group_size=config.sample.group_size if config.sample.group_same_noise else 1,
  )


def update_settings(config: ml_collections.ConfigDict) -> update.UpdateSettings:
  """The training pass's static settings of config.train (and config.lora)."""
  accumulation = config_utils.resolve_accumulation(config.train.accumulation, jax.default_backend())
  return update.UpdateSettings(
    method=config.train.method,
    clip_range=config.train.clip_range,
    batch_size=config.train.batch_size,
    gradient_accumulation_steps=config.train.gradient_accumulation_steps,
    num_timesteps_kept=update.num_timesteps_kept(config),
    sampler=sampler_settings(config),
    unroll_accumulation=accumulation == "unrolled",
    remat=config.train.remat,
    adapter=adapters.from_config(config),
    kl_coef=float(config.train.kl_coef),
    ema_decay=float(config.train.ema_decay),
  )


def sample(params, base, token_ids, negative_token_ids, key, *, model, settings, adapter):
  """`sampling.sample` with the UNet params the adapter forms from the trained ones."""
  unet = adapter.unet_params(params["unet"], base)
  return sampling.sample(model, dict(params, unet=unet), token_ids, negative_token_ids, key, settings)


@dataclasses.dataclass(frozen=True)
class Memory:
  """A compiled function's buffers per device, in bytes (XLA's memory analysis)."""

  arguments: int
  temporaries: int
  outputs: int
  aliased: int
  compile_seconds: float
  out_of_memory: OutOfMemory | None = None

  @property
  def peak(self) -> int:
    """Arguments + temporaries + outputs not aliased to (donated) arguments."""
    return self.arguments + self.temporaries + self.outputs - self.aliased

  def describe(self) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MB"
    if self.out_of_memory is not None:
      return (
        f"refused by the compiler after {self.compile_seconds:.1f} s: arguments {mb(self.arguments)}, at least "
        f"{mb(self.temporaries)} of temporaries per device ({self.out_of_memory.message})"
      )
    return (
      f"arguments {mb(self.arguments)}, temporaries {mb(self.temporaries)}, outputs {mb(self.outputs)} "
      f"({mb(self.aliased)} aliased to arguments) per device; compiled in {self.compile_seconds:.1f} s"
    )


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """The compiler's refusal of a program too big for its device (XLA:TPU checks at compile time).

  required: bytes per device that the message names: the temporaries alone, or the whole
  program's (`whole_program`); available: the device's bytes it names (None if it names none).
  """

  required: int
  available: int | None
  whole_program: bool
  message: str


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_NUMBER = r"([\d.]+)\s*([KMGT]?)i?B?"
# XLA:TPU's two phrasings: "the total memory required for HLO temporaries (16.19G) exceeds
# available HBM (15.75G)" and "Used 17.46G of 15.75G hbm".
_OUT_OF_MEMORY = (
  (re.compile(rf"required for HLO temporaries \({_NUMBER}\) exceeds available \w+ \({_NUMBER}\)"), False),
  (re.compile(rf"Used {_NUMBER} of {_NUMBER} hbm", re.IGNORECASE), True),
)


def out_of_memory(error: BaseException) -> OutOfMemory | None:
  """The OutOfMemory that `error` reports, when it is the compiler's refusal for lack of memory; else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return None
  for pattern, whole_program in _OUT_OF_MEMORY:
    match = pattern.search(text)
    if match:
      required, available = (float(match.group(i)) * _UNITS[match.group(i + 1)] for i in (1, 3))
      return OutOfMemory(int(required), int(available), whole_program, text.strip().splitlines()[0][:500])
  return None


def refused_memory(refusal: OutOfMemory, args: tuple, seconds: float) -> Memory:
  """The Memory of a program the compiler refused: its arguments' bytes per device (from their
  shardings) and the temporaries the refusal names (a lower bound: the compiler stops counting)."""
  arguments = sharding.bytes_per_device(args, jax.tree.map(lambda x: x.sharding, args))
  temporaries = max(refusal.required - arguments, 0) if refusal.whole_program else refusal.required
  return Memory(arguments, temporaries, 0, 0, seconds, refusal)


def compile_ahead(jitted, args: tuple) -> tuple[Any, Memory]:
  """`jitted` lowered for abstract `args` and compiled, with its memory analysis.

  When the compiler refuses the program for lack of device memory (`out_of_memory`),
  returns (None, its Memory counted from the refusal: `Memory.out_of_memory` set), so
  that the memory pre-flight can name the settings that fit; other errors propagate.
  """
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as error:
    refusal = out_of_memory(error)
    if refusal is None:
      raise
    return None, refused_memory(refusal, args, time.perf_counter() - start)
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  field = lambda name: int(getattr(analysis, name, 0) or 0) if analysis is not None else 0
  memory = Memory(
    arguments=field("argument_size_in_bytes"),
    temporaries=field("temp_size_in_bytes"),
    outputs=field("output_size_in_bytes"),
    aliased=field("alias_size_in_bytes"),
    compile_seconds=seconds,
  )
  return compiled, memory


@dataclasses.dataclass(frozen=True)
class Jitted:
  """The run's jitted (not yet compiled) functions, with their shardings."""

  sample: Any
  eval_sample: Any
  make_examples: Any
  optimizer_step: Any
  encode: Any
  init_state: Any
  export_unet: Any


def jit(
  config: ml_collections.ConfigDict,
  model: models.DiffusionModel,
  mesh: Mesh,
  layout: train_state.StateLayout,
) -> Jitted:
  """The run's functions jitted with explicit shardings (the state donated to the step)."""
  settings = update_settings(config)
  method = methods.get(config.train.method)
  optimizer = train_state.make_optimizer(config.train)
  replicated, batch = sharding.replicated(mesh), sharding.batch(mesh)
  params_sharding = {"unet": layout.state_sharding.params, "vae": replicated, "text_encoder": replicated}
  trajectory_sharding = sampling.Trajectory(latents=batch, log_probs=batch, timesteps=replicated)

  def jit_sampler(eta: float):
    return jax.jit(
      functools.partial(sample, model=model, settings=sampler_settings(config, eta), adapter=settings.adapter),
      in_shardings=(params_sharding, layout.base_sharding, batch, replicated, replicated),
      out_shardings=(trajectory_sharding, batch, batch),
    )

  train_sampler = jit_sampler(config.sample.eta)
  eval_eta = config.eval.eta if config.eval.every_epochs else config.sample.eta
  examples_sharding = sharding.batch_axis(mesh, 2)  # [num_updates, accumulation, M, ...]
  return Jitted(
    sample=train_sampler,
    eval_sample=train_sampler if eval_eta == config.sample.eta else jit_sampler(eval_eta),
    make_examples=jax.jit(
      functools.partial(method.make_examples, model, settings=settings),
      in_shardings=(rollouts_sharding(mesh), replicated),
      out_shardings=examples_sharding,
    ),
    optimizer_step=jax.jit(
      functools.partial(
        update.optimizer_step,
        model,
        optimizer,
        method.loss,
        settings=settings,
        minibatch_sharding=batch,
        params_sharding=layout.state_sharding.params,
      ),
      in_shardings=(layout.state_sharding, examples_sharding, replicated, replicated, layout.base_sharding),
      out_shardings=(layout.state_sharding, replicated),
      donate_argnums=(0,),
    ),
    encode=jax.jit(
      functools.partial(models.encode_prompts, model), in_shardings=(replicated, replicated), out_shardings=replicated
    ),
    init_state=jax.jit(
      functools.partial(
        train_state.init, adapter=settings.adapter, optimizer=optimizer, ema=config.train.ema_decay > 0
      ),
      in_shardings=(layout.unet_sharding, replicated),
      out_shardings=layout.state_sharding,
    ),
    export_unet=jax.jit(
      settings.adapter.unet_params,
      in_shardings=(layout.state_sharding.params, layout.base_sharding),
      out_shardings=layout.unet_sharding,
    ),
  )


def rollouts_sharding(mesh: Mesh) -> update.Rollouts:
  """Trajectories split over the devices; the timesteps replicated."""
  batch = sharding.batch(mesh)
  return update.Rollouts(
    latents=batch, log_probs=batch, timesteps=sharding.replicated(mesh), context=batch, weights=batch
  )


def _abstract(tree: Any, shardings: Any) -> Any:
  """`tree`'s shapes as ShapeDtypeStructs carrying `shardings` (one sharding or a matching tree)."""
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings), tree)


@dataclasses.dataclass(frozen=True)
class AbstractInputs:
  """Abstract arguments of each compiled step (ShapeDtypeStructs with shardings)."""

  sample: tuple
  make_examples: tuple
  optimizer_step: tuple


def abstract_inputs(
  config: ml_collections.ConfigDict,
  model: models.DiffusionModel,
  mesh: Mesh,
  layout: train_state.StateLayout,
  frozen: dict[str, Any],
  jitted: Jitted,
) -> AbstractInputs:
  """The steps' arguments at the config's sizes, from shapes alone.

  Args:
    frozen: the frozen modules' params {"vae", "text_encoder"} (arrays or ShapeDtypeStructs).
  """
  replicated, batch = sharding.replicated(mesh), sharding.batch(mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  length = model.max_prompt_tokens
  frozen = _abstract(frozen, replicated)
  params = dict(frozen, unet=layout.state.params)
  sample_args = (
    params,
    layout.base,
    jax.ShapeDtypeStruct((config.sample.batch_size, length), jnp.int32, sharding=batch),
    jax.ShapeDtypeStruct((length,), jnp.int32, sharding=replicated),
    key,
  )
  trajectory, context, _ = jax.eval_shape(jitted.sample, *sample_args)
  num = config.sample.batch_size * config.sample.num_batches_per_epoch
  per_epoch = lambda x: (num,) + x.shape[1:]
  rollouts = update.Rollouts(
    latents=jax.ShapeDtypeStruct(per_epoch(trajectory.latents), trajectory.latents.dtype, sharding=batch),
    log_probs=jax.ShapeDtypeStruct(per_epoch(trajectory.log_probs), trajectory.log_probs.dtype, sharding=batch),
    timesteps=jax.ShapeDtypeStruct(trajectory.timesteps.shape, trajectory.timesteps.dtype, sharding=replicated),
    context=jax.ShapeDtypeStruct(per_epoch(context), context.dtype, sharding=batch),
    weights=jax.ShapeDtypeStruct((num,), jnp.float32, sharding=batch),
  )
  examples = _abstract(jax.eval_shape(jitted.make_examples, rollouts, key), sharding.batch_axis(mesh, 2))
  negative_tokens = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=replicated)
  negative_context = jax.eval_shape(jitted.encode, frozen["text_encoder"], negative_tokens)
  negative_context = jax.ShapeDtypeStruct(negative_context.shape[1:], negative_context.dtype, sharding=replicated)
  index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  return AbstractInputs(
    sample=sample_args,
    make_examples=(rollouts, key),
    optimizer_step=(layout.state, examples, index, negative_context, layout.base),
  )


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's compiled steps and what calling them needs.

  Attributes:
    sample, eval_sample, make_examples, optimizer_step: compiled functions
      (see the module docstring); eval_sample samples with config.eval.eta
      (the same function when it equals config.sample.eta).
    jitted: the jitted functions they were compiled from (and the ones run
      once: encode, init_state, export_unet).
    memory: {step name: its `Memory`}.
    settings: the training pass's static settings.
    num_updates: optimiser steps per inner epoch.
    negative_tokens: int32 [L], the empty prompt's token ids (CFG's negative prompt).
    inputs: the abstract arguments the steps were compiled for (what the memory pre-flight counts).
  """

  model: models.DiffusionModel
  mesh: Mesh
  layout: train_state.StateLayout
  sample: Any
  eval_sample: Any
  make_examples: Any
  optimizer_step: Any
  jitted: Jitted
  memory: dict[str, Memory]
  settings: update.UpdateSettings
  num_updates: int
  negative_tokens: np.ndarray
  inputs: AbstractInputs | None = None

  def place_frozen(self, params: dict[str, Any]) -> dict[str, Any]:
    """The frozen modules' params {"vae", "text_encoder"} of `params`, replicated on the mesh."""
    return jax.device_put(
      {"vae": params["vae"], "text_encoder": params["text_encoder"]}, sharding.replicated(self.mesh)
    )

  def place_unet(self, unet_params: Any) -> Any:
    """Pretrained UNet params on the mesh, in buffers of their own (the state's are donated to the step)."""
    return jax.device_put(unet_params, self.layout.unet_sharding, may_alias=False)

  def base(self, unet_on_mesh: Any) -> Any:
    """The steps' frozen base input: the placed pretrained UNet when LoRA or KL needs it, else None."""
    return unet_on_mesh if self.layout.needs_base else None

  def init_state(self, unet_on_mesh: Any, key: jax.Array) -> train_state.TrainState:
    """A fresh train state from the placed pretrained UNet (`place_unet`) and the adapters' key."""
    return self.jitted.init_state(unet_on_mesh, key)

  def token_ids(self, prompts: list[str]) -> jax.Array:
    """This process's prompts as the global batch of token ids [B, L] the samplers take."""
    return sharding.host_to_global(models.tokenize(self.model, prompts), sharding.batch(self.mesh))

  def negative_context(self, text_params: Any) -> jax.Array:
    """The empty prompt's embedding [L, D]."""
    return self.jitted.encode(text_params, self.negative_tokens[None])[0]

  def train_inner_epoch(self, state, rollouts: update.Rollouts, negative_context, key, base=None):
    """One pass over an epoch's examples: `num_updates` optimiser steps, dispatched asynchronously.

    Returns the new state and the metrics ([num_updates, accumulation] each,
    "grad_norm" [num_updates]), left on the device until read.
    """
    examples = self.make_examples(jax.device_put(rollouts, rollouts_sharding(self.mesh)), key)
    step_metrics = []
    for index in range(self.num_updates):
      state, metrics = self.optimizer_step(state, examples, np.int32(index), negative_context, base)
      step_metrics.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics)


def configure(
  config: ml_collections.ConfigDict, model: models.DiffusionModel, unet_shapes: Any, mesh: Mesh
) -> tuple[ml_collections.ConfigDict, models.DiffusionModel, train_state.StateLayout]:
  """The config with its "auto" settings resolved, the model with its attention, and the state's layout.

  Everything `build` needs, from shapes alone (nothing compiles).
  Raises ValueError naming config.lora.targets when LoRA targets match nothing.
  """
  config = config_utils.resolve_auto(config, jax.default_backend())
  model = models.with_attention(model, config.model.attention, float(config.model.attention_block_mb), mesh)
  settings = update_settings(config)
  optimizer = train_state.make_optimizer(config.train)
  return config, model, train_state.layout(config, unet_shapes, mesh, settings.adapter, optimizer, settings.needs_base)


# The compiled steps of a run; the evaluation alone needs only the samplers.
STEP_NAMES = ("sample", "eval_sample", "make_examples", "optimizer_step")


def prepare(
  config: ml_collections.ConfigDict,
  model: models.DiffusionModel,
  params: dict[str, Any],
  mesh: Mesh,
  names: tuple[str, ...] = STEP_NAMES,
) -> Steps:
  """`configure` then `build`: the compiled steps `names` of `config` for params {"unet", "vae", "text_encoder"}.

  Raises MemoryError when the compiler refused a step for lack of device memory (the
  trainer instead lets its memory pre-flight name the settings that fit).
  """
  config, model, layout = configure(config, model, params["unet"], mesh)
  steps = build(config, model, mesh, layout, {"vae": params["vae"], "text_encoder": params["text_encoder"]}, names)
  for name, memory in steps.memory.items():
    if memory.out_of_memory is not None:
      raise MemoryError(
        f"the compiler refused the {name} step: {memory.out_of_memory.message}; "
        "python -m ddpo_jax.bench memory --platform=native reports the settings that fit."
      )
  return steps


def build(
  config: ml_collections.ConfigDict,
  model: models.DiffusionModel,
  mesh: Mesh,
  layout: train_state.StateLayout,
  frozen: dict[str, Any],
  names: tuple[str, ...] = STEP_NAMES,
) -> Steps:
  """Compiles the run's steps ahead, logging each one's memory per device.

  Args:
    frozen: the frozen modules' params {"vae", "text_encoder"} (arrays or ShapeDtypeStructs).
    names: the steps to compile (of STEP_NAMES); the others are None.
  """
  jitted = jit(config, model, mesh, layout)
  inputs = abstract_inputs(config, model, mesh, layout, frozen, jitted)
  compiled, memory = dict.fromkeys(STEP_NAMES), {}
  for name, args in (
    ("sample", inputs.sample),
    ("make_examples", inputs.make_examples),
    ("optimizer_step", inputs.optimizer_step),
  ):
    if name in names:
      compiled[name], memory[name] = compile_ahead(getattr(jitted, name), args)
  if "eval_sample" in names:
    if jitted.eval_sample is jitted.sample and compiled["sample"] is not None:
      compiled["eval_sample"] = compiled["sample"]
    else:
      compiled["eval_sample"], memory["eval_sample"] = compile_ahead(jitted.eval_sample, inputs.sample)
  for name, m in memory.items():
    logging.info("compiled %s: %s", name, m.describe())
  return Steps(
    model=model,
    mesh=mesh,
    layout=layout,
    jitted=jitted,
    memory=memory,
    settings=update_settings(config),
    num_updates=update.num_updates_per_inner_epoch(config),
    negative_tokens=models.tokenize(model, [""])[0],
    inputs=inputs,
    **compiled,
  )
