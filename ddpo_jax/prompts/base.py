"""Prompt functions: the contract every prompt function follows, the registry, and helpers to build one.

A prompt function is `fn(rng, batch_size) -> list[str]`: `batch_size` prompts
drawn with the numpy Generator `rng` alone, so a seeded rng gives the same
prompts on every run. The registry holds prompt-function *factories*
(`factory(**kwargs) -> PromptFn`, the kwargs coming from the config); `get`
looks one up by its registered name or by an import path
"package.module:factory", so user prompt sets need no change to ddpo_jax.

This module imports no family, so that the families (`lists.py`, `tfds.py`, a
user's own module) import it without an import cycle. Importing it runs
`ddpo_jax.prompts` first, which registers the built-in families, so `get`
sees all of them by the time a caller can reach it.

The word lists live in ddpo_jax/data/prompts/ (see `load_list`).
"""

from __future__ import annotations

import os
from typing import Callable
from typing import Sequence

import numpy as np

from ddpo_jax import registry

PromptFn = Callable[[np.random.Generator, int], list[str]]
PromptFactory = Callable[..., PromptFn]

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "prompts")
# ImageNet classes 0..397 are the animals (tench .. puffer).
NUM_IMAGENET_ANIMALS = 398
UNSEEN_ACTIVITY = "taking an exam"

REGISTRY = registry.Registry("prompt function")


def register(name: str):
  """Decorator adding a factory to the registry under `name`."""
  return REGISTRY.register(name)


def registered() -> list[str]:
  """The registered names, sorted."""
  return REGISTRY.names()


def get(name: str, **kwargs) -> PromptFn:
  """`name` (registered, or "package.module:factory") built with kwargs."""
  return REGISTRY.make(name, **kwargs)


def read_lines(path: str) -> list[str]:
  """The non-empty lines of a text file, stripped of surrounding whitespace."""
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def load_list(filename: str) -> list[str]:
  """The non-empty lines of a packaged list, e.g. load_list("common_animals.txt")."""
  return read_lines(os.path.join(DATA_DIR, filename))


def article(word: str) -> str:
  """The article for `word`: "an" before a vowel letter, else "a" (by spelling)."""
  return "an" if word[:1].lower() in "aeiou" else "a"


def uniform(prompts: Sequence[str]) -> PromptFn:
  """A prompt function drawing uniformly, with replacement, from `prompts`."""
  prompts = list(prompts)
  if not prompts:
    raise ValueError("cannot sample prompts from an empty list")

  def fn(rng: np.random.Generator, batch_size: int) -> list[str]:
    return [prompts[i] for i in rng.integers(len(prompts), size=batch_size)]

  return fn


def subject_activity(subjects: Sequence[str], activities: Sequence[str]) -> PromptFn:
  """Uniform over "a(n) {subject} {activity}" for every subject × activity."""
  return uniform([f"{article(s)} {s} {a}" for s in subjects for a in activities])


def grouped(prompt_fn: PromptFn, group_size: int) -> PromptFn:
  """`prompt_fn` drawing batch_size / group_size prompts, each repeated group_size times in a row.

  group_size 1 is `prompt_fn` itself (the same draws).
  """
  if group_size == 1:
    return prompt_fn

  def fn(rng: np.random.Generator, batch_size: int) -> list[str]:
    if batch_size % group_size:
      raise ValueError(f"a batch of {batch_size} prompts is not a whole number of groups of {group_size}")
    return [p for p in prompt_fn(rng, batch_size // group_size) for _ in range(group_size)]

  return fn
