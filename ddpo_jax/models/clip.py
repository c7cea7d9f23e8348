"""Loading and building CLIP vision towers: the image encoders of CLIP-based rewards.

With models.py, the only module of ddpo_jax that imports transformers; rewards
import it lazily, inside their factories. The rest sees a Flax module
`module.apply({"params": params}, pixels) -> image embeddings [B, D]` and its
params.

transformers has no Flax counterpart of CLIPVisionModelWithProjection (it has
FlaxCLIPVisionModel, unprojected, and FlaxCLIPModel, both towers), so
`FlaxCLIPVisionModelWithProjection` below is the vision half of FlaxCLIPModel:
the vision transformer and `visual_projection`, with the same param names. It
loads a CLIPModel checkpoint such as "openai/clip-vit-large-patch14" (its text
tower is skipped) and saves and loads back in transformers' save_pretrained
layout, a local folder going through the same code path as a Hub id.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPConfig
from transformers import CLIPVisionConfig
from transformers import PretrainedConfig
from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionPreTrainedModel
from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer

Params = dict[str, Any]

# `load_vision(TINY_RANDOM)` builds `build_tiny_vision()`: a randomly initialised
# tower small enough for CPU tests, with the ViT-L/14 input size and embedding
# width (so the LAION aesthetic MLP fits on top).
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


class VisionWithProjectionModule(nn.Module):
  """CLIP's image encoder: vision transformer, then the linear projection."""

  config: CLIPVisionConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.vision_model = FlaxCLIPVisionTransformer(self.config, dtype=self.dtype)
    self.visual_projection = nn.Dense(
      self.config.projection_dim,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=jax.nn.initializers.normal(0.02),
    )

  def __call__(self, pixel_values, deterministic: bool = True, *unused_args, **unused_kwargs):
    """Image embeddings [B, projection_dim] (not normalised) of pixels [B, H, W, 3].

    The pixels are CLIP-normalised (mean/std per channel) at the config's
    image_size. The extra arguments of transformers' calling convention
    (output_attentions, ...) are accepted and ignored.
    """
    del unused_args, unused_kwargs
    outputs = self.vision_model(pixel_values=pixel_values, deterministic=deterministic, return_dict=True)
    return self.visual_projection(outputs.pooler_output)


class FlaxCLIPVisionModelWithProjection(FlaxCLIPVisionPreTrainedModel):
  """transformers' wrapper (from_pretrained, save_pretrained) around the module above."""

  module_class = VisionWithProjectionModule


def vision_config(name: str, revision: str | None = None) -> CLIPVisionConfig:
  """The vision config of a CLIPVisionConfig or CLIPConfig checkpoint.

  A two-tower CLIPModel config keeps projection_dim at its top level, and its
  vision_config may not repeat it (CLIPVisionConfig's default is 512).
  """
  config_dict, _ = PretrainedConfig.get_config_dict(name, revision=revision)
  if config_dict.get("model_type") == "clip":
    config = CLIPConfig.from_dict(config_dict)
    vision = config.vision_config
    vision.projection_dim = config.projection_dim
    return vision
  return CLIPVisionConfig.from_dict(config_dict)


@functools.lru_cache(maxsize=4)
def build_tiny_vision(seed: int = TINY_SEED, dtype: str = "float32") -> FlaxCLIPVisionModelWithProjection:
  """A randomly initialised tower of `TINY_CONFIG` (params in `.params`), the same for a given seed.

  Cached (initialising takes seconds on a CPU): one object per (seed, dtype).
  """
  return FlaxCLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CONFIG), seed=seed, dtype=jnp.dtype(dtype))


def load_vision(
  name: str,
  dtype: str = "float32",
  revision: str | None = None,
  from_pt: bool = False,
) -> tuple[nn.Module, Params, int]:
  """Loads a CLIP vision tower with its projection.

  Args:
    name: a Hugging Face id such as "openai/clip-vit-large-patch14", a local
      folder in transformers' save_pretrained layout (of a CLIPModel or of
      `FlaxCLIPVisionModelWithProjection`), or `TINY_RANDOM`.
    dtype: compute dtype of the module ("float32" or "bfloat16"); params are
      float32.
    revision: the Hub revision; None for the default.
    from_pt: convert PyTorch weights (needs torch installed).

  Returns:
    (module, params, image_size): `module.apply({"params": params}, pixels)`
    maps CLIP-normalised pixels [B, image_size, image_size, 3] to image
    embeddings [B, projection_dim].
  """
  if name == TINY_RANDOM:
    model = build_tiny_vision(dtype=dtype)
    params = model.params
  else:
    path = os.path.expanduser(name)
    config = vision_config(path, revision)
    # Without random init the params come back beside the model; transformers'
    # PyTorch conversion needs the initialised params, though.
    loaded = FlaxCLIPVisionModelWithProjection.from_pretrained(
      path, config=config, revision=revision, from_pt=from_pt, dtype=jnp.dtype(dtype), _do_init=from_pt
    )
    model, params = (loaded, loaded.params) if from_pt else loaded
  params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), _unfreeze(params))
  return model.module, params, int(model.config.image_size)


def _unfreeze(tree):
  from flax.core import unfreeze

  return unfreeze(tree)
