"""The DDIM log-probability against a plain NumPy version of DDPO.md's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpo_jax
from ddpo_jax import ddim


def sd_alphas_cumprod():
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def numpy_step(model_output, t, x_t, prev, alphas, final_alpha, step_ratio, eta, prediction_type):
  """DDPO.md's formula, written out independently in float64 NumPy."""
  a_t = alphas[t]
  a_prev = alphas[t - step_ratio] if t - step_ratio >= 0 else final_alpha
  if prediction_type == "epsilon":
    eps = model_output
    x0 = (x_t - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
  elif prediction_type == "v_prediction":
    x0 = np.sqrt(a_t) * x_t - np.sqrt(1 - a_t) * model_output
    eps = np.sqrt(a_t) * model_output + np.sqrt(1 - a_t) * x_t
  else:
    x0 = model_output
    eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
  var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
  sigma = eta * np.sqrt(var)
  mu = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
  sigma = max(sigma, 1e-6)
  logp = -((prev - mu) ** 2) / (2 * sigma**2) - np.log(sigma) - 0.5 * np.log(2 * np.pi)
  return mu, sigma, logp.reshape(logp.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [981, 501, 21, 1])  # t = 1 is the last step (t' < 0)
def test_log_prob_matches_numpy(prediction_type, t):
  rng = np.random.default_rng(t)
  alphas = sd_alphas_cumprod()
  x_t = rng.standard_normal((3, 4, 5, 5))
  output = rng.standard_normal((3, 4, 5, 5))
  kwargs = dict(
    alphas_cumprod=alphas, final_alpha_cumprod=alphas[0], step_ratio=20, eta=1.0, prediction_type=prediction_type
  )
  mu, sigma, _ = numpy_step(output, t, x_t, x_t, alphas, alphas[0], 20, 1.0, prediction_type)
  prev = mu + sigma * rng.standard_normal(x_t.shape)
  _, _, expected = numpy_step(output, t, x_t, prev, alphas, alphas[0], 20, 1.0, prediction_type)
  returned, log_prob = ddpo_jax.ddim_step_with_logprob(
    jnp.asarray(output, jnp.float32),
    t,
    jnp.asarray(x_t, jnp.float32),
    prev_sample=jnp.asarray(prev, jnp.float32),
    **kwargs,
  )
  np.testing.assert_allclose(np.asarray(log_prob), expected, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(returned), prev, rtol=1e-5, atol=1e-5)


def test_sampled_step_has_the_formula_mean_and_std():
  alphas = sd_alphas_cumprod()
  x_t = np.ones((4096, 1, 1, 1)) * 0.3
  output = np.ones_like(x_t) * -0.2
  mu, sigma, _ = numpy_step(output, 501, x_t, x_t, alphas, alphas[0], 20, 1.0, "epsilon")
  prev, _ = ddim.ddim_step_with_logprob(
    jnp.asarray(output, jnp.float32),
    501,
    jnp.asarray(x_t, jnp.float32),
    alphas_cumprod=alphas,
    final_alpha_cumprod=alphas[0],
    step_ratio=20,
    eta=1.0,
    key=jax.random.PRNGKey(0),
  )
  prev = np.asarray(prev).ravel()
  assert abs(prev.mean() - mu.ravel()[0]) < 4 * sigma / np.sqrt(prev.size)
  assert abs(prev.std() - sigma) < 0.05 * sigma


@pytest.mark.parametrize("eta", [1e-9, 0.0])
def test_no_nan_at_tiny_eta(eta):
  alphas = sd_alphas_cumprod()
  x_t = jnp.ones((2, 4, 3, 3))
  prev, log_prob = ddim.ddim_step_with_logprob(
    jnp.zeros_like(x_t),
    jnp.array([981, 1]),
    x_t,
    alphas_cumprod=alphas,
    final_alpha_cumprod=alphas[0],
    step_ratio=20,
    eta=eta,
    key=jax.random.PRNGKey(1),
  )
  assert np.all(np.isfinite(np.asarray(prev))) and np.all(np.isfinite(np.asarray(log_prob)))


def test_gradient_flows_through_the_mean_only():
  alphas = sd_alphas_cumprod()
  x_t = jnp.ones((1, 2, 2, 2))
  kwargs = dict(alphas_cumprod=alphas, final_alpha_cumprod=alphas[0], step_ratio=20, eta=1.0)

  def log_prob(output, prev):
    return ddim.ddim_step_with_logprob(output, 501, x_t, prev_sample=prev, **kwargs)[1].sum()

  grad_prev = jax.grad(log_prob, argnums=1)(jnp.zeros_like(x_t), jnp.zeros_like(x_t))
  grad_output = jax.grad(log_prob, argnums=0)(jnp.zeros_like(x_t), jnp.zeros_like(x_t))
  assert np.all(np.asarray(grad_prev) == 0)  # x_{t-1} is a constant
  assert np.any(np.asarray(grad_output) != 0)


def test_timesteps_are_the_schedulers():
  from diffusers import DDIMScheduler

  scheduler = DDIMScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False
  )
  scheduler.set_timesteps(50)
  ours = ddim.inference_timesteps(1000, 50, 1)
  np.testing.assert_array_equal(ours, scheduler.timesteps.numpy())
  assert ours[0] == 981 and ours[-1] == 1
  np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), sd_alphas_cumprod(), rtol=1e-5)


def test_gaussian_kl_matches_numpy():
  rng = np.random.default_rng(0)
  mean, reference = rng.standard_normal((2, 3, 4, 5, 5))
  std = np.array([0.5, 0.1, 2.0]).reshape(3, 1, 1, 1)
  kl = ddim.gaussian_kl(jnp.asarray(mean, jnp.float32), jnp.asarray(reference, jnp.float32), jnp.asarray(std))
  # KL of two Gaussians with a shared diagonal σ, summed over the 100 elements, then / 100.
  d = mean[0].size
  expected = [
    0.5 * np.sum(np.log(s**2 / s**2) + (s**2 + (m - r) ** 2) / s**2 - 1) / d
    for m, r, s in zip(mean, reference, std.ravel())
  ]
  np.testing.assert_allclose(np.asarray(kl), expected, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(ddim.gaussian_kl(jnp.asarray(mean), jnp.asarray(mean), 0.3)), 0.0)


def test_mean_and_std_are_the_steps():
  """ddim_step_with_logprob's sample and log-prob come from ddim_mean_and_std's Gaussian."""
  rng = np.random.default_rng(1)
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  kwargs = dict(alphas_cumprod=np.cumprod(1 - betas), final_alpha_cumprod=0.99915, step_ratio=20, eta=1.0)
  x_t, output = (jnp.asarray(rng.standard_normal((2, 4, 3, 3)), jnp.float32) for _ in range(2))
  t = jnp.array([981, 1])
  mean, std = ddim.ddim_mean_and_std(output, t, x_t, **kwargs)
  prev, log_prob = ddim.ddim_step_with_logprob(output, t, x_t, key=jax.random.PRNGKey(0), **kwargs)
  z = jax.random.normal(jax.random.PRNGKey(0), x_t.shape)
  np.testing.assert_array_equal(np.asarray(prev), np.asarray(mean + std * z))
  np.testing.assert_array_equal(np.asarray(log_prob), np.asarray(ddim.gaussian_log_prob(prev, mean, std)))
