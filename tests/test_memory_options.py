"""The memory options of the training pass: rematerialised UNet blocks (same
gradients) and bfloat16 compute over float32 master weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpo_jax import ddim
from ddpo_jax import models
from ddpo_jax import sampling
from ddpo_jax import update
from ddpo_jax.methods import ddpo

M = 8  # transitions


def transitions(model, params):
  """Random (x_t, x_{t-1}) pairs at the sampler's timesteps, with real prompt embeddings."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  shape = (M, model.latent_channels, model.latent_size, model.latent_size)
  schedule = model.schedule
  steps = ddim.inference_timesteps(schedule.num_train_timesteps, 4, schedule.steps_offset)
  timesteps = jnp.asarray(np.random.default_rng(0).choice(steps, M), dtype=jnp.int32)
  token_ids = models.tokenize(model, ["a red circle on a plain blue background"] * M)
  context = models.encode_prompts(model, params["text_encoder"], token_ids)
  return ddpo.Transitions(
    latents=jax.random.normal(keys[0], shape),
    next_latents=jax.random.normal(keys[1], shape),
    timesteps=timesteps,
    old_log_probs=jnp.zeros((M,)),
    advantages=jax.random.normal(keys[2], (M,)),
    context=context,
  )


def settings(remat=False):
  return update.UpdateSettings(
    method="ddpo_is",
    clip_range=1e-4,
    batch_size=M,
    gradient_accumulation_steps=1,
    num_timesteps_kept=4,
    sampler=sampling.SamplerSettings(num_steps=4, eta=1.0, guidance_scale=5.0),
    remat=remat,
  )


def gradients(model, params, minibatch, negative, remat):
  loss = functools.partial(ddpo.DDPO_IS.loss, model, settings=settings(remat))
  return jax.jit(jax.grad(lambda p: loss(p, minibatch, negative)[0]))(params["unet"])


def test_remat_gives_the_same_gradients(tiny_loaded):
  model, params = tiny_loaded
  minibatch = transitions(model, params)
  negative = models.encode_prompts(model, params["text_encoder"], models.tokenize(model, [""]))[0]
  plain = gradients(model, params, minibatch, negative, remat=False)
  rematerialised = gradients(model, params, minibatch, negative, remat=True)
  assert jax.tree.structure(plain) == jax.tree.structure(rematerialised)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_keeps_float32_weights_and_log_probs(tiny_model_dir, tiny_loaded):
  model32, params = tiny_loaded
  model16, params16 = models.load(tiny_model_dir, dtype="bfloat16")
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params16))  # master weights
  minibatch = transitions(model32, params)
  negative = models.encode_prompts(model32, params["text_encoder"], models.tokenize(model32, [""]))[0]
  log_probs = jax.jit(lambda p: ddpo.transition_log_probs(model16, p, minibatch, negative, settings().sampler))(
    params["unet"]
  )
  reference = ddpo.transition_log_probs(model32, params["unet"], minibatch, negative, settings().sampler)
  assert log_probs.dtype == jnp.float32 and np.isfinite(log_probs).all()
  # bfloat16 has 8 mantissa bits: the UNet's output is ~1e-2 relative off.
  np.testing.assert_allclose(log_probs, reference, rtol=0.05, atol=0.05)

  grads16 = gradients(model16, params, minibatch, negative, remat=False)
  grads32 = gradients(model32, params, minibatch, negative, remat=False)
  assert all(g.dtype == np.float32 for g in jax.tree.leaves(grads16))
  flat16, flat32 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads16, grads32))
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > 0.95, cosine
  optimizer = optax.adamw(1e-3)
  updates, _ = optimizer.update(grads16, optimizer.init(params["unet"]), params["unet"])
  new_params = optax.apply_updates(params["unet"], updates)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(new_params))
