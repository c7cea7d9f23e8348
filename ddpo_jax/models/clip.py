"""Loading CLIP vision towers, the image encoders of CLIP-based rewards, by name.

The tower is `clip_towers.CLIPVisionModelWithProjection`:
`module.apply({"params": params}, pixel_values)` maps CLIP-normalised pixels
[B, 3, image_size, image_size] (NCHW, as CLIPImageProcessor writes them) to
image embeddings [B, projection_dim]. `load_vision` finds its weights from a
name:

- a local folder in transformers' save_pretrained layout: config.json and
  *.safetensors (of a CLIPVisionModelWithProjection, or of a CLIPModel such as
  openai/clip-vit-large-patch14, whose text tower is skipped), or, from
  transformers' Flax classes, config.json and flax_model.msgpack (the param
  trees are the same); pickled PyTorch weights are refused with the way to
  convert them;
- a Hugging Face id: its config.json and *.safetensors only are downloaded;
- `TINY_RANDOM`: a small random tower for tests, built offline.

Neither torch nor transformers is imported.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import clip_towers
from ddpo_jax.models import diffusion
from ddpo_jax.models import pytorch_weights

Params = dict[str, Any]

# `load_vision(TINY_RANDOM)`: a randomly initialised tower small enough for CPU
# tests, with ViT-L/14's input size and embedding width (so the LAION aesthetic
# MLP fits on top).
TINY_RANDOM = "tiny-random"
TINY_SEED = 0
TINY_CONFIG = dict(
  image_size=224,
  patch_size=16,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  projection_dim=768,
)
# What a Hub id downloads: the config and the safetensors weights (sharded ones with their index).
HUB_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")
# The weights file of transformers' Flax save_pretrained.
FLAX_WEIGHTS = "flax_model.msgpack"
VISION_KEYS = ("vision_model", "visual_projection")


@functools.lru_cache(maxsize=4)
def _tiny_params(seed: int) -> Params:
  """Our module's init of `TINY_CONFIG` for `seed` (seconds on a CPU, hence the cache)."""
  module = clip_towers.CLIPVisionModelWithProjection(clip_towers.VisionConfig(**TINY_CONFIG))
  size = TINY_CONFIG["image_size"]
  return module.init(jax.random.key(seed), jnp.zeros((1, 3, size, size), jnp.float32))["params"]


def tiny_vision(
  seed: int = TINY_SEED, dtype: jnp.dtype = jnp.float32
) -> tuple[clip_towers.CLIPVisionModelWithProjection, Params]:
  """(module, float32 params) of a random `TINY_CONFIG` tower, the same for a given seed."""
  module = clip_towers.CLIPVisionModelWithProjection(clip_towers.VisionConfig(**TINY_CONFIG), dtype=dtype)
  # A fresh tree each call, so that a caller editing it leaves the cache alone.
  return module, jax.tree.map(lambda x: x, _tiny_params(seed))


def vision_params_from_flax(tree: Params, config: clip_towers.VisionConfig) -> Params:
  """The vision tower's float32 params from a restored transformers Flax checkpoint.

  tree: the param tree of flax_model.msgpack, {"vision_model", "visual_projection"}
  and, for a CLIPModel, the text tower's entries, which are dropped. Raises
  ValueError naming what is missing, unexpected or misshapen.
  """
  params = {key: tree[key] for key in VISION_KEYS if key in tree}
  expected = clip_towers.vision_param_shapes(clip_towers.CLIPVisionModelWithProjection(config))
  pytorch_weights.check_tree(params, expected, "CLIP vision tower")
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), params)


def load_flax_folder(
  folder: str, dtype: jnp.dtype = jnp.float32
) -> tuple[clip_towers.CLIPVisionModelWithProjection, Params]:
  """(module, float32 params) of a folder saved by transformers' Flax classes (config.json, flax_model.msgpack)."""
  from flax import serialization

  with open(os.path.join(folder, "config.json")) as f:
    config = clip_towers.VisionConfig.from_json(json.load(f))
  with open(os.path.join(folder, FLAX_WEIGHTS), "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  return clip_towers.CLIPVisionModelWithProjection(config, dtype=dtype), vision_params_from_flax(tree, config)


def load_folder(
  folder: str, dtype: jnp.dtype = jnp.float32
) -> tuple[clip_towers.CLIPVisionModelWithProjection, Params]:
  """(module, float32 params) of a local folder: its *.safetensors, else its flax_model.msgpack.

  Raises pytorch_weights.PickledWeightsError (naming the conversion) when the
  folder has only pickled PyTorch weights, FileNotFoundError when it has none.
  """
  try:
    pytorch_weights.safetensors_files(folder)
  except (pytorch_weights.PickledWeightsError, FileNotFoundError):
    if not os.path.exists(os.path.join(folder, FLAX_WEIGHTS)):
      raise
    return load_flax_folder(folder, dtype)
  return clip_towers.load_vision_tower(folder, dtype)


def download(repo_id: str, revision: str | None = None, patterns: tuple[str, ...] = HUB_PATTERNS) -> str:
  """The local snapshot folder of a Hub repo's files matching `patterns` (default: config.json and
  *.safetensors), downloaded once, then cached."""
  from huggingface_hub import snapshot_download

  return snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))


def local_folder(name: str, revision: str | None = None) -> str:
  """The folder that the local name `name` means (~ expanded).

  Raises ValueError when a revision is given (revisions are the Hub's) and
  FileNotFoundError when there is no such folder.
  """
  if revision:
    raise ValueError(f"revision {revision!r} applies to Hugging Face ids, not to the local folder {name!r}")
  path = os.path.expanduser(name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a folder (nor a Hugging Face id)")
  return path


def missing_hub_weights(name: str, revision: str | None, error: Exception) -> FileNotFoundError:
  """The error for a Hub repo whose snapshot lacks config.json or *.safetensors, with the ways out."""
  return FileNotFoundError(
    f"the Hub repo {name!r} (revision {revision or 'default'}) lacks config.json or *.safetensors weights, "
    f"the only files ddpo_jax downloads ({error}); pickled PyTorch weights: {pytorch_weights.CONVERT_HINT}, "
    f"then pass the folder; transformers' Flax weights: pass a folder with config.json and {FLAX_WEIGHTS}"
  )


def load_vision(
  name: str, dtype: str = "float32", revision: str | None = None
) -> tuple[clip_towers.CLIPVisionModelWithProjection, Params, int]:
  """Loads a CLIP vision tower with its projection.

  Args:
    name: a local folder (see the module docstring), a Hugging Face id such as
      "openai/clip-vit-large-patch14", or `TINY_RANDOM`.
    dtype: compute dtype of the module ("float32" or "bfloat16"); params are
      float32.
    revision: the Hub revision of a Hugging Face id; None for the default.

  Returns:
    (module, params, image_size): `module.apply({"params": params}, pixels)`
    maps CLIP-normalised pixels [B, 3, image_size, image_size] to image
    embeddings [B, projection_dim].
  """
  compute_dtype = jnp.dtype(dtype)
  if name == TINY_RANDOM:
    module, params = tiny_vision(dtype=compute_dtype)
  elif diffusion.is_local(name):
    module, params = load_folder(local_folder(name, revision), compute_dtype)
  else:
    folder = download(name, revision)
    try:
      module, params = clip_towers.load_vision_tower(folder, compute_dtype)
    except FileNotFoundError as e:
      raise missing_hub_weights(name, revision, e) from e
  return module, params, int(module.config.image_size)
