r"""Speed benchmarks of ddpo_jax against the PyTorch reference, one subcommand each:

    python -m benchmarks SUBCOMMAND --flags

run from the root of the repository (this folder is not installed with the
package; the memory planner, a user command, is `python -m benchmarks memory`).

Subcommands:
  rollout, train, epoch
          Speed against the PyTorch reference in the same run (one JSON line
          per measurement; see benchmarks/speed.py):
              python -m benchmarks rollout --size=tiny
              python -m benchmarks train --size=mid
              python -m benchmarks epoch --size=tiny

A subcommand is a module of this package named in `SUBCOMMANDS`, which defines
its own absl flags at import (only the chosen one is imported, so their flags
never clash) and `main(argv)`. `python -m benchmarks SUBCOMMAND --help` lists
its flags. To add one, write benchmarks/NAME.py and add NAME here.
"""

# name -> (module of benchmarks, one line of help).
SUBCOMMANDS = {
  "rollout": ("rollout", "sampling throughput, FLOP/s and compile time, against the PyTorch reference"),
  "train": ("training", "training throughput (transitions/s), against the PyTorch reference"),
  "epoch": ("epoch", "an epoch's wall time against the sum of its device work, and the reference's"),
}
