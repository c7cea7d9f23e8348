"""The train state's layout (ddpo_jax/train_state.py): shapes and shardings from shapes alone, and the check
that FSDP really shards it."""

import jax
import numpy as np

from ddpo_jax import adapters
from ddpo_jax import config_utils
from ddpo_jax import sharding
from ddpo_jax import train_state


def layout_of(params, **overrides):
  config = config_utils.override(config_utils.get_config("configs/compress.py:tiny"), overrides)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  adapter = adapters.from_config(config)
  optimizer = train_state.make_optimizer(config.train)
  needs_base = adapter.needs_base or config.train.kl_coef > 0
  return train_state.layout(config, params["unet"], mesh, adapter, optimizer, needs_base), mesh


def test_layout_from_shapes_alone(tiny_loaded):
  _, params = tiny_loaded
  shapes = {"unet": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["unet"])}
  layout, _ = layout_of(shapes, **{"train.ema_decay": 0.5, "train.kl_coef": 0.0})
  assert jax.tree.structure(layout.state.params) == jax.tree.structure(params["unet"])
  assert layout.state_sharding.ema_params == layout.state_sharding.params
  assert layout.base is None and layout.base_sharding is None  # full fine-tuning without KL
  kl_layout, _ = layout_of(shapes, **{"train.kl_coef": 0.1})  # the KL's reference: the pretrained params
  assert jax.tree.structure(kl_layout.base) == jax.tree.structure(params["unet"]) and kl_layout.needs_base
  lora_layout, _ = layout_of(shapes, **{"lora.rank": 2})
  assert lora_layout.base is lora_layout.unet and lora_layout.needs_base


def test_replicating_rules_under_fsdp_are_refused(tiny_loaded):
  _, params = tiny_loaded
  replicated, mesh = layout_of(
    params, **{"mesh.data": 1, "mesh.fsdp": 8, "mesh.partition_rules": ((".*", "replicate"),)}
  )
  problem = train_state.check_sharded(replicated, mesh, 0.5)
  assert "only 0% of the train state's bytes are sharded" in problem and "config.mesh.min_sharded_fraction" in problem
  assert train_state.check_sharded(replicated, mesh, 0.0) is None  # 0: no check
  sharded, mesh = layout_of(params, **{"mesh.data": 1, "mesh.fsdp": 8, "mesh.fsdp_min_size": 256})
  assert train_state.sharded_state_fraction(sharded) > 0.9 and train_state.check_sharded(sharded, mesh, 0.5) is None
  per_device = train_state.bytes_per_device(sharded)
  assert per_device < 0.3 * train_state.bytes_per_device(replicated)
  data_parallel, mesh = layout_of(params, **{"mesh.data": 8, "mesh.fsdp": 1})
  assert train_state.check_sharded(data_parallel, mesh, 0.5) is None  # nothing to shard without an fsdp axis
  assert np.isclose(train_state.sharded_state_fraction(data_parallel), 0.0)
