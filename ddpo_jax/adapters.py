"""What is trained: the UNet's params themselves, or LoRA adapters of them.

An adapter says which params the train state holds and how the UNet params
the policy applies are formed from them, so that the train state, the step
and the sampler need no branch on it:

  trained = adapter.init(key, unet_params)      # the state's params at step 0
  unet = adapter.unet_params(trained, base)     # what the UNet applies

`base` is the frozen pretrained UNet, a separate input of the compiled steps
(`needs_base`); full fine-tuning does not read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from ddpo_jax import lora


@dataclasses.dataclass(frozen=True)
class FullFineTuning:
  """Every UNet param is trained (the paper's setting)."""

  # The applied params are the trained ones: no frozen base is needed.
  needs_base = False

  def init(self, key: jax.Array, unet_params: Any) -> Any:
    del key
    return unet_params

  def unet_params(self, trained: Any, base: Any) -> Any:
    del base
    return trained


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters (`ddpo_jax.lora`) on the kernels whose paths match `targets`.

  Attributes:
    rank: r of each adapter pair A [in, r], B [r, out].
    alpha: the merged kernel is W + (alpha / rank) A @ B.
    targets: regexes over UNet param paths.
  """

  rank: int
  alpha: float
  targets: tuple[str, ...]
  # The adapters are merged into the frozen base UNet.
  needs_base = True

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def init(self, key: jax.Array, unet_params: Any) -> Any:
    """Adapters for the targeted kernels; `unet_params` is read for its shapes only."""
    return lora.init(key, unet_params, self.targets, self.rank)

  def unet_params(self, trained: Any, base: Any) -> Any:
    return lora.merge(base, trained, self.scale)


Adapter = FullFineTuning | LoRA


def from_config(config: ml_collections.ConfigDict) -> Adapter:
  """config.lora.rank > 0: LoRA of that rank; 0: full fine-tuning."""
  if config.lora.rank:
    return LoRA(rank=int(config.lora.rank), alpha=float(config.lora.alpha), targets=tuple(config.lora.targets))
  return FullFineTuning()
