"""`python -m ddpo_jax.bench SUBCOMMAND --flags`: runs one subcommand (see ddpo_jax/bench/__init__.py)."""

import importlib
import sys

from absl import app

from ddpo_jax import config_utils
from ddpo_jax.bench import SUBCOMMANDS


def usage() -> str:
  lines = [f"  {name:<10} {help_line}" for name, (_, help_line) in sorted(SUBCOMMANDS.items())]
  return "usage: python -m ddpo_jax.bench SUBCOMMAND [--flags]\n\nsubcommands:\n" + "\n".join(lines) + "\n"


def run(argv: list[str]) -> None:
  """argv: [program, SUBCOMMAND, flags...]."""
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    sys.stdout.write(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in SUBCOMMANDS:
    sys.stderr.write(f"unknown subcommand {name!r}\n\n" + usage())
    sys.exit(2)
  module = importlib.import_module(f"ddpo_jax.bench.{SUBCOMMANDS[name][0]}")
  module.define_flags()
  try:
    # --config=configs/compress.py also names the installed config outside the repository, as for ddpo_jax.main.
    flags_argv = config_utils.resolve_config_argument(argv[2:])
  except ValueError as error:
    sys.exit(f"--config: {error}")
  # The subcommand sees its own flags as sys.argv[1:] (e.g. to pass them on to child processes).
  sys.argv = [f"{argv[0]} {name}"] + flags_argv
  app.run(module.main)


if __name__ == "__main__":
  run(sys.argv)
