"""Advantages from rewards: batch normalisation or per-prompt statistics.

DDPO's policy gradient weights each trajectory by its reward normalised into
an advantage. With one prompt per batch (or prompts of similar difficulty)
the batch mean and std suffice; with many prompts of different difficulty a
per-prompt baseline is fairer: `PerPromptStatTracker` keeps the last
`buffer_size` rewards of each prompt and normalises with those once it holds
`min_count` of them. Advantages are finally clipped to ±clip, matching the
clip of the PPO ratio.
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
