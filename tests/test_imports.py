"""No import cycles between ddpo_jax's modules.

A cycle makes what a module sees at import time depend on which module of the
cycle was imported first (a name defined below the import is missing when the
other one runs), so it is caught here from the source, without importing it.
Imports inside functions count: they run later, but they still tie the two
modules together and usually mark a cycle worked around rather than removed.
"""

from __future__ import annotations

import ast
import os

import ddpo_jax

PACKAGE = "ddpo_jax"
PACKAGE_DIR = os.path.dirname(os.path.abspath(ddpo_jax.__file__))


def module_files() -> dict[str, str]:
  """Every module under ddpo_jax/ by its dotted name (a package by its own name, for its __init__.py)."""
  modules = {}
  for folder, _, files in os.walk(PACKAGE_DIR):
    for filename in files:
      if not filename.endswith(".py"):
        continue
      parts = [PACKAGE, *os.path.relpath(os.path.join(folder, filename), PACKAGE_DIR)[: -len(".py")].split(os.sep)]
      if parts[-1] == "__init__":
        parts.pop()
      modules[".".join(parts)] = os.path.join(folder, filename)
  return modules


def imported_modules(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The ddpo_jax modules that module `name` imports, anywhere in its source.

  `from A import b` is module A.b when that is one, else A (b is a name defined
  by A). Importing A.b also runs A's __init__ first; that is not counted, since
  every submodule would otherwise import its own package.
  """
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = os.path.basename(path) == "__init__.py"
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        # Relative to the package holding the module (a package's __init__ is in that package itself).
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        source = ".".join(anchor + ([node.module] if node.module else []))
      else:
        source = node.module
      for alias in node.names:
        found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
  return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
  modules = module_files()
  return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module, each sorted (Tarjan's algorithm)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for successor in sorted(graph[node]):
      if successor not in index:
        visit(successor)
        low[node] = min(low[node], low[successor])
      elif successor in on_stack:
        low[node] = min(low[node], index[successor])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return sorted(components)


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
  """One cycle through the first module of `component`, as the modules in import order, the first repeated last."""
  members = set(component)
  start = component[0]
  parents = {start: None}
  queue = [start]
  while queue:
    node = queue.pop(0)
    for successor in sorted(graph[node] & members):
      if successor == start:
        path = [node]
        while parents[path[-1]] is not None:
          path.append(parents[path[-1]])
        return [*reversed(path), start]
      if successor not in parents:
        parents[successor] = node
        queue.append(successor)
  raise AssertionError(f"{component} is not strongly connected")


def test_graph_sees_the_imports_of_known_modules():
  # Guards the parser: a graph that lost its edges would show no cycle either.
  graph = import_graph()
  assert "ddpo_jax.registry" in graph["ddpo_jax.rewards.base"]
  assert "ddpo_jax.rewards.base" in graph["ddpo_jax.rewards.jpeg"]
  assert "ddpo_jax.toy.shapes" in graph["ddpo_jax.rewards.toy_alignment"]


def test_imports_resolve_to_modules_else_to_the_package_defining_the_name(tmp_path):
  modules = {name: "" for name in ["ddpo_jax", "ddpo_jax.a", "ddpo_jax.a.b", "ddpo_jax.a.c", "ddpo_jax.d"]}
  source = tmp_path / "c.py"
  source.write_text(
    "import ddpo_jax.d\n"
    "from ddpo_jax import a\n"
    "from ddpo_jax.a import NAME\n"
    "def f():\n"
    "  from . import b\n"
    "  from .. import d\n"
    "  import numpy\n"
  )
  assert imported_modules("ddpo_jax.a.c", str(source), modules) == {"ddpo_jax.d", "ddpo_jax.a", "ddpo_jax.a.b"}
  package = tmp_path / "__init__.py"
  package.write_text("from .b import NAME\nfrom . import c\n")
  assert imported_modules("ddpo_jax.a", str(package), modules) == {"ddpo_jax.a.b", "ddpo_jax.a.c"}


def test_no_import_cycles():
  graph = import_graph()
  found = cycles(graph)
  assert not found, "import cycles between ddpo_jax modules:\n" + "\n".join(
    f"  {sorted(c)}: {' -> '.join(cycle_path(graph, c))}" for c in found
  )
