"""LAION aesthetic predictor: the aesthetic-quality task of DDPO.

score = MLP(e / |e|), e the CLIP ViT-L/14 image embedding (768-d, projected)
of the image after CLIP's own preprocessing. The MLP is LAION's
improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE): Linear layers
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activation between them, trained
by regression on human ratings from 1 to 10, so scores lie roughly in [1, 10].
Prompts are ignored.

The whole path, uint8 pixels to score, is one jitted function on this process's
local devices, the batch split over them. The MLP's weights ship with the
package (`WEIGHTS_FILE`, written by `convert_aesthetic` from the PyTorch file);
the CLIP tower (ddpo_jax's own Flax module, `models.clip_towers`) loads through
`ddpo_jax.models.clip`.
"""

from __future__ import annotations

import functools
import os
from typing import Any
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ddpo_jax.rewards.base import RewardFn
from ddpo_jax.rewards.base import check_images
from ddpo_jax.rewards.base import register

Params = dict[str, Any]

WEIGHTS_FILE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "weights", "laion_aesthetic_l14.safetensors"
)
CLIP_MODEL = "openai/clip-vit-large-patch14"
# CLIP's per-channel pixel statistics (RGB, pixels scaled to [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBED_DIM = 768
# (index in the PyTorch nn.Sequential, output width) of each Linear layer; the
# missing indices are Dropout layers, which act only in training.
MLP_LAYERS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))


def layer_name(index: int) -> str:
  """The Flax name of the Linear layer at `index` of the PyTorch Sequential."""
  return f"layers_{index}"


class AestheticMLP(nn.Module):
  """The predictor's head: L2-normalised embeddings [B, 768] -> scores [B]."""

  @nn.compact
  def __call__(self, embeddings: jax.Array) -> jax.Array:
    x = embeddings
    for index, features in MLP_LAYERS:
      # Full float32 matmuls: TPUs otherwise multiply float32 in bfloat16 passes.
      x = nn.Dense(features, precision=jax.lax.Precision.HIGHEST, name=layer_name(index))(x)
    return x[..., 0]


def load_mlp_params(path: str = WEIGHTS_FILE) -> Params:
  """The MLP's params {"layers_i": {"kernel", "bias"}} from a converted safetensors file."""
  from safetensors.numpy import load_file

  params: Params = {}
  for key, value in load_file(path).items():
    layer, _, leaf = key.partition(".")
    params.setdefault(layer, {})[leaf] = value
  return params


# ----------------------------------------------------------------------------
# CLIP's preprocessing (transformers' CLIPImageProcessor), in JAX.
# ----------------------------------------------------------------------------


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) with the shorter side scaled to `size`, the longer one truncated as transformers does."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


@jax.custom_jvp
def round_levels(x: jax.Array) -> jax.Array:
  """x rounded to the nearest whole level (halves up), as PIL's uint8 passes; its derivative is taken as 1.

  The rounding (a straight-through estimator) keeps the values PIL gives and
  lets gradients through, so that CLIP rewards are differentiable w.r.t. the pixels.
  """
  return jnp.floor(x + 0.5)


@round_levels.defjvp
def _round_levels_jvp(primals, tangents):
  (x,), (tangent,) = primals, tangents
  return round_levels(x), tangent


def _resample_axis(x: jax.Array, axis: int, length: int, size: int) -> jax.Array:
  """Axis `axis` of float pixels x resized bicubically to `length`, then its central `size` samples.

  Like PIL: Keys cubic (a = -0.5) with the kernel widened when shrinking
  (antialiasing), rounded to whole uint8 levels (`round_levels`).
  """
  offset = (length - size) // 2
  if length == x.shape[axis]:
    return jax.lax.slice_in_dim(x, offset, offset + size, axis=axis)
  shape = list(x.shape)
  shape[axis] = size
  scale = jnp.array([length / x.shape[axis]], jnp.float32)
  x = jax.image.scale_and_translate(x, shape, (axis,), scale, jnp.array([-offset], jnp.float32), "cubic")
  return jnp.clip(round_levels(x), 0, 255)


def clip_pixels(images: jax.Array, size: int) -> jax.Array:
  """uint8 images [B, H, W, 3] -> CLIP-normalised float32 pixel_values [B, 3, size, size] (NCHW).

  Float images (levels 0 to 255) are taken as they are, and the result is
  differentiable w.r.t. them (see `round_levels`).

  As CLIPImageProcessor: bicubic resize of the shorter side to `size`, centre
  crop to size x size, scale to [0, 1], normalise by CLIP_MEAN and CLIP_STD,
  channels first (the layout of its pixel_values, which the CLIP tower takes).
  The resize runs as PIL's does, width then height, each pass rounded to uint8
  levels (Pillow >= 13 runs the height first when it shrinks more than the
  width, i.e. for tall images scaled down, which moves some pixels by a few
  levels; square and wide images are resized in the same order).
  """
  height, width = images.shape[1:3]
  new_height, new_width = resized_shape(height, width, size)
  x = images.astype(jnp.float32)
  x = _resample_axis(x, 2, new_width, size)
  x = _resample_axis(x, 1, new_height, size)
  x = (x / 255.0 - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
  return jnp.transpose(x, (0, 3, 1, 2))


# ----------------------------------------------------------------------------
# The score and the reward.
# ----------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / |x| along the last axis (eps keeps a zero vector finite)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def aesthetic_scores(vision_module: nn.Module, image_size: int, params: Params, images: jax.Array) -> jax.Array:
  """float32 scores [B] of uint8 images [B, H, W, 3].

  `params` = {"vision": the CLIP tower's, "mlp": AestheticMLP's}; the tower
  computes in its own dtype, the normalisation and MLP in float32.
  """
  pixels = clip_pixels(images, image_size)
  embeddings = vision_module.apply({"params": params["vision"]}, pixels)
  return AestheticMLP().apply({"params": params["mlp"]}, l2_normalize(embeddings.astype(jnp.float32)))


def _padded(x: np.ndarray, pad: int) -> np.ndarray:
  """x [B, ...] with `pad` rows of zeros after it."""
  return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x


def local_sharded(
  score_fn: Callable[..., jax.Array],
  params: Params,
  devices=None,
  prompt_inputs: Callable[[list[str]], np.ndarray] | None = None,
) -> RewardFn:
  """A reward running `score_fn(params, images) -> [B]` jitted over `devices` (default: this process's).

  With `prompt_inputs` (prompts -> an array [B, ...], e.g. token ids [B, 77]
  int32, computed on the host), the jitted call is `score_fn(params, images,
  prompt_inputs(prompts))`; without, prompts are ignored. The batch (images and
  prompt inputs alike) is split over a 1-D mesh of the devices, padded with
  zeros (black images) to a multiple of their number (the padding's scores are
  dropped); params are replicated. Compiled once per image shape and batch size.
  """
  devices = jax.local_devices() if devices is None else list(devices)
  mesh = Mesh(np.asarray(devices), ("batch",))
  batch_sharding = NamedSharding(mesh, P("batch"))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  jitted = jax.jit(score_fn, out_shardings=batch_sharding)

  def reward(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    images = check_images(images)
    batch = len(images)
    inputs = [images]
    if prompt_inputs is not None:
      if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} images")
      inputs.append(np.asarray(prompt_inputs(list(prompts))))
    pad = -batch % len(devices)
    scores = jitted(params, *jax.device_put([_padded(x, pad) for x in inputs], batch_sharding))
    return np.asarray(scores, np.float32)[:batch]

  return reward


@register("aesthetic")
def aesthetic(
  clip_model: str = CLIP_MODEL,
  dtype: str = "float32",
  revision: str = "",
  weights: str = "",
) -> RewardFn:
  """Reward = LAION aesthetic score (about 1 to 10): higher is more aesthetic.

  Args:
    clip_model: the CLIP tower: a Hugging Face id (its config.json and
      *.safetensors are downloaded), a local folder in transformers' layout
      (config.json with *.safetensors or flax_model.msgpack; pickled weights
      are refused with how to convert them), or "tiny-random" (a small random
      tower, offline). The MLP was trained on ViT-L/14 embeddings; other towers
      need their own.
    dtype: compute dtype of the CLIP tower ("float32" or "bfloat16").
    revision: the Hub revision of clip_model; empty for the default.
    weights: a converted MLP file (see convert_aesthetic); empty for the
      packaged one.
  """
  from ddpo_jax.models import clip as clip_models

  vision_module, vision_params, image_size = clip_models.load_vision(clip_model, dtype, revision or None)
  pixels = jax.ShapeDtypeStruct((1, 3, image_size, image_size), jnp.float32)
  embedding = jax.eval_shape(lambda p, x: vision_module.apply({"params": p}, x), vision_params, pixels)
  if embedding.shape != (1, EMBED_DIM):
    raise ValueError(
      f"the aesthetic MLP takes {EMBED_DIM}-d CLIP ViT-L/14 embeddings; {clip_model!r} gives shape {embedding.shape}"
    )
  params = {"vision": vision_params, "mlp": load_mlp_params(weights or WEIGHTS_FILE)}
  return local_sharded(functools.partial(aesthetic_scores, vision_module, image_size), params)
