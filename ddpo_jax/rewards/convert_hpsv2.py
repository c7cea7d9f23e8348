r"""Converts an HPSv2 checkpoint (an OpenCLIP ViT-H-14) to the CLIPModel folder the `hpsv2` reward reads.

    huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir=weights
    python -m ddpo_jax.rewards.convert_hpsv2 --allow_pickle \
      --src=weights/HPS_v2.1_compressed.pt --dst=weights/hpsv2.1

HPSv2.1 (Wu et al., 2023, github.com/tgxs002/HPSv2) is published only as a
PyTorch pickle, {"state_dict": OpenCLIP's names}, at xswu/HPSv2 on the Hugging
Face Hub (HPS_v2.1_compressed.pt; HPS_v2_compressed.pt is v2.0). Pickles are
read only when --allow_pickle is given, and then with
`torch.load(weights_only=True)`, which rebuilds tensors and plain containers
and refuses anything else, so the file's code never runs; a safetensors file
with OpenCLIP's names is read without torch. The output, a folder in
transformers' CLIPModel layout (config.json, model.safetensors, float32), is
what the reward reads at run time, with NumPy only; transformers' CLIPModel
loads it too. Needs torch for a pickle (`pip install torch==2.13.0`).
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import app
from absl import flags
import numpy as np

from ddpo_jax.models import open_clip
from ddpo_jax.models import pytorch_weights

FLAGS = flags.FLAGS

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_checkpoint(src: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """OpenCLIP's state dict in `src` as NumPy arrays, without "state_dict" wrapping or a "module." prefix.

  src: a .safetensors file, or (with allow_pickle) a PyTorch pickle holding the
  state dict or {"state_dict": state dict, ...}. Raises ValueError for a pickle
  without allow_pickle, before reading it.
  """
  if src.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return open_clip.strip_prefix(load_file(src))
  if not allow_pickle:
    raise ValueError(
      f"{src} is a PyTorch pickle (or not a .safetensors file): it is read only when asked, with --allow_pickle "
      f"(then by torch.load(weights_only=True), which loads tensors only and runs none of the file's code)"
    )
  import torch

  checkpoint = torch.load(src, map_location="cpu", weights_only=True)
  state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
  if not isinstance(state_dict, dict):
    raise ValueError(f"{src} holds a {type(checkpoint).__name__}, not a state dict or {{'state_dict': ...}}")
  arrays = {key: value.detach().float().numpy() for key, value in state_dict.items() if torch.is_tensor(value)}
  return open_clip.strip_prefix(arrays)


def convert(src: str, dst: str, architecture: str = "ViT-H-14", allow_pickle: bool = False) -> None:
  """Writes `dst`/config.json and `dst`/model.safetensors from the OpenCLIP checkpoint `src`.

  The folder is written beside its final place and renamed into it, so a
  failure leaves no half-written folder; an existing `dst` is refused.
  """
  if architecture not in open_clip.ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not one of {sorted(open_clip.ARCHITECTURES)}")
  if os.path.exists(dst):
    raise ValueError(f"{dst} exists: give a new --dst (nothing is overwritten)")
  state_dict = open_clip.to_transformers(read_checkpoint(src, allow_pickle))
  config = open_clip.transformers_config(state_dict, open_clip.ARCHITECTURES[architecture])
  parent = os.path.dirname(os.path.abspath(dst))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".convert_hpsv2.", dir=parent)
  pytorch_weights.write_state_dict(state_dict, os.path.join(staging, "model.safetensors"))
  with open(os.path.join(staging, "config.json"), "w") as f:
    json.dump(dict(config, converted_from=os.path.basename(src), open_clip_architecture=architecture), f, indent=2)
  os.replace(staging, dst)


def define_flags():
  """Command-line flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string("src", None, "The checkpoint: HPS_v2.1_compressed.pt, or a .safetensors of OpenCLIP's names.")
  flags.DEFINE_string("dst", None, "The folder to write (config.json, model.safetensors); must not exist.")
  flags.DEFINE_string("architecture", "ViT-H-14", f"The OpenCLIP model, of {sorted(open_clip.ARCHITECTURES)}.")
  flags.DEFINE_bool("allow_pickle", False, "Read a PyTorch pickle (with torch.load(weights_only=True)).")
  flags.mark_flags_as_required(["src", "dst"])


def main(argv):
  del argv
  convert(FLAGS.src, FLAGS.dst, FLAGS.architecture, FLAGS.allow_pickle)
  print(f"wrote {FLAGS.dst}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
