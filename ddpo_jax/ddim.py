"""The DDIM step with its Gaussian log-likelihood (DDPO's policy).

Reference: Black et al., "Training Diffusion Models with Reinforcement
Learning" (ICLR 2024), section 4.3; Song et al., "Denoising Diffusion Implicit
Models" (ICLR 2021), eq. 12.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# The original JAX code floors sigma here, so that eta -> 0 gives no NaN.
MIN_STD = 1e-6


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, steps_offset: int) -> np.ndarray:
  """The scheduler's DDIM timesteps, descending: int32 [num_inference_steps].

  "Leading" spacing as diffusers' DDIM: SD v1 (steps_offset 1) with 50 steps
  runs t = 981, 961, ..., 1.
  """
  step_ratio = num_train_timesteps // num_inference_steps
  return (np.arange(num_inference_steps)[::-1] * step_ratio + steps_offset).astype(np.int32)


def _alpha_cumprod_at(alphas_cumprod: jax.Array, final_alpha_cumprod: float, t: jax.Array) -> jax.Array:
  return jnp.where(t >= 0, alphas_cumprod[jnp.clip(t, 0, None)], final_alpha_cumprod)


def _broadcast(x: jax.Array, like: jax.Array) -> jax.Array:
  x = jnp.asarray(x, like.dtype)
  return x.reshape(x.shape + (1,) * (like.ndim - x.ndim)) if x.ndim else x


def ddim_mean_and_std(
  model_output: jax.Array,
  timestep: jax.Array,
  sample: jax.Array,
  *,
  alphas_cumprod: jax.Array,
  final_alpha_cumprod: float,
  step_ratio: int,
  eta: float,
  prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
  """The DDIM posterior p(x_{t'} | x_t) = N(μ, σ² I), t' = t - step_ratio.

  x̂_0 and ε̂ come from the model output (epsilon, v or sample prediction);
  σ = eta * sqrt((1-ᾱ_t')/(1-ᾱ_t) * (1 - ᾱ_t/ᾱ_t')), floored at MIN_STD;
  μ = sqrt(ᾱ_t') x̂_0 + sqrt(1 - ᾱ_t' - σ²) ε̂ (with the unfloored σ).

  Args:
    model_output: [B, ...] the (guided) UNet output.
    timestep: int, scalar or [B], the current t.
    sample: [B, ...] x_t.
    alphas_cumprod: [num_train_timesteps] ᾱ of the training schedule.
    final_alpha_cumprod: ᾱ for t' < 0 (ᾱ[0] for SD v1).
    step_ratio: num_train_timesteps // num_inference_steps.
    eta: DDIM stochasticity; 1.0 is DDPM-like.
    prediction_type: "epsilon", "v_prediction" or "sample".

  Returns:
    mean [B, ...] float32 and std float32, broadcastable to it ([B, 1, ...]
    for per-sample timesteps, a scalar for a scalar timestep). σ does not
    depend on the model.
  """
  sample = sample.astype(jnp.float32)
  model_output = model_output.astype(jnp.float32)
  timestep = jnp.asarray(timestep)
  alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)
  alpha_t = _broadcast(_alpha_cumprod_at(alphas_cumprod, final_alpha_cumprod, timestep), sample)
  alpha_prev = _broadcast(_alpha_cumprod_at(alphas_cumprod, final_alpha_cumprod, timestep - step_ratio), sample)

  if prediction_type == "epsilon":
    eps = model_output
    x0 = (sample - jnp.sqrt(1 - alpha_t) * eps) / jnp.sqrt(alpha_t)
  elif prediction_type == "v_prediction":
    x0 = jnp.sqrt(alpha_t) * sample - jnp.sqrt(1 - alpha_t) * model_output
    eps = jnp.sqrt(alpha_t) * model_output + jnp.sqrt(1 - alpha_t) * sample
  elif prediction_type == "sample":
    x0 = model_output
    eps = (sample - jnp.sqrt(alpha_t) * x0) / jnp.sqrt(1 - alpha_t)
  else:
    raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample.")

  variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
  std = eta * jnp.sqrt(jnp.maximum(variance, 0.0))
  direction = jnp.sqrt(jnp.maximum(1 - alpha_prev - std**2, 0.0)) * eps
  mean = jnp.sqrt(alpha_prev) * x0 + direction
  return mean, jnp.maximum(std, MIN_STD)


def gaussian_log_prob(value: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """log N(value; mean, std² I) as the MEAN over all non-batch elements: [B].

  value is a constant for the gradient (it flows through the mean).
  """
  value = jax.lax.stop_gradient(value.astype(jnp.float32))
  log_density = -((value - mean) ** 2) / (2 * std**2) - jnp.log(std) - 0.5 * math.log(2 * math.pi)
  return log_density.mean(axis=tuple(range(1, value.ndim)))


def gaussian_kl(mean: jax.Array, reference_mean: jax.Array, std: jax.Array) -> jax.Array:
  """KL(N(mean, σ² I) || N(reference_mean, σ² I)) per element, averaged: [B].

  With a shared σ the KL of the two Gaussians is ||μ - μ_ref||² / (2σ²)
  summed over the D = C·h·w latent elements; like `gaussian_log_prob` it is
  taken as the MEAN over the elements (the KL divided by D), so that it is on
  the scale of the log-probabilities that DDPO's objectives use.
  """
  kl = (mean - reference_mean) ** 2 / (2 * std**2)
  return kl.mean(axis=tuple(range(1, mean.ndim)))


def ddim_step_with_logprob(
  model_output: jax.Array,
  timestep: jax.Array,
  sample: jax.Array,
  *,
  alphas_cumprod: jax.Array,
  final_alpha_cumprod: float,
  step_ratio: int,
  eta: float,
  key: jax.Array | None = None,
  prev_sample: jax.Array | None = None,
  prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
  """One DDIM step x_t -> x_{t'} (t' = t - step_ratio) and log p(x_{t'} | x_t).

  The Gaussian N(μ, σ² I) is `ddim_mean_and_std`'s; x_{t'} = μ + σ z.
  The log-probability is the MEAN over all non-batch elements of the Gaussian
  log-density, and x_{t'} is a constant for its gradient (it flows through μ).

  Args:
    model_output, timestep, sample, alphas_cumprod, final_alpha_cumprod,
      step_ratio, eta, prediction_type: as for `ddim_mean_and_std`.
    key: PRNG key for z; required unless prev_sample is given.
    prev_sample: [B, ...] a given x_{t'} whose log-probability is wanted
      (the training pass); otherwise x_{t'} is sampled.

  Returns:
    prev_sample [B, ...] (float32) and log_prob [B] (float32).
  """
  mean, std = ddim_mean_and_std(
    model_output,
    timestep,
    sample,
    alphas_cumprod=alphas_cumprod,
    final_alpha_cumprod=final_alpha_cumprod,
    step_ratio=step_ratio,
    eta=eta,
    prediction_type=prediction_type,
  )
  if prev_sample is None:
    if key is None:
      raise ValueError("ddim_step_with_logprob needs a key when prev_sample is not given.")
    prev_sample = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
  prev_sample = jax.lax.stop_gradient(prev_sample.astype(jnp.float32))
  return prev_sample, gaussian_log_prob(prev_sample, mean, std)
