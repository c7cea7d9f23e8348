"""Checks of a config before anything compiles or downloads.

Every error names the setting and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
import inspect
import math
import os
import re
import tempfile

import jax
import ml_collections
import numpy as np

from ddpo_jax import advantages
from ddpo_jax import config_utils
from ddpo_jax import methods
from ddpo_jax import models
from ddpo_jax import prompts
from ddpo_jax import registry
from ddpo_jax import rewards
from ddpo_jax import sharding
from ddpo_jax import update


class ConfigError(ValueError):
  """An invalid setting or combination of settings."""


def _check_factory(kind: str, setting: str, name: str, registered: list[str]) -> None:
  if name in registered:
    return
  if ":" not in name:
    raise ConfigError(
      f"{setting}={name!r} is not a registered {kind} ({registered}) nor an import path "
      "'package.module:factory'; fix the name or give the import path of your own."
    )
  try:
    factory = registry.import_object(name)
  except ValueError as e:
    raise ConfigError(f"{setting}={name!r}: {e}; check the import path.") from e
  if not callable(factory):
    raise ConfigError(f"{setting}={name!r} is not callable; give the import path of a factory function.")


def _check_kwargs(setting: str, factory_registry: registry.Registry, name: str, kwargs) -> None:
  """`setting` (e.g. "config.prompt.kwargs") must hold keyword arguments that factory `name` accepts."""
  factory = factory_registry.factory(name)
  kwargs = dict(kwargs)
  try:
    signature = inspect.signature(factory)
  except ValueError:  # no signature to read (a builtin): the call itself will say
    return
  missing = [
    p.name
    for p in signature.parameters.values()
    if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs
  ]
  if missing:
    raise ConfigError(
      f"{setting}.{missing[0]} is required by {name!r} and is not set: give it, e.g. "
      f"--{setting}.{missing[0]}=VALUE, or set it in a config file of your own."
    )
  try:
    signature.bind(**kwargs)
  except TypeError as e:
    accepted = [p for p in signature.parameters if p not in ("args", "kwargs")]
    literal = {k: v for k, v in kwargs.items() if k in accepted}
    raise ConfigError(
      f"{setting}={kwargs} do not fit {name!r}, which takes {accepted} ({e}). A setting that another "
      f"function needed stays when its name changes: give all of them at once, e.g. "
      f'--{setting}="{literal}", or set them in a config file of your own.'
    ) from e


def _check_workdir(workdir: str) -> None:
  if "://" in workdir:
    raise ConfigError(
      f"--workdir={workdir!r}: the workdir is written with local file APIs; mount the bucket with gcsfuse "
      "(launch/tpu_vm.sh does it on every worker with TPU_BUCKET=...) and give the mounted path, "
      "or use a shared filesystem."
    )
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir!r} cannot be written ({e}); choose a writable folder.") from e


def _check_finite(value, setting: str = "config") -> None:
  """Every float under `value` (a ConfigDict, a mapping, a list or tuple, or a number) must be finite.

  NaN passes every range check written as a comparison (`nan <= 0` is False) and ±inf many, so this runs first.
  """
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    for key, item in value.items():
      _check_finite(item, f"{setting}.{key}")
  elif isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      _check_finite(item, f"{setting}[{i}]")
  elif isinstance(value, (float, np.floating)) and not math.isfinite(value):
    raise ConfigError(f"{setting}={value}: must be a finite number.")


def _check_seed(setting: str, seed) -> None:
  # jax.random.PRNGKey keeps a seed's low 32 bits (2**32 gives the key of 0) and numpy refuses negative seeds.
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise ConfigError(f"{setting}={seed!r} must be an integer in [0, 2**32); e.g. 0.")


def _check_positive_int(setting: str, value, why: str = "") -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{setting}={value!r} must be an integer >= 1{why}.")


# config.train.advantages values.
ADVANTAGES = ("stat_tracking", "group")


def validate(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  num_devices: int,
  num_processes: int = 1,
  backend: str | None = None,
) -> None:
  """Raises ConfigError for the first invalid value or combination.

  backend: the platform the run compiles for ("cpu", "gpu", "tpu"; None: jax's default backend), against which
  config.model.attention is checked.
  """
  _check_finite(config)
  s, t = config.sample, config.train
  _check_seed("config.seed", config.seed)
  if config.num_epochs < 1:
    raise ConfigError(f"config.num_epochs={config.num_epochs} must be >= 1.")
  try:
    data, fsdp = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  shards = data * fsdp
  if t.method not in methods.names():
    raise ConfigError(f"config.train.method={t.method!r} is unknown; choose one of {methods.names()}.")
  if s.num_steps < 1:
    raise ConfigError(f"config.sample.num_steps={s.num_steps} must be >= 1.")
  if s.eta <= 0:
    raise ConfigError(
      f"config.sample.eta={s.eta}: a policy gradient needs a stochastic sampler; set eta > 0 (the paper uses 1.0)."
    )
  if not 0 < t.timestep_fraction <= 1:
    raise ConfigError(f"config.train.timestep_fraction={t.timestep_fraction} must be in (0, 1].")
  if update.num_timesteps_kept(config) < 1:
    raise ConfigError(
      f"config.train.timestep_fraction={t.timestep_fraction} keeps no step of {s.num_steps}; raise it to at least "
      f"{1 / s.num_steps:.3g}."
    )
  for name, value in (("sample.batch_size", s.batch_size), ("train.batch_size", t.batch_size)):
    if value < 1 or value % shards:
      raise ConfigError(
        f"config.{name}={value} must be a positive multiple of the {shards} devices that split a batch "
        f"(mesh {data}x{fsdp}); use e.g. {shards * max(1, value // shards)}."
      )
  for name, value in (
    ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
    ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
    ("train.num_inner_epochs", t.num_inner_epochs),
  ):
    if value < 1:
      raise ConfigError(f"config.{name}={value} must be >= 1.")
  samples = s.batch_size * s.num_batches_per_epoch
  kept = update.num_timesteps_kept(config)
  transitions = samples * kept
  per_update = t.batch_size * t.gradient_accumulation_steps
  if transitions % per_update:
    raise ConfigError(
      f"An epoch has {samples} samples x {kept} kept timesteps = {transitions} transitions, "
      f"which do not divide into optimiser steps of config.train.batch_size x "
      f"config.train.gradient_accumulation_steps = {per_update}; choose sizes whose product divides {transitions}."
    )
  for name, value in (
    ("train.learning_rate", t.learning_rate),
    ("train.clip_range", t.clip_range),
    ("train.adv_clip_max", t.adv_clip_max),
    ("train.max_grad_norm", t.max_grad_norm),
  ):
    if not value > 0:
      raise ConfigError(f"config.{name}={value} must be > 0.")
  _check_optimizer(t)
  problem = methods.get(t.method).check_config(config)
  if problem:
    raise ConfigError(problem)
  _check_beyond_ddpo(config, num_processes)
  _check_eval(config, num_processes)
  _check_preflight(config)
  if config.stat_tracking.per_prompt and not 1 <= config.stat_tracking.min_count <= config.stat_tracking.buffer_size:
    raise ConfigError(
      f"config.stat_tracking.min_count={config.stat_tracking.min_count} must be in "
      f"[1, config.stat_tracking.buffer_size={config.stat_tracking.buffer_size}]."
    )
  for pattern, action in config.mesh.partition_rules:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.mesh.partition_rules: {pattern!r} is not a valid regex ({e}).") from e
    if action not in ("fsdp", "replicate"):
      raise ConfigError(f"config.mesh.partition_rules: action {action!r} of {pattern!r} must be 'fsdp' or 'replicate'.")
  if config.checkpoint.max_to_keep < 1:
    raise ConfigError(f"config.checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be >= 1.")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: choose 'float32' or 'bfloat16'.")
  for resolve, setting, platform in (
    (config_utils.resolve_accumulation, config.train.accumulation, "cpu"),
    (config_utils.resolve_attention, config.model.attention, backend or jax.default_backend()),
    (config_utils.resolve_attention_block_mb, config.model.attention_block_mb, "blocked"),
  ):
    try:
      resolve(setting, platform)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  if not 0 <= config.mesh.min_sharded_fraction <= 1:
    raise ConfigError(
      f"config.mesh.min_sharded_fraction={config.mesh.min_sharded_fraction} must be in [0, 1] (0: no check)."
    )
  _check_factory("reward", "config.reward.name", config.reward.name, rewards.registered())
  _check_positive_int("config.reward.num_threads", config.reward.num_threads, " (host threads computing rewards)")
  _check_positive_int(
    "config.logging.num_images",
    config.logging.num_images,
    " (samples per grid; config.logging.images_every_epochs=0 writes no training grids)",
  )
  if config.reward.on_invalid not in rewards.ON_INVALID:
    raise ConfigError(f"config.reward.on_invalid={config.reward.on_invalid!r}: choose one of {rewards.ON_INVALID}.")
  if config.reward.name == "weighted":
    weights = dict(config.reward.kwargs.get("weights", {}))
    if not weights:
      raise ConfigError(
        "config.reward.name='weighted' needs config.reward.kwargs.weights = {reward_name: weight, ...}."
      )
    for name in weights:
      _check_factory("reward", f"config.reward.kwargs.weights[{name!r}]", name, rewards.registered())
  _check_kwargs("config.reward.kwargs", rewards.REGISTRY, config.reward.name, config.reward.kwargs)
  _check_factory("prompt function", "config.prompt.name", config.prompt.name, prompts.registered())
  _check_kwargs("config.prompt.kwargs", prompts.REGISTRY, config.prompt.name, config.prompt.kwargs)
  if models.is_local(config.model.name):
    problem = models.check_model_folder(config.model.name)
    if problem:
      raise ConfigError(
        f"config.model.name={config.model.name!r}: {problem}; give a folder written by save_pretrained, "
        "a Hugging Face id such as 'CompVis/stable-diffusion-v1-4', or 'toy-world'."
      )
  if workdir is not None:
    _check_workdir(workdir)


def _check_optimizer(t: ml_collections.ConfigDict) -> None:
  """AdamW's settings besides the learning rate (config.train)."""
  for name in ("adam_beta1", "adam_beta2"):
    if not 0 <= t[name] < 1:
      raise ConfigError(f"config.train.{name}={t[name]} must be in [0, 1) (the paper: beta1 0.9, beta2 0.999).")
  if not t.adam_eps > 0:
    raise ConfigError(f"config.train.adam_eps={t.adam_eps} must be > 0 (e.g. 1e-8).")
  if not t.weight_decay >= 0:
    raise ConfigError(f"config.train.weight_decay={t.weight_decay} must be >= 0 (0: none; the paper: 1e-4).")


def _check_preflight(config: ml_collections.ConfigDict) -> None:
  """The memory pre-flight's settings."""
  p = config.preflight
  if not isinstance(p.enabled, bool):
    raise ConfigError(f"config.preflight.enabled={p.enabled!r} must be True or False.")
  if not 0 < p.headroom <= 1:
    raise ConfigError(
      f"config.preflight.headroom={p.headroom} must be in (0, 1]: the fraction of the device memory a step may "
      "use (e.g. 0.9)."
    )
  for name in ("device_memory_bytes", "max_compilations"):
    value = p[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f"config.preflight.{name}={value!r} must be an integer >= 0.")


def _check_eval(config: ml_collections.ConfigDict, num_processes: int) -> None:
  """The held-out evaluation's settings (only when config.eval.every_epochs > 0)."""
  e, batch_size = config.eval, config.sample.batch_size
  if not isinstance(e.every_epochs, int) or e.every_epochs < 0:
    raise ConfigError(f"config.eval.every_epochs={e.every_epochs!r} must be an integer >= 0 (0: no evaluation).")
  if not e.every_epochs:
    return
  _check_seed("config.eval.seed", e.seed)
  _check_factory("prompt function", "config.eval.prompt.name", e.prompt.name, prompts.registered())
  _check_kwargs("config.eval.prompt.kwargs", prompts.REGISTRY, e.prompt.name, e.prompt.kwargs)
  if e.num_samples < 1 or e.num_samples % batch_size:
    raise ConfigError(
      f"config.eval.num_samples={e.num_samples} must be a positive multiple of config.sample.batch_size="
      f"{batch_size} (the evaluation reuses the sampler); use e.g. {batch_size * max(1, e.num_samples // batch_size)}."
    )
  local = batch_size // max(num_processes, 1)
  k = e.samples_per_prompt
  if not isinstance(k, int) or k < 1 or local % k:
    raise ConfigError(
      f"config.eval.samples_per_prompt={k!r} must be an integer >= 1 that divides the {local} samples per "
      f"process of config.sample.batch_size={batch_size}."
    )
  if not e.eta >= 0:
    raise ConfigError(f"config.eval.eta={e.eta} must be >= 0 (0: deterministic DDIM).")
  for name in e.rewards:
    _check_factory("reward", "config.eval.rewards", name, rewards.registered())


def _check_beyond_ddpo(config: ml_collections.ConfigDict, num_processes: int) -> None:
  """Grouped sampling and advantages, KL, EMA and LoRA."""
  s, t = config.sample, config.train
  k = s.group_size
  if not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.sample.group_size={k!r} must be an integer >= 1.")
  local = s.batch_size // max(num_processes, 1)
  if local % k:
    # Advantages see every process's samples in global order: a group must lie within one process's rows.
    raise ConfigError(
      f"config.sample.group_size={k} must divide the {local} samples per process of config.sample.batch_size="
      f"{s.batch_size} over {num_processes} process(es), so that no group straddles two processes; "
      f"choose a group size that divides {local}."
    )
  if not isinstance(s.group_same_noise, bool):
    raise ConfigError(f"config.sample.group_same_noise={s.group_same_noise!r} must be True or False.")
  if t.advantages not in ADVANTAGES:
    raise ConfigError(f"config.train.advantages={t.advantages!r} is unknown; choose one of {ADVANTAGES}.")
  if t.advantages == "group" and k < 2:
    raise ConfigError(
      "config.train.advantages='group' compares the samples of a prompt with each other: set "
      f"config.sample.group_size >= 2 (it is {k})."
    )
  if t.group_std not in advantages.GROUP_STDS:
    raise ConfigError(f"config.train.group_std={t.group_std!r}: choose one of {advantages.GROUP_STDS}.")
  if not 0 <= t.kl_coef < float("inf"):
    raise ConfigError(f"config.train.kl_coef={t.kl_coef} must be >= 0 (0: no KL regularisation).")
  if not 0 <= t.ema_decay < 1:
    raise ConfigError(f"config.train.ema_decay={t.ema_decay} must be in [0, 1) (0: no EMA; e.g. 0.9).")
  if config.logging.sample_with_ema and t.ema_decay == 0:
    raise ConfigError(
      "config.logging.sample_with_ema=True needs EMA params: set config.train.ema_decay > 0 (e.g. 0.9)."
    )
  rank = config.lora.rank
  if not isinstance(rank, int) or rank < 0:
    raise ConfigError(f"config.lora.rank={rank!r} must be an integer >= 0 (0: full fine-tuning, e.g. 4).")
  if rank:
    if not config.lora.alpha > 0:
      raise ConfigError(f"config.lora.alpha={config.lora.alpha} must be > 0 (alpha = rank: scale 1).")
    if not config.lora.targets:
      raise ConfigError("config.lora.targets is empty; give regexes of UNet kernel paths, e.g. 'attn1/to_q/kernel$'.")
    for pattern in config.lora.targets:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ConfigError(f"config.lora.targets: {pattern!r} is not a valid regex ({e}).") from e
