"""The training pass: minibatches of (x_t, x_{t-1}) transitions through the
clipped objective, with gradient accumulation.

An inner epoch shuffles the trajectories and, per trajectory, its timesteps;
keeps `timestep_fraction` of the steps; and lays the transitions out
time-major, so that one minibatch holds many trajectories, each at its own
timestep (`make_transitions`, one device call). Then each optimiser step is one
device call (`optimizer_step`) that accumulates the gradients of
`gradient_accumulation_steps` minibatches. No Python loop over timesteps, no
host round trip between steps (metrics stay on the device).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddpo_jax import ddim
from ddpo_jax import models
from ddpo_jax import objectives
from ddpo_jax import sampling


@flax.struct.dataclass
class TrainState:
  """What the optimiser updates: the UNet params, its optimiser state, the step."""

  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class Rollouts:
  """An epoch's samples, as the training pass needs them.

  Attributes:
    latents: [N, T+1, C, h, w]; log_probs: [N, T]; timesteps: [T];
    context: [N, L, D] prompt embeddings; advantages: [N].
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
class UpdateSettings:
  """Static settings of the training pass."""

  method: str = flax.struct.field(pytree_node=False)
  clip_range: float = flax.struct.field(pytree_node=False)
  batch_size: int = flax.struct.field(pytree_node=False)
  gradient_accumulation_steps: int = flax.struct.field(pytree_node=False)
  num_timesteps_kept: int = flax.struct.field(pytree_node=False)
  sampler: sampling.SamplerSettings = flax.struct.field(pytree_node=False)
  # Unroll the accumulation loop. XLA's CPU backend runs convolution gradients
  # inside a while loop ~60x slower than unrolled (measured: a 3x3 conv's
  # weight gradient, 10 minibatches of 128x8x8x32: 2.4 s in lax.scan, 0.04 s
  # unrolled); accelerators keep the loop, which compiles faster.
  unroll_accumulation: bool = flax.struct.field(pytree_node=False, default=False)
  # Rematerialise the UNet's blocks in the backward pass (memory for compute).
  remat: bool = flax.struct.field(pytree_node=False, default=False)


def transition_log_probs(
  model: models.DiffusionModel,
  unet_params,
  minibatch: Transitions,
  negative_context: jax.Array,
  sampler: sampling.SamplerSettings,
  remat: bool = False,
) -> jax.Array:
  """log p_θ(x_{t-1} | x_t, c) of given transitions [M], with the sampling CFG."""
  output = sampling.guided_noise(
    model,
    unet_params,
    minibatch.latents,
    minibatch.timesteps,
    minibatch.context,
    negative_context,
    sampler.guidance_scale,
    remat=remat,
  )
  _, log_probs = ddim.ddim_step_with_logprob(
    output,
    minibatch.timesteps,
    minibatch.latents,
    prev_sample=minibatch.next_latents,
    **sampling.ddim_kwargs(model, sampler),
  )
  return log_probs


def minibatch_loss(model, unet_params, minibatch: Transitions, negative_context, settings: UpdateSettings):
  log_probs = transition_log_probs(model, unet_params, minibatch, negative_context, settings.sampler, settings.remat)
  loss_fn = objectives.get(settings.method)
  loss, metrics = loss_fn(log_probs, minibatch.old_log_probs, minibatch.advantages, settings.clip_range)
  return loss, dict(metrics, loss=loss)


def make_transitions(rollouts: Rollouts, key: jax.Array, settings: UpdateSettings) -> Transitions:
  """Shuffles trajectories and their timesteps, subsamples, and lays out minibatches."""
  num_trajectories, num_steps = rollouts.log_probs.shape
  trajectory_key, time_key = jax.random.split(key)
  order = jax.random.permutation(trajectory_key, num_trajectories)
  time_keys = jax.random.split(time_key, num_trajectories)
  steps = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(time_keys)[:, : settings.num_timesteps_kept]
  rows = order[:, None]  # [N, 1]
  steps = steps[order]  # [N, K]

  def time_major(x):  # [N, K, ...] -> [num_updates, accumulation, M, ...]
    x = jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
    return x.reshape((-1, settings.gradient_accumulation_steps, settings.batch_size) + x.shape[1:])

  num_kept = settings.num_timesteps_kept
  return Transitions(
    latents=time_major(rollouts.latents[rows, steps]),
    next_latents=time_major(rollouts.latents[rows, steps + 1]),
    timesteps=time_major(rollouts.timesteps[steps]),
    old_log_probs=time_major(rollouts.log_probs[rows, steps]),
    advantages=time_major(jnp.broadcast_to(rollouts.advantages[order][:, None], (num_trajectories, num_kept))),
    context=time_major(
      jnp.broadcast_to(rollouts.context[order][:, None], (num_trajectories, num_kept) + rollouts.context.shape[1:])
    ),
  )


def optimizer_step(
  model: models.DiffusionModel,
  optimizer: optax.GradientTransformation,
  state: TrainState,
  transitions: Transitions,
  index: jax.Array,
  negative_context: jax.Array,
  settings: UpdateSettings,
  minibatch_sharding=None,
  params_sharding=None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step over the minibatches `transitions[index]`.

  Args:
    transitions: the inner epoch's transitions, [num_updates, accumulation, M, ...].
    index: int scalar, which optimiser step of the inner epoch this is.
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
    grads, metrics = grad_fn(state.params, minibatch, negative_context, settings)
    return constrain(jax.tree.map(jnp.add, grads_sum, grads)), metrics

  constrain = lambda tree: tree if params_sharding is None else jax.lax.with_sharding_constraint(tree, params_sharding)
  zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
  grads_sum, metrics = jax.lax.scan(accumulate, zeros, group, unroll=settings.unroll_accumulation)
  grads = jax.tree.map(lambda g: g / settings.gradient_accumulation_steps, grads_sum)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, dict(metrics, grad_norm=optax.tree.norm(grads))
