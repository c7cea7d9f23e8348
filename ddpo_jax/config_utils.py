"""Config files by path (outside absl: tests, notebooks), overrides, and the "auto" settings.

Some settings default to "auto" and are resolved for the backend the run
finds (`resolve_auto`), so that config.json records what actually ran.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections


def load_module(path: str):
  """Imports a config file by path (configs/*.py import their base this way)."""
  name = "ddpo_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def load_sibling(config_file: str, name: str):
  """The module `name`.py beside `config_file` (e.g. base.py beside compress.py)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py"))


def get_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/compress.py:tiny' -> that config, as --config=... would give it."""
  path, _, preset = spec.partition(":")
  module = load_module(path)
  return module.get_config(preset) if preset else module.get_config()


def override(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets {"section.name": value, ...} in `config` (in place) as --config.section.name=value would; returns it.

  The one implementation of dotted overrides: the study, the benchmarks and
  the tests use it (a misspelt name raises, as the locked config does).
  """
  for key, value in values.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


# config.train.accumulation values: how an optimiser step's minibatches are accumulated.
ACCUMULATIONS = ("auto", "unrolled", "scan")
# config.model.attention_block_mb's "auto": MB of float32 scores per block of the blocked attention
# on the CPU, where blocking wins (docs/speed.md); accelerators keep diffusers' attention layers (0).
CPU_ATTENTION_BLOCK_MB = 4


def resolve_accumulation(setting: str, backend: str) -> str:
  """config.train.accumulation for `backend` ("cpu", "gpu", "tpu"): "unrolled" or "scan".

  "auto" is "unrolled" on the CPU, whose XLA backend runs convolution weight
  gradients inside a while loop with a generic, far slower kernel, and "scan"
  elsewhere (one compiled loop body, faster compilation).
  """
  if setting not in ACCUMULATIONS:
    raise ValueError(f"config.train.accumulation={setting!r}: choose one of {ACCUMULATIONS}.")
  if setting == "auto":
    return "unrolled" if backend == "cpu" else "scan"
  return setting


def resolve_attention_block_mb(setting: str, backend: str) -> float:
  """config.model.attention_block_mb for `backend`, in MB (0: diffusers' attention layers)."""
  if setting == "auto":
    return float(CPU_ATTENTION_BLOCK_MB if backend == "cpu" else 0)
  try:
    value = float(setting)
  except (TypeError, ValueError):
    value = float("nan")
  if not value >= 0 or value == float("inf"):
    raise ValueError(
      f"config.model.attention_block_mb={setting!r} must be 'auto' or a number of MB >= 0 (0: diffusers' attention)."
    )
  return value


def resolve_auto(config: ml_collections.ConfigDict, backend: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose "auto" settings hold what they resolve to on `backend`."""
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.train.accumulation = resolve_accumulation(config.train.accumulation, backend)
    resolved.model.attention_block_mb = f"{resolve_attention_block_mb(config.model.attention_block_mb, backend):g}"
  if config.is_locked:
    resolved.lock()
  return resolved
