"""The training pass: minibatches of (x_t, x_{t-1}) transitions through the
clipped objective, with gradient accumulation.

An inner epoch shuffles the trajectories and, per trajectory, its timesteps;
keeps `timestep_fraction` of the steps; and lays the transitions out
time-major, so that one minibatch holds many trajectories, each at its own
timestep (`make_transitions`, one device call). Then each optimiser step is one
device call (`optimizer_step`) that accumulates the gradients of
`gradient_accumulation_steps` minibatches. No Python loop over timesteps, no
host round trip between steps (metrics stay on the device).

The RWR baselines (`settings.method` "rwr" or "rwr_sparse") train on the same
layout of examples instead: per trajectory, `num_timesteps_kept` copies of its
final latents x_0, each noised to a random training timestep
(`make_denoising_examples`), through the reward-weighted denoising loss.

Options beyond DDPO (all off by default):
- LoRA: the trained params are adapters (`ddpo_jax.lora`) merged into the
  frozen base UNet inside the step;
- KL regularisation: `kl_coef` times the per-step KL between the current
  policy's Gaussian transitions and the base (pretrained) model's is added to
  the loss;
- EMA: the state keeps an exponential moving average of the trained params,
  updated after every optimiser step.
The base UNet params ("base" below) are a separate frozen input, on the
device once: needed with LoRA or KL, None otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddpo_jax import ddim
from ddpo_jax import lora
from ddpo_jax import models
from ddpo_jax import objectives
from ddpo_jax import sampling


@flax.struct.dataclass
class TrainState:
  """What the optimiser updates and checkpoints.

  Attributes:
    step: int32 scalar, optimiser steps taken.
    params: the trained params: the UNet's, or its LoRA adapters.
    opt_state: the optimiser's state of `params`.
    ema_params: an exponential moving average of `params` (None when off).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


@flax.struct.dataclass
class Rollouts:
  """An epoch's samples, as the training pass needs them.

  Attributes:
    latents: [N, T+1, C, h, w]; log_probs: [N, T]; timesteps: [T];
    context: [N, L, D] prompt embeddings; advantages: [N] (with RWR: the
    trajectories' weights).
  """

  latents: jax.Array
  log_probs: jax.Array
  timesteps: jax.Array
  context: jax.Array
  advantages: jax.Array


@flax.struct.dataclass
class Transitions:
  """Minibatches of transitions: leading axes [num_updates, accumulation, M]."""

  latents: jax.Array
  next_latents: jax.Array
  timesteps: jax.Array
  old_log_probs: jax.Array
  advantages: jax.Array
  context: jax.Array


@flax.struct.dataclass
class DenoisingExamples:
  """RWR's minibatches: leading axes [num_updates, accumulation, M].

  Attributes:
    noisy_latents: [..., C, h, w] sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
    targets: [..., C, h, w] what the UNet regresses: ε (or v, or x_0, as the
      schedule's prediction type says).
    timesteps: int32 [...] t, uniform over the training timesteps.
    weights: [...] the trajectory's RWR weight.
    context: [..., L, D].
  """

  noisy_latents: jax.Array
  targets: jax.Array
  timesteps: jax.Array
  weights: jax.Array
  context: jax.Array


@flax.struct.dataclass
class UpdateSettings:
  """Static settings of the training pass."""

  method: str = flax.struct.field(pytree_node=False)
  clip_range: float = flax.struct.field(pytree_node=False)
  batch_size: int = flax.struct.field(pytree_node=False)
  gradient_accumulation_steps: int = flax.struct.field(pytree_node=False)
  num_timesteps_kept: int = flax.struct.field(pytree_node=False)
  sampler: sampling.SamplerSettings = flax.struct.field(pytree_node=False)
  # Unroll the accumulation loop. XLA's CPU backend runs convolution weight
  # gradients inside a while loop with a generic kernel, ~60x slower than
  # unrolled (measured: a 3x3 conv's weight gradient, 10 minibatches of
  # 128x8x8x32: 2.4 s in lax.scan, 0.04 s unrolled; one mid-size minibatch
  # 70 s against 5 s); accelerators keep the loop, which compiles faster.
  # Unrolled minibatches run one after another (`after`).
  unroll_accumulation: bool = flax.struct.field(pytree_node=False, default=False)
  # Rematerialise the UNet's blocks in the backward pass (memory for compute).
  remat: bool = flax.struct.field(pytree_node=False, default=False)
  # alpha / rank when the trained params are LoRA adapters of the base UNet; None: full fine-tuning.
  lora_scale: float | None = flax.struct.field(pytree_node=False, default=None)
  # Coefficient of the KL to the base model in the loss (0: not computed).
  kl_coef: float = flax.struct.field(pytree_node=False, default=0.0)
  # Decay of the params' EMA (0: no EMA).
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def is_rwr(self) -> bool:
    """Whether the method is a reward-weighted regression baseline."""
    return self.method in objectives.RWR_METHODS

  @property
  def needs_base(self) -> bool:
    """Whether the step needs the frozen base UNet (LoRA or KL)."""
    return self.lora_scale is not None or self.kl_coef > 0


def unet_params(trained, base, settings: UpdateSettings):
  """The UNet params the policy applies: `trained`, or base + LoRA adapters `trained`."""
  if settings.lora_scale is None:
    return trained
  return lora.merge(base, trained, settings.lora_scale)


def transition_distribution(
  model: models.DiffusionModel,
  unet: Any,
  minibatch: Transitions,
  negative_context: jax.Array,
  sampler: sampling.SamplerSettings,
  remat: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The guided policy's Gaussian p(x_{t-1} | x_t, c) of given transitions:
  mean [M, C, h, w] and std [M, 1, 1, 1] (see `ddim.ddim_mean_and_std`)."""
  output = sampling.guided_noise(
    model,
    unet,
    minibatch.latents,
    minibatch.timesteps,
    minibatch.context,
    negative_context,
    sampler.guidance_scale,
    remat=remat,
  )
  return ddim.ddim_mean_and_std(output, minibatch.timesteps, minibatch.latents, **sampling.ddim_kwargs(model, sampler))


def transition_log_probs(
  model: models.DiffusionModel,
  unet_params,
  minibatch: Transitions,
  negative_context: jax.Array,
  sampler: sampling.SamplerSettings,
  remat: bool = False,
) -> jax.Array:
  """log p_θ(x_{t-1} | x_t, c) of given transitions [M], with the sampling CFG."""
  mean, std = transition_distribution(model, unet_params, minibatch, negative_context, sampler, remat)
  return ddim.gaussian_log_prob(minibatch.next_latents, mean, std)


def minibatch_loss(
  model, trained, minibatch: Transitions, negative_context, settings: UpdateSettings, base=None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The objective of one minibatch and its diagnostics.

  Args:
    trained: the trained params (the UNet's, or LoRA adapters of `base`).
    minibatch: `Transitions`, or `DenoisingExamples` for RWR (whose loss is
      the weighted denoising loss of the conditional UNet, no guidance).
    base: the frozen base UNet params, when `settings.needs_base`.

  Returns:
    (loss, metrics): the policy loss plus kl_coef * mean KL to the base model;
    metrics hold "loss" (that total) and, with KL, "kl_to_reference"
    (the mean over the minibatch of `ddim.gaussian_kl`).
  """
  unet = unet_params(trained, base, settings)
  if settings.is_rwr:
    prediction = models.predict_noise(
      model, unet, minibatch.noisy_latents, minibatch.timesteps, minibatch.context, remat=settings.remat
    )
    loss, metrics = objectives.weighted_denoising_loss(prediction, minibatch.targets, minibatch.weights)
    return loss, dict(metrics, loss=loss)
  mean, std = transition_distribution(model, unet, minibatch, negative_context, settings.sampler, settings.remat)
  log_probs = ddim.gaussian_log_prob(minibatch.next_latents, mean, std)
  loss_fn = objectives.get(settings.method)
  loss, metrics = loss_fn(log_probs, minibatch.old_log_probs, minibatch.advantages, settings.clip_range)
  if settings.kl_coef > 0:
    # The reference is the base model (with LoRA: the adapters switched off); σ is the same for both.
    reference_mean, _ = transition_distribution(
      model, jax.lax.stop_gradient(base), minibatch, negative_context, settings.sampler
    )
    kl = ddim.gaussian_kl(mean, jax.lax.stop_gradient(reference_mean), std).mean()
    loss = loss + settings.kl_coef * kl
    metrics = dict(metrics, kl_to_reference=kl)
  return loss, dict(metrics, loss=loss)


def ema_update(ema_params, params, decay: float):
  """decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def _time_major(x: jax.Array, settings: UpdateSettings) -> jax.Array:
  """[N, K, ...] -> [num_updates, accumulation, M, ...], step k of every trajectory before step k+1."""
  x = jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
  return x.reshape((-1, settings.gradient_accumulation_steps, settings.batch_size) + x.shape[1:])


def _per_example(x: jax.Array, num_kept: int) -> jax.Array:
  """[N, ...] -> [N, K, ...]: a trajectory's value for each of its K examples."""
  return jnp.broadcast_to(x[:, None], (x.shape[0], num_kept) + x.shape[1:])


def make_transitions(rollouts: Rollouts, key: jax.Array, settings: UpdateSettings) -> Transitions:
  """Shuffles trajectories and their timesteps, subsamples, and lays out minibatches."""
  num_trajectories, num_steps = rollouts.log_probs.shape
  trajectory_key, time_key = jax.random.split(key)
  order = jax.random.permutation(trajectory_key, num_trajectories)
  time_keys = jax.random.split(time_key, num_trajectories)
  steps = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(time_keys)[:, : settings.num_timesteps_kept]
  rows = order[:, None]  # [N, 1]
  steps = steps[order]  # [N, K]
  time_major = functools.partial(_time_major, settings=settings)
  num_kept = settings.num_timesteps_kept
  return Transitions(
    latents=time_major(rollouts.latents[rows, steps]),
    next_latents=time_major(rollouts.latents[rows, steps + 1]),
    timesteps=time_major(rollouts.timesteps[steps]),
    old_log_probs=time_major(rollouts.log_probs[rows, steps]),
    advantages=time_major(_per_example(rollouts.advantages[order], num_kept)),
    context=time_major(_per_example(rollouts.context[order], num_kept)),
  )


def make_denoising_examples(
  model: models.DiffusionModel, rollouts: Rollouts, key: jax.Array, settings: UpdateSettings
) -> DenoisingExamples:
  """RWR's examples: each trajectory's x_0 (its final latents) noised to
  `num_timesteps_kept` timesteps drawn uniformly from [0, num_train_timesteps),
  with fresh noise, in the minibatch layout of `make_transitions`.

  The standard denoising loss of the model's prediction type: the target is
  ε ("epsilon"), sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x_0 ("v_prediction") or x_0 ("sample").
  """
  schedule = model.schedule
  num_trajectories = rollouts.latents.shape[0]
  num_kept = settings.num_timesteps_kept
  order_key, time_key, noise_key = jax.random.split(key, 3)
  order = jax.random.permutation(order_key, num_trajectories)
  clean = _per_example(rollouts.latents[order, -1], num_kept)  # [N, K, C, h, w]
  timesteps = jax.random.randint(time_key, (num_trajectories, num_kept), 0, schedule.num_train_timesteps)
  noise = jax.random.normal(noise_key, clean.shape, clean.dtype)
  alpha_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[timesteps][..., None, None, None]
  signal, sigma = jnp.sqrt(alpha_cumprod), jnp.sqrt(1.0 - alpha_cumprod)
  if schedule.prediction_type == "epsilon":
    targets = noise
  elif schedule.prediction_type == "v_prediction":
    targets = signal * noise - sigma * clean
  elif schedule.prediction_type == "sample":
    targets = clean
  else:
    raise ValueError(f"prediction type {schedule.prediction_type!r} is not supported by RWR")
  time_major = functools.partial(_time_major, settings=settings)
  return DenoisingExamples(
    noisy_latents=time_major(signal * clean + sigma * noise),
    targets=time_major(targets),
    timesteps=time_major(timesteps.astype(jnp.int32)),
    weights=time_major(_per_example(rollouts.advantages[order], num_kept)),
    context=time_major(_per_example(rollouts.context[order], num_kept)),
  )


def make_examples(
  model: models.DiffusionModel, rollouts: Rollouts, key: jax.Array, settings: UpdateSettings
) -> Transitions | DenoisingExamples:
  """The training pass's minibatches of the method: transitions, or RWR's denoising examples."""
  if settings.is_rwr:
    return make_denoising_examples(model, rollouts, key, settings)
  return make_transitions(rollouts, key, settings)


def after(tree, token):
  """`tree` unchanged in value, but computed after `token` (any pytree of arrays).

  Adds 0 · (one element of `token`) to each floating-point leaf: a data
  dependency that XLA cannot drop. Unrolled on the CPU, XLA's scheduler would
  otherwise run every minibatch's forward pass before any backward pass and
  keep all their activations alive (mid bench size, 5 minibatches: a 12.8 GB
  peak against 3.7 GB, and 22 s per step against 16 s: fresh pages cost), and
  the CPU pipeline removes `lax.optimization_barrier`s before it schedules.
  x + 0 = x (only a -0.0 becomes +0.0); a NaN or inf in `token` would
  propagate, but then the accumulated gradient is already NaN.
  """
  leaf = jax.tree.leaves(token)[0]
  zero = leaf[(0,) * leaf.ndim] * 0  # an element, not a reshape: a sharded leaf is not gathered
  add = lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(add, tree)


def optimizer_step(
  model: models.DiffusionModel,
  optimizer: optax.GradientTransformation,
  state: TrainState,
  transitions: Transitions,
  index: jax.Array,
  negative_context: jax.Array,
  base: Any = None,
  *,
  settings: UpdateSettings,
  minibatch_sharding=None,
  params_sharding=None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step over the minibatches `transitions[index]`, then the EMA.

  Args:
    transitions: the inner epoch's `Transitions` (or RWR's `DenoisingExamples`),
      [num_updates, accumulation, M, ...].
    index: int scalar, which optimiser step of the inner epoch this is.
    base: the frozen base UNet params when `settings.needs_base`, else None.
    minibatch_sharding, params_sharding: where each minibatch and the summed
      gradients live (the gradients as the params: FSDP-sharded ones stay so).

  Returns:
    The new state and metrics: each [accumulation] (per minibatch), plus the
    scalar "grad_norm" of the averaged gradient.
  """
  group = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), transitions)
  grad_fn = jax.grad(functools.partial(minibatch_loss, model), has_aux=True)

  def accumulate(grads_sum, minibatch):
    if minibatch_sharding is not None:
      minibatch = jax.lax.with_sharding_constraint(minibatch, minibatch_sharding)
    grads, metrics = grad_fn(state.params, minibatch, negative_context, settings, base)
    return constrain(jax.tree.map(jnp.add, grads_sum, grads)), metrics

  constrain = lambda tree: tree if params_sharding is None else jax.lax.with_sharding_constraint(tree, params_sharding)
  zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
  if settings.unroll_accumulation:  # no while loop at all (lax.scan keeps one when the length is 1)
    grads_sum, per_minibatch = zeros, []
    for i in range(settings.gradient_accumulation_steps):
      minibatch = jax.tree.map(lambda x, i=i: x[i], group)
      grads_sum, minibatch_metrics = accumulate(grads_sum, after(minibatch, grads_sum) if i else minibatch)
      per_minibatch.append(minibatch_metrics)
    metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *per_minibatch)
  else:
    grads_sum, metrics = jax.lax.scan(accumulate, zeros, group)
  grads = jax.tree.map(lambda g: g / settings.gradient_accumulation_steps, grads_sum)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = ema_update(state.ema_params, params, settings.ema_decay) if settings.ema_decay > 0 else None
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
  return new_state, dict(metrics, grad_norm=optax.tree.norm(grads))
