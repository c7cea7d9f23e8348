"""PyTorch weights as NumPy, without torch: `*.safetensors` only, never unpickling; both ways.

diffusers and transformers save a module's weights as `diffusion_pytorch_model.safetensors`
or `model.safetensors` (large ones sharded, with a `*.safetensors.index.json`). This module
reads them into a flat {"down_blocks.0.resnets.0.conv1.weight": array} dict and converts
PyTorch's layouts to Flax's: a Linear's weight [out, in] is a Dense kernel [in, out], a
Conv2d's [out, in, kh, kw] a Conv kernel [kh, kw, in, out]; norms' weights are scales.
Each model's module maps its own names (`unet.py`, `vae.py`, `clip_towers.py`).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

# Suffixes of pickled PyTorch checkpoints, which are refused: loading them runs arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
  "convert it to safetensors once, where torch is installed: "
  '`python -c "import sys, torch, safetensors.torch as st; '
  'st.save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])" IN.bin OUT.safetensors` '
  "(or save_pretrained(..., safe_serialization=True))"
)


class PickledWeightsError(ValueError):
  """A folder holds only pickled PyTorch weights."""


# The weights' file names diffusers and transformers save (beside variants such as *.fp16.safetensors).
CANONICAL_NAMES = ("diffusion_pytorch_model", "model")


def safetensors_files(folder: str) -> list[str]:
  """The `*.safetensors` files of one module's folder: the canonical file, else all shards of its
  index, else the folder's only safetensors file.

  Raises PickledWeightsError when the folder has only pickled weights, FileNotFoundError
  when it has no weights at all, and ValueError when it holds only several variants
  (*.fp16.safetensors, *.non_ema.safetensors, ...) of which none is the canonical one.
  """
  for name in CANONICAL_NAMES:
    if os.path.exists(os.path.join(folder, f"{name}.safetensors")):
      return [os.path.join(folder, f"{name}.safetensors")]
  for name in CANONICAL_NAMES:
    index = os.path.join(folder, f"{name}.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(folder, shard) for shard in shards]
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if len(files) == 1:
    return files
  if files:
    names = ", ".join(os.path.basename(f) for f in files)
    raise ValueError(
      f"{folder} holds several weight files ({names}) and none named "
      f"{' or '.join(n + '.safetensors' for n in CANONICAL_NAMES)}; keep (or rename to that) the one to load."
    )
  pickled = sorted(p for p in os.listdir(folder) if p.endswith(PICKLE_SUFFIXES)) if os.path.isdir(folder) else []
  if pickled:
    raise PickledWeightsError(
      f"{folder} holds only pickled PyTorch weights ({', '.join(pickled)}), which ddpo_jax does not load "
      f"(unpickling runs arbitrary code); {CONVERT_HINT}."
    )
  raise FileNotFoundError(f"{folder} holds no *.safetensors weights")


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's safetensors files by its PyTorch name, as float32 (or integer) NumPy arrays."""
  from safetensors import safe_open

  state = {}
  for path in safetensors_files(folder):
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        array = f.get_tensor(name)
        state[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
  return state


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def pytorch_tensor(leaf: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """A Flax param's leaf name and array -> PyTorch's ("weight" or "bias", tensor): the inverse of the
  conversions above (Dense kernels transposed, Conv kernels to [out, in, kh, kw], scales and embeddings
  as weights)."""
  array = np.asarray(array, np.float32)
  if leaf == "kernel" and array.ndim == 2:
    return "weight", np.ascontiguousarray(array.T)
  if leaf == "kernel" and array.ndim == 4:
    return "weight", np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  if leaf in ("scale", "embedding"):
    return "weight", array
  return leaf, array


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """{"a": {"b": x}} -> {("a", "b"): x}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, prefix + (str(key),)))
    else:
      flat[prefix + (str(key),)] = value
  return flat


def write_state_dict(state_dict: dict[str, np.ndarray], path: str) -> None:
  """Writes {PyTorch name: array} as one safetensors file that torch, diffusers and transformers load."""
  from safetensors.numpy import save_file

  # np.ascontiguousarray makes 0-d arrays 1-d; the reshape keeps scalars (CLIP's logit_scale) scalars.
  arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state_dict.items()}
  save_file(arrays, path, metadata={"format": "pt"})


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  """{("a", "b"): x} -> {"a": {"b": x}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def check_tree(converted: Any, expected: Any, what: str) -> None:
  """Raises ValueError naming the paths whose presence or shape differs between two param trees."""
  import jax

  def shapes(tree):
    return {
      "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }

  got, want = shapes(converted), shapes(expected)
  problems = [f"missing {p} {want[p]}" for p in want if p not in got]
  problems += [f"unexpected {p} {got[p]}" for p in got if p not in want]
  problems += [f"{p}: {got[p]} instead of {want[p]}" for p in want if p in got and got[p] != want[p]]
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    raise ValueError(f"the {what} weights do not fit the architecture of its config: {shown}")
