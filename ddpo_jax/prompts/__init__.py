"""Prompt functions: where the captions of each sampling epoch come from.

A prompt function is `fn(rng, batch_size) -> list[str]`, deterministic given
the numpy Generator rng; `get(name, **kwargs)` builds one by registered name
or by import path "package.module:factory" (see `base.py`).

Importing this package registers the built-in families: the word lists, a
text file, the toy captions and a constant (`lists.py`), and a TFDS text
feature (`tfds.py`, which needs the `tfds` extra only when it is used). The
contract and helpers live in `base.py`, which the families import, so that
none of them imports this package back; they are re-exported here for
callers (`from ddpo_jax import prompts; prompts.get(...)`).
"""

from __future__ import annotations

from ddpo_jax.prompts import base
from ddpo_jax.prompts import lists  # registers the built-in lists
from ddpo_jax.prompts import tfds  # registers "tfds"
from ddpo_jax.prompts.base import DATA_DIR
from ddpo_jax.prompts.base import NUM_IMAGENET_ANIMALS
from ddpo_jax.prompts.base import REGISTRY
from ddpo_jax.prompts.base import UNSEEN_ACTIVITY
from ddpo_jax.prompts.base import PromptFactory
from ddpo_jax.prompts.base import PromptFn
from ddpo_jax.prompts.base import article
from ddpo_jax.prompts.base import get
from ddpo_jax.prompts.base import grouped
from ddpo_jax.prompts.base import load_list
from ddpo_jax.prompts.base import read_lines
from ddpo_jax.prompts.base import register
from ddpo_jax.prompts.base import registered
from ddpo_jax.prompts.base import subject_activity
from ddpo_jax.prompts.base import uniform

__all__ = [
  "DATA_DIR",
  "NUM_IMAGENET_ANIMALS",
  "REGISTRY",
  "UNSEEN_ACTIVITY",
  "PromptFactory",
  "PromptFn",
  "article",
  "base",
  "get",
  "grouped",
  "lists",
  "load_list",
  "read_lines",
  "register",
  "registered",
  "subject_activity",
  "tfds",
  "uniform",
]
