"""Advantages from rewards: batch normalisation or per-prompt statistics.

DDPO's policy gradient weights each trajectory by its reward normalised into
an advantage. With one prompt per batch (or prompts of similar difficulty)
the batch mean and std suffice; with many prompts of different difficulty a
per-prompt baseline is fairer: `PerPromptStatTracker` keeps the last
`buffer_size` rewards of each prompt and normalises with those once it holds
`min_count` of them. With several samples per prompt in a batch
(`config.sample.group_size`), `group_advantages` compares each sample with the
other samples of its group only (GRPO's group-relative baseline). Advantages
are finally clipped to ±clip, matching the clip of the PPO ratio.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

EPS = 1e-6


def normalize(rewards: np.ndarray, eps: float = EPS) -> np.ndarray:
  """(r - mean) / (std + eps) over the batch, float32 [B]."""
  rewards = np.asarray(rewards, np.float64)
  return ((rewards - rewards.mean()) / (rewards.std() + eps)).astype(np.float32)


class PerPromptStatTracker:
  """Per-prompt ring buffers of recent rewards, for per-prompt normalisation.

  Args:
    buffer_size: rewards kept per prompt (the oldest are dropped first).
    min_count: rewards a prompt's buffer must hold before its own mean and std
      are used; below that the batch's mean and std are.
  """

  def __init__(self, buffer_size: int, min_count: int):
    if buffer_size < 1:
      raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    if not 0 <= min_count <= buffer_size:
      # A min_count above buffer_size would silently never use the buffers.
      raise ValueError(f"min_count must be in [0, buffer_size={buffer_size}], got {min_count}")
    self.buffer_size = buffer_size
    self.min_count = min_count
    self._buffers: dict[str, collections.deque[float]] = {}

  def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
    """Adds this batch's rewards to the buffers; returns float32 [B] advantages.

    Each prompt's rewards are added before its statistics are taken, so a
    prompt's own rewards of this batch count towards its mean and std.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.shape != (len(prompts),):
      raise ValueError(f"got {len(prompts)} prompts but rewards of shape {rewards.shape}")
    prompts_arr = np.asarray(prompts, dtype=object)
    batch_mean, batch_std = rewards.mean(), rewards.std() + EPS
    advantages = np.empty_like(rewards)
    for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
      mask = prompts_arr == prompt
      buffer = self._buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
      buffer.extend(rewards[mask].tolist())
      if len(buffer) < self.min_count:
        mean, std = batch_mean, batch_std
      else:
        mean, std = np.mean(buffer), np.std(buffer) + EPS
      advantages[mask] = (rewards[mask] - mean) / std
    return advantages.astype(np.float32)

  def state(self) -> dict[str, list[float]]:
    """The buffers as {prompt: rewards, oldest first}; JSON-serialisable."""
    return {prompt: [float(r) for r in buffer] for prompt, buffer in self._buffers.items()}

  def load_state(self, state: dict[str, list[float]]) -> None:
    """Replaces the buffers by `state` (from `state()`); keeps the newest buffer_size."""
    self._buffers = {
      prompt: collections.deque((float(r) for r in rewards), maxlen=self.buffer_size)
      for prompt, rewards in state.items()
    }

  def stats(self) -> dict[str, float]:
    """Counts for logging: tracked prompts and their mean buffer length."""
    lengths = [len(b) for b in self._buffers.values()]
    return {
      "num_prompts": len(lengths),
      "mean_buffer_length": float(np.mean(lengths)) if lengths else 0.0,
    }


def compute_advantages(
  prompts: Sequence[str],
  rewards: np.ndarray,
  tracker: PerPromptStatTracker | None,
  clip: float,
) -> np.ndarray:
  """float32 [B] advantages: per-prompt if `tracker` is given, else batch-normalised, clipped to ±clip."""
  if clip <= 0:
    raise ValueError(f"advantage clip must be > 0, got {clip}")
  if np.shape(rewards) != (len(prompts),):
    raise ValueError(f"got {len(prompts)} prompts but rewards of shape {np.shape(rewards)}")
  if tracker is not None:
    advantages = tracker.update(prompts, rewards)
  else:
    advantages = normalize(rewards)
  return np.clip(advantages, -clip, clip).astype(np.float32)


# How group advantages are scaled: by each group's own std, or by the batch's.
GROUP_STDS = ("group", "batch")


def group_advantages(rewards: np.ndarray, group_size: int, std: str = "group", eps: float = EPS):
  """Group-relative advantages: (r - group mean) / (group std or batch std).

  Rows come in consecutive groups of `group_size` samples of the same prompt
  (and, optionally, the same initial noise). NaN rewards (dropped samples)
  take no part in any statistic and get advantage 0. A group whose valid
  rewards all tie (or that has fewer than two) carries no signal: its
  advantages are 0.

  Args:
    rewards: [N] float, N a multiple of group_size; NaN where invalid.
    std: "group" (each group's own std, as GRPO) or "batch" (the std of all
      valid rewards, which keeps the scale of small within-group differences).

  Returns:
    (advantages float32 [N], tied bool [N / group_size]).
  """
  rewards = np.asarray(rewards, np.float64)
  if group_size < 1 or rewards.ndim != 1 or rewards.size % group_size:
    raise ValueError(f"got {rewards.shape} rewards, not a whole number of groups of {group_size}")
  if std not in GROUP_STDS:
    raise ValueError(f"group std {std!r}: choose one of {GROUP_STDS}")
  groups = rewards.reshape(-1, group_size)
  valid = np.isfinite(groups)
  count = valid.sum(axis=1)
  filled = np.where(valid, groups, 0.0)
  mean = filled.sum(axis=1) / np.maximum(count, 1)
  spread = np.where(valid, groups, -np.inf).max(axis=1) - np.where(valid, groups, np.inf).min(axis=1)
  tied = (count < 2) | ~(spread > 0)
  if std == "group":
    scale = np.sqrt((np.where(valid, groups - mean[:, None], 0.0) ** 2).sum(axis=1) / np.maximum(count, 1))[:, None]
  else:
    scale = np.std(rewards[np.isfinite(rewards)]) if np.isfinite(rewards).any() else 0.0
  advantages = (groups - mean[:, None]) / (scale + eps)
  advantages = np.where(valid & ~tied[:, None], advantages, 0.0)
  return advantages.reshape(-1).astype(np.float32), tied
