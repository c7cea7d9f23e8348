"""Reward functions: the registry and the contract every reward follows.

A reward is built by a factory, `factory(**kwargs) -> RewardFn`, and scores a
batch on the host:

  RewardFn(images: uint8 [B, H, W, 3], prompts: list[str] of length B)
      -> float32 [B]
         or {"reward": float32 [B], "<part>": float32 [B], ...}

The mapping form names parts that are logged on their own (reward_<part>_mean);
"reward" is what the policy is trained on (see `weighted.py`).

`make` finds a factory by its registered name or by an import path
"package.module:factory", so a user reward needs no change to ddpo_jax.
`score_batch` is the trainer's guard on what a reward returns: NaN, inf, a
wrong shape or an exception is reported with the reward's name and the prompt,
and then either stops the run ("raise") or drops those samples ("drop").

Built in: jpeg_compressibility, jpeg_incompressibility (`jpeg.py`),
toy_alignment (`toy_alignment.py`), aesthetic (`aesthetic.py`), prompt_alignment
(`prompt_alignment.py`, a client of `ddpo_jax.reward_server`) and weighted
(`weighted.py`, a weighted sum of any of these).
"""

from __future__ import annotations

import dataclasses
from typing import Callable
from typing import Mapping
from typing import Sequence

from absl import logging
import numpy as np

from ddpo_jax import registry

RewardFn = Callable[[np.ndarray, list[str]], "np.ndarray | Mapping[str, np.ndarray]"]
# What to do with samples whose reward is invalid.
ON_INVALID = ("raise", "drop")
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


def check_rewards(name: str, rewards, images: np.ndarray, prompts: Sequence[str], finite: bool = True) -> np.ndarray:
  """The output of reward `name` as float32 [B], B = len(images).

  Raises ValueError naming the reward and the prompt concerned when the output
  is not numeric, has the wrong shape (naming the batch's first prompt) or,
  with `finite`, holds NaN or inf (naming the first prompt with such a reward).
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
  if finite and bad.size:
    i = int(bad[0])
    raise ValueError(
      f"reward {name!r} returned {values[i]} for prompt {prompts[i]!r} (image {i}); "
      f"{bad.size} of {batch} rewards are not finite"
    )
  return values


class RewardError(RuntimeError):
  """A reward function failed or returned invalid values (with `on_invalid="raise"`)."""


@dataclasses.dataclass
class ScoredBatch:
  """A batch's rewards as the trainer uses them.

  Attributes:
    rewards: float32 [B]; NaN where invalid.
    valid: bool [B]; False for dropped samples.
    parts: named parts of the reward, float32 [B] each (NaN where missing).
    problem: what was wrong, or "" when every sample is valid.
  """

  rewards: np.ndarray
  valid: np.ndarray
  parts: dict[str, np.ndarray]
  problem: str = ""


def score_batch(
  name: str, reward_fn: RewardFn, images: np.ndarray, prompts: Sequence[str], on_invalid: str = "raise"
) -> ScoredBatch:
  """Runs `reward_fn` on a batch and checks what it returns.

  Args:
    on_invalid: "raise": any exception, wrong shape or non-finite value raises
      RewardError naming the reward and the prompt; "drop": the samples
      concerned (the whole batch for an exception or a wrong shape) are
      marked invalid and a warning names the reward and the prompt.
  """
  if on_invalid not in ON_INVALID:
    raise ValueError(f"on_invalid={on_invalid!r}: choose one of {ON_INVALID}")
  batch = len(images)
  first = repr(prompts[0]) if len(prompts) else "<no prompts>"
  try:
    output = reward_fn(images, list(prompts))
    if isinstance(output, Mapping):
      if "reward" not in output:
        raise ValueError(f"reward {name!r} returned a mapping without the key 'reward': {sorted(output)}")
      parts = {k: check_rewards(f"{name}/{k}", v, images, prompts, finite=False) for k, v in output.items()}
      values = parts.pop("reward")
    else:
      values, parts = check_rewards(name, output, images, prompts, finite=False), {}
  except Exception as e:  # noqa: BLE001 - a user's reward may raise anything
    message = f"reward {name!r} failed on a batch of {batch} starting with prompt {first}: {type(e).__name__}: {e}"
    if on_invalid == "raise":
      raise RewardError(
        message + "; fix the reward, or set config.reward.on_invalid='drop' to skip such batches"
      ) from e
    logging.warning("%s; dropping the batch", message)
    return ScoredBatch(np.full(batch, np.nan, np.float32), np.zeros(batch, bool), {}, message)
  bad = np.flatnonzero(~np.isfinite(values))
  if not bad.size:
    return ScoredBatch(values, np.ones(batch, bool), parts)
  i = int(bad[0])
  message = (
    f"reward {name!r} returned {values[i]} for prompt {prompts[i]!r} (image {i}); "
    f"{bad.size} of {batch} rewards are not finite"
  )
  if on_invalid == "raise":
    raise RewardError(message + "; fix the reward, or set config.reward.on_invalid='drop' to skip such samples")
  logging.warning("%s; dropping those samples", message)
  valid = np.isfinite(values)
  return ScoredBatch(np.where(valid, values, np.nan).astype(np.float32), valid, parts, message)


def concatenate(batches: Sequence[ScoredBatch]) -> ScoredBatch:
  """Batches one after another; a part missing from a batch is NaN there."""
  names = sorted({k for b in batches for k in b.parts})
  return ScoredBatch(
    rewards=np.concatenate([b.rewards for b in batches]),
    valid=np.concatenate([b.valid for b in batches]),
    parts={
      k: np.concatenate([b.parts.get(k, np.full(len(b.rewards), np.nan, np.float32)) for b in batches]) for k in names
    },
    problem="; ".join(b.problem for b in batches if b.problem),
  )


# Imported last: they register themselves through `register` above.
from ddpo_jax.rewards import aesthetic  # noqa: E402,F401
from ddpo_jax.rewards import jpeg  # noqa: E402,F401
from ddpo_jax.rewards import prompt_alignment  # noqa: E402,F401
from ddpo_jax.rewards import toy_alignment  # noqa: E402,F401
from ddpo_jax.rewards import weighted  # noqa: E402,F401
