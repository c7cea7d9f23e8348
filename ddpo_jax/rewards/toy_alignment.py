"""Prompt alignment in the toy world, read from pixels.

The fraction of the caption's four attributes (shape colour, shape, pattern,
background colour) that `ddpo_jax.toy.shapes.analyse` finds in the image, in
[0, 1]: the toy stand-in for DDPO's VLM-based alignment reward, exact and
cheap. Prompts must be toy-world captions (see `shapes.Scene.from_caption`).
"""

from __future__ import annotations

import numpy as np

from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import check_images
from ddpo_jax.rewards.base import register
from ddpo_jax.toy import shapes


@register("toy_alignment")
def toy_alignment() -> RewardFn:
  """Reward = fraction of the caption's attributes the image shows."""

  def reward(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    images = check_images(images)
    if len(prompts) != len(images):
      raise ValueError(f"toy_alignment got {len(images)} images but {len(prompts)} prompts")
    return np.array([shapes.alignment(im, p) for im, p in zip(images, prompts)], np.float32)

  return reward
