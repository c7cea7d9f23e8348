"""A training method as a record, and the table of methods by name.

A method says three things, each a pure function:

  make_examples(model, rollouts, key, settings) -> examples
      how an epoch's rollouts become the training pass's examples, laid out
      [num_updates, accumulation, M, ...] (jitted once per run);
  loss(model, unet_params, minibatch, negative_context, settings, reference_params) -> (loss, metrics)
      the objective of one minibatch, differentiated with respect to the
      trained params through `unet_params` (the applied UNet params; the
      adapter forms them); `reference_params` is the frozen pretrained UNet,
      or None when neither LoRA nor KL needs it;
  trajectory_weights(scored, prompts, tracker, config, epoch) -> (weights [N], metrics)
      how the epoch's rewards (every process's, in global order) become one
      float32 weight per trajectory: DDPO's advantages, RWR's regression
      weights; host metrics to log beside them;

plus `check_config(config) -> str | None`, the method's own settings checked
before anything compiles (the message names the setting and the fix).

A new method is a module of this package defining its records and calling
`register` on them, plus its import line in methods/__init__.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable

import ml_collections
import numpy as np

from ddpo_jax import rewards


def _no_check(config: ml_collections.ConfigDict) -> str | None:
  del config
  return None


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method (see the module docstring for each function's contract)."""

  name: str
  make_examples: Callable[..., Any]
  loss: Callable[..., tuple[Any, dict[str, Any]]]
  trajectory_weights: Callable[..., tuple[np.ndarray, dict[str, float]]]
  check_config: Callable[[ml_collections.ConfigDict], str | None] = _no_check


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to the table under its name."""
  if method.name in _METHODS:
    raise ValueError(f"training method {method.name!r} is already registered")
  _METHODS[method.name] = method
  return method


def names() -> tuple[str, ...]:
  """The registered methods' names, in registration order."""
  return tuple(_METHODS)


def get(name: str) -> Method:
  """The method registered as `name`; ValueError naming the setting otherwise."""
  if name not in _METHODS:
    raise ValueError(f"config.train.method={name!r} is unknown; choose one of {names()}.")
  return _METHODS[name]


def valid_rewards(scored: rewards.ScoredBatch, epoch: int) -> np.ndarray:
  """float32 [N] rewards with NaN where invalid; RewardError when none is valid."""
  if not scored.valid.any():
    raise rewards.RewardError(
      f"epoch {epoch}: every sample's reward is invalid ({scored.problem}); nothing to train on."
    )
  return np.where(scored.valid, scored.rewards, np.nan)
