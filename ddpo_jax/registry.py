"""Named factories, found by registered name or by import path.

Rewards and prompt functions are both looked up this way, so a user's own
is selected in the config ("package.module:factory") without forking.
"""

from __future__ import annotations

import importlib
from typing import Any
from typing import Callable


def import_object(path: str) -> Any:
  """The object at "package.module:attribute"; ValueError if there is none."""
  module_name, _, attr = path.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"cannot import module {module_name!r} of {path!r}: {e}") from e
  if not hasattr(module, attr):
    raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
  return getattr(module, attr)


class Registry:
  """A name -> factory table for one kind of thing (e.g. "reward")."""

  def __init__(self, kind: str):
    self.kind = kind
    self._factories: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding a factory under `name`."""

    def decorator(factory):
      if name in self._factories:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._factories[name] = factory
      return factory

    return decorator

  def names(self) -> list[str]:
    return sorted(self._factories)

  def factory(self, name: str) -> Callable[..., Any]:
    """The factory `name`: registered, or at the import path "package.module:factory"."""
    if name in self._factories:
      return self._factories[name]
    if ":" in name:
      return import_object(name)
    raise ValueError(
      f"unknown {self.kind} {name!r}; registered ones are {self.names()}, "
      "or give an import path 'package.module:factory'."
    )

  def make(self, name: str, **kwargs) -> Any:
    """The factory `name` (registered, or "package.module:factory") called with kwargs."""
    return self.factory(name)(**kwargs)
