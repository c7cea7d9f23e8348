"""The mesh, partition rules and the row-gathering helpers (ddpo_jax/sharding.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax import sharding


def test_partition_rules():
  mesh = sharding.make_mesh(2, 4)
  tree = {
    "conv": {"kernel": jnp.zeros((3, 3, 64, 128)), "bias": jnp.zeros((128,))},
    "proj": {"kernel": jnp.zeros((6, 512))},  # only the last dim divides by 4
    "odd": {"kernel": jnp.zeros((7, 9, 11, 13))},  # no dim divides by 4
    "norm": {"scale": jnp.zeros((4096,))},
  }
  rules = [(r"norm", "replicate"), (r"kernel", "fsdp")]
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, mesh, rules, min_size=100))
  assert specs["conv"]["kernel"] == jax.sharding.PartitionSpec(None, None, None, "fsdp")  # the largest dim
  assert specs["conv"]["bias"] == jax.sharding.PartitionSpec()  # no rule matches: replicated
  assert specs["proj"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp")
  assert specs["odd"]["kernel"] == jax.sharding.PartitionSpec()
  assert specs["norm"]["scale"] == jax.sharding.PartitionSpec()
  small = sharding.tree_shardings(tree, mesh, rules, min_size=10**6)
  assert sharding.sharded_fraction(tree, small) == 0
  full = sharding.tree_shardings(tree, mesh, rules, min_size=100)
  conv_bytes = 3 * 3 * 64 * 128 * 4
  assert sharding.bytes_per_device(tree, full) == sharding.bytes_per_device(tree, small) - conv_bytes * 3 // 4 - (
    6 * 512 * 4 * 3 // 4
  )


def test_gather_rows_and_prompts_in_one_process_keep_the_order():
  values = np.arange(12.0)
  np.testing.assert_array_equal(sharding.gather_rows(values, 3), values)
  prompts = [f"p{i}" for i in range(6)]
  assert sharding.gather_prompts(prompts, 2) == prompts


def test_bytes_of_counts_every_leaf():
  tree = {"a": jnp.zeros((3, 4), jnp.float32), "b": jax.ShapeDtypeStruct((5,), jnp.int8)}
  assert sharding.bytes_of(tree) == 3 * 4 * 4 + 5
