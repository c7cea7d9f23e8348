"""Prompt functions: where the captions of each sampling epoch come from.

A prompt function is `fn(rng, batch_size) -> list[str]`: `batch_size` prompts
drawn with the numpy Generator `rng` alone, so a seeded rng gives the same
prompts on every run. The registry holds prompt-function *factories*
(`factory(**kwargs) -> PromptFn`, the kwargs coming from the config); `get`
looks one up by its registered name or by an import path
"package.module:factory", so user prompt sets need no change to this file.

The word lists live in ddpo_jax/data/prompts/ (see `load_list`). The held-out
sets (`uncommon_animals`, `everyday_objects`, `unseen_activity`) are for
evaluating generalisation after training on the others.
"""

from __future__ import annotations

import os
from typing import Callable
from typing import Sequence

import numpy as np

from ddpo_jax import registry

PromptFn = Callable[[np.random.Generator, int], list[str]]
PromptFactory = Callable[..., PromptFn]

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "prompts")
# ImageNet classes 0..397 are the animals (tench .. puffer).
NUM_IMAGENET_ANIMALS = 398
UNSEEN_ACTIVITY = "taking an exam"

_REGISTRY = registry.Registry("prompt function")


def register(name: str):
  """Decorator adding a factory to the registry under `name`."""
  return _REGISTRY.register(name)


def registered() -> list[str]:
  """The registered names, sorted."""
  return _REGISTRY.names()


def get(name: str, **kwargs) -> PromptFn:
  """`name` (registered, or "package.module:factory") built with kwargs."""
  return _REGISTRY.make(name, **kwargs)


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


@register("imagenet_animals")
def imagenet_animals() -> PromptFn:
  """The 398 ImageNet animal classes, each line as written (synonyms included)."""
  return uniform(load_list("imagenet_classes.txt")[:NUM_IMAGENET_ANIMALS])


@register("common_animals")
def common_animals() -> PromptFn:
  return uniform(load_list("common_animals.txt"))


@register("simple_animals")
def simple_animals() -> PromptFn:
  return uniform(load_list("very_simple_animals.txt"))


@register("nouns_activities")
def nouns_activities(nouns_file: str | None = None, activities_file: str | None = None) -> PromptFn:
  """Prompts "a(n) {animal} {activity}" over common_animals × activities.

  `nouns_file` and `activities_file` replace the packaged lists with text files
  of one entry per line.
  """
  nouns = read_lines(nouns_file) if nouns_file else load_list("common_animals.txt")
  activities = read_lines(activities_file) if activities_file else load_list("activities.txt")
  return subject_activity(nouns, activities)


@register("from_file")
def from_file(path: str) -> PromptFn:
  """Uniform over the non-empty lines of the text file `path`."""
  prompts = read_lines(path)
  if not prompts:
    raise ValueError(f"prompt file {path!r} has no non-empty lines")
  return uniform(prompts)


@register("toy_scenes")
def toy_scenes(split: str = "all") -> PromptFn:
  """Captions of the toy world, uniform over `ddpo_jax.toy.shapes.scenes(split)`.

  split: "all"; "train", the scenes whose shape colour × shape pair is not one
  of `shapes.HELDOUT_PAIRS`; "heldout", those whose pair is (unseen
  combinations for evaluating generalisation).
  """
  from ddpo_jax.toy import shapes

  return uniform([scene.caption for scene in shapes.scenes(split)])


@register("constant")
def constant(prompt: str = "") -> PromptFn:
  """The same prompt every time; "" samples the model unconditionally."""
  return lambda rng, batch_size: [prompt] * batch_size


@register("tfds")
def tfds(**kwargs) -> PromptFn:
  """A text feature of a TensorFlow Datasets dataset (the `tfds` extra); kwargs as in `tfds_prompts.tfds_prompts`."""
  from ddpo_jax import tfds_prompts  # imports this module

  return tfds_prompts.tfds_prompts(**kwargs)


# Held-out sets.


@register("uncommon_animals")
def uncommon_animals() -> PromptFn:
  return uniform(load_list("uncommon_animals.txt"))


@register("everyday_objects")
def everyday_objects() -> PromptFn:
  return uniform(load_list("everyday_objects.txt"))


@register("unseen_activity")
def unseen_activity() -> PromptFn:
  """The common animals doing an activity absent from activities.txt."""
  return subject_activity(load_list("common_animals.txt"), [UNSEEN_ACTIVITY])
