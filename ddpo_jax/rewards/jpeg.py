"""JPEG file-size rewards: the compressibility tasks of DDPO.

The size of each image saved by PIL as JPEG (quality 95, in memory), in kB
(1 kB = 1000 bytes). Compressibility rewards small files (flat, smooth
images); incompressibility rewards large ones (detail, noise). Prompts are
ignored.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import check_images
from ddpo_jax.rewards.base import register

QUALITY = 95


def jpeg_size_kb(image: np.ndarray, quality: int = QUALITY) -> float:
  """JPEG size in kB of one uint8 [H, W, 3] image at `quality`."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return buffer.tell() / 1000


def jpeg_sizes_kb(images: np.ndarray, quality: int = QUALITY) -> np.ndarray:
  """float32 [B] JPEG sizes in kB of uint8 images [B, H, W, 3]."""
  images = check_images(images)
  return np.array([jpeg_size_kb(image, quality) for image in images], np.float32)


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = QUALITY) -> RewardFn:
  """Reward = -(JPEG size in kB): smaller files score higher."""

  def reward(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    del prompts
    return -jpeg_sizes_kb(images, quality)

  return reward


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = QUALITY) -> RewardFn:
  """Reward = +(JPEG size in kB): larger files score higher."""

  def reward(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    del prompts
    return jpeg_sizes_kb(images, quality)

  return reward
