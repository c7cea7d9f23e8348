"""Models without weights: the modules and the params' shapes, offline.

`abstract_model(name)` builds the same modules as `models.load` (diffusers'
FlaxUNet2DConditionModel and FlaxAutoencoderKL, transformers'
FlaxCLIPTextModel) from their configs alone, and the params as a tree of
jax.ShapeDtypeStructs from `jax.eval_shape` of each module's init: nothing
is downloaded and no param memory is allocated. What needs only shapes (the
Trainer's shardings, lowering and compiling its functions, memory reports)
works on it as on a loaded model.

The configs come from:
  * a known Hugging Face id ("CompVis/stable-diffusion-v1-4"): the component
    configs of its repo, shipped in ddpo_jax/data/architectures/;
  * "toy-world" or a local folder in diffusers' layout: its unet/, vae/,
    text_encoder/, scheduler/ configs and its tokenizer;
  * a dict {"unet", "vae", "text_encoder", "scheduler", "tokenizer"} of such
    configs ("tokenizer": {"path"} of a tokenizer folder, or the fields of
    `StandInTokenizer`).

Part of the loading layer with models.py: building the modules without
weights needs the library classes themselves (models.py has no function that
does), so this module also imports diffusers and transformers, inside its
functions as models.py does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpo_jax.models import diffusion as models

ARCHITECTURES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "architectures")
# Hugging Face ids whose architecture ships here, and the file of each.
KNOWN = {"CompVis/stable-diffusion-v1-4": "sd-v1-4.json"}
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler", "tokenizer")


@dataclasses.dataclass
class _Encoding:
  input_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class StandInTokenizer:
  """The part of a CLIP tokenizer's interface that `models.tokenize` uses,
  without a vocabulary: it tokenizes the empty prompt only (the negative
  prompt of classifier-free guidance, which the Trainer tokenizes at
  construction) as CLIP does: <|startoftext|> <|endoftext|>, then padding.
  """

  model_max_length: int
  vocab_size: int
  bos_token_id: int
  eos_token_id: int
  pad_token_id: int

  def __len__(self) -> int:
    return self.vocab_size

  def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="np"):
    """Token ids int32 [B, max_length] of empty prompts; raises for any other prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if any(prompts):
      raise ValueError(
        "the stand-in tokenizer of an abstract model has no vocabulary and tokenizes only the empty prompt; "
        "load the model with models.load to tokenize text."
      )
    length = max_length or self.model_max_length
    ids = np.full((len(prompts), length), self.pad_token_id, np.int32)
    ids[:, 0] = self.bos_token_id
    if length > 1:
      ids[:, 1] = self.eos_token_id
    return _Encoding(input_ids=ids)


def known_names() -> list[str]:
  return sorted(KNOWN)


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def folder_configs(path: str) -> dict[str, Any]:
  """The component configs of a model folder in diffusers' layout."""
  path = os.path.expanduser(models.resolve_path(path))
  problem = models.check_model_folder(path)
  if problem:
    raise ValueError(f"cannot build an abstract model: {problem}.")
  return {
    "unet": _read_json(os.path.join(path, "unet", "config.json")),
    "vae": _read_json(os.path.join(path, "vae", "config.json")),
    "text_encoder": _read_json(os.path.join(path, "text_encoder", "config.json")),
    "scheduler": _read_json(os.path.join(path, "scheduler", "scheduler_config.json")),
    "tokenizer": {"path": os.path.join(path, "tokenizer")},
    "path": path,
  }


def component_configs(name: str) -> dict[str, Any]:
  """{"unet", "vae", "text_encoder", "scheduler", "tokenizer", "path"} of a
  known Hugging Face id, "toy-world" or a local folder."""
  if name in KNOWN:
    configs = _read_json(os.path.join(ARCHITECTURES_DIR, KNOWN[name]))
    return dict({c: configs[c] for c in COMPONENTS}, path=name)
  if models.is_local(name):
    return folder_configs(name)
  raise ValueError(
    f"no architecture is known for {name!r} offline; known: {known_names()}, 'toy-world', or a local folder "
    "in diffusers' layout (add its configs to ddpo_jax/data/architectures/ to know another id)."
  )


def _tokenizer(spec: dict):
  if "path" in spec:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(spec["path"])
  return StandInTokenizer(**{f.name: int(spec[f.name]) for f in dataclasses.fields(StandInTokenizer)})


def _shapes(tree) -> Any:
  """Plain nested dicts of float32 ShapeDtypeStructs, as models.load's params."""
  from flax.core import unfreeze

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), unfreeze(tree))


def build_modules(configs: dict[str, Any], dtype: str = "float32") -> models.DiffusionModel:
  """The modules of `models.load`, from component configs (no params)."""
  from diffusers import FlaxAutoencoderKL
  from diffusers import FlaxDDIMScheduler
  from diffusers import FlaxUNet2DConditionModel
  from transformers import CLIPTextConfig
  from transformers import FlaxCLIPTextModel

  compute_dtype = jnp.dtype(dtype)
  unet = FlaxUNet2DConditionModel.from_config(configs["unet"], dtype=compute_dtype)
  vae = FlaxAutoencoderKL.from_config(configs["vae"], dtype=compute_dtype)
  text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
  text_encoder = FlaxCLIPTextModel(text_config, dtype=compute_dtype, _do_init=False)
  scheduler = FlaxDDIMScheduler.from_config(configs["scheduler"])
  return models.DiffusionModel(
    unet=unet,
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=_tokenizer(configs["tokenizer"]),
    schedule=models._schedule_from_scheduler(scheduler),
    path=configs.get("path", ""),
  )


def abstract_params(model: models.DiffusionModel) -> dict[str, Any]:
  """{"unet", "vae", "text_encoder"}: float32 jax.ShapeDtypeStruct trees of
  the same paths and shapes as `models.load`'s params (jax.eval_shape of each
  module's init: nothing is computed or allocated)."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  text_shape = (1, model.max_prompt_tokens)
  return {
    "unet": _shapes(jax.eval_shape(model.unet.init_weights, key)),
    "vae": _shapes(jax.eval_shape(model.vae.init_weights, key)),
    "text_encoder": _shapes(jax.eval_shape(lambda k: model.text_encoder.init_weights(k, text_shape), key)),
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
