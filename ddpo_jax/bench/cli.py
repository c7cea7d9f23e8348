"""A command of subcommands, each a module with its own absl flags: `python -m ddpo_jax.bench` and `python -m
benchmarks` (the speed benchmarks, outside the package) both run through `run`."""

from __future__ import annotations

import importlib
import sys

from absl import app

from ddpo_jax import config_utils


def usage(program: str, subcommands: dict[str, tuple[str, str]]) -> str:
  lines = [f"  {name:<10} {help_line}" for name, (_, help_line) in sorted(subcommands.items())]
  return f"usage: {program} SUBCOMMAND [--flags]\n\nsubcommands:\n" + "\n".join(lines) + "\n"


def run(argv: list[str], program: str, package: str, subcommands: dict[str, tuple[str, str]]) -> None:
  """Runs the subcommand named by argv[1] ([program, SUBCOMMAND, flags...]).

  Args:
    subcommands: name -> (module of `package`, one line of help); the module
      defines `define_flags()` and `main(argv)`, and only the chosen one is
      imported, so that their flags never clash.
  """
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    sys.stdout.write(usage(program, subcommands))
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in subcommands:
    sys.stderr.write(f"unknown subcommand {name!r}\n\n" + usage(program, subcommands))
    sys.exit(2)
  module = importlib.import_module(f"{package}.{subcommands[name][0]}")
  module.define_flags()
  try:
    # --config=configs/compress.py also names the installed config outside the repository, as for ddpo_jax.main.
    flags_argv = config_utils.resolve_config_argument(argv[2:])
  except ValueError as error:
    sys.exit(f"--config: {error}")
  # The subcommand sees its own flags as sys.argv[1:] (e.g. to pass them on to child processes).
  sys.argv = [f"{argv[0]} {name}"] + flags_argv
  app.run(module.main)
