"""Reward functions: the contract every reward follows, the registry, and the trainer's guard on what they return.

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

This module imports no family, so that the families (and a user's reward)
import it without an import cycle. Importing it runs `ddpo_jax.rewards` first,
which registers the built-in rewards, so `make` sees all of them by the time a
caller (weighted's included) can reach it.
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

REGISTRY = registry.Registry("reward")


def register(name: str):
  """Decorator adding a factory to the registry under `name`."""
  return REGISTRY.register(name)


def registered() -> list[str]:
  """The registered names, sorted."""
  return REGISTRY.names()


def make(name: str, **kwargs) -> RewardFn:
  """`name` (registered, or "package.module:factory") built with kwargs."""
  return REGISTRY.make(name, **kwargs)


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

  The reward gets a read-only view of `images` (uint8 [B, H, W, 3]): the same array goes on to other rewards,
  the diversity and the grids, so a reward that writes into it raises instead of changing what they see.

  Args:
    on_invalid: "raise": any exception, wrong shape or non-finite value raises
      RewardError naming the reward and the prompt; "drop": the samples
      concerned (the whole batch for an exception or a wrong shape) are
      marked invalid and a warning names the reward and the prompt.
  """
  if on_invalid not in ON_INVALID:
    raise ValueError(f"on_invalid={on_invalid!r}: choose one of {ON_INVALID}")
  # np.asarray of a one-process jax.Array is read-only already; a concatenation of batches or shards is not.
  images = np.asarray(images).view()
  images.flags.writeable = False
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


def reward_statistics(scored: ScoredBatch) -> dict[str, float]:
  """Statistics of the valid rewards, each part's mean, and the dropped count."""
  valid = scored.rewards[scored.valid]
  out = dict(
    reward_mean=float(valid.mean()),
    reward_std=float(valid.std()),
    reward_min=float(valid.min()),
    reward_max=float(valid.max()),
    reward_invalid=int((~scored.valid).sum()),
  )
  for name, values in scored.parts.items():
    part = values[scored.valid]
    out[f"reward_{name}_mean"] = float(np.nanmean(part)) if np.isfinite(part).any() else float("nan")
    out[f"reward_{name}_std"] = float(np.nanstd(part)) if np.isfinite(part).any() else float("nan")
  return out
