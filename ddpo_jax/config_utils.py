"""Loading the config files of configs/ outside absl (tests, notebooks)."""

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
  """Sets {"section.name": value, ...} in `config` (in place) as --config.section.name=value would; returns it."""
  for key, value in values.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config
