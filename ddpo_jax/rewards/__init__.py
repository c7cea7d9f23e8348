"""Reward functions: the registry and the contract every reward follows.

A reward is built by a factory, `factory(**kwargs) -> RewardFn`, and scores a
batch on the host:

  RewardFn(images: uint8 [B, H, W, 3], prompts: list[str] of length B)
      -> float32 [B]

`make` finds a factory by its registered name or by an import path
"package.module:factory", so a user reward needs no change to ddpo_jax.
`check_rewards` is the trainer's guard on what a reward returns.

Built in: jpeg_compressibility, jpeg_incompressibility (`jpeg.py`) and
toy_alignment (`toy_alignment.py`).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import numpy as np

RewardFn = Callable[[np.ndarray, list[str]], np.ndarray]
RewardFactory = Callable[..., RewardFn]

_REGISTRY: dict[str, RewardFactory] = {}


def register(name: str) -> Callable[[RewardFactory], RewardFactory]:
  """Decorator adding a reward factory to the registry under `name`."""

  def decorator(factory: RewardFactory) -> RewardFactory:
    if name in _REGISTRY:
      raise ValueError(f"reward {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory

  return decorator


def registered() -> list[str]:
  """The registered reward names, sorted."""
  return sorted(_REGISTRY)


def make(name: str, **kwargs) -> RewardFn:
  """The reward `name` (registered, or "package.module:factory") built with kwargs."""
  if name in _REGISTRY:
    return _REGISTRY[name](**kwargs)
  if ":" in name:
    return _import_object(name)(**kwargs)
  raise ValueError(
      f"unknown reward {name!r}; registered ones are {registered()}, "
      "or give an import path 'package.module:factory'."
  )


def _import_object(path: str):
  module_name, _, attr = path.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"cannot import module {module_name!r} of {path!r}: {e}") from e
  if not hasattr(module, attr):
    raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
  return getattr(module, attr)


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
    raise ValueError(f"reward {name!r} returned non-numeric values for a batch starting with prompt {first}: {e}") from e
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
from ddpo_jax.rewards import jpeg, toy_alignment  # noqa: E402,F401
