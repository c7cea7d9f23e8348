"""Models without weights: the modules and the params' shapes, offline.

`abstract_model(name)` builds the same modules as `models.load` (our UNet,
AutoencoderKL and CLIP text encoder) from their configs alone, and the params
as a tree of jax.ShapeDtypeStructs from `jax.eval_shape` of each module's
init: nothing is downloaded and no param memory is allocated. What needs only
shapes (shardings, lowering and compiling the steps, memory reports) works on
it as on a loaded model.

The configs come from:
  * a known Hugging Face id ("CompVis/stable-diffusion-v1-4"): the component
    configs of its repo, shipped in ddpo_jax/data/architectures/;
  * "toy-world" or a local folder in diffusers' layout: its unet/, vae/,
    text_encoder/, scheduler/ configs and its tokenizer;
  * a dict {"unet", "vae", "text_encoder", "scheduler", "tokenizer"} of such
    configs ("tokenizer": {"path"} of a tokenizer folder, or the fields of
    `StandInTokenizer`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from ddpo_jax.models import clip_towers
from ddpo_jax.models import diffusion as models
from ddpo_jax.models import unet as unet_lib
from ddpo_jax.models import vae as vae_lib

StandInTokenizer = models.StandInTokenizer

ARCHITECTURES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "architectures")
# Hugging Face ids whose architecture ships here, and the file of each.
KNOWN = {"CompVis/stable-diffusion-v1-4": "sd-v1-4.json"}
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler", "tokenizer")


def known_names() -> list[str]:
  return sorted(KNOWN)


def folder_configs(path: str) -> dict[str, Any]:
  """The component configs of a model folder in diffusers' layout."""
  path = os.path.expanduser(models.resolve_path(path))
  problem = models.check_model_folder(path)
  if problem:
    raise ValueError(f"cannot build an abstract model: {problem}.")
  return models.folder_configs(path)


def component_configs(name: str) -> dict[str, Any]:
  """{"unet", "vae", "text_encoder", "scheduler", "tokenizer", "path"} of a
  known Hugging Face id, "toy-world" or a local folder."""
  if name in KNOWN:
    configs = models._read_json(os.path.join(ARCHITECTURES_DIR, KNOWN[name]))
    return dict({c: configs[c] for c in COMPONENTS}, path=name)
  if models.is_local(name):
    return folder_configs(name)
  raise ValueError(
    f"no architecture is known for {name!r} offline; known: {known_names()}, 'toy-world', or a local folder "
    "in diffusers' layout (add its configs to ddpo_jax/data/architectures/ to know another id)."
  )


def build_modules(configs: dict[str, Any], dtype: str = "float32") -> models.DiffusionModel:
  """The modules of `models.load`, from component configs (no params)."""
  return models.build_modules(configs, dtype)


def abstract_params(model: models.DiffusionModel) -> dict[str, Any]:
  """{"unet", "vae", "text_encoder"}: float32 jax.ShapeDtypeStruct trees of
  the same paths and shapes as `models.load`'s params (jax.eval_shape of each
  module's init: nothing is computed or allocated)."""
  return {
    "unet": unet_lib.param_shapes(model.unet, unet_lib.example_inputs(model.unet.config)),
    "vae": unet_lib.param_shapes(model.vae, vae_lib.example_inputs(model.vae.config)),
    "text_encoder": clip_towers.text_param_shapes(model.text_encoder),
  }


def abstract_model(name_or_config: str | dict, dtype: str = "float32") -> tuple[models.DiffusionModel, dict]:
  """A model without weights: (DiffusionModel, params of jax.ShapeDtypeStructs).

  Args:
    name_or_config: a known Hugging Face id, "toy-world", a local folder, or a
      dict of component configs (see the module docstring).
    dtype: compute dtype of the modules, as `models.load`'s.
  """
  configs = component_configs(name_or_config) if isinstance(name_or_config, str) else name_or_config
  model = build_modules(configs, dtype)
  return model, abstract_params(model)


def num_params(tree) -> int:
  """Elements of a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


def num_bytes(tree) -> int:
  """Bytes of a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
