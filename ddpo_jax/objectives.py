"""DDPO's policy-gradient objectives over transitions, as small pure functions.

Reference: Black et al., "Training Diffusion Models with Reinforcement
Learning" (ICLR 2024), eq. 3 (DDPO_SF) and eq. 4 (DDPO_IS, with PPO's clip).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("ddpo_is", "ddpo_sf")


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


def get(method: str):
  """The loss function of a method name of `METHODS`."""
  if method == "ddpo_is":
    return clipped_importance_loss
  if method == "ddpo_sf":
    return score_function_loss
  raise ValueError(f"train.method={method!r} is unknown; choose one of {METHODS}.")
