"""`python -m ddpo_jax.main` with one fault injected, for tests/test_faults.py.

    python tests/fault_worker.py PHASE SIGNAL EPOCH INDEX -- --config=... --workdir=... [--config.x=y ...]

The fault is SIGNAL (KILL or TERM) sent to this process in PHASE of the
EPOCH-th epoch this run trains (0: its first, wherever it resumed):
  sampling    after the INDEX-th sampling call of that epoch is dispatched;
  rewards     in the INDEX-th reward call of that epoch (a reward thread);
  training    after the INDEX-th optimiser step of that epoch is dispatched;
  checkpoint  as soon as that epoch's checkpoint save has started (orbax is
              still writing it; INDEX is ignored).
INDEX 0 draws one from the epoch's calls with NumPy's generator seeded by
$FAULT_SEED. Needs config.eval.every_epochs=0 (an evaluation's reward calls
would count).
"""

import dataclasses
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


class Fault:
  """Counts a phase's calls and sends the signal at the chosen one."""

  def __init__(self, signal_name: str, epoch: int, index: int):
    self.signal = getattr(signal, "SIG" + signal_name)
    self.epoch, self.index, self.calls = epoch, index, 0

  def per_epoch(self, calls_per_epoch: int) -> None:
    if self.index == 0:
      rng = np.random.default_rng(int(os.environ.get("FAULT_SEED", "0")))
      self.index = int(rng.integers(1, calls_per_epoch + 1))
    self.target = self.epoch * calls_per_epoch + self.index

  def call(self) -> None:
    self.calls += 1
    if self.calls == self.target:
      os.kill(os.getpid(), self.signal)


def install(phase: str, fault: Fault) -> None:
  from ddpo_jax import checkpoints
  from ddpo_jax import rewards
  from ddpo_jax import steps as steps_lib

  build = steps_lib.build

  def build_with_the_fault(config, *args, **kwargs):
    run = build(config, *args, **kwargs)
    calls = {
      "sampling": config.sample.num_batches_per_epoch,
      "rewards": config.sample.num_batches_per_epoch,
      "training": run.num_updates * config.train.num_inner_epochs,
      "checkpoint": 1,
    }[phase]
    fault.per_epoch(calls)
    if phase in ("sampling", "training"):
      name = "sample" if phase == "sampling" else "optimizer_step"
      original = getattr(run, name)

      def with_fault(*a, **k):
        out = original(*a, **k)
        fault.call()
        return out

      run = dataclasses.replace(run, **{name: with_fault})
    return run

  steps_lib.build = build_with_the_fault
  if phase == "rewards":
    score_batch = rewards.score_batch

    def score_with_fault(*a, **k):
      fault.call()
      return score_batch(*a, **k)

    rewards.score_batch = score_with_fault
  if phase == "checkpoint":
    save = checkpoints.Checkpointer.save

    def save_with_fault(self, *a, **k):
      save(self, *a, **k)
      fault.call()

    checkpoints.Checkpointer.save = save_with_fault


def main() -> None:
  phase, signal_name, epoch, index, separator, *argv = sys.argv[1:]
  assert separator == "--", sys.argv
  install(phase, Fault(signal_name, int(epoch), int(index)))
  from absl import app

  from ddpo_jax import config_utils
  from ddpo_jax import main as ddpo_main

  sys.argv = config_utils.resolve_config_argument([sys.argv[0], *argv])
  app.run(ddpo_main.main)


if __name__ == "__main__":
  main()
