"""Reward functions: `make(name, **kwargs)` builds one by registered name or by import path "package.module:factory".

A reward scores a batch on the host, `RewardFn(images uint8 [B, H, W, 3],
prompts) -> float32 [B]` or a mapping with the key "reward" and named parts;
`score_batch` checks what it returns (see `base.py` for the contract).

Importing this package registers the built-in rewards: jpeg_compressibility,
jpeg_incompressibility (`jpeg.py`), toy_alignment (`toy_alignment.py`),
aesthetic (`aesthetic.py`), clip_score and pickscore (`clip_score.py`), hpsv2 (`hpsv2.py`),
prompt_alignment (`prompt_alignment.py`, a client of `ddpo_jax.reward_server`)
and weighted (`weighted.py`, a weighted sum of any of these). The contract
lives in `base.py`, which the families import, so that none of them imports
this package back; it is re-exported here for callers (`from ddpo_jax import rewards; rewards.make(...)`).
"""

from __future__ import annotations

from ddpo_jax.rewards import aesthetic
from ddpo_jax.rewards import base
from ddpo_jax.rewards import clip_score
from ddpo_jax.rewards import hpsv2
from ddpo_jax.rewards import jpeg
from ddpo_jax.rewards import prompt_alignment
from ddpo_jax.rewards import toy_alignment
from ddpo_jax.rewards import weighted
from ddpo_jax.rewards.base import ON_INVALID
from ddpo_jax.rewards.base import REGISTRY
from ddpo_jax.rewards.base import RewardError
from ddpo_jax.rewards.base import RewardFactory
from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import ScoredBatch
from ddpo_jax.rewards.base import check_images
from ddpo_jax.rewards.base import check_rewards
from ddpo_jax.rewards.base import concatenate
from ddpo_jax.rewards.base import make
from ddpo_jax.rewards.base import register
from ddpo_jax.rewards.base import registered
from ddpo_jax.rewards.base import reward_statistics
from ddpo_jax.rewards.base import score_batch

__all__ = [
  "ON_INVALID",
  "REGISTRY",
  "RewardError",
  "RewardFactory",
  "RewardFn",
  "ScoredBatch",
  "aesthetic",
  "base",
  "check_images",
  "check_rewards",
  "clip_score",
  "concatenate",
  "hpsv2",
  "jpeg",
  "make",
  "prompt_alignment",
  "register",
  "registered",
  "reward_statistics",
  "score_batch",
  "toy_alignment",
  "weighted",
]
