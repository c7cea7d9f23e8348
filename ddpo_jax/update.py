"""The training pass's method-independent parts: the rollouts it trains on,
its static settings, and one optimiser step with gradient accumulation.

Each optimiser step is one device call (`optimizer_step`) that accumulates the
gradients of `gradient_accumulation_steps` minibatches of the method's
examples (`ddpo_jax.methods`: DDPO's transitions, RWR's denoising examples),
clips and applies them, then updates the EMA. No Python loop over timesteps,
no host round trip between steps (metrics stay on the device).

The trained params are the UNet's or LoRA adapters of it (`settings.adapter`
forms the applied UNet params inside the step); the frozen pretrained UNet
("base" below) is a separate input, on the device once: needed with LoRA or
KL, None otherwise.
"""

from __future__ import annotations

from typing import Any
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpo_jax import adapters
from ddpo_jax import models
from ddpo_jax import sampling
from ddpo_jax import train_state


@flax.struct.dataclass
class Rollouts:
  """An epoch's samples, as the training pass needs them.

  Attributes:
    latents: [N, T+1, C, h, w]; log_probs: [N, T]; timesteps: [T];
    context: [N, L, D] prompt embeddings; weights: [N] the method's weight of
    each trajectory (DDPO: its advantage; RWR: its regression weight).
  """

  latents: jax.Array
  log_probs: jax.Array
  timesteps: jax.Array
  context: jax.Array
  weights: jax.Array


@flax.struct.dataclass
class UpdateSettings:
  """Static settings of the training pass."""

  method: str = flax.struct.field(pytree_node=False)
  clip_range: float = flax.struct.field(pytree_node=False)
  batch_size: int = flax.struct.field(pytree_node=False)
  gradient_accumulation_steps: int = flax.struct.field(pytree_node=False)
  num_timesteps_kept: int = flax.struct.field(pytree_node=False)
  sampler: sampling.SamplerSettings = flax.struct.field(pytree_node=False)
  # Accumulate in an unrolled Python loop (config.train.accumulation = "unrolled") instead of lax.scan.
  # XLA's CPU backend runs convolution weight gradients inside a while loop with a generic kernel,
  # far slower than unrolled (docs/speed.md); accelerators keep the loop, which compiles faster.
  # Unrolled minibatches run one after another (`after`).
  unroll_accumulation: bool = flax.struct.field(pytree_node=False, default=False)
  # Rematerialise the UNet's blocks in the backward pass (memory for compute).
  remat: bool = flax.struct.field(pytree_node=False, default=False)
  # What is trained: the UNet's params or LoRA adapters of them.
  adapter: adapters.Adapter = flax.struct.field(pytree_node=False, default=adapters.FullFineTuning())
  # Coefficient of the KL to the base model in the loss (0: not computed).
  kl_coef: float = flax.struct.field(pytree_node=False, default=0.0)
  # Decay of the params' EMA (0: no EMA).
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def needs_base(self) -> bool:
    """Whether the step needs the frozen base UNet (LoRA's base or KL's reference)."""
    return self.adapter.needs_base or self.kl_coef > 0


def num_timesteps_kept(config: ml_collections.ConfigDict) -> int:
  """Timesteps of each trajectory trained on per inner epoch."""
  return int(config.sample.num_steps * config.train.timestep_fraction)


def num_transitions(config: ml_collections.ConfigDict) -> int:
  """Examples of an inner epoch: samples per epoch × kept timesteps."""
  return config.sample.batch_size * config.sample.num_batches_per_epoch * num_timesteps_kept(config)


def num_updates_per_inner_epoch(config: ml_collections.ConfigDict) -> int:
  return num_transitions(config) // (config.train.batch_size * config.train.gradient_accumulation_steps)


def time_major(x: jax.Array, settings: UpdateSettings) -> jax.Array:
  """[N, K, ...] -> [num_updates, accumulation, M, ...], step k of every trajectory before step k+1."""
  x = jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
  return x.reshape((-1, settings.gradient_accumulation_steps, settings.batch_size) + x.shape[1:])


def per_example(x: jax.Array, num_kept: int) -> jax.Array:
  """[N, ...] -> [N, K, ...]: a trajectory's value for each of its K examples."""
  return jnp.broadcast_to(x[:, None], (x.shape[0], num_kept) + x.shape[1:])


def ema_update(ema_params, params, decay: float):
  """decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def after(tree, token):
  """`tree` unchanged in value, but computed after `token` (any pytree of arrays).

  Adds 0 · (one element of `token`) to each floating-point leaf: a data
  dependency that XLA cannot drop. Unrolled on the CPU, XLA's scheduler would
  otherwise run every minibatch's forward pass before any backward pass and
  keep all their activations alive (docs/speed.md has the peak memory and
  step times), and the CPU pipeline removes `lax.optimization_barrier`s
  before it schedules.
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
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
  state: train_state.TrainState,
  examples: Any,
  index: jax.Array,
  negative_context: jax.Array,
  base: Any = None,
  *,
  settings: UpdateSettings,
  minibatch_sharding=None,
  params_sharding=None,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimiser step over the minibatches `examples[index]`, then the EMA.

  Args:
    loss: the method's minibatch loss (`ddpo_jax.methods.base`), of the applied UNet params.
    examples: the inner epoch's examples of the method (DDPO's transitions,
      RWR's denoising examples), [num_updates, accumulation, M, ...].
    index: int scalar, which optimiser step of the inner epoch this is.
    base: the frozen base UNet params when `settings.needs_base`, else None.
    minibatch_sharding, params_sharding: where each minibatch and the summed
      gradients live (the gradients as the params: FSDP-sharded ones stay so).

  Returns:
    The new state and metrics: each [accumulation] (per minibatch), plus the
    scalar "grad_norm" of the averaged gradient.
  """
  group = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), examples)

  def trained_loss(trained, minibatch):
    unet = settings.adapter.unet_params(trained, base)
    return loss(model, unet, minibatch, negative_context, settings, base)

  grad_fn = jax.grad(trained_loss, has_aux=True)

  def accumulate(grads_sum, minibatch):
    if minibatch_sharding is not None:
      minibatch = jax.lax.with_sharding_constraint(minibatch, minibatch_sharding)
    grads, metrics = grad_fn(state.params, minibatch)
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
  new_state = train_state.TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
  return new_state, dict(metrics, grad_norm=optax.tree.norm(grads))
