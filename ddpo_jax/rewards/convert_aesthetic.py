r"""Converts the LAION aesthetic predictor's PyTorch weights to the file aesthetic.py reads.

    python -m ddpo_jax.rewards.convert_aesthetic \
      --src=sac+logos+ava1-l14-linearMSE.pth \
      --dst=ddpo_jax/data/weights/laion_aesthetic_l14.safetensors

The source is the state dict of the improved-aesthetic-predictor's MLP
(nn.Sequential: Linear layers at indices 0, 2, 4, 6, 7, Dropout between the
first four). It is read with `torch.load(weights_only=True)`, which unpickles
tensors and plain containers only, never arbitrary code. The output holds the
Flax params of `aesthetic.AestheticMLP` as safetensors, keys
"layers_{i}.kernel" [in, out] and "layers_{i}.bias" [out], float32. Needs torch
(the `torch` extra); reading the output does not.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

from ddpo_jax.rewards import aesthetic

FLAGS = flags.FLAGS


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch state dict file as float32 numpy arrays, loaded safely."""
  import torch

  state_dict = torch.load(path, weights_only=True, map_location="cpu")
  return {k: v.detach().numpy().astype(np.float32) for k, v in state_dict.items()}


def to_flax(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """PyTorch Linear weights [out, in] and biases -> flat Flax params "layers_{i}.kernel" [in, out], "layers_{i}.bias".

  Raises ValueError unless the keys and shapes are exactly the predictor's.
  """
  expected = {}
  in_features = aesthetic.EMBED_DIM
  for index, out_features in aesthetic.MLP_LAYERS:
    expected[f"layers.{index}.weight"] = (out_features, in_features)
    expected[f"layers.{index}.bias"] = (out_features,)
    in_features = out_features
  got = {k: tuple(v.shape) for k, v in state_dict.items()}
  if got != expected:
    raise ValueError(f"not the LAION aesthetic MLP's state dict: expected {expected}, got {got}")
  params = {}
  for index, _ in aesthetic.MLP_LAYERS:
    name = aesthetic.layer_name(index)
    params[f"{name}.kernel"] = np.ascontiguousarray(state_dict[f"layers.{index}.weight"].T)
    params[f"{name}.bias"] = np.ascontiguousarray(state_dict[f"layers.{index}.bias"])
  return params


def convert(src: str, dst: str) -> None:
  """Reads the PyTorch state dict `src` and writes the safetensors file `dst`."""
  from safetensors.numpy import save_file

  params = to_flax(read_state_dict(src))
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  save_file(params, dst, metadata={"source": os.path.basename(src), "format": "flax AestheticMLP params"})


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("src", None, "The PyTorch state dict, e.g. sac+logos+ava1-l14-linearMSE.pth.")
  flags.DEFINE_string("dst", aesthetic.WEIGHTS_FILE, "Where to write the safetensors file.")
  flags.mark_flags_as_required(["src"])


def main(argv):
  del argv
  convert(FLAGS.src, FLAGS.dst)
  print(f"wrote {FLAGS.dst}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
