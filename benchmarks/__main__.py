"""`python -m benchmarks SUBCOMMAND --flags`: runs one benchmark (see benchmarks/__init__.py)."""

import importlib
import sys

from absl import app

from benchmarks import SUBCOMMANDS


def usage() -> str:
  lines = [f"  {name:<10} {help_line}" for name, (_, help_line) in sorted(SUBCOMMANDS.items())]
  return "usage: python -m benchmarks SUBCOMMAND [--flags]\n\nsubcommands:\n" + "\n".join(lines) + "\n"


def run(argv: list[str]) -> None:
  """argv: [program, SUBCOMMAND, flags...]."""
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    sys.stdout.write(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in SUBCOMMANDS:
    sys.stderr.write(f"unknown subcommand {name!r}\n\n" + usage())
    sys.exit(2)
  module = importlib.import_module(f"benchmarks.{SUBCOMMANDS[name][0]}")
  module.define_flags()
  # The subcommand sees its own flags as sys.argv[1:] (e.g. to pass them on to child processes).
  sys.argv = [f"{argv[0]} {name}"] + argv[2:]
  app.run(module.main)


if __name__ == "__main__":
  run(sys.argv)
