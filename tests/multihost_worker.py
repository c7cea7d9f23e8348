"""One process of a multi-process run on this machine (tests/test_multihost.py).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES MODEL_DIR WORKDIR OUT.npz

Starts jax.distributed over 127.0.0.1:PORT (CPU backend, gloo collectives)
when NUM_PROCESSES > 1, runs `train.train` on the settings below and saves the
final UNet params, as this process sees them, to OUT.npz.
"""

import os
import sys

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
model_dir, workdir, out = sys.argv[5:8]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

from ddpo_jax import config_utils  # noqa: E402
from ddpo_jax import sharding  # noqa: E402
from ddpo_jax import train  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green cross", "a yellow triangle"]


def cycling_prompts(**unused_kwargs):
  """Prompts by position, ignoring the generator: the global batch is the same
  however many processes draw it (each process's share is a multiple of 4)."""
  return lambda rng, batch_size: [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]


def config():
  c = config_utils.get_config("configs/compress.py:tiny")
  c.model.name = model_dir
  c.num_epochs = 2
  c.prompt.name = "tests.multihost_worker:cycling_prompts"
  c.stat_tracking.per_prompt = True  # the statistics need every process's rewards
  c.stat_tracking.buffer_size = 16
  c.stat_tracking.min_count = 2
  c.sample.batch_size = 16
  c.sample.num_steps = 4
  c.train.batch_size = 16
  c.train.gradient_accumulation_steps = 4
  # Adam with eps >> |g| steps by ~lr * g: the params then compare gradients
  # (with the default eps each step is ~lr * sign(g), and the last-bit noise of
  # another reduction order flips the signs of tiny gradients).
  c.train.adam_eps = 1.0
  c.train.learning_rate = 0.1
  c.train.num_inner_epochs = 1  # one on-policy step per epoch, no reference pass: the test's settings
  c.train.kl_coef = 0.0
  c.train.clip_range = 1e-4
  c.mesh.data = 2
  c.mesh.fsdp = 2
  c.mesh.fsdp_min_size = 256
  c.logging.images_every_epochs = 0
  return c


def main():
  if num_processes > 1:
    sharding.initialize_distributed("on", f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and jax.device_count() == 4
  summary, state = train.train(config(), workdir)
  full = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), state.params)
  flat = {sharding.path_string(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(full)}
  np.savez(out, reward_mean=summary["reward_mean"], **flat)


if __name__ == "__main__":
  # Imported as tests.multihost_worker by the prompt registry as well: the
  # factory above must be importable from there, hence the module-level names.
  sys.modules.setdefault("tests.multihost_worker", sys.modules[__name__])
  main()
