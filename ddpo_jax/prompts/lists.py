"""The built-in prompt sets: word lists of ddpo_jax/data/prompts/, a text file, the toy world's captions, a constant.

Each registers itself by name in `ddpo_jax.prompts.base`. The held-out sets
(`uncommon_animals`, `everyday_objects`, `unseen_activity`) are for
evaluating generalisation after training on the others.
"""

from __future__ import annotations

from ddpo_jax.prompts.base import NUM_IMAGENET_ANIMALS
from ddpo_jax.prompts.base import UNSEEN_ACTIVITY
from ddpo_jax.prompts.base import PromptFn
from ddpo_jax.prompts.base import load_list
from ddpo_jax.prompts.base import read_lines
from ddpo_jax.prompts.base import register
from ddpo_jax.prompts.base import subject_activity
from ddpo_jax.prompts.base import uniform


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
