"""Config files by path or name, the one dotted-override helper, and the "auto" settings.

configs/ sits at the top of the repository and is also installed with the package as `ddpo_jax.configs`, so a
spec such as "configs/compress.py:tiny" works both from the repository root (the file itself) and from anywhere
else with ddpo_jax installed (the installed copy of compress.py).

Some settings default to "auto" and are resolved for the backend the run finds (`resolve_auto`), so that
config.json records what actually ran.
"""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import os
import sys
from typing import Any

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
  """The folder of the config files installed with the package (`ddpo_jax.configs`); None without one
  (a checkout imported through sys.path without `pip install -e .`)."""
  try:
    return str(importlib.resources.files("ddpo_jax.configs"))
  except ModuleNotFoundError:
    return None


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
  # Only a bare name or one under configs/ stands for an installed config: a misspelt folder is an error.
  if os.path.dirname(os.path.normpath(path)) in ("", "configs") and os.path.basename(path) in installed:
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


def _config_spec(argv: list[str]) -> str | None:
  """The PATH[:preset] of argv's --config, or None."""
  for i, argument in enumerate(argv):
    if argument.startswith(CONFIG_FLAG + "="):
      return argument[len(CONFIG_FLAG) + 1 :]
    if argument == CONFIG_FLAG and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flag_value(text: str) -> Any:
  """A new kwargs value from the command line: a Python literal (3, 0.5, True, None, (1, 2), "x") or else the text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def split_new_kwargs(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
  """`argv` without its `--config.SECTION.kwargs.NAME=VALUE` arguments whose NAME the config lacks and its
  `--config.SECTION.kwargs="{'NAME': VALUE, ...}"` ones (all of a function's kwargs at once), and those as
  {"SECTION.kwargs.NAME": value} and {"SECTION.kwargs": {...}}.

  The kwargs of a reward or prompt function are open (their names are the factory's), but ml_collections'
  flags can only set keys that exist: `--config.prompt.kwargs.split=train` on a config whose prompt.kwargs
  holds only `prompt` would die in its parser. The trainer's main adds these with `add_new_kwargs`; other
  keys, and kwargs that exist, stay with ml_collections (typed as the config's values are).
  """
  spec = _config_spec(argv)
  if spec is None:
    return list(argv), {}
  config = None
  kept, new = [], {}
  skip = False
  for i, argument in enumerate(argv):
    if skip:
      skip = False
      continue
    key, value = None, None
    flag_name = argument.split("=")[0]
    if flag_name.startswith(CONFIG_FLAG + ".") and (".kwargs." in flag_name or flag_name.endswith(".kwargs")):
      if "=" in argument:
        key, value = argument[len(CONFIG_FLAG) + 1 :].split("=", 1)
      elif i + 1 < len(argv):
        key, value = argument[len(CONFIG_FLAG) + 1 :], argv[i + 1]
    if key is not None:
      config = config if config is not None else get_config(spec)
      *sections, name = key.split(".")
      node = config
      for section in sections:
        node = node[section] if section in node else None
        if node is None:
          break
      replaces_all = name == "kwargs" and isinstance(parse_flag_value(value), dict)
      if node is not None and (replaces_all or (sections[-1:] == ["kwargs"] and name not in node)):
        new[key] = parse_flag_value(value)
        skip = "=" not in argument
        continue
    kept.append(argument)
  return kept, new


def add_new_kwargs(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets `split_new_kwargs`' values in `config`, a locked one included; returns it.

  A whole kwargs dict replaces the config's (in argv's order, so later single kwargs add to it)."""
  with config.unlocked():
    for key, value in values.items():
      if key.split(".")[-1] == "kwargs":
        *sections, _ = key.split(".")
        node = config
        for section in sections:
          node = node[section]
        node.kwargs = ml_collections.ConfigDict(value)
      else:
        override(config, {key: value})
  return config


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
  """Sets {"section.name": value, ...} in `config` (in place) as --config.section.name=value would; returns it.

  The one implementation of dotted overrides: the study, the benchmarks and
  the tests use it (a misspelt name raises, as the locked config does).
  """
  for key, value in values.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    # The kwargs of a reward or prompt function are open: their names are the factory's.
    if name not in node and sections[-1:] != ["kwargs"]:
      raise KeyError(f"the config has no setting {key!r}; check its spelling against configs/base.py.")
    node[name] = value
  return config


# config.train.accumulation values: how an optimiser step's minibatches are accumulated.
ACCUMULATIONS = ("auto", "unrolled", "scan")
# config.model.attention_block_mb's "auto": MB of float32 scores per block of the blocked attention
# (the CPU's, where blocking wins: docs/speed.md); 0 (unused) for the other implementations.
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


def resolve_attention(setting: str, backend: str) -> str:
  """config.model.attention for `backend`: one of `attention.IMPLEMENTATIONS` that runs there."""
  from ddpo_jax.models import attention

  return attention.resolve(setting, backend)


def resolve_attention_block_mb(setting: str, attention: str) -> float:
  """config.model.attention_block_mb for the resolved `attention`, in MB (0: one block)."""
  if setting == "auto":
    return float(CPU_ATTENTION_BLOCK_MB if attention == "blocked" else 0)
  try:
    value = float(setting)
  except (TypeError, ValueError):
    value = float("nan")
  if not value >= 0 or value == float("inf"):
    raise ValueError(
      f"config.model.attention_block_mb={setting!r} must be 'auto' or a number of MB >= 0 (0: one block)."
    )
  return value


def resolve_auto(config: ml_collections.ConfigDict, backend: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose "auto" settings hold what they resolve to on `backend`."""
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.train.accumulation = resolve_accumulation(config.train.accumulation, backend)
    resolved.model.attention = resolve_attention(config.model.attention, backend)
    block_mb = resolve_attention_block_mb(config.model.attention_block_mb, resolved.model.attention)
    resolved.model.attention_block_mb = f"{block_mb:g}"
  if config.is_locked:
    resolved.lock()
  return resolved
