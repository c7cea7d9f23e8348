"""The training methods (ddpo_jax/methods): DDPO's transitions and on-policy ratio, IS vs SF, the losses by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpo_jax import config_utils
from ddpo_jax import methods
from ddpo_jax import models
from ddpo_jax import objectives
from ddpo_jax import rewards
from ddpo_jax import steps
from ddpo_jax.methods import ddpo
from tests.conftest import random_transitions
from tests.conftest import rollouts_of

# Float32 reassociation on the CPU makes the training pass's UNet (transitions
# of mixed timesteps, another batch layout) differ from the sampling pass's in
# the last bits; measured here up to ~2e-6 in the ratio. DDPO_IS clips at
# 1e-4, so a deviation 10x below the clip range still leaves the first
# minibatch's gradient intact.
ON_POLICY_TOLERANCE = 1e-5


def test_every_method_is_a_registered_record():
  assert methods.names() == ("ddpo_is", "ddpo_sf", "rwr", "rwr_sparse")
  for name in methods.names():
    method = methods.get(name)
    assert method.name == name and callable(method.loss) and callable(method.make_examples)
  with pytest.raises(ValueError, match="config.train.method='ppo' is unknown"):
    methods.get("ppo")


def test_sample_shapes(tiny_run):
  config, _, run, trajectory, context, images = tiny_run
  model = run.model
  n, t = config.sample.batch_size, config.sample.num_steps
  assert trajectory.latents.shape == (n, t + 1, 4, 8, 8)
  assert trajectory.log_probs.shape == (n, t)
  np.testing.assert_array_equal(np.asarray(trajectory.timesteps), [751, 501, 251, 1])
  assert images.shape == (n, model.image_size, model.image_size, 3) and images.dtype == jnp.uint8
  assert context.shape == (n, model.max_prompt_tokens, model.text_hidden_size)


@pytest.mark.parametrize("batch_size", [64, 16, 8])
def test_on_policy_ratio_is_one(tiny_run, batch_size):
  """Before any update, the training pass recomputes the sampling log-probs."""
  _, params, run, trajectory, context, _ = tiny_run
  settings = run.settings.replace(batch_size=batch_size, gradient_accumulation_steps=1)
  rollouts = rollouts_of(trajectory, context, np.zeros(16))
  transitions = ddpo.make_transitions(rollouts, jax.random.PRNGKey(3), settings)
  negative = run.negative_context(params["text_encoder"])
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[3:]), transitions)

  @jax.jit
  def log_probs(minibatch):
    return ddpo.transition_log_probs(run.model, params["unet"], minibatch, negative, settings.sampler)

  for start in range(0, flat.timesteps.shape[0], batch_size):
    minibatch = jax.tree.map(lambda x, s=start: x[s : s + batch_size], flat)
    ratio = np.exp(np.asarray(log_probs(minibatch)) - np.asarray(minibatch.old_log_probs))
    assert np.max(np.abs(ratio - 1)) < ON_POLICY_TOLERANCE, np.max(np.abs(ratio - 1))


def test_transitions_keep_trajectories_together(tiny_run):
  _, _, run, trajectory, context, _ = tiny_run
  advantages = np.arange(16, dtype=np.float32)
  transitions = ddpo.make_transitions(rollouts_of(trajectory, context, advantages), jax.random.PRNGKey(5), run.settings)
  flat = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[3:]), transitions)
  latents = np.asarray(trajectory.latents)
  steps = {int(t): j for j, t in enumerate(np.asarray(trajectory.timesteps))}
  seen = set()
  for k in range(flat.timesteps.shape[0]):
    i, j = int(flat.advantages[k]), steps[int(flat.timesteps[k])]
    np.testing.assert_array_equal(flat.latents[k], latents[i, j])
    np.testing.assert_array_equal(flat.next_latents[k], latents[i, j + 1])
    np.testing.assert_array_equal(flat.old_log_probs[k], np.asarray(trajectory.log_probs)[i, j])
    seen.add((i, j))
  assert len(seen) == 16 * 4  # every transition exactly once (timestep_fraction 1)


def test_is_gradient_equals_sf_gradient_at_ratio_one(tiny_run):
  _, params, run, trajectory, context, _ = tiny_run
  rng = np.random.default_rng(0)
  rollouts = rollouts_of(trajectory, context, rng.standard_normal(16))
  minibatch = jax.tree.map(lambda x: x[0, 0], ddpo.make_transitions(rollouts, jax.random.PRNGKey(1), run.settings))
  negative = run.negative_context(params["text_encoder"])

  def grad(method):
    loss = methods.get(method).loss
    settings = run.settings.replace(method=method)
    return jax.jit(jax.grad(lambda p: loss(run.model, p, minibatch, negative, settings)[0]))(params["unet"])

  is_grad, sf_grad = grad("ddpo_is"), grad("ddpo_sf")
  is_flat, sf_flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (is_grad, sf_grad)]
  assert np.linalg.norm(sf_flat) > 0
  np.testing.assert_allclose(is_flat, sf_flat, rtol=1e-3, atol=1e-5 * np.abs(sf_flat).max())


def test_clipped_loss_by_hand():
  log_probs = jnp.log(jnp.array([1.5, 0.5, 1.0, 1.00005]))
  old = jnp.zeros(4)
  advantages = jnp.array([1.0, 1.0, -2.0, 1.0])
  loss, metrics = objectives.clipped_importance_loss(log_probs, old, advantages, clip_range=0.2)
  # max(-A r, -A clip(r)): [-1.2, -0.5, 2.0, -1.00005]
  np.testing.assert_allclose(float(loss), np.mean([-1.2, -0.5, 2.0, -1.00005]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["clipfrac"]), 0.5)
  np.testing.assert_allclose(
    float(metrics["approx_kl"]), 0.5 * np.mean(np.log([1.5, 0.5, 1.0, 1.00005]) ** 2), rtol=1e-5
  )


# KL to the pretrained model, full fine-tuning: against NumPy, and 0 with 0 gradient at the reference.


def test_kl_term_of_the_loss(tiny_loaded, tiny_model_dir):
  model, params = tiny_loaded
  config = config_utils.override(config_utils.get_config("configs/compress.py:tiny"), {"train.kl_coef": 0.5})
  config.sample.num_steps = 4
  settings = steps.update_settings(config)
  minibatch = random_transitions(model, params)
  negative = models.encode_prompts(model, params["text_encoder"], models.tokenize(model, [""]))[0]
  base = params["unet"]
  noise = jax.tree.map(lambda x: 0.01 * np.random.default_rng(x.size).standard_normal(x.shape), base)
  moved = jax.tree.map(lambda x, n: (x + n).astype(np.float32), base, noise)

  @jax.jit
  def evaluate(trained, minibatch, base):
    (loss, metrics), grads = jax.value_and_grad(ddpo.DDPO_IS.loss, argnums=1, has_aux=True)(
      model, trained, minibatch, negative, settings, base
    )
    policy, _ = ddpo.DDPO_IS.loss(model, trained, minibatch, negative, settings.replace(kl_coef=0.0))
    means = [ddpo.transition_distribution(model, p, minibatch, negative, settings.sampler) for p in (trained, base)]
    return loss, metrics, grads, policy, means

  loss, metrics, _, policy, ((mean, std), (reference, _)) = evaluate(moved, minibatch, base)
  mean, std, reference = (np.asarray(x, np.float64) for x in (mean, std, reference))
  expected = np.mean(np.mean((mean - reference) ** 2 / (2 * std**2), axis=(1, 2, 3)))
  assert expected > 0
  np.testing.assert_allclose(float(metrics["kl_to_reference"]), expected, rtol=1e-4)
  np.testing.assert_allclose(float(loss), float(policy) + 0.5 * expected, rtol=1e-5)

  # At the reference, with zero advantages (no policy gradient): KL and gradient 0, up to the
  # float32 rounding of two compilations of the same UNet pass (the policy's runs the attention's
  # forward rule that keeps residuals, the reference's does not), against the 0.01-perturbed params.
  zero = minibatch.replace(advantages=jnp.zeros_like(minibatch.advantages))
  _, moved_metrics, moved_grads, _, _ = evaluate(moved, zero, base)
  loss, metrics, grads, _, _ = evaluate(base, zero, base)
  moved_kl = float(moved_metrics["kl_to_reference"])
  assert abs(float(metrics["kl_to_reference"])) < 1e-4 * moved_kl and abs(float(loss)) < 1e-4 * moved_kl
  assert float(optax.tree.norm(grads)) < 1e-3 * float(optax.tree.norm(moved_grads))


def test_group_epoch_advantages_clip_and_log_ties():
  scored = rewards.ScoredBatch(
    rewards=np.array([0.0, 0.0, 0.0, 10.0, 1.0, 1.0, 1.0, 1.0], np.float32),
    valid=np.array([True] * 8),
    parts={},
  )
  adv, metrics = ddpo.group_relative_advantages(scored, 4, "group", clip=1.5, epoch=0)
  np.testing.assert_allclose(adv, [-1 / np.sqrt(3)] * 3 + [1.5] + [0] * 4, rtol=1e-5)
  assert metrics == {"group_tied_fraction": 0.5}
