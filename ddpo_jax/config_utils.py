"""Loading the config files of configs/ outside absl (tests, notebooks), and finding them from any folder.

configs/ sits at the top of the repository and is also installed with the package as `ddpo_jax.configs`, so a
spec such as "configs/compress.py:tiny" works both from the repository root (the file itself) and from anywhere
else with ddpo_jax installed (the installed copy of compress.py).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import sys

import ml_collections

CONFIG_FLAG = "--config"


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


def installed_configs_dir() -> str | None:
  """The folder of the config files installed with the package (`ddpo_jax.configs`); None without one.

  A source checkout imported through sys.path without `pip install` has no `ddpo_jax.configs` (nor does an older
  editable install, made before configs were shipped): its configs/ beside the package stands in, so that such a
  checkout finds its own configs from any folder too.
  """
  try:
    return str(importlib.resources.files("ddpo_jax.configs"))
  except ModuleNotFoundError:
    checkout_configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return checkout_configs if os.path.isfile(os.path.join(checkout_configs, "base.py")) else None


def installed_config_names() -> list[str]:
  """The file names of the installed configs ("base.py", "compress.py", ...), sorted."""
  folder = installed_configs_dir()
  if folder is None:
    return []
  return sorted(name for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py")


def find_config_file(path: str) -> str:
  """`path` if it is a file, else the installed config of the same file name (e.g. "configs/compress.py" run from a
  folder without configs/ is the installed compress.py); ValueError if neither exists.

  The commands and examples name configs as "configs/NAME.py", relative to the repository root; this lets the same
  commands run from any folder against an installed wheel.
  """
  if os.path.isfile(path):
    return path
  installed = installed_config_names()
  if os.path.basename(path) in installed:
    return os.path.join(installed_configs_dir(), os.path.basename(path))
  names = ", ".join(installed) or "none"
  raise ValueError(
    f"config file {path!r} not found: looked for it from the current folder ({os.getcwd()}) and among the "
    f"installed configs (ddpo_jax.configs: {names})"
  )


def resolve_config_argument(argv: list[str]) -> list[str]:
  """`argv` with the file of its `--config=PATH[:preset]` (or `--config PATH[:preset]`) replaced by
  `find_config_file(PATH)`, the preset kept; other arguments (--config.x=...) unchanged.

  absl's config flag opens PATH as given, relative to the current folder; resolving it first lets
  `--config=configs/compress.py:tiny` name the installed config when run outside the repository.
  """
  resolved = list(argv)
  for i, argument in enumerate(resolved):
    if argument.startswith(CONFIG_FLAG + "="):
      resolved[i] = CONFIG_FLAG + "=" + _resolve_spec(argument[len(CONFIG_FLAG) + 1 :])
    elif argument == CONFIG_FLAG and i + 1 < len(resolved) and not resolved[i + 1].startswith("-"):
      resolved[i + 1] = _resolve_spec(resolved[i + 1])
  return resolved


def _resolve_spec(spec: str) -> str:
  """'configs/compress.py:tiny' -> 'FOUND/compress.py:tiny'."""
  path, colon, preset = spec.partition(":")
  return find_config_file(path) + colon + preset


def get_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/compress.py:tiny' -> that config, as --config=... would give it (the path found by find_config_file)."""
  path, _, preset = spec.partition(":")
  module = load_module(find_config_file(path))
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
