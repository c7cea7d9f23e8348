"""Sharding constraints inside the models: every device computes on its own rows of a batch.

With params sharded over a mesh axis (fsdp), XLA's partitioner may otherwise run a layer
on the whole global batch on every device (gathering activations instead of weights). The
constraints below pin activations [B, ...] to their rows over all of the mesh's axes, as
ddpo_jax shards its batches (`sharding.BATCH_AXES` = every axis of its mesh).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpo_jax.models.attention import AttentionFn


@functools.cache
def batch_constraint(mesh: jax.sharding.Mesh) -> Callable[[jax.Array], jax.Array]:
  """x [B, ...] -> x with its rows split over every axis of `mesh` (unchanged when B is not a multiple of
  the mesh's size, as for a batch smaller than the devices). Cached: one function per mesh, so
  modules holding it compare equal."""
  rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))

  def constrain(x: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, rows) if x.shape[0] % mesh.size == 0 else x

  return constrain


@functools.cache
def constrained_attention(attention_fn: AttentionFn, mesh: jax.sharding.Mesh) -> AttentionFn:
  """`attention_fn` whose queries, keys, values and output are constrained to their rows over `mesh`."""
  constrain = batch_constraint(mesh)

  def attention(query, key, value, mask=None, scale=None):
    out = attention_fn(constrain(query), constrain(key), constrain(value), mask=mask, scale=scale)
    return constrain(out)

  return attention
