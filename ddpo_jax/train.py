"""The DDPO training loop: sample, reward, advantages, train; repeat.

`train_and_evaluate(config, workdir)` is the whole program behind
`python -m ddpo_jax.main`; a notebook can call it as well.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from ddpo_jax import advantages as advantages_lib
from ddpo_jax import checkpoints
from ddpo_jax import evaluation
from ddpo_jax import lora
from ddpo_jax import metrics as metrics_lib
from ddpo_jax import models
from ddpo_jax import objectives
from ddpo_jax import prompts as prompts_lib
from ddpo_jax import rewards as rewards_lib
from ddpo_jax import sampling
from ddpo_jax import sharding
from ddpo_jax import update
from ddpo_jax import validation


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW at a constant learning rate."""
  return optax.chain(
    optax.clip_by_global_norm(train_config.max_grad_norm),
    optax.adamw(
      train_config.learning_rate,
      b1=train_config.adam_beta1,
      b2=train_config.adam_beta2,
      eps=train_config.adam_eps,
      weight_decay=train_config.weight_decay,
    ),
  )


# fold_in of the root key that draws the LoRA adapters' initialisation (epochs use 0, 1, ...).
LORA_INIT_FOLD = 2**31 - 1


def sampler_settings(config: ml_collections.ConfigDict) -> sampling.SamplerSettings:
  return sampling.SamplerSettings(
    num_steps=config.sample.num_steps,
    eta=config.sample.eta,
    guidance_scale=config.sample.guidance_scale,
    noise_group_size=config.sample.group_size if config.sample.group_same_noise else 1,
  )


def update_settings(config: ml_collections.ConfigDict) -> update.UpdateSettings:
  return update.UpdateSettings(
    method=config.train.method,
    clip_range=config.train.clip_range,
    batch_size=config.train.batch_size,
    gradient_accumulation_steps=config.train.gradient_accumulation_steps,
    num_timesteps_kept=validation.num_timesteps_kept(config),
    sampler=sampler_settings(config),
    unroll_accumulation=jax.default_backend() == "cpu",
    remat=config.train.remat,
    lora_scale=config.lora.alpha / config.lora.rank if config.lora.rank else None,
    kl_coef=float(config.train.kl_coef),
    ema_decay=float(config.train.ema_decay),
  )


class Trainer:
  """The compiled pieces of a run: sampler, training pass, shardings.

  Built once per run (and shared by tests through fixtures); holds no state
  that changes during training.

  The trained params (`TrainState.params`) are the UNet's, or with
  config.lora.rank > 0 LoRA adapters of it. The frozen base UNet ("base":
  the pretrained params, LoRA's base and the KL's reference) is a separate
  input of the sampler and the step, placed once by `place_base` (None when
  neither LoRA nor KL needs it).

  Args:
    params: the model's params {"unet", "vae", "text_encoder"}, arrays or
      jax.ShapeDtypeStructs: only their shapes are used here.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: models.DiffusionModel, mesh, params):
    self.config = config
    self.model = model
    self.mesh = mesh
    self.optimizer = make_optimizer(config.train)
    self.settings = settings = update_settings(config)
    self.sampler_settings = sampler_settings(config)
    replicated = sharding.replicated(mesh)
    batch = sharding.batch(mesh)
    self.replicated, self.batch_sharding = replicated, batch
    rules = [tuple(rule) for rule in config.mesh.partition_rules]
    self.lora_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), LORA_INIT_FOLD)

    # --- The train state's partitioning, from shapes alone.
    self.unet_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params["unet"])
    try:
      state_shapes = jax.eval_shape(self._init_state, self.unet_shapes, self.lora_key)
    except ValueError as e:  # LoRA targets that match nothing: name the setting
      raise validation.ConfigError(str(e)) from e
    self.state_sharding = sharding.tree_shardings(state_shapes, mesh, rules, config.mesh.fsdp_min_size)
    if state_shapes.ema_params is not None:  # the EMA lives where the params do, whatever the rules say
      self.state_sharding = self.state_sharding.replace(ema_params=self.state_sharding.params)
    # Where the trained params live (the UNet's, or its adapters).
    self.unet_sharding = self.state_sharding.params
    # The state as orbax restores it: shapes, dtypes and shardings.
    self.abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, self.state_sharding
    )
    # The frozen base UNet, partitioned by the same rules as the state's params ("params/..." paths).
    self.base_sharding = None
    self.abstract_base = None
    if settings.needs_base:
      self.base_sharding = sharding.tree_shardings(
        {"params": self.unet_shapes}, mesh, rules, config.mesh.fsdp_min_size
      )["params"]
      self.abstract_base = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.unet_shapes, self.base_sharding
      )
    self.params_sharding = {"unet": self.unet_sharding, "vae": replicated, "text_encoder": replicated}

    self._sample = self._sampler(self.sampler_settings)  # the memory report traces it
    self.sample_fn = self._jit_sampler(self.sampler_settings)
    rollouts_sharding = update.Rollouts(
      latents=batch, log_probs=batch, timesteps=replicated, context=batch, advantages=batch
    )
    self.num_updates = validation.num_updates_per_inner_epoch(config)
    transitions_sharding = sharding.batch_axis(mesh, 2)  # [num_updates, accumulation, M, ...]
    self.transitions_fn = jax.jit(
      functools.partial(update.make_examples, model, settings=settings),
      in_shardings=(rollouts_sharding, replicated),
      out_shardings=transitions_sharding,
    )
    self.step_fn = jax.jit(
      functools.partial(
        update.optimizer_step,
        model,
        self.optimizer,
        settings=settings,
        minibatch_sharding=batch,
        params_sharding=self.unet_sharding,
      ),
      in_shardings=(self.state_sharding, transitions_sharding, replicated, replicated, self.base_sharding),
      out_shardings=(self.state_sharding, replicated),
      donate_argnums=(0,),
    )
    self.encode_fn = jax.jit(
      functools.partial(models.encode_prompts, model), in_shardings=(replicated, replicated), out_shardings=replicated
    )
    if settings.lora_scale is None:
      self.init_fn = jax.jit(
        self._init_state, in_shardings=(self.unet_sharding, replicated), out_shardings=self.state_sharding
      )
    else:  # adapters need the UNet's shapes only
      self.init_fn = jax.jit(
        lambda key: self._init_state(self.unet_shapes, key),
        in_shardings=(replicated,),
        out_shardings=self.state_sharding,
      )
    self.unet_fn = jax.jit(
      functools.partial(update.unet_params, settings=settings),
      in_shardings=(self.unet_sharding, self.base_sharding),
      out_shardings=self.unet_sharding if settings.lora_scale is None else self.base_sharding,
    )
    # The empty prompt's token ids [L], tokenized once (CFG's negative prompt).
    self.negative_tokens = models.tokenize(model, [""])[0]

  def _init_state(self, unet_params, key) -> update.TrainState:
    """The state at step 0; with LoRA `unet_params` is only read for its shapes."""
    if self.settings.lora_scale is None:
      trained = unet_params
    else:
      trained = lora.init(key, unet_params, self.config.lora.targets, self.config.lora.rank)
    # A copy (not the same buffer): the state is donated leaf by leaf.
    ema = jax.tree.map(jnp.copy, trained) if self.settings.ema_decay > 0 else None
    return update.TrainState(
      step=jnp.zeros((), jnp.int32), params=trained, opt_state=self.optimizer.init(trained), ema_params=ema
    )

  def init_state(self, params) -> update.TrainState:
    """A fresh train state from params {"unet", ...}, wherever they live."""
    if self.settings.lora_scale is not None:
      return self.init_fn(self.lora_key)
    return self.init_fn(jax.device_put(params["unet"], self.unet_sharding), self.lora_key)

  def place_frozen(self, params) -> dict[str, Any]:
    """The frozen modules' params {"vae", "text_encoder"}, replicated on the mesh."""
    return jax.device_put({"vae": params["vae"], "text_encoder": params["text_encoder"]}, self.replicated)

  def place_base(self, params) -> Any:
    """The frozen base UNet of params {"unet", ...} on the mesh, or None when unused.

    Always a buffer of its own (never the caller's arrays), since the state's
    buffers are donated to the step.
    """
    if self.base_sharding is None:
      return None
    return jax.device_put(params["unet"], self.base_sharding, may_alias=False)

  def unet_params(self, trained, base=None) -> Any:
    """The UNet params of trained params (merged with `base` under LoRA), on the mesh.

    Export them with `models.save(model, dict(params, unet=jax.device_get(...)), path)`.
    """
    return self.unet_fn(trained, base)

  def _sampler(self, settings: sampling.SamplerSettings):
    """`sampling.sample` with `settings` as a pure function (not jitted):
    (params, base, token_ids, negative_token_ids, key) -> (trajectory, context, images)."""

    def sample(params, base, token_ids, negative_token_ids, key):
      unet = update.unet_params(params["unet"], base, self.settings)
      return sampling.sample(self.model, dict(params, unet=unet), token_ids, negative_token_ids, key, settings)

    return sample

  def _jit_sampler(self, settings: sampling.SamplerSettings):
    """`_sampler(settings)` jitted for this mesh."""
    batch = self.batch_sharding
    return jax.jit(
      self._sampler(settings),
      in_shardings=(self.params_sharding, self.base_sharding, batch, self.replicated, self.replicated),
      out_shardings=(sampling.Trajectory(latents=batch, log_probs=batch, timesteps=self.replicated), batch, batch),
    )

  def sampler_for_eta(self, eta: float):
    """`sample` (the training sampler) when eta is the training's, else the
    same sampler with DDIM stochasticity `eta` (compiled on first use)."""
    if eta == self.sampler_settings.eta:
      return self.sample
    sample_fn = self._jit_sampler(self.sampler_settings.replace(eta=float(eta)))

    def sample(params, prompts: list[str], key: jax.Array, base: Any = None):
      token_ids = sharding.host_to_global(models.tokenize(self.model, prompts), self.batch_sharding)
      return sample_fn(params, base, token_ids, self.negative_tokens, key)

    return sample

  def negative_context(self, params) -> jax.Array:
    return self.encode_fn(params["text_encoder"], self.negative_tokens[None])[0]

  def train_inner_epoch(
    self,
    state: update.TrainState,
    rollouts: update.Rollouts,
    negative_context: jax.Array,
    key: jax.Array,
    base: Any = None,
  ) -> tuple[update.TrainState, dict[str, jax.Array]]:
    """One pass over an epoch's transitions: `num_updates` optimiser steps.

    Dispatches asynchronously; the metrics ([num_updates, accumulation] each,
    "grad_norm" [num_updates]) stay on the device until read.
    """
    transitions = self.transitions_fn(rollouts, key)
    step_metrics = []
    for index in range(self.num_updates):
      state, metrics = self.step_fn(state, transitions, np.int32(index), negative_context, base)
      step_metrics.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics)

  def sample(self, params, prompts: list[str], key: jax.Array, base: Any = None):
    """Dispatches one sampling call (asynchronous); prompts are this host's.

    params: {"unet": the trained params, "vae", "text_encoder"}; base: `place_base`'s.
    """
    token_ids = sharding.host_to_global(models.tokenize(self.model, prompts), self.batch_sharding)
    return self.sample_fn(params, base, token_ids, self.negative_tokens, key)


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; a resumed run with other settings keeps the old file."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      previous = f.read()
    if previous == text:
      return
    kept = os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.replace(path, kept)
    logging.warning("this run's config differs from the one in %s; the old one is kept as %s", workdir, kept)
  with open(path, "w") as f:
    f.write(text)


def _mean_metrics(train_metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Host means over inner epochs and minibatches, plus the on-policy check."""
  host = jax.device_get(train_metrics)
  summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  if "ratio_max_deviation" in host[0]:  # policy gradients (RWR has no ratio)
    # Before any update the ratio of the first minibatch must be 1.
    summary["onpolicy_ratio_deviation"] = float(np.asarray(host[0]["ratio_max_deviation"]).reshape(-1)[0])
  return summary


def _log_epoch(
  writer: metrics_lib.MetricWriter,
  config: ml_collections.ConfigDict,
  epoch: int,
  epoch_start: float,
  train_start: float,
  train_metrics: list[dict[str, jax.Array]],
  rewards: np.ndarray,
  local_rewards: np.ndarray,
  prompts: list[str],
  images: list[np.ndarray],
  host_metrics: dict[str, float],
) -> dict[str, Any]:
  """Fetches an epoch's training metrics (blocking until its training is
  done), checks them, and writes the epoch's record, histogram and grid.

  rewards: every process's valid rewards [N]; local_rewards (NaN where
  dropped), prompts, images: this process's.
  """
  summary = _mean_metrics(train_metrics)
  done = time.time()
  for name, value in summary.items():
    if not np.isfinite(value):
      raise FloatingPointError(f"epoch {epoch}: training metric {name} is {value}; lower config.train.learning_rate.")
  summary.update(
    host_metrics,
    epoch=epoch,
    training_seconds=done - train_start,
    seconds=done - epoch_start,
  )
  writer.write_scalars(epoch, summary, split="train")
  writer.write_histogram(epoch, "rewards", rewards)
  every = config.logging.images_every_epochs
  if every and (epoch % every == 0 or epoch == config.num_epochs - 1):
    n = min(config.logging.num_images, len(prompts))
    labels = [f"{r:.3g} {p}" for r, p in zip(local_rewards[:n], prompts[:n])]
    writer.write_images(epoch, "samples", np.concatenate(images)[:n], labels)
  if jax.process_index() == 0:
    diagnostics = " | ".join(f"{name} {summary[name]:.3g}" for name in _LOGGED if name in summary)
    logging.info(
      "epoch %d | samples %d | reward %.4f ± %.4f | %s | %.1f s",
      epoch,
      summary["samples"],
      summary["reward_mean"],
      summary["reward_std"],
      diagnostics,
      summary["seconds"],
    )
  return summary


# Training diagnostics of the epoch's log line, those the method has.
_LOGGED = ("loss", "approx_kl", "clipfrac", "denoising_mse", "rwr_effective_fraction")


def _ema_grid(trainer, config, writer, frozen, ema_params, base, prompt_fn, reward_fn, epoch: int) -> dict[str, float]:
  """Samples a batch with the EMA params, with the prompts and key of epoch
  `epoch`'s first batch; writes images/samples_ema_EPOCH.png and returns
  {"ema_reward_mean": the mean valid reward over every process's samples}."""
  local_batch = config.sample.batch_size // jax.process_count()
  prompts = prompt_fn(np.random.default_rng([config.seed, epoch, jax.process_index()]), local_batch)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), epoch), 0)
  _, _, images = trainer.sample(dict(frozen, unet=ema_params), prompts, key, base)
  images = sharding.local_rows(images)
  scored = rewards_lib.score_batch(config.reward.name, reward_fn, images, prompts, "drop")
  rewards = gather_rows(np.where(scored.valid, scored.rewards, np.nan), 1)
  n = min(config.logging.num_images, len(prompts))
  writer.write_images(epoch, "samples_ema", images[:n], [f"{r:.3g} {p}" for r, p in zip(scored.rewards[:n], prompts)])
  mean = float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan")
  if jax.process_index() == 0:
    logging.info("EMA params after epoch %d: reward %.4f (current params: see the epoch's line)", epoch, mean)
  return {"ema_reward_mean": mean}


def gather_rows(local: np.ndarray, num_batches: int) -> np.ndarray:
  """Every process's per-sample values [N], in the rows' global order.

  A global batch holds process 0's rows, then process 1's, ...; an epoch is
  its batches one after another. Each process passes its own [n], batch by
  batch (n = num_batches * rows per process).
  """
  rows = sharding.allgather_rows(np.asarray(local).reshape(num_batches, -1))  # [P, batches, b]
  return np.swapaxes(rows, 0, 1).reshape(-1)


def gather_prompts(local_prompts: list[str], num_batches: int) -> list[str]:
  """`gather_rows` for strings."""
  per_process = sharding.allgather_strings(local_prompts)
  local = len(local_prompts) // num_batches
  return [host[b * local + i] for b in range(num_batches) for host in per_process for i in range(local)]


def epoch_advantages(
  prompts: list[str], scored: rewards_lib.ScoredBatch, tracker, clip: float, epoch: int
) -> np.ndarray:
  """float32 [N] advantages of every process's samples; 0 for dropped ones,
  which take no part in the statistics either."""
  if not scored.valid.any():
    raise rewards_lib.RewardError(
      f"epoch {epoch}: every sample's reward is invalid ({scored.problem}); nothing to train on."
    )
  advantages = np.zeros(len(prompts), np.float32)
  kept = [p for p, v in zip(prompts, scored.valid) if v]
  advantages[scored.valid] = advantages_lib.compute_advantages(kept, scored.rewards[scored.valid], tracker, clip)
  return advantages


def group_epoch_advantages(
  scored: rewards_lib.ScoredBatch, group_size: int, group_std: str, clip: float, epoch: int
) -> tuple[np.ndarray, dict[str, float]]:
  """float32 [N] group-relative advantages of every process's samples (in
  global order, groups of `group_size` consecutive rows), clipped to ±clip,
  and {"group_tied_fraction": the fraction of groups whose rewards all tie}."""
  if not scored.valid.any():
    raise rewards_lib.RewardError(
      f"epoch {epoch}: every sample's reward is invalid ({scored.problem}); nothing to train on."
    )
  rewards = np.where(scored.valid, scored.rewards, np.nan)
  advantages, tied = advantages_lib.group_advantages(rewards, group_size, group_std)
  return np.clip(advantages, -clip, clip).astype(np.float32), {"group_tied_fraction": float(tied.mean())}


def rwr_epoch_weights(
  scored: rewards_lib.ScoredBatch, method: str, temperature: float, percentile: float, epoch: int
) -> tuple[np.ndarray, dict[str, float]]:
  """float32 [N] RWR weights of every process's samples (0 for dropped ones),
  mean 1 over the valid ones, and {"rwr_effective_fraction": (Σw)² / (n Σw²),
  the effective sample size as a fraction of the n valid samples}."""
  if not scored.valid.any():
    raise rewards_lib.RewardError(
      f"epoch {epoch}: every sample's reward is invalid ({scored.problem}); nothing to train on."
    )
  rewards = np.where(scored.valid, scored.rewards, np.nan)
  if method == "rwr":
    weights = objectives.rwr_dense_weights(rewards, temperature)
  else:
    weights = objectives.rwr_sparse_weights(rewards, percentile)
  effective = float(weights.sum() ** 2 / (scored.valid.sum() * np.square(weights.astype(np.float64)).sum()))
  return weights, {"rwr_effective_fraction": effective}


def reward_metrics(scored: rewards_lib.ScoredBatch) -> dict[str, float]:
  """Statistics of the valid rewards, each part's mean, and the dropped count."""
  valid = scored.rewards[scored.valid]
  out = dict(
    reward_mean=float(valid.mean()),
    reward_std=float(valid.std()),
    reward_min=float(valid.min()),
    reward_max=float(valid.max()),
    reward_invalid=int((~scored.valid).sum()),
  )
  for name, values in scored.parts.items():
    part = values[scored.valid]
    out[f"reward_{name}_mean"] = float(np.nanmean(part)) if np.isfinite(part).any() else float("nan")
    out[f"reward_{name}_std"] = float(np.nanstd(part)) if np.isfinite(part).any() else float("nan")
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs DDPO per `config`, writing everything into `workdir`.

  Resumes from the latest checkpoint in `workdir` when there is one, else
  starts from the pretrained weights. Returns the last epoch's metrics
  (with "preempted": True when a SIGTERM stopped the run early).
  """
  summary, _ = train(config, workdir)
  return summary


def train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, Any], update.TrainState]:
  """`train_and_evaluate` that also returns the final train state."""
  validation.validate(config, workdir, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  reward_fn = rewards_lib.make(config.reward.name, **config.reward.kwargs.to_dict())
  prompt_fn = prompts_lib.grouped(
    prompts_lib.get(config.prompt.name, **config.prompt.kwargs.to_dict()), config.sample.group_size
  )
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  model, params = models.load(
    config.model.name, revision=config.model.revision or None, dtype=config.model.dtype, from_pt=config.model.from_pt
  )
  if is_main:
    _save_config(config, workdir)
  trainer = Trainer(config, model, mesh, params)
  logging.info(
    "train state: %.1f MB per device, %.0f%% of its bytes sharded over fsdp (mesh %s); %d trained params",
    sharding.bytes_per_device(trainer.abstract_state, trainer.state_sharding) / 1e6,
    100 * sharding.sharded_fraction(trainer.abstract_state, trainer.state_sharding),
    dict(mesh.shape),
    lora.num_params(trainer.abstract_state.params),
  )
  tracker = (
    advantages_lib.PerPromptStatTracker(config.stat_tracking.buffer_size, config.stat_tracking.min_count)
    if config.stat_tracking.per_prompt and config.train.advantages == "stat_tracking"
    else None
  )

  # --- Resume from the latest checkpoint that restores, else start afresh.
  checkpointer = checkpoints.Checkpointer(
    checkpoints.checkpoint_dir(workdir), config.checkpoint.max_to_keep, config.checkpoint.asynchronous
  )
  restored = checkpointer.restore_latest(trainer.abstract_state)
  if restored is None:
    state, start_epoch = trainer.init_state(params), 0
  else:
    step, state, meta = restored
    if meta["seed"] != config.seed:
      raise validation.ConfigError(
        f"config.seed={config.seed} differs from the seed {meta['seed']} of the checkpoint in {workdir}; "
        "resume with the same seed or start in a new --workdir."
      )
    start_epoch = int(meta["epoch"]) + 1
    if tracker is not None:
      tracker.load_state(meta["tracker"])
    logging.info("resuming from checkpoint %d (epoch %d done) in %s", step, meta["epoch"], workdir)
  frozen = trainer.place_frozen(params)
  base = trainer.place_base(params)
  negative_context = trainer.negative_context(frozen)
  del params

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  writer.resume_at(start_epoch)
  preemption = checkpoints.PreemptionFlag()
  executor = concurrent.futures.ThreadPoolExecutor(config.reward.num_threads)
  root_key = jax.random.PRNGKey(config.seed)
  samples_per_epoch = config.sample.batch_size * config.sample.num_batches_per_epoch
  num_batches = config.sample.num_batches_per_epoch
  local_batch = config.sample.batch_size // jax.process_count()
  pending = None  # the previous epoch, logged once the next one's sampling is dispatched
  summary: dict[str, Any] = {}
  preempted = False
  evaluator = evaluation.Evaluator(config, trainer, reward_fn) if config.eval.every_epochs else None
  eval_summary: dict[str, Any] = {}
  if evaluator is not None and start_epoch == 0:
    eval_summary = _evaluate(evaluator, writer, frozen, state.params, base, -1, 0)

  for epoch in range(start_epoch, config.num_epochs):
    epoch_start = time.time()
    epoch_key = jax.random.fold_in(root_key, epoch)
    current = dict(frozen, unet=state.params)

    # --- Sampling: dispatch every batch, then hand each one's images to a
    # reward thread as soon as they are ready, while the device goes on.
    prompt_rng = np.random.default_rng([config.seed, epoch, jax.process_index()])
    batches = []
    for b in range(num_batches):
      batch_prompts = prompt_fn(prompt_rng, local_batch)
      trajectory, context, images = trainer.sample(current, batch_prompts, jax.random.fold_in(epoch_key, b), base)
      batches.append((batch_prompts, trajectory, context, images))
    if pending is not None:  # the device is busy sampling: log the last epoch now
      summary = _log_epoch(writer, config, **pending)
      pending = None
    futures, local_prompts, local_images = [], [], []
    for batch_prompts, _, _, images in tqdm.tqdm(
      batches, desc=f"epoch {epoch} sampling", leave=False, disable=not is_main
    ):
      host_images = sharding.local_rows(images)
      futures.append(
        executor.submit(
          rewards_lib.score_batch,
          config.reward.name,
          reward_fn,
          host_images,
          batch_prompts,
          config.reward.on_invalid,
        )
      )
      local_prompts += batch_prompts
      local_images.append(host_images)
    local_scored = rewards_lib.concatenate([f.result() for f in futures])
    sampling_seconds = time.time() - epoch_start

    # --- Advantages (per prompt or per batch) over every process's samples,
    # identical on all processes; one per trajectory.
    all_prompts = gather_prompts(local_prompts, num_batches)
    scored = rewards_lib.ScoredBatch(
      rewards=gather_rows(local_scored.rewards, num_batches),
      valid=gather_rows(local_scored.valid, num_batches),
      parts={k: gather_rows(v, num_batches) for k, v in local_scored.parts.items()},
      problem=local_scored.problem,
    )
    if trainer.settings.is_rwr:  # RWR's weights travel where the advantages do
      advantages, advantage_metrics = rwr_epoch_weights(
        scored, config.train.method, config.train.rwr_temperature, config.train.rwr_percentile, epoch
      )
    elif config.train.advantages == "group":
      advantages, advantage_metrics = group_epoch_advantages(
        scored, config.sample.group_size, config.train.group_std, config.train.adv_clip_max, epoch
      )
    else:
      advantages = epoch_advantages(all_prompts, scored, tracker, config.train.adv_clip_max, epoch)
      advantage_metrics = {}
    rollouts = update.Rollouts(
      latents=jnp.concatenate([b[1].latents for b in batches]),
      log_probs=jnp.concatenate([b[1].log_probs for b in batches]),
      timesteps=batches[0][1].timesteps,
      context=jnp.concatenate([b[2] for b in batches]),
      advantages=sharding.from_global_rows(advantages.astype(np.float32), trainer.batch_sharding),
    )

    # --- Training: dispatched asynchronously, one device call per optimiser step.
    train_start = time.time()
    train_metrics = []
    for inner in tqdm.trange(
      config.train.num_inner_epochs, desc=f"epoch {epoch} training", leave=False, disable=not is_main
    ):
      state, inner_metrics = trainer.train_inner_epoch(
        state, rollouts, negative_context, jax.random.fold_in(epoch_key, 10_000 + inner), base
      )
      train_metrics.append(inner_metrics)
    pending = dict(
      epoch=epoch,
      epoch_start=epoch_start,
      train_start=train_start,
      train_metrics=train_metrics,
      rewards=scored.rewards[scored.valid],
      local_rewards=local_scored.rewards,
      prompts=local_prompts,
      images=local_images,
      host_metrics=dict(
        reward_metrics(scored),
        **advantage_metrics,
        samples=(epoch + 1) * samples_per_epoch,
        sampling_seconds=sampling_seconds,
        **({f"stat_tracker_{k}": v for k, v in tracker.stats().items()} if tracker else {}),
      ),
    )

    # --- Held-out evaluation of the params after this epoch (the epoch's own
    # record first, so that records stay in epoch order).
    if evaluator is not None and evaluation.is_due(epoch, config.num_epochs, config.eval.every_epochs):
      summary = _log_epoch(writer, config, **pending)
      pending = None
      eval_summary = _evaluate(evaluator, writer, frozen, state.params, base, epoch, (epoch + 1) * samples_per_epoch)

    # --- Checkpoint: periodically and when preempted (then stop). The epoch's
    # record is written first, so metrics.jsonl never runs ahead of a restore.
    preempted = preemption.requested()
    if preempted or checkpoints.is_due(epoch, config.num_epochs, config.checkpoint.every_epochs):
      if pending is not None:
        summary = _log_epoch(writer, config, **pending)
        pending = None
      meta = dict(epoch=epoch, seed=config.seed, tracker=tracker.state() if tracker else {})
      checkpointer.save(epoch + 1, state, meta)
    if preempted:
      logging.warning("stopped after epoch %d to be preempted; run again with --workdir=%s to resume", epoch, workdir)
      break

  if pending is not None:
    summary = _log_epoch(writer, config, **pending)
  if config.logging.sample_with_ema and not preempted and summary:
    summary.update(
      _ema_grid(trainer, config, writer, frozen, state.ema_params, base, prompt_fn, reward_fn, summary["epoch"])
    )
  checkpointer.close()
  executor.shutdown()
  writer.close()
  preemption.restore_handlers()
  sharding.sync_processes("train_and_evaluate done")
  if preempted:
    summary["preempted"] = True
  summary.update({f"eval_{name}": value for name, value in eval_summary.items()})
  return summary, state


def _evaluate(evaluator, writer, frozen, trained, base, epoch: int, samples: int) -> dict[str, Any]:
  """Evaluates the params after epoch `epoch` (-1: before training), writes
  the record and grid, and returns the metrics (with "epoch")."""
  metrics, images, labels = evaluator.evaluate(dict(frozen, unet=trained), base)
  evaluator.write(writer, epoch, samples, metrics, images, labels)
  if jax.process_index() == 0:
    others = " | ".join(
      f"{k[len('reward_') : -len('_mean')]} {v:.4g}"
      for k, v in metrics.items()
      if k.endswith("_mean") and k != "reward_mean"
    )
    logging.info(
      "eval after epoch %d | reward %.4f | %s | diversity %.3f | %.1f s",
      epoch,
      metrics["reward_mean"],
      others,
      metrics.get("diversity", metrics["diversity_all"]),
      metrics["seconds"],
    )
  return dict(metrics, epoch=epoch)
