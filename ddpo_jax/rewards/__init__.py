"""Reward functions: the registry and the contract every reward follows.

A reward is built by a factory, `factory(**kwargs) -> RewardFn`, and scores a
batch on the host:

  RewardFn(images: uint8 [B, H, W, 3], prompts: list[str] of length B)
      -> float32 [B]

`make` finds a factory by its registered name or by an import path
"package.module:factory", so a user reward needs no change to ddpo_jax.
`check_rewards` is the trainer's guard on what a reward returns.

Built in: jpeg_compressibility, jpeg_incompressibility (`jpeg.py`),
toy_alignment (`toy_alignment.py`), aesthetic (`aesthetic.py`) and prompt_alignment
(`prompt_alignment.py`, a client of `ddpo_jax.reward_server`).
"""

from __future__ import annotations

from typing import Callable
from typing import Sequence

import numpy as np

from ddpo_jax import registry

RewardFn = Callable[[np.ndarray, list[str]], np.ndarray]
RewardFactory = Callable[..., RewardFn]

_REGISTRY = registry.Registry("reward")


def register(name: str):
  """Decorator adding a factory to the registry under `name`."""
  return _REGISTRY.register(name)


def registered() -> list[str]:
  """The registered names, sorted."""
  return _REGISTRY.names()


def make(name: str, **kwargs) -> RewardFn:
  """`name` (registered, or "package.module:factory") built with kwargs."""
  return _REGISTRY.make(name, **kwargs)


def check_images(images: np.ndarray) -> np.ndarray:
  """`images` as a uint8 [B, H, W, 3] array; raises ValueError otherwise."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"rewards take uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
  return images


def check_rewards(name: str, rewards, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """The output of reward `name` as float32 [B], B = len(images).

  Raises ValueError naming the reward and the prompt concerned when the output
  is not numeric, has the wrong shape (naming the batch's first prompt) or
  holds NaN or inf (naming the first prompt with such a reward).
  """
  batch = len(images)
  first = repr(prompts[0]) if len(prompts) else "<no prompts>"
  try:
    values = np.asarray(rewards, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"reward {name!r} returned non-numeric values for a batch starting with prompt {first}: {e}"
    ) from e
  if values.shape != (batch,):
    raise ValueError(
      f"reward {name!r} returned shape {values.shape} for {batch} images, expected ({batch},); "
      f"first prompt of the batch: {first}"
    )
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
      f"reward {name!r} returned {values[i]} for prompt {prompts[i]!r} (image {i}); "
      f"{bad.size} of {batch} rewards are not finite"
    )
  return values


# Imported last: they register themselves through `register` above.
from ddpo_jax.rewards import aesthetic  # noqa: E402,F401
from ddpo_jax.rewards import jpeg  # noqa: E402,F401
from ddpo_jax.rewards import prompt_alignment  # noqa: E402,F401
from ddpo_jax.rewards import toy_alignment  # noqa: E402,F401
