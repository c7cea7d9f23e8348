"""The paper's reward-weighted regression baselines: rwr and rwr_sparse.

Black et al. (ICLR 2024), section 4.2: the standard denoising loss on the
epoch's own samples, each weighted by its reward, densely (w ∝ exp(r / T),
`objectives.rwr_dense_weights`) or by a filter (w ∝ 1[r >= a percentile],
"filtered fine-tuning", `objectives.rwr_sparse_weights`). The examples are
each trajectory's final latents x_0 noised to `num_timesteps_kept` random
training timesteps with fresh noise, in the same minibatch layout as DDPO's
transitions, so both train with the same optimiser and accumulation.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpo_jax import models
from ddpo_jax import objectives
from ddpo_jax import rewards
from ddpo_jax import update
from ddpo_jax.methods import base


@flax.struct.dataclass
class DenoisingExamples:
  """RWR's minibatches: leading axes [num_updates, accumulation, M].

  Attributes:
    noisy_latents: [..., C, h, w] sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
    targets: [..., C, h, w] what the UNet regresses: ε (or v, or x_0, as the
      schedule's prediction type says).
    timesteps: int32 [...] t, uniform over the training timesteps.
    weights: [...] the trajectory's RWR weight.
    context: [..., L, D].
  """

  noisy_latents: jax.Array
  targets: jax.Array
  timesteps: jax.Array
  weights: jax.Array
  context: jax.Array


def make_denoising_examples(
  model: models.DiffusionModel, rollouts: update.Rollouts, key: jax.Array, settings: update.UpdateSettings
) -> DenoisingExamples:
  """RWR's examples: each trajectory's x_0 (its final latents) noised to
  `num_timesteps_kept` timesteps drawn uniformly from [0, num_train_timesteps),
  with fresh noise, in the minibatch layout of DDPO's transitions.

  The standard denoising loss of the model's prediction type: the target is
  ε ("epsilon"), sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x_0 ("v_prediction") or x_0 ("sample").
  """
  schedule = model.schedule
  num_trajectories = rollouts.latents.shape[0]
  num_kept = settings.num_timesteps_kept
  order_key, time_key, noise_key = jax.random.split(key, 3)
  order = jax.random.permutation(order_key, num_trajectories)
  clean = update.per_example(rollouts.latents[order, -1], num_kept)  # [N, K, C, h, w]
  timesteps = jax.random.randint(time_key, (num_trajectories, num_kept), 0, schedule.num_train_timesteps)
  noise = jax.random.normal(noise_key, clean.shape, clean.dtype)
  alpha_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[timesteps][..., None, None, None]
  signal, sigma = jnp.sqrt(alpha_cumprod), jnp.sqrt(1.0 - alpha_cumprod)
  if schedule.prediction_type == "epsilon":
    targets = noise
  elif schedule.prediction_type == "v_prediction":
    targets = signal * noise - sigma * clean
  elif schedule.prediction_type == "sample":
    targets = clean
  else:
    raise ValueError(f"prediction type {schedule.prediction_type!r} is not supported by RWR")
  time_major = functools.partial(update.time_major, settings=settings)
  return DenoisingExamples(
    noisy_latents=time_major(signal * clean + sigma * noise),
    targets=time_major(targets),
    timesteps=time_major(timesteps.astype(jnp.int32)),
    weights=time_major(update.per_example(rollouts.weights[order], num_kept)),
    context=time_major(update.per_example(rollouts.context[order], num_kept)),
  )


def denoising_loss(
  model: models.DiffusionModel,
  unet: Any,
  minibatch: DenoisingExamples,
  negative_context: jax.Array,
  settings: update.UpdateSettings,
  reference: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted denoising loss of the conditional UNet (no guidance): (loss, {"denoising_mse", "loss"})."""
  del negative_context, reference
  prediction = models.predict_noise(
    model, unet, minibatch.noisy_latents, minibatch.timesteps, minibatch.context, remat=settings.remat
  )
  loss, metrics = objectives.weighted_denoising_loss(prediction, minibatch.targets, minibatch.weights)
  return loss, dict(metrics, loss=loss)


def _effective_fraction(weights: np.ndarray, valid: np.ndarray) -> dict[str, float]:
  """{"rwr_effective_fraction": (Σw)² / (n Σw²), the effective sample size as a fraction of the n valid samples}."""
  effective = float(weights.sum() ** 2 / (valid.sum() * np.square(weights.astype(np.float64)).sum()))
  return {"rwr_effective_fraction": effective}


def dense_weights(
  scored: rewards.ScoredBatch, prompts: list[str], tracker, config: ml_collections.ConfigDict, epoch: int
) -> tuple[np.ndarray, dict[str, float]]:
  """float32 [N] weights exp(r / config.train.rwr_temperature), mean 1 over the valid samples (0 for dropped ones)."""
  del prompts, tracker
  weights = objectives.rwr_dense_weights(base.valid_rewards(scored, epoch), config.train.rwr_temperature)
  return weights, _effective_fraction(weights, scored.valid)


def sparse_weights(
  scored: rewards.ScoredBatch, prompts: list[str], tracker, config: ml_collections.ConfigDict, epoch: int
) -> tuple[np.ndarray, dict[str, float]]:
  """float32 [N] weights 1[r >= the config.train.rwr_percentile-th percentile], mean 1 over the valid samples."""
  del prompts, tracker
  weights = objectives.rwr_sparse_weights(base.valid_rewards(scored, epoch), config.train.rwr_percentile)
  return weights, _effective_fraction(weights, scored.valid)


def _check_common(config: ml_collections.ConfigDict) -> str | None:
  """The options RWR does not combine with."""
  t = config.train
  if t.kl_coef > 0:
    return (
      f"config.train.kl_coef={t.kl_coef}: the KL regulariser acts on DDPO's transitions; RWR "
      f"(config.train.method={t.method!r}) trains on denoising examples. Set kl_coef=0 or method='ddpo_is'."
    )
  if t.advantages != "stat_tracking":
    return (
      f"config.train.advantages={t.advantages!r}: RWR (config.train.method={t.method!r}) weights samples by "
      "their rewards instead of advantages; leave config.train.advantages='stat_tracking'."
    )
  return None


def _check_dense(config: ml_collections.ConfigDict) -> str | None:
  if not config.train.rwr_temperature > 0:
    return (
      f"config.train.rwr_temperature={config.train.rwr_temperature} must be > 0 (in the reward's units, e.g. its std)."
    )
  return _check_common(config)


def _check_sparse(config: ml_collections.ConfigDict) -> str | None:
  if not 0 <= config.train.rwr_percentile < 100:
    return f"config.train.rwr_percentile={config.train.rwr_percentile} must be in [0, 100) (e.g. 90: the top 10%)."
  return _check_common(config)


RWR = base.register(
  base.Method(
    name="rwr",
    make_examples=make_denoising_examples,
    loss=denoising_loss,
    trajectory_weights=dense_weights,
    check_config=_check_dense,
  )
)
RWR_SPARSE = base.register(
  base.Method(
    name="rwr_sparse",
    make_examples=make_denoising_examples,
    loss=denoising_loss,
    trajectory_weights=sparse_weights,
    check_config=_check_sparse,
  )
)
