"""The training objectives, as small pure functions.

DDPO's policy gradients over transitions (Black et al., "Training Diffusion
Models with Reinforcement Learning", ICLR 2024, eq. 3: DDPO_SF, eq. 4: DDPO_IS
with PPO's clip), and the paper's reward-weighted regression baselines (RWR,
its section 4.2): the standard denoising loss on the epoch's samples, each
weighted by its reward, densely (`rwr_dense_weights`) or by a filter
(`rwr_sparse_weights`, "filtered fine-tuning"). The methods that use them
are records in `ddpo_jax.methods`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def clipped_importance_loss(
  log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, clip_range: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DDPO_IS: mean over transitions of max(-A ρ, -A clip(ρ, 1-ε, 1+ε)).

  Args:
    log_probs: [M] log p_θ(x_{t-1} | x_t, c) under the current params.
    old_log_probs: [M] the same under the sampling params.
    advantages: [M] the trajectory's advantage, per transition.
    clip_range: ε.

  Returns:
    (loss, diagnostics): approx_kl = ½ mean((log p - log p_old)²),
    clipfrac = mean(|ρ - 1| > ε), ratio statistics.
  """
  log_ratio = log_probs - old_log_probs
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = jnp.maximum(unclipped, clipped).mean()
  return loss, _diagnostics(log_ratio, ratio, clip_range)


def score_function_loss(
  log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, clip_range: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DDPO_SF (REINFORCE): -mean(A log p_θ); its gradient is -mean(A ∇log p_θ)."""
  log_ratio = log_probs - old_log_probs
  loss = -(advantages * log_probs).mean()
  return loss, _diagnostics(log_ratio, jnp.exp(log_ratio), clip_range)


def _diagnostics(log_ratio: jax.Array, ratio: jax.Array, clip_range: float) -> dict[str, jax.Array]:
  return {
    "approx_kl": 0.5 * jnp.mean(jnp.square(log_ratio)),
    "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
    "ratio_mean": ratio.mean(),
    "ratio_max_deviation": jnp.max(jnp.abs(ratio - 1.0)),
  }


def weighted_denoising_loss(
  prediction: jax.Array, target: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """RWR: mean over examples of w · mean((prediction - target)²) over C·h·w.

  Args:
    prediction, target: [M, C, h, w], the model's output and its regression
      target (the noise, or v, as the schedule predicts).
    weights: [M] the example's trajectory weight (mean 1 over the epoch).

  Returns:
    (loss, {"denoising_mse": the unweighted mean squared error}).
  """
  squared_error = jnp.mean(jnp.square(prediction - target), axis=tuple(range(1, prediction.ndim)))
  return jnp.mean(weights * squared_error), {"denoising_mse": squared_error.mean()}


def rwr_dense_weights(rewards: np.ndarray, temperature: float) -> np.ndarray:
  """RWR's weights w_i ∝ exp(r_i / temperature), scaled to mean 1: float32 [N].

  NaN rewards (dropped samples) get weight 0 and take no part in the
  normalisation. Computed in float64 with the max subtracted, so a small
  temperature does not overflow.
  """
  rewards = np.asarray(rewards, np.float64)
  valid = np.isfinite(rewards)
  logits = np.where(valid, rewards / temperature, -np.inf)
  weights = np.exp(logits - logits[valid].max())
  return (weights * valid.sum() / weights.sum()).astype(np.float32)


def rwr_sparse_weights(rewards: np.ndarray, percentile: float) -> np.ndarray:
  """Filtered fine-tuning: w_i = 1[r_i >= the `percentile`-th percentile of
  the valid rewards], scaled to mean 1 over them: float32 [N] (0 for NaN)."""
  rewards = np.asarray(rewards, np.float64)
  valid = np.isfinite(rewards)
  threshold = np.percentile(rewards[valid], percentile)
  kept = valid & (rewards >= threshold)
  return (kept * valid.sum() / kept.sum()).astype(np.float32)
