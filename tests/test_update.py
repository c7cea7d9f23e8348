"""The optimiser step (ddpo_jax/update.py): sharded == unsharded, accumulation unrolled == looped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpo_jax import config_utils
from ddpo_jax import sharding
from ddpo_jax import steps
from ddpo_jax import train_state
from ddpo_jax import update
from tests.conftest import rollouts_of

# The steps a training pass calls (the samplers are not compiled).
TRAINING_STEPS = ("make_examples", "optimizer_step")


def one_update(model, params, config, trajectory, context, mesh):
  run = steps.prepare(config, model, params, mesh, names=TRAINING_STEPS)
  state = run.init_state(run.place_unet(params["unet"]), train_state.adapter_key(config.seed))
  if mesh.shape["fsdp"] > 1:  # the big kernels and their Adam moments really are split
    assert sharding.sharded_fraction(run.layout.state, run.layout.state_sharding) > 0.9
    kernel = state.params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.addressable_shards[0].data.size == kernel.size // mesh.shape["fsdp"]
  rollouts = rollouts_of(trajectory, context, np.linspace(-1, 1, 16))
  rollouts = jax.device_put(jax.device_get(rollouts))
  negative = run.negative_context(params["text_encoder"])
  state, metrics = run.train_inner_epoch(state, rollouts, negative, jax.random.PRNGKey(7))
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def comparable_update(tiny_run, tiny_loaded):
  """A config whose single update compares across meshes, and its 1-device result."""
  config, params, _, trajectory, context, _ = tiny_run
  model, _ = tiny_loaded
  config = config.copy_and_resolve_references()
  config.train.gradient_accumulation_steps = 4  # one optimiser step over all 64 transitions
  # Adam's first step is lr * g / (|g| + eps): with eps >> |g| it is linear in
  # g, so the params compare the all-reduced gradients themselves (with the
  # default eps it is ~lr * sign(g), and last-bit noise flips tiny g's signs).
  config.train.adam_eps = 1.0
  config.train.learning_rate = 1.0
  config.mesh.fsdp_min_size = 256  # the tiny UNet's kernels are small: shard them anyway
  single = one_update(model, params, config, trajectory, context, sharding.make_mesh(1, 1, jax.devices()[:1]))
  return config, single


# (data, fsdp) meshes of the 8 CPU devices: pure data parallel, mixed, pure FSDP.
@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4), (1, 8)])
def test_update_on_8_devices_equals_1_device(tiny_run, tiny_loaded, comparable_update, data, fsdp):
  _, params, _, trajectory, context, _ = tiny_run
  model, _ = tiny_loaded
  config, (single_params, single_metrics) = comparable_update
  assert jax.device_count() == 8
  multi_params, multi_metrics = one_update(model, params, config, trajectory, context, sharding.make_mesh(data, fsdp))
  np.testing.assert_allclose(multi_metrics["loss"], single_metrics["loss"], atol=1e-6)  # |A| ~ 1
  np.testing.assert_allclose(multi_metrics["grad_norm"], single_metrics["grad_norm"], rtol=1e-5)
  changed = False
  for a, b, p0 in zip(jax.tree.leaves(single_params), jax.tree.leaves(multi_params), jax.tree.leaves(params["unet"])):
    # The updates are ~1e-3..1e-1; FSDP reduce-scatters sum in another order (~1e-6 measured).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-6)
    changed |= not np.allclose(a, np.asarray(p0))
  assert changed


def test_after_keeps_values_and_adds_a_dependency():
  tree = {"x": jnp.array([-0.0, 1.5, -2.0]), "ids": jnp.array([1, 2], jnp.int32)}
  token = {"g": jnp.array([[3.0, 4.0]])}
  out = update.after(tree, token)
  np.testing.assert_array_equal(out["x"], tree["x"])
  np.testing.assert_array_equal(out["ids"], tree["ids"])
  jaxpr = jax.make_jaxpr(update.after)(tree, token).jaxpr
  token_var = jaxpr.invars[-1]
  assert any(token_var in eqn.invars for eqn in jaxpr.eqns)  # the token is read


def step_for_accumulation(tiny_run, tiny_loaded, accumulation, unroll):
  """(the run's compiled optimiser step over 64 transitions in `accumulation` minibatches, its arguments)."""
  config, params, _, trajectory, context, _ = tiny_run
  model, _ = tiny_loaded
  config = config_utils.override(
    config.copy_and_resolve_references(),
    {
      "train.batch_size": 64 // accumulation,
      "train.gradient_accumulation_steps": accumulation,
      "train.accumulation": "unrolled" if unroll else "scan",
      # An update linear in g (comparable_update).
      "train.adam_eps": 1.0,
      "train.learning_rate": 1.0,
    },
  )
  run = steps.prepare(config, model, params, sharding.make_mesh(1, 1, jax.devices()[:1]), names=TRAINING_STEPS)
  assert run.settings.unroll_accumulation == unroll
  rollouts = jax.device_put(jax.device_get(rollouts_of(trajectory, context, np.linspace(-1, 1, 16))))
  args = (
    run.init_state(run.place_unet(params["unet"]), train_state.adapter_key(0)),
    run.make_examples(rollouts, jax.random.PRNGKey(3)),
    np.int32(0),
    run.negative_context(params["text_encoder"]),
    None,
  )
  return run.optimizer_step, args


def test_unrolled_accumulation_equals_the_loop_and_runs_minibatches_in_turn(tiny_run, tiny_loaded):
  """The CPU's unrolled accumulation computes what lax.scan does, and keeps one
  minibatch's activations at a time (XLA would otherwise run all forward passes first)."""
  unrolled, args = step_for_accumulation(tiny_run, tiny_loaded, 4, unroll=True)
  looped, looped_args = step_for_accumulation(tiny_run, tiny_loaded, 4, unroll=False)
  # Each step donates its state: fresh copies for each.
  copy = lambda a: jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, a)
  (state_a, metrics_a), (state_b, metrics_b) = unrolled(*copy(args)), looped(*copy(looped_args))
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-6)
  one_minibatch, _ = step_for_accumulation(tiny_run, tiny_loaded, 1, unroll=True)
  per_minibatch = one_minibatch.memory_analysis().temp_size_in_bytes  # a minibatch of 64, not 16
  assert unrolled.memory_analysis().temp_size_in_bytes < 0.6 * per_minibatch


def test_ema_update_by_hand():
  ema = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
  params = {"w": jnp.array([3.0, -2.0]), "b": jnp.array(0.0)}
  out = update.ema_update(ema, params, 0.9)
  np.testing.assert_allclose(out["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 3.6, rtol=1e-6)
