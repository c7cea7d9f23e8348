"""Low-rank adapters (LoRA) on the UNet's kernels, at the level of params.

The trained tree mirrors the UNet's params, holding at each adapted kernel W
[in, out] a pair {"lora_a": A [in, r], "lora_b": B [r, out]} and nothing
else. `merge` forms the effective kernel W + (alpha / r) A @ B inside the
jitted functions, right before the UNet is applied, so the UNet module is
unchanged and the base params stay a frozen input: with B = 0 (the
initialisation) the merged params are the base params exactly, and switching
the adapters off is just applying the base params (the KL reference).

Targets are regexes searched in param paths such as
"down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"; only
2-D kernels (Dense layers) can be adapted.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models"
(ICLR 2022); the initialisation is diffusers' LoRALinearLayer's (A ~ N(0, 1/r²),
B = 0), as the PyTorch port of DDPO trains it.
"""

from __future__ import annotations

import re
from typing import Any
from typing import Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

# diffusers' Flax attention modules: query, key, value and output projections
# of the self- (attn1) and cross-attention (attn2) of every transformer block.
DEFAULT_TARGETS = (r"attn\d+/to_(q|k|v|out_0)/kernel$",)
A, B = "lora_a", "lora_b"


def path_of(key: tuple[str, ...]) -> str:
  return "/".join(str(k) for k in key)


def target_keys(unet_params: Any, patterns: Sequence[str]) -> list[tuple[str, ...]]:
  """Flat keys of the 2-D kernels whose path some regex of `patterns` matches.

  Raises ValueError when nothing matches or a matched leaf is not 2-D.
  """
  compiled = [re.compile(p) for p in patterns]
  keys = []
  for key, leaf in traverse_util.flatten_dict(unet_params).items():
    path = path_of(key)
    if not any(p.search(path) for p in compiled):
      continue
    if len(np.shape(leaf)) != 2:
      raise ValueError(
        f"config.lora.targets={tuple(patterns)} matches {path} of shape {np.shape(leaf)}; LoRA adapts 2-D "
        "(Dense) kernels only: make the regexes end in e.g. 'to_q/kernel$'."
      )
    keys.append(key)
  if not keys:
    raise ValueError(
      f"config.lora.targets={tuple(patterns)} matches no param of the UNet; paths look like "
      "'down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel'."
    )
  return keys


def init(key: jax.Array, unet_params: Any, patterns: Sequence[str], rank: int) -> dict:
  """Adapters of rank `rank` for the targeted kernels: A ~ N(0, 1/rank²), B = 0.

  Args:
    unet_params: the base UNet params (arrays or ShapeDtypeStructs: only shapes are read).

  Returns:
    The nested adapter tree: {..., "to_q": {"kernel": {"lora_a": [in, r], "lora_b": [r, out]}}}.
  """
  flat = traverse_util.flatten_dict(unet_params)
  adapters = {}
  for i, k in enumerate(target_keys(unet_params, patterns)):
    fan_in, fan_out = np.shape(flat[k])
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32) / rank
    adapters[k + (A,)] = a
    adapters[k + (B,)] = jnp.zeros((rank, fan_out), jnp.float32)
  return traverse_util.unflatten_dict(adapters)


def merge(base: Any, adapters: Any, scale: float) -> Any:
  """The UNet params with each adapted kernel W replaced by W + scale · A @ B.

  Works on jax and NumPy arrays alike (inside jit: the merged kernels are
  formed on the fly and differentiate into the adapters).

  Args:
    base: the base UNet params (nested dicts).
    adapters: `init`'s tree (or a trained one).
    scale: alpha / rank.
  """
  flat = traverse_util.flatten_dict(base)
  flat_adapters = traverse_util.flatten_dict(adapters)
  for k in sorted({k[:-1] for k in flat_adapters}):  # sorted: the same program in every process
    if k not in flat:
      raise ValueError(f"adapter {path_of(k)} has no kernel in the base params")
    kernel = flat[k]
    delta = flat_adapters[k + (A,)] @ flat_adapters[k + (B,)]
    flat[k] = kernel + (scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def num_params(tree: Any) -> int:
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))
