"""Several rewards at once: a weighted sum, each part logged on its own.

    config.reward.name = "weighted"
    config.reward.kwargs = {
      "weights": {"aesthetic": 1.0, "jpeg_compressibility": 0.5},
      "component_kwargs": {"aesthetic": {"clip_model": "tiny-random"}},
    }

trains on 1.0 * aesthetic + 0.5 * jpeg_compressibility and logs
reward_aesthetic_mean and reward_jpeg_compressibility_mean beside reward_mean.
Components are any reward names `make` accepts, user rewards included.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import check_rewards
from ddpo_jax.rewards.base import make
from ddpo_jax.rewards.base import register


@register("weighted")
def weighted(weights: Mapping[str, float], component_kwargs: Mapping[str, Mapping] | None = None) -> RewardFn:
  """sum_k weights[k] * reward_k, returned with each reward_k as a part.

  Args:
    weights: reward name -> weight (non-empty).
    component_kwargs: reward name -> keyword arguments of its factory.
  """
  if not weights:
    raise ValueError("weighted reward: `weights` is empty; give {reward_name: weight, ...}.")
  component_kwargs = dict(component_kwargs or {})
  unknown = sorted(set(component_kwargs) - set(weights))
  if unknown:
    raise ValueError(f"weighted reward: component_kwargs for {unknown}, which have no weight in `weights`.")
  components = {name: make(name, **dict(component_kwargs.get(name, {}))) for name in weights}

  def reward(images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    parts = {
      name: check_rewards(name, fn(images, prompts), images, prompts, finite=False) for name, fn in components.items()
    }
    total = sum(np.float32(weights[name]) * values for name, values in parts.items())
    return {"reward": total.astype(np.float32), **parts}

  return reward
