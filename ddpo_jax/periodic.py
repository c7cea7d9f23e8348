"""When periodic actions happen: one rule for sample grids, evaluation and checkpoints.

An action with a period of N epochs (config.logging.images_every_epochs,
config.eval.every_epochs, config.checkpoint.every_epochs) is due after epoch e
(0-based) when e + 1 is a multiple of N, and after the last epoch; N = 0 turns
it off. With 12 epochs and N = 4: after epochs 3, 7 and 11.

Two additions, stated where they happen in the loop: a checkpoint is also
written after the last epoch and when the run is preempted, whatever N; the
held-out evaluation also runs once before the first epoch (epoch -1).
"""

from __future__ import annotations


def is_due(epoch: int, num_epochs: int, every_epochs: int) -> bool:
  """Whether an action of period `every_epochs` runs after epoch `epoch` of `num_epochs`."""
  if every_epochs <= 0:
    return False
  return (epoch + 1) % every_epochs == 0 or epoch == num_epochs - 1
