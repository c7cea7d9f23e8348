r"""Runs DDPO.

    python -m ddpo_jax.main --config=configs/compress.py:tiny --workdir=runs/compress-tiny

Any setting can be overridden: --config.train.learning_rate=3e-4.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddpo_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file of configs/, optionally with :preset.", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Folder for the config, metrics, TensorBoard events and images.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
