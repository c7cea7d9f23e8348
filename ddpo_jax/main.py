r"""Runs DDPO.

    python -m ddpo_jax.main --config=configs/compress.py:tiny --workdir=runs/compress-tiny

--config names a file of the current folder, or else the installed config of that file name, so the command above
also runs outside the repository with ddpo_jax installed.

Any setting can be overridden: --config.train.learning_rate=3e-4, and a reward's or prompt function's
keyword arguments given, new ones included: --config.prompt.kwargs.split=train. Running the
same command again with the same --workdir resumes from its latest checkpoint.
On a multi-host TPU slice every worker runs the same command.

An invalid setting, or a --workdir that another run is using, stops the command before anything loads:
the message alone on stderr, exit status 2.
A checkpoint that cannot be written (a full disk) stops the run with one message naming the cause, the
checkpoints that are intact and how to resume: exit status 1.
"""

import sys
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddpo_jax import config_utils

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file of configs/, optionally with :preset.", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Folder for the config, metrics, checkpoints, TensorBoard and images.")
flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "jax.distributed: auto starts it on multi-host TPU slices or when --coordinator_address is given.",
)
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs off Cloud TPU.")
flags.DEFINE_integer("num_processes", 0, "Processes of a multi-process run (with --coordinator_address).")
flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config"])

# --config.SECTION.kwargs.NAME=VALUE arguments naming kwargs the config lacks (config_utils.split_new_kwargs),
# added to the config in main.
NEW_KWARGS: dict = {}

# Exit status of a run stopped by SIGTERM after saving its checkpoint.
PREEMPTED_EXIT_CODE = 143
# Exit status of a run refused before it starts: an invalid setting or a workdir in use (message on stderr).
CONFIG_ERROR_EXIT_CODE = 2


def _quiet_orbax(record) -> bool:
  """Drops orbax's INFO records (dozens per checkpoint); keeps its warnings."""
  return record.levelno > logging.converter.STANDARD_INFO or "/orbax/" not in record.pathname


def quiet_logs() -> None:
  """Keeps the console to what matters: orbax's INFO records dropped, and a failed checkpoint write's hundreds
  of tracebacks at debug level (checkpoints.CheckpointWriteFailed says what happened)."""
  from ddpo_jax import checkpoints  # imports jax: after flags, before any jax use

  logging.get_absl_handler().addFilter(_quiet_orbax)
  logging.get_absl_handler().addFilter(checkpoints.shorten_failed_write_records)
  checkpoints.quiet_failed_write_noise()


def quiet_third_party_deprecations() -> None:
  """Filters the Deprecation/FutureWarnings that flax, orbax and jax raise about their own APIs
  (not about this run) from the console, once at start-up."""
  for module in ("flax", "orbax", "jax"):
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def resolve_config_argument(argv: list[str]) -> list[str]:
  """`argv` with --config's file found by `config_utils.find_config_file` (the :preset kept); ValueError if none.

  The work is config_utils', which `python -m ddpo_jax.bench` shares without importing this module's flags.
  """
  return config_utils.resolve_config_argument(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  quiet_logs()
  quiet_third_party_deprecations()
  from ddpo_jax import checkpoints
  from ddpo_jax import sharding
  from ddpo_jax import train
  from ddpo_jax import validation
  from ddpo_jax import workdir_lock

  config_utils.add_new_kwargs(FLAGS.config, NEW_KWARGS)
  sharding.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (validation.ConfigError, workdir_lock.WorkdirInUse) as error:
    # The message names the setting and the fix; a traceback would only bury it.
    print(error, file=sys.stderr)
    sys.exit(CONFIG_ERROR_EXIT_CODE)
  except checkpoints.CheckpointWriteFailed as error:
    # The cause, the intact checkpoints and how to resume are in the message; orbax's traceback is at debug level.
    logging.debug("the failed checkpoint write", exc_info=True)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  if summary.get("preempted"):
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  try:
    sys.argv = resolve_config_argument(sys.argv)
    sys.argv, NEW_KWARGS = config_utils.split_new_kwargs(sys.argv)
  except ValueError as error:
    sys.exit(f"--config: {error}")
  app.run(main)
