"""`python -m ddpo_jax.bench SUBCOMMAND --flags`: runs one subcommand (see ddpo_jax/bench/__init__.py)."""

import sys

from ddpo_jax.bench import SUBCOMMANDS
from ddpo_jax.bench import cli

if __name__ == "__main__":
  cli.run(sys.argv, "python -m ddpo_jax.bench", "ddpo_jax.bench", SUBCOMMANDS)
