"""Shared fixtures. Eight fake CPU devices are set before jax is imported, so
that sharding is real; tests that need one device build a 1-device mesh.

The session shares one persistent compilation cache, in a fresh folder removed at its end (the tests'
subprocesses too, through the environment): many tests compile the same tiny programs, and XLA:CPU spends
minutes on the tiny training step. A program is looked up by its HLO, devices and flags, so a hit is the same
program; a test that needs its own cache sets JAX_COMPILATION_CACHE_DIR itself."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU tests compile for compile-only devices and open no chip: without this, libtpu's lockfile fails them
# while any other process on the machine (another test session, a planner) has libtpu loaded.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="ddpo_jax_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
else:
  _SESSION_CACHE = None

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


from tests import tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A tiny random SD-shaped model saved in diffusers' layout (loads via models.load)."""
  path = tmp_path_factory.mktemp("tiny_model")
  tiny_model.save_tiny_model(str(path))
  return str(path)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
  from ddpo_jax import models

  return models.load(tiny_model_dir)


# The training values the tests using the tiny preset were written for (the
# preset's before it gained KL and a second inner epoch): one on-policy
# optimiser step per epoch, no reference forward pass.
TESTS_TRAINING = {
  "train.kl_coef": 0.0,
  "train.num_inner_epochs": 1,
  "train.clip_range": 1e-4,
  "train.learning_rate": 3e-4,
}


def tiny_config(model_dir, **overrides):
  """configs/compress.py:tiny on the tests' tiny model: 16 samples of 4 steps, minibatches of 16."""
  from ddpo_jax import config_utils

  config = config_utils.get_config("configs/compress.py:tiny")
  values = {
    **TESTS_TRAINING,
    "model.name": model_dir,
    "sample.batch_size": 16,
    "sample.num_batches_per_epoch": 1,
    "sample.num_steps": 4,
    "train.batch_size": 16,
    "train.gradient_accumulation_steps": 2,
  }
  return config_utils.override(config, dict(values, **overrides))


def rollouts_of(trajectory, context, weights):
  import jax.numpy as jnp

  from ddpo_jax import update

  return update.Rollouts(
    latents=trajectory.latents,
    log_probs=trajectory.log_probs,
    timesteps=trajectory.timesteps,
    context=context,
    weights=jnp.asarray(weights, jnp.float32),
  )


@pytest.fixture(scope="session")
def tiny_run(tiny_loaded, tiny_model_dir):
  """The tiny model's compiled steps on 8 devices (data parallel) and one sampling call of 16 toy captions.

  Returns (config, params, run, trajectory, context, images); `run.model` is
  the model with the attention the config resolves to, as the trainer uses it.
  """
  import jax

  from ddpo_jax import sharding
  from ddpo_jax import steps
  from ddpo_jax.toy import shapes

  _, params = tiny_loaded
  model, _ = tiny_loaded
  config = tiny_config(tiny_model_dir)
  run = steps.prepare(config, model, params, sharding.make_mesh(-1, 1))
  captions = [s.caption for s in shapes.all_scenes()[:: len(shapes.all_scenes()) // 16][:16]]
  trajectory, context, images = run.sample(
    params, None, run.token_ids(captions), run.negative_tokens, jax.random.PRNGKey(0)
  )
  return config, params, run, trajectory, context, images


def random_transitions(model, params, m=8):
  """DDPO transitions [m] of random latents at the 4-step schedule's timesteps, with toy captions' context."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ddpo_jax import ddim
  from ddpo_jax import models
  from ddpo_jax.methods import ddpo
  from ddpo_jax.toy import shapes

  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  shape = (m, model.latent_channels, model.latent_size, model.latent_size)
  steps = ddim.inference_timesteps(model.schedule.num_train_timesteps, 4, model.schedule.steps_offset)
  token_ids = models.tokenize(model, [s.caption for s in shapes.all_scenes()[:m]])
  return ddpo.Transitions(
    latents=jax.random.normal(keys[0], shape),
    next_latents=jax.random.normal(keys[1], shape),
    timesteps=jnp.asarray(np.resize(steps, m), jnp.int32),
    old_log_probs=jnp.zeros((m,)),
    advantages=jax.random.normal(keys[2], (m,)),
    context=models.encode_prompts(model, params["text_encoder"], token_ids),
  )
