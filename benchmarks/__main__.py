"""`python -m benchmarks SUBCOMMAND --flags`: runs one benchmark (see benchmarks/__init__.py)."""

import sys

from benchmarks import SUBCOMMANDS
from ddpo_jax.bench import cli

if __name__ == "__main__":
  cli.run(sys.argv, "python -m benchmarks", "benchmarks", SUBCOMMANDS)
