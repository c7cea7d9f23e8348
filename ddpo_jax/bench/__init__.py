r"""The memory planner, one subcommand:

    python -m ddpo_jax.bench SUBCOMMAND --flags

Subcommands:
  memory  Bytes per device of the params, the optimizer state, the rollout
          buffers and the compiled sampler's and training step's working
          memory, for the mesh of a target (TPU v4-8, TPU v5e-8, one 80 GB
          GPU), and whether the config fits in its HBM. Runs no model and
          downloads nothing:
              python -m ddpo_jax.bench memory --config=configs/compress.py
          With libtpu installed, --topology=v5e:2x4 (any TPU slice jax
          knows) compiles with the TPU compiler for that slice and adds
          roofline times per sampling call, optimiser step and epoch.

The speed benchmarks against the PyTorch reference (rollout, train, epoch) are
not installed with the package: they live in benchmarks/ at the top of the
repository (`python -m benchmarks rollout --size=tiny` from its root).

A subcommand is a module of this package named in `SUBCOMMANDS`, which defines
its own absl flags at import (only the chosen one is imported, so their flags
never clash) and `main(argv)`. `python -m ddpo_jax.bench SUBCOMMAND --help`
lists its flags. To add one, write ddpo_jax/bench/NAME.py and add NAME here.
"""

# name -> (module of ddpo_jax.bench, one line of help).
SUBCOMMANDS = {
  "memory": ("memory", "bytes per device and whether a config fits in a target's HBM"),
}
