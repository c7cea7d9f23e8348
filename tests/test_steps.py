"""The compiled steps (ddpo_jax/steps.py): compiled ahead, once, with their memory analysis."""

import chex
import jax
import numpy as np
import pytest

from ddpo_jax import sharding
from ddpo_jax import steps
from ddpo_jax import train_state
from ddpo_jax import update
from tests.conftest import rollouts_of
from tests.conftest import tiny_config


def test_steps_report_their_memory(tiny_run):
  _, _, run, _, _, _ = tiny_run
  assert set(run.memory) == {"sample", "make_examples", "optimizer_step"}  # eval.eta == sample.eta: one sampler
  assert run.eval_sample is run.sample
  for name, memory in run.memory.items():
    assert memory.arguments > 0 and memory.outputs > 0, name
    assert memory.peak == memory.arguments + memory.temporaries + memory.outputs - memory.aliased
  # The step donates its state: the new state's buffers alias the old one's.
  assert run.memory["optimizer_step"].aliased > 0 and run.memory["sample"].aliased == 0
  assert "temporaries" in run.memory["optimizer_step"].describe()


def test_training_compiles_once(tiny_run, tiny_loaded, monkeypatch):
  """Epoch after epoch, the loop calls the steps compiled ahead: each step function is traced once."""
  config, params, _, trajectory, context, _ = tiny_run
  model, _ = tiny_loaded
  # Traced once each while compiling ahead; a retrace (new shapes, another sharding) would raise.
  monkeypatch.setattr(update, "optimizer_step", chex.assert_max_traces(update.optimizer_step, n=1))
  monkeypatch.setattr(steps, "sample", chex.assert_max_traces(steps.sample, n=1))
  run = steps.prepare(config, model, params, sharding.make_mesh(-1, 1))
  state = run.init_state(run.place_unet(params["unet"]), train_state.adapter_key(0))
  negative = run.negative_context(params["text_encoder"])
  rollouts = rollouts_of(trajectory, context, np.linspace(-1, 1, 16))
  for epoch in range(3):
    run.sample(
      dict(params, unet=state.params), None, run.token_ids(["a"] * 16), run.negative_tokens, jax.random.PRNGKey(epoch)
    )
    state, metrics = run.train_inner_epoch(state, rollouts, negative, jax.random.PRNGKey(epoch))
  assert metrics["loss"].shape == (run.num_updates, 2)


def test_a_wrong_shape_is_an_error_not_a_recompilation(tiny_run):
  _, params, run, _, _, _ = tiny_run
  with pytest.raises((TypeError, ValueError)):
    run.sample(params, None, run.token_ids(["a"] * 8), run.negative_tokens, jax.random.PRNGKey(0))


def test_a_different_eval_eta_compiles_its_own_sampler(tiny_loaded, tiny_model_dir):
  model, params = tiny_loaded
  config = tiny_config(tiny_model_dir, **{"eval.eta": 0.0, "train.gradient_accumulation_steps": 4})
  run = steps.prepare(config, model, params, sharding.make_mesh(-1, 1), names=("sample", "eval_sample"))
  assert run.optimizer_step is None and set(run.memory) == {"sample", "eval_sample"}
  assert run.eval_sample is not run.sample
  tokens = run.token_ids(["a red circle"] * 16)
  sample = lambda fn: fn(params, None, tokens, run.negative_tokens, jax.random.PRNGKey(0))[0].latents
  trained, evaluated = np.asarray(sample(run.sample)), np.asarray(sample(run.eval_sample))
  np.testing.assert_array_equal(trained[:, 0], evaluated[:, 0])  # the same x_T from the same key ...
  assert np.abs(trained[:, -1] - evaluated[:, -1]).max() > 1e-3  # ... denoised without the steps' noise


def test_fsdp_step_needs_no_more_temporaries_than_data_parallel(tiny_loaded, tiny_model_dir):
  """With all 8 devices on the fsdp axis, each device computes the UNet on its own rows only: the compiled
  optimizer step's temporaries per device are at most those of the data-parallel mesh (not the whole
  batch's activations on every device)."""
  model, params = tiny_loaded
  config = tiny_config(tiny_model_dir, **{"mesh.fsdp": 8, "mesh.min_sharded_fraction": 0.0})
  memory = {}
  for data, fsdp in ((8, 1), (1, 8)):
    run = steps.prepare(config, model, params, sharding.make_mesh(data, fsdp), names=("optimizer_step",))
    memory[(data, fsdp)] = run.memory["optimizer_step"]
  print({k: m.describe() for k, m in memory.items()})
  data_parallel, fsdp = memory[(8, 1)], memory[(1, 8)]
  # Within 0.5%: the fsdp step also holds a layer's all-gathered weights as temporaries (data parallelism
  # has them among its arguments). Without the constraints the fsdp step needed 12% more (12.7 vs 11.3 MB).
  assert fsdp.temporaries <= 1.005 * data_parallel.temporaries
  assert fsdp.peak < data_parallel.peak
