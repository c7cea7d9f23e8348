"""The train state: what the optimiser updates and checkpoints, its shapes and shardings.

The state is laid out from shapes alone (`layout`, through jax.eval_shape), so
nothing is built on one device: the compiled `init` creates it on the mesh
with its shardings, and orbax restores into the same abstract tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from ddpo_jax import adapters
from ddpo_jax import sharding

# fold_in of the root key that draws the LoRA adapters' initialisation (epochs use 0, 1, ...).
ADAPTER_INIT_FOLD = 2**31 - 1


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


def init(
  unet_params: Any,
  key: jax.Array,
  *,
  adapter: adapters.Adapter,
  optimizer: optax.GradientTransformation,
  ema: bool,
) -> TrainState:
  """The state at step 0 from the pretrained UNet params (with LoRA only their shapes are read)."""
  trained = adapter.init(key, unet_params)
  # A copy (not the same buffer): the state is donated leaf by leaf.
  ema_params = jax.tree.map(jnp.copy, trained) if ema else None
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=trained, opt_state=optimizer.init(trained), ema_params=ema_params
  )


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Shapes and shardings of a run's train state and of the UNet it trains.

  Attributes:
    state: the TrainState as jax.ShapeDtypeStructs with their shardings (what
      orbax restores into).
    state_sharding: the TrainState's NamedShardings.
    unet: the pretrained UNet params as ShapeDtypeStructs with shardings: the
      input of `init` and, when `needs_base`, the frozen base of the steps.
    unet_sharding: their NamedShardings (the partition rules over "params/..." paths).
    needs_base: whether the steps take the frozen UNet as an input (LoRA's
      base, KL's reference); otherwise they are passed None.
  """

  state: TrainState
  state_sharding: TrainState
  unet: Any
  unet_sharding: Any
  needs_base: bool

  @property
  def base(self) -> Any:
    """The abstract frozen base UNet of the steps, or None."""
    return self.unet if self.needs_base else None

  @property
  def base_sharding(self) -> Any:
    return self.unet_sharding if self.needs_base else None


def layout(
  config: ml_collections.ConfigDict,
  unet_shapes: Any,
  mesh: Mesh,
  adapter: adapters.Adapter,
  optimizer: optax.GradientTransformation,
  needs_base: bool,
) -> StateLayout:
  """The state's shapes (from `unet_shapes`, arrays or ShapeDtypeStructs) and its shardings on `mesh`.

  Raises ValueError naming config.lora.targets when LoRA targets match nothing.
  """
  rules = [tuple(rule) for rule in config.mesh.partition_rules]
  unet_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), unet_shapes)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  state_shapes = jax.eval_shape(
    lambda u, k: init(u, k, adapter=adapter, optimizer=optimizer, ema=config.train.ema_decay > 0), unet_shapes, key
  )
  state_sharding = sharding.tree_shardings(state_shapes, mesh, rules, config.mesh.fsdp_min_size)
  if state_shapes.ema_params is not None:  # the EMA lives where the params do, whatever the rules say
    state_sharding = state_sharding.replace(ema_params=state_sharding.params)
  unet_sharding = sharding.tree_shardings({"params": unet_shapes}, mesh, rules, config.mesh.fsdp_min_size)["params"]
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return StateLayout(
    state=jax.tree.map(with_sharding, state_shapes, state_sharding),
    state_sharding=state_sharding,
    unet=jax.tree.map(with_sharding, unet_shapes, unet_sharding),
    unet_sharding=unet_sharding,
    needs_base=needs_base,
  )


def adapter_key(seed: int) -> jax.Array:
  """The key of the adapters' initialisation (unused by full fine-tuning)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), ADAPTER_INIT_FOLD)


def sharded_state_fraction(state_layout: StateLayout) -> float:
  """Fraction of the bytes of the state (and of the frozen base UNet, when used) split over some mesh axis."""
  trees = [(state_layout.state, state_layout.state_sharding)]
  if state_layout.needs_base:
    trees.append((state_layout.unet, state_layout.unet_sharding))
  total = sum(sharding.bytes_of(tree) for tree, _ in trees)
  sharded = sum(sharding.sharded_fraction(tree, s) * sharding.bytes_of(tree) for tree, s in trees)
  return sharded / max(total, 1)


def bytes_per_device(state_layout: StateLayout) -> int:
  """Bytes of the state (and of the frozen base UNet, when used) that each device holds."""
  total = sharding.bytes_per_device(state_layout.state, state_layout.state_sharding)
  if state_layout.needs_base:
    total += sharding.bytes_per_device(state_layout.unet, state_layout.unet_sharding)
  return total


def check_sharded(state_layout: StateLayout, mesh: Mesh, min_fraction: float) -> str | None:
  """With an fsdp axis, what is wrong when less than `min_fraction` of the state's bytes are sharded, or None.

  MaxText's `assert_params_sufficiently_sharded` in spirit: partition rules
  that replicate the large params defeat FSDP silently (every device holds
  everything), so the run stops before it compiles.
  """
  if mesh.shape["fsdp"] == 1 or not min_fraction:
    return None
  fraction = sharded_state_fraction(state_layout)
  if fraction >= min_fraction:
    return None
  return (
    f"only {100 * fraction:.0f}% of the train state's bytes are sharded over the fsdp axis of mesh "
    f"{dict(mesh.shape)}, below config.mesh.min_sharded_fraction={min_fraction}: make config.mesh.partition_rules "
    "shard the large params ('fsdp'), lower config.mesh.fsdp_min_size, or set config.mesh.fsdp=1."
  )
